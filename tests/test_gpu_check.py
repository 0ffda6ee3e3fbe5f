"""benchmarks/gpu_check.py on the CPU: the driver, its time limits and its reports.

The GPU numbers themselves come from running it on a CUDA machine (BENCHMARKS.md); here the
parts that need no GPU run at smoke sizes, and the pieces that decide what the report says
(test counts from pytest's JUnit XML, a part stopped at its time limit) are checked on
inputs whose answers are known.
"""
import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def _module():
    return load_script("benchmarks/gpu_check.py")


def test_smoke_run_writes_both_reports(tmp_path):
    out = tmp_path / "gc"  # given relative to the working folder: the parts run elsewhere
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--output",
                           "gc", "--device", "cpu", "--quick", "--parts",
                           "graphs,likelihood,samplers,train", "--rtol", "1e-2", "--atol", "1e-2"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["parts"]) == {"graphs", "likelihood", "samplers", "train"}
    assert all(p["ok"] for p in summary["parts"].values()), summary["parts"]
    assert summary["meta"]["device"] == "cpu" and summary["meta"]["seconds"] > 0
    graphs = summary["parts"]["graphs"]["likelihood"]
    assert {r["step_control"] for r in graphs} == {"batch", "per_sample"}
    for r in graphs:  # on the CPU nothing is recorded: the "graphed" solve is the eager one
        assert r["nfe_graphed"] == r["nfe_eager"] and r["max_dbpd_graphed"] == 0.0
        assert r["cuda_graph"]["replays"] == 0 and r["replayed"] is False
    lik = summary["parts"]["likelihood"]["rows"]
    assert not any("CUDA graph" in r["run"] for r in lik)  # no graph rows without CUDA
    (train,) = summary["parts"]["train"]["rows"]
    assert train["mode"] == "fp32" and train["profile"]["steps"] == 1
    assert (out / "trace_ddpmpp_tiny_fp32.json.gz").exists()
    text = (out / "summary.md").read_text()
    assert text.strip() == proc.stdout.strip()
    for heading in ("# GPU check", "Likelihood solves, CUDA graph against eager",
                    "Likelihood evaluation cost", "Sampling calls", "Training, batch 8",
                    "Training step profiles: self CPU time", "Costliest kernels: ddpmpp_tiny"):
        assert heading in text


def test_gpu_tests_all_skipped_pass_the_cpu_smoke_run_only(tmp_path, monkeypatch):
    # Without CUDA every gpu test skips: the CPU smoke run's tests part is then fine, while on
    # a GPU machine a run that passed nothing means CUDA was not seen.
    module = _module()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    args = argparse.Namespace(device="cpu", test_workers=1, part_limit=600)
    result = module.part_tests(args, tmp_path)
    assert result["counts"]["passed"] == 0 and result["counts"]["skipped"] > 0
    assert result["ok"], result
    kept = module.junit_results(tmp_path / "gpu_tests.xml")  # the same results on "cuda"
    monkeypatch.setattr(module, "_run_logged", lambda cmd, log, limit: (0, None))
    monkeypatch.setattr(module, "junit_results", lambda xml: kept)
    assert not module.part_tests(argparse.Namespace(device="cuda", test_workers=1,
                                                    part_limit=600), tmp_path)["ok"]


@pytest.mark.parametrize("workers", [None, 2])
def test_test_counts_come_from_the_log_when_the_run_was_cut_off(tmp_path, workers):
    # pytest writes its JUnit file only at the end: a tests part stopped at its limit counts
    # the result lines of -v instead (plain and xdist forms). Ids and assertion texts that
    # hold "PASSED" or a test id must not count.
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_log.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("x", ["a b PASSED", "c"])
        def test_passes(x):
            pass

        def test_fails():
            assert "tests/x.py::y PASSED" == "ERROR"

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        @pytest.mark.xfail
        def test_xfails():
            assert False

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_errors(broken):
            pass
    """))
    if workers and not _module()._has("xdist"):
        pytest.skip("pytest-xdist is not installed")
    log = tmp_path / "gpu_tests.log"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests"]
                       + (["-n", str(workers)] if workers else []), cwd=tmp_path, stdout=f,
                       stderr=subprocess.STDOUT, timeout=300)
    counts, failures = _module().log_results(log)
    assert counts == dict(passed=2, failed=1, errors=1, skipped=2)  # xfail counts as skipped
    assert sorted(f["test"] for f in failures) == ["tests/test_log.py::test_errors",
                                                   "tests/test_log.py::test_fails"]
    assert _module().log_results(tmp_path / "missing.log")[0]["passed"] == 0


def test_test_counts_come_from_the_junit_file(tmp_path):
    (tmp_path / "test_four.py").write_text(textwrap.dedent("""
        import pytest

        def test_passes():
            assert True

        def test_fails():
            assert 1 == 2, "one is not two"

        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_errors(broken):
            pass
    """))
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    str(tmp_path / "test_four.py"), f"--junitxml={xml}"], cwd=tmp_path,
                   capture_output=True, timeout=300)
    counts, failures, timings = _module().junit_results(xml)
    assert counts == dict(passed=1, failed=1, errors=1, skipped=1)
    messages = {f["test"].split("::")[-1]: f["message"] for f in failures}
    assert set(messages) == {"test_fails", "test_errors"}
    assert "one is not two" in messages["test_fails"]
    assert len(timings) == 4


def test_a_part_past_its_limit_is_stopped_with_its_children(tmp_path):
    gc = _module()
    # A stand-in for a hung part: a child that sleeps, started the way the driver starts parts.
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; "
                             "time.sleep(60)']); time.sleep(60)"], start_new_session=True)
    # What it printed before the stop (it saved no part_*.json) is kept.
    (tmp_path / "part_samplers.log").write_text('{"sampler": "pc", "batch": 16}\nnot json\n')
    started = time.perf_counter()
    result = gc._finish("samplers", proc, 2.0, started, tmp_path)
    assert time.perf_counter() - started < 20
    assert result["ok"] is False and "time limit of 2 s" in result["error"]
    assert result["rows"] == [{"sampler": "pc", "batch": 16}]
    assert proc.poll() is not None
    assert "| pc | 16 | - | - | - | - |" in gc.render(dict(meta=dict(
        date="d", gpu=None, device="cpu", torch="t", cuda=None, python="p", command="c",
        seconds=1.0), parts={"samplers": result}))


@pytest.mark.parametrize("args, message", [
    (["--parts", "tests,speed"], "unknown part 'speed'"),
    (["--budget", "0"], "--budget must be a finite number > 0"),
    (["--budget", "nan"], "--budget must be a finite number > 0, got nan"),
    (["--device", "cuda"], "--device cuda but CUDA is not available"),
    (["--device", "mps"], "--device must be cuda, cuda:N or cpu, got 'mps'"),
    (["--output", "{tmp}/file"], "is a file; give a folder"),
    (["--output", "{tmp}/file/gc"], "file, which is a file, not a folder"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    (tmp_path / "file").write_text("x")
    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--output",
                           str(tmp_path / "o"), *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
