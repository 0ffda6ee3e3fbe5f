"""One prepared device check: the GPU tests and the key GPU numbers, in one time-boxed command.

    python benchmarks/gpu_check.py --output gpu_check          # on a CUDA machine
    python benchmarks/gpu_check.py --output /tmp/gc --device cpu --quick   # smoke run

Runs each part below in its own process with its own time limit, so one hang or crash costs
only that part, and writes DIR/summary.md (a short report) and DIR/summary.json (every number,
the device, versions and commands), plus each part's own files. Parts:

- tests: every test marked `gpu` (`pytest -m gpu tests`, spread over processes with
  pytest-xdist when it is installed); counts, failures and the slowest tests.
- graphs: CUDA graphs against eager calls on the same inputs: likelihood solves of a small
  U-Net and of DDPM++ cont. (random weights) with batch and per-sample step control (NFE, the
  largest bits/dim difference, replays; an eager repeat shows how much eager calls differ from
  each other), and host synchronisations per sampler call and per training step.
- likelihood: ms per evaluation of the likelihood's right-hand side (one forward and one
  vector-Jacobian product) of DDPM++ cont. at batch 64 and 256 in strict fp32, TF32 and TF32
  replayed from a CUDA graph, and the paper code's way at batch 64 (benchmarks/bench.py).
- samplers: seconds per DPM-Solver (20 evaluations) and PC sampling call of DDPM++ cont. at
  two batch sizes, eager and with the network replayed from a CUDA graph.
- train: training images/s, ms/step, peak memory and warm-up of DDPM++ cont. at batch 128 in
  TF32 and in bf16 + channels-last + torch.compile, then a profile of 5 more steps of each:
  kernel time per step by category and the costliest kernels, with Chrome traces
  (benchmarks/train_speed.py --profile_steps).

The tests and graphs parts run side by side (neither is timed); the timed parts run alone
after them, training first. The whole command stays within --budget seconds (default 480):
a part gets its own limit or what is left of the budget, whichever is less. summary.json is
rewritten after every part, so a command cut short keeps what finished.
Exit status: 0 when every part finished and every test passed, 1 otherwise.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PARTS = ("tests", "graphs", "likelihood", "samplers", "train")
TIMED_ORDER = ("train", "likelihood", "samplers")  # run one at a time, after tests and graphs
# Time limits per part in seconds: (full run on CUDA, --quick); the budget trims them further.
LIMITS = {"tests": (210, 600), "graphs": (150, 300), "likelihood": (75, 120),
          "samplers": (45, 120), "train": (200, 300)}


# --- the parts, each run in a child process ------------------------------------------------------

def part_tests(args, out: Path) -> Dict:
    xml = out / "gpu_tests.xml"
    # -v: a line per finished test, so a part stopped at its limit (pytest writes the JUnit
    # file only at the end) still reports what passed and failed; faulthandler dumps the
    # stacks of a test that hangs.
    cmd = [sys.executable, "-m", "pytest", "-v", "-m", "gpu", "tests", "-p", "no:cacheprovider",
           f"--junitxml={xml}", "-rfE", "--durations=10", "-o",
           f"faulthandler_timeout={int(max(30, args.part_limit / 3))}"]
    if args.device != "cpu" and _has("xdist"):
        cmd += ["-n", str(args.test_workers)]
    if _has("pytest_timeout"):  # a hung test fails alone instead of stopping the part
        cmd += [f"--timeout={int(max(60, args.part_limit - 25))}"]
    code, error = _run_logged(cmd, out / "gpu_tests.log", args.part_limit)
    counts, failures, slowest = junit_results(xml) if xml.exists() else (
        *log_results(out / "gpu_tests.log"), [])
    # On a GPU a run that passed nothing (all skipped: CUDA not seen) is a failure; on the CPU
    # smoke run every GPU test skips, and that is its success.
    ran = counts["passed"] > 0 or (args.device == "cpu" and counts["failed"] == 0
                                   and counts["errors"] == 0)
    result = dict(command=" ".join(cmd[1:]), returncode=code, counts=counts,
                  failures=failures, slowest=slowest[:8], ok=code == 0 and ran)
    if error:
        result["error"] = error
    return result


def _run_logged(cmd: List[str], log: Path, limit: float):
    """Runs cmd with its output in `log`, stopped (with its children) after `limit` seconds.
    Returns (exit status or None, error line or None)."""
    import signal
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(REPO),
                                         PYTHONUNBUFFERED="1"), start_new_session=True)
        try:
            return proc.wait(timeout=limit), None
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"stopped at its time limit of {limit:.0f} s"


def _json_lines(log: Path) -> List[Dict]:
    """The JSON objects a benchmark printed one per line (what it finished before a stop)."""
    rows = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def junit_results(path: Path):
    """(counts {passed, failed, errors, skipped}, failures [{test, message}], tests sorted by
    time [{test, seconds}]) from a pytest --junitxml file."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures: List[Dict] = []
    timings: List[Dict] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        timings.append(dict(test=name, seconds=float(case.get("time", 0.0))))
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append(dict(test=name, message=message[0][:400] if message else ""))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    timings.sort(key=lambda r: -r["seconds"])
    return counts, failures, timings


_OUTCOMES = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
# The result lines of `pytest -v`: "tests/f.py::test_x[id] PASSED [ 10%]" without xdist,
# "[gw0] [ 10%] PASSED tests/f.py::test_x[id]" with it (test ids may hold spaces).
_PLAIN_RESULT = re.compile(rf"^(?P<test>tests/\S.*) (?P<outcome>{_OUTCOMES})(?: \(.*\))?"
                           rf"\s*\[\s*\d+%\]\s*$")
_XDIST_RESULT = re.compile(rf"^\[gw\d+\] \[\s*\d+%\] (?P<outcome>{_OUTCOMES}) "
                           rf"(?P<test>tests/.*?)\s*$")


def log_results(log: Path):
    """(counts, failures) from the per-test result lines of `pytest -v` (with or without
    xdist), for a run stopped before it wrote its JUnit file; the report sections at the end
    (tracebacks, the short summary) are not read."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures: List[Dict] = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("=") and re.search(r"\b(FAILURES|ERRORS|short test summary)\b",
                                              line):
            break
        match = _PLAIN_RESULT.match(line) or _XDIST_RESULT.match(line)
        if not match:
            continue
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors",
               "SKIPPED": "skipped", "XFAIL": "skipped"}[match.group("outcome")]
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append(dict(test=match.group("test"), message="(from the log: the run "
                                                                   "was stopped before its "
                                                                   "report)"))
    return counts, failures


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def _random_model(name: str, device, seed: int = 0):
    """(sde, score_fn, shape) of a freshly initialised model whose all-zero weights are redrawn
    (bench.random_ddpmpp); `name` is a train_speed model name."""
    import bench
    import train_speed
    return bench.random_ddpmpp(train_speed.CONFIGS[name], train_speed.MODEL_KWARGS.get(name, {}),
                               device, seed)


def _small_unet(device):
    import torch
    from score_sde import VPSDE, make_score_fn
    from score_sde.models import SmallUNet
    torch.manual_seed(0)
    net = SmallUNet(image_size=8, in_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), dropout=0.0)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    net = net.to(device).eval().requires_grad_(False)
    sde = VPSDE()
    return sde, make_score_fn(net, sde, prediction="noise", time_input="t"), (1, 8, 8)


def part_graphs(args, out: Path) -> Dict:
    """Replayed against eager likelihood solves, and host synchronisations per call."""
    import torch
    from score_sde import log_likelihood
    device = torch.device(args.device)
    rows: List[Dict] = []
    result = dict(likelihood=rows, ok=False)

    def save():  # after every row, so a stop at the time limit keeps what was measured
        (out / "part_graphs.json").write_text(json.dumps(result, indent=1) + "\n")

    result["syncs"] = _sync_counts(device, args.quick)
    # The training-step count turned TF32 on (train_speed's "tf32" mode): the solves below
    # compare strict-fp32 graphed and eager calls.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    save()
    # (label, model, batch, tolerance): DDPM++ with random weights is a stiff flow that takes
    # minutes at 1e-5, so it is solved at 1e-3; rows that would start past half the part's
    # time are skipped (and say so) rather than cut off.
    models = [("small U-Net (attention 4x4)", lambda: _small_unet(device), 4 if args.quick else 8,
               args.rtol)]
    if not args.quick:
        models.append(("DDPM++ cont., random weights", lambda: _random_model("ddpmpp", device), 4,
                       max(args.rtol, 1e-3)))
    started = time.perf_counter()
    for label, build, batch, tol in models:
        sde, score_fn, shape = build()
        g = torch.Generator(device=device).manual_seed(1)
        x = torch.rand((batch,) + tuple(shape), device=device, generator=g) * 2 - 1
        probes = torch.randint(0, 2, (1,) + tuple(x.shape), device=device,
                               generator=g).float() * 2 - 1
        bpd = 1 / (x[0].numel() * math.log(2))
        for step_control in ("batch", "per_sample"):
            kw = dict(probes=probes, step_control=step_control, rtol=tol,
                      atol=max(tol, args.atol))
            row = dict(model=label, batch=batch, step_control=step_control, rtol=tol)
            if time.perf_counter() - started > 0.5 * args.part_limit:
                row["skipped"] = "not started: past half of the part's time limit"
                rows.append(row)
                save()
                continue
            try:
                t0 = time.perf_counter()
                eager, _, nfe_eager = log_likelihood(sde, score_fn, x, **kw)
                _sync(device)
                t1 = time.perf_counter()
                again, _, nfe_again = log_likelihood(sde, score_fn, x, **kw)
                stats: Dict = {}
                _sync(device)
                t2 = time.perf_counter()
                graphed, _, nfe_graphed = log_likelihood(sde, score_fn, x, cuda_graph=True,
                                                         cuda_graph_stats=stats, **kw)
                _sync(device)
                t3 = time.perf_counter()
                row.update(nfe_eager=nfe_eager, nfe_eager_repeat=nfe_again,
                           nfe_graphed=nfe_graphed,
                           max_dbpd_eager_repeat=float((again - eager).abs().max()) * bpd,
                           max_dbpd_graphed=float((graphed - eager).abs().max()) * bpd,
                           seconds_eager=t1 - t0, seconds_graphed=t3 - t2,
                           cuda_graph=stats, replayed=stats.get("replays", 0) > 0
                           and not stats.get("failures"))
            except Exception as err:  # noqa: BLE001 - record and go on to the next row
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
    result["ok"] = all("error" not in r for r in rows)
    return result


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sync_counts(device, quick: bool) -> Dict:
    """Synchronising CUDA operations per call (sync debug mode "warn"), at two step counts."""
    import warnings
    import torch
    from score_sde import VPSDE, sample_dpm_solver, sample_pc
    if device.type != "cuda":
        return dict(note="needs CUDA")
    sde, score_fn, shape = _small_unet(device)

    def count(fn) -> int:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    result = {}
    for name, run in (("sample_pc", lambda n: sample_pc(VPSDE(), score_fn, (4,) + shape,
                                                        num_steps=n, device=device)),
                      ("sample_dpm_solver", lambda n: sample_dpm_solver(
                          VPSDE(), score_fn, (4,) + shape, num_steps=n, device=device))):
        try:
            run(30)
            result[name] = {str(n): count(lambda: run(n)) for n in (30, 60)}
        except Exception as err:  # noqa: BLE001
            result[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    try:
        import train_speed
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            train_speed.write_synthetic_cifar(data, n_train=640)
            trainer = train_speed.make_trainer("ddpmpp_tiny", "tf32", str(Path(tmp) / "run"),
                                               data_dir=str(data), batch_size=32, n_iters=100,
                                               device=str(device))
            for _ in range(3):
                trainer.train_step(train_speed._Quiet())
            _sync(device)
            result["train_step"] = {str(n): count(lambda: [trainer.train_step(
                train_speed._Quiet()) for _ in range(n)]) for n in (5, 10)}
    except Exception as err:  # noqa: BLE001
        result["train_step"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return result


def part_likelihood(args, out: Path) -> Dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench.py"), "--sections", "likelihood",
           "--lik_parts", "cost", "--device", args.device, "--output", str(out / "lik.json")]
    if args.quick:
        cmd += ["--lik_model", "ddpmpp_tiny", "--lik_batch", "8", "--cost_evals", "2"]
    else:
        cmd += ["--lik_batch", "256", "--cost_evals", "20"]
    code, error = _run_logged(cmd, out / "lik.log", args.part_limit)
    if code != 0:
        lines = (out / "lik.log").read_text().strip().splitlines() or ["no output"]
        return dict(command=" ".join(cmd[1:]), ok=False, error=error or lines[-1][:400],
                    model="DDPM++ cont. (partial)", rows=_json_lines(out / "lik.log"))
    result = json.loads((out / "lik.json").read_text())
    return dict(command=" ".join(cmd[1:]), ok=True,
                **result["likelihood"]["evaluation_cost"])


def part_samplers(args, out: Path) -> Dict:
    """Seconds per sampling call, eager and with the network replayed from CUDA graphs."""
    import torch
    from score_sde import sample_dpm_solver, sample_pc
    from score_sde.cuda_graphs import CudaGraphed
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sde, score_fn, shape = _random_model("ddpmpp_tiny" if args.quick else "ddpmpp", device)
    rows: List[Dict] = []
    result = dict(model=("DDPM++ tiny" if args.quick else "DDPM++ cont.") +
                  ", random weights, TF32", rows=rows, ok=False)

    def save():  # after every row, so a stop at the time limit keeps what was measured
        (out / "part_samplers.json").write_text(json.dumps(result, indent=1) + "\n")

    plan = [("dpm_solver, 20 evaluations", lambda s, b: sample_dpm_solver(
                sde, s, (b,) + tuple(shape), num_steps=20, device=device)),
            ("pc, euler_maruyama, 50 steps", lambda s, b: sample_pc(
                sde, s, (b,) + tuple(shape), num_steps=50, predictor="euler_maruyama",
                corrector="none", device=device))]
    for label, run in plan:
        for batch in ((4,) if args.quick else (16, 128)):
            row = dict(sampler=label, batch=batch)
            try:
                for mode in ("eager", "cuda_graph"):
                    score = score_fn if mode == "eager" else CudaGraphed(
                        score_fn, strict=device.type == "cuda")
                    run(score, batch)  # warm-up (and the recording)
                    _sync(device)
                    t0 = time.perf_counter()
                    _, nfe = run(score, batch)
                    _sync(device)
                    row[f"seconds_{mode}"] = time.perf_counter() - t0
                    row["nfe"] = nfe
                    if mode == "cuda_graph":
                        row["cuda_graph"] = score.stats()
                        row["replayed"] = score.replays > 0 and not score.failures
                row["speedup"] = row["seconds_eager"] / row["seconds_cuda_graph"]
            except Exception as err:  # noqa: BLE001 - keep the eager timing, go on
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            rows.append(row)
            save()
            print(json.dumps(row), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    result["ok"] = all("error" not in r for r in rows)
    return result


def part_train(args, out: Path) -> Dict:
    modes = "fp32" if args.quick else "tf32,bf16_cl_compile"
    model = "ddpmpp_tiny" if args.quick else "ddpmpp"
    cmd = [sys.executable, str(REPO / "benchmarks" / "train_speed.py"), "--models", model,
           "--modes", modes, "--device", args.device, "--output", str(out / "train.json")]
    # The profiles (a few seconds each, Chrome traces beside train.json) follow the timed steps.
    cmd += (["--batch_size", "8", "--warmup", "1", "--steps", "2", "--profile_steps", "1"]
            if args.quick else ["--batch_size", "128", "--warmup", "8", "--steps", "30",
                                "--profile_steps", "5"])
    code, error = _run_logged(cmd, out / "train.log", args.part_limit)
    if code != 0:
        lines = (out / "train.log").read_text().strip().splitlines() or ["no output"]
        return dict(command=" ".join(cmd[1:]), ok=False, error=error or lines[-1][:400],
                    rows=_json_lines(out / "train.log"))
    return dict(command=" ".join(cmd[1:]), ok=True,
                rows=json.loads((out / "train.json").read_text()))


PART_FUNCTIONS = {"tests": part_tests, "graphs": part_graphs, "likelihood": part_likelihood,
                  "samplers": part_samplers, "train": part_train}


# --- the driver -------------------------------------------------------------------------------

def _launch(name: str, args, out: Path, limit: float) -> subprocess.Popen:
    # The part stops its own child processes a little before the driver would stop it.
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--output", str(out),
           "--device", args.device, "--rtol", str(args.rtol), "--atol", str(args.atol),
           "--test_workers", str(args.test_workers), "--part_limit", str(max(5.0, limit - 15))]
    cmd += ["--quick"] if args.quick else []
    log = open(out / f"part_{name}.log", "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO)),
                            start_new_session=True)


def _finish(name: str, proc: subprocess.Popen, limit: float, started: float,
            out: Path) -> Dict:
    """Waits for a part until `limit` seconds after `started`; kills it (and its children)
    past that. Returns the part's result."""
    try:
        proc.wait(timeout=max(1.0, started + limit - time.perf_counter()))
    except subprocess.TimeoutExpired:
        import signal
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        partial = out / f"part_{name}.json"  # what the part saved before it was stopped
        result = json.loads(partial.read_text()) if partial.exists() else dict(
            rows=_json_lines(out / f"part_{name}.log"))  # else the rows it printed
        result.update(ok=False, error=f"stopped at its time limit of {limit:.0f} s",
                      seconds=time.perf_counter() - started)
        return result
    path = out / f"part_{name}.json"
    if proc.returncode != 0 or not path.exists():
        tail = (out / f"part_{name}.log").read_text().strip().splitlines()[-3:]
        return dict(ok=False, error=f"exit status {proc.returncode}: " + " | ".join(tail)[-600:],
                    seconds=time.perf_counter() - started)
    result = json.loads(path.read_text())
    result["seconds"] = time.perf_counter() - started
    return result


def run_all(args) -> int:
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    parts = [p for p in PARTS if p in args.parts]
    which = 1 if args.quick else 0
    results: Dict[str, Dict] = {}

    def limit(name: str) -> float:
        left = args.budget - (time.perf_counter() - t_start)
        return max(5.0, min(LIMITS[name][which], left))

    # The untimed parts side by side, then the timed ones alone.
    side = [p for p in ("tests", "graphs") if p in parts]
    running = {}
    for name in side:
        lim = limit(name)
        running[name] = (_launch(name, args, out, lim), time.perf_counter(), lim)
    def write_summary() -> Dict:  # after every part: a driver cut short keeps the finished
        summary = dict(meta=_meta(args, time.perf_counter() - t_start), parts=results)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    for name, (proc, started, lim) in running.items():
        results[name] = _finish(name, proc, lim, started, out)
        write_summary()
    # Training first: its compile warm-up needs the time, and the budget trims the last part.
    for name in sorted((p for p in parts if p not in side), key=TIMED_ORDER.index):
        lim = limit(name)
        started = time.perf_counter()
        results[name] = _finish(name, _launch(name, args, out, lim), lim, started, out)
        write_summary()
    summary = write_summary()
    text = render(summary)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(r.get("ok") for r in results.values()) else 1


def _meta(args, seconds: float) -> Dict:
    import torch
    cuda = torch.cuda.is_available() and args.device != "cpu"
    return dict(date=datetime.date.today().isoformat(),
                command="python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
                device=args.device, gpu=torch.cuda.get_device_name(0) if cuda else None,
                torch=torch.__version__, cuda=torch.version.cuda,
                python=platform.python_version(), seconds=seconds)


def render(summary: Dict) -> str:
    """The Markdown report."""
    m, parts = summary["meta"], summary["parts"]
    lines = [f"# GPU check, {m['date']}", "",
             f"Device: {m['gpu'] or m['device']}; torch {m['torch']} (CUDA {m['cuda']}), "
             f"Python {m['python']}. Command: `{m['command']}`. Wall time {m['seconds']:.0f} s.",
             ""]
    lines += ["| part | status | seconds |", "| --- | --- | ---: |"]
    for name, r in parts.items():
        status = "ok" if r.get("ok") else "FAILED: " + str(r.get("error", "see below"))[:160]
        lines.append(f"| {name} | {status} | {r.get('seconds', float('nan')):.0f} |")
    t = parts.get("tests")
    if t and "counts" in t:
        c = t["counts"]
        lines += ["", f"## GPU tests: {c['passed']} passed, {c['failed']} failed, "
                      f"{c['errors']} errors, {c['skipped']} skipped", ""]
        lines += [f"- FAILED {f['test']}: {f['message']}" for f in t["failures"]]
        lines += ["", "Slowest: " + ", ".join(f"{s['test'].split('::')[-1]} {s['seconds']:.0f} s"
                                              for s in t["slowest"][:5])]
    g = parts.get("graphs")
    if g and "likelihood" in g:
        cells = []
        for r in g["likelihood"]:
            head = [r["model"], r["batch"], f"{r['step_control']}, {r['rtol']:g}"]
            if "error" in r or "skipped" in r:
                what = f"error: {r['error'][:120]}" if "error" in r else r["skipped"]
                cells.append(head + [what] + [""] * 5)
                continue
            cells.append(head + [
                f"{r['nfe_eager']} / {r['nfe_eager_repeat']} / {r['nfe_graphed']}",
                f"{r['max_dbpd_eager_repeat']:.2e}", f"{r['max_dbpd_graphed']:.2e}",
                r["cuda_graph"].get("replays", 0), f"{r['seconds_eager']:.2f}",
                f"{r['seconds_graphed']:.2f}"])
        lines += _table("Likelihood solves, CUDA graph against eager (same inputs and probes)",
                        ["model", "batch", "control, rtol", "NFE eager / repeat / graphed",
                         "max dbpd repeat", "max dbpd graphed", "replays", "s eager",
                         "s graphed"], cells)
        lines += ["", "Host synchronisations per call: " + json.dumps(g.get("syncs"))]
    lk = parts.get("likelihood")
    if lk and "rows" in lk:
        lines += _table(f"Likelihood evaluation cost: {lk.get('model')}",
                        ["run", "batch", "ms/eval", "image-evals/s", "x paper code", "replayed",
                         "max rel. diff. to eager"],
                        [[r.get("run"), r.get("batch"), _cell(r, "ms_per_eval", ".1f"),
                          _cell(r, "image_evals_per_s", ".0f"),
                          _cell(r, "speedup_vs_paper_code", ".2f"),
                          r.get("replayed", "-"),
                          f"{r['max_rel_diff_vs_eager']:.1e}" if "max_rel_diff_vs_eager" in r
                          else "-"] for r in lk["rows"]])
        if lk.get("solver_rows"):
            lines += _table("dopri5 arithmetic outside the network per evaluation (the state "
                            "the likelihood integrates is float64)",
                            ["state", "batch", "NFE", "ms/eval"],
                            [[r["state"], r["batch"], f"{r['nfe']:.0f}",
                              f"{r['ms_per_eval']:.3f}"] for r in lk["solver_rows"]])
    sm = parts.get("samplers")
    if sm and sm.get("rows"):
        lines += _table(f"Sampling calls: {sm.get('model', 'DDPM++ (partial)')}",
                        ["sampler", "batch", "NFE", "s eager", "s graphed", "speed-up",
                         "replayed"],
                        [[r.get("sampler"), r.get("batch"), r.get("nfe", "-"),
                          _cell(r, "seconds_eager", ".3f"), _cell(r, "seconds_cuda_graph", ".3f"),
                          _cell(r, "speedup", ".2f"),
                          f"error: {r['error'][:120]}" if "error" in r else r.get("replayed")]
                         for r in sm["rows"]])
    tr = parts.get("train")
    if tr and "rows" in tr:
        batches = sorted({r["batch_size"] for r in tr["rows"] if "batch_size" in r})
        lines += _table(f"Training, batch {', '.join(map(str, batches))}",
                        ["model", "mode", "images/s", "ms/step", "peak GiB", "warm-up s"],
                        [[r.get("model"), r.get("mode"), _cell(r, "images_per_s", ".0f"),
                          _cell(r, "ms_per_step", ".1f"), _cell(r, "peak_gib", ".1f"),
                          _cell(r, "warmup_s", ".0f")] for r in tr["rows"]])
        profiled = [r for r in tr["rows"] if "profile" in r]
        if profiled:
            lines += _profile_tables(profiled)
    return "\n".join(lines) + "\n"


def _cell(row: Dict, key: str, fmt: str) -> str:
    """row[key] formatted, or "-" where a row cut short lacks it."""
    return format(row[key], fmt) if isinstance(row.get(key), (int, float)) else "-"


def _profile_tables(rows: List[Dict]) -> List[str]:
    """Markdown of train_speed profiles: time by category per mode, then the costliest
    kernels of each."""
    categories = list(rows[0]["profile"]["categories"])
    cells = []
    for r in rows:
        p = r["profile"]
        cells.append([r["model"], r["mode"], f"{p['wall_ms_per_step']:.1f}",
                      f"{p['device_ms_per_step']:.1f}", f"{p['launches_per_step']:.0f}"]
                     + [f"{p['categories'][c]['ms_per_step']:.1f} "
                        f"({p['categories'][c]['percent']:.0f}%)" for c in categories])
    lines = _table(f"Training step profiles: {rows[0]['profile']['device_time']}, ms/step "
                   f"(% of it) by category", ["model", "mode", "wall ms", "device ms",
                                              "launches"] + categories, cells)
    for r in rows:
        lines += _table(f"Costliest kernels: {r['model']}, {r['mode']}",
                        ["kernel", "category", "ms/step", "launches/step"],
                        [[k["name"][:90].replace("|", "/"), k["category"],
                          f"{k['ms_per_step']:.2f}", f"{k['launches_per_step']:.0f}"]
                         for k in r["profile"]["top"]])
    return lines


def _table(title: str, header: List[str], rows: List[List]) -> List[str]:
    """A Markdown section: a heading and a table (text columns left, the rest right)."""
    align = ["---" if i == 0 or header[i] in ("mode", "control, rtol", "sampler", "replayed",
                                               "category")
             else "---:" for i in range(len(header))]
    return (["", f"## {title}", "", "| " + " | ".join(header) + " |",
             "| " + " | ".join(align) + " |"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True, help="folder for summary.md, summary.json, logs")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke "
                   "run")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--budget", type=float, default=480.0, help="wall-time limit, seconds")
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke runs)")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--test_workers", type=int, default=6)
    p.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part
    p.add_argument("--part_limit", type=float, default=600.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = args.parts.split(",")
    bad = [v for v in args.parts if v not in PARTS]
    if bad:
        p.error(f"unknown part {bad[0]!r}; accepted: {', '.join(PARTS)}")
    if args.part is not None and args.part not in PARTS:
        p.error(f"unknown part {args.part!r}")
    if not (math.isfinite(args.budget) and args.budget > 0):
        p.error(f"--budget must be a finite number > 0, got {args.budget}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        p.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    # The parts run as subprocesses in the repository root: a relative folder must not move.
    args.output = str(Path(args.output).resolve())
    out = Path(args.output)
    blocker = next((q for q in (out, *out.parents) if q.exists() and not q.is_dir()), None)
    if blocker == out:
        p.error(f"--output {args.output} is a file; give a folder")
    if blocker is not None:
        p.error(f"--output {args.output} lies under {blocker}, which is a file, not a folder")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            p.error("--device cuda but CUDA is not available; use --device cpu for a smoke run")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    if args.part is None:
        return run_all(args)
    out = Path(args.output)
    result = PART_FUNCTIONS[args.part](args, out)
    (out / f"part_{args.part}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
