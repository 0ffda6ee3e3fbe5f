"""benchmarks/likelihood_accuracy.py, likelihood_work_precision.py, likelihood_error_sources.py
and likelihood_step_checks.py on the smallest of their mixtures (2-d), on the CPU.

What is checked is that the measurements respond to what they measure: errors against the
tight float64 solve shrink when the tolerance does, and one-step errors taken from the exact
path are tiny at a tight tolerance and visible at a loose one (so the stage states really are
the solver's, not the exact path's)."""
import json

import pytest

from tests.scripts import load_script

TWO_D = 4  # index of the 2-d mixture in likelihood_accuracy.CASES


@pytest.fixture(scope="module")
def accuracy():
    return load_script("benchmarks/likelihood_accuracy.py")


@pytest.fixture(scope="module")
def work_precision():
    return load_script("benchmarks/likelihood_work_precision.py")


@pytest.fixture(scope="module")
def sources():
    return load_script("benchmarks/likelihood_error_sources.py")


@pytest.fixture(scope="module")
def checks():
    return load_script("benchmarks/likelihood_step_checks.py")


def test_the_two_d_case_is_the_two_d_mixture(accuracy):
    assert list(accuracy.CASES.values())[TWO_D][0] == 2


def test_accuracy_rows_shrink_with_the_tolerance(accuracy, tmp_path):
    rows = {}
    for tol in (1e-3, 1e-6):
        out = tmp_path / f"acc{tol:g}.json"
        assert accuracy.main(["--cases", str(TWO_D), "--tol", str(tol),
                              "--output", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["meta"]["tol"] == tol
        rows[tol] = {(r["dtype"], r["run"]): r for r in result["rows"]}
    runs = [f"{norm}, {control}" for norm, control in accuracy.RUNS]
    runs.append("SciPy RK45 (paper code)")
    assert set(rows[1e-3]) == {(d, r) for d in ("float32", "float64") for r in runs}
    for key, loose in rows[1e-3].items():
        tight = rows[1e-6][key]
        assert tight["nfe"] > loose["nfe"] > 0, key
        assert tight["max_abs_dbpd"] < loose["max_abs_dbpd"], key


def test_scipy_one_sample_at_a_time(accuracy, tmp_path):
    # SciPy's RK45 on one sample holds it to that sample's own rms over its elements (the norm
    # of error_norm="rms" with per-sample control); the row reports the largest sample's
    # evaluations and their mean, on float64 data only.
    out = tmp_path / "acc.json"
    assert accuracy.main(["--cases", str(TWO_D), "--tol", "1e-4", "--scipy_per_sample",
                          "--output", str(out)]) == 0
    rows = {(r["dtype"], r["run"]): r for r in json.loads(out.read_text())["rows"]}
    alone = rows[("float64", "SciPy RK45, each sample alone")]
    assert alone["nfe"] >= alone["nfe_mean"] > 0
    assert ("float32", "SciPy RK45, each sample alone") not in rows


def test_cost_of_target_needs_every_tighter_tolerance(work_precision):
    # The error of an adaptive solve need not fall monotonically with the tolerance: a
    # tolerance counts only if every tighter one on the grid meets the target too.
    def rows(errors):
        return [dict(tol=t, nfe=n, max_abs_dbpd=e)
                for t, n, e in zip((1e-5, 3e-6, 1e-6, 3e-7), (100, 120, 140, 160), errors)]

    cost = work_precision.cost_of_target
    assert cost(rows([5e-5, 2e-5, 1e-5, 1e-6]), 1e-4)["tol"] == 1e-5
    assert cost(rows([2e-4, 5e-5, 1e-5, 1e-6]), 1e-4)["nfe"] == 120
    assert cost(rows([5e-5, 3e-5, 2e-4, 1e-6]), 1e-4)["tol"] == 3e-7
    assert cost(rows([5e-5, 3e-5, 1e-5, 2e-4]), 1e-4) is None


def test_work_precision_summary_matches_its_rows(work_precision, tmp_path):
    out = tmp_path / "wp.json"
    assert work_precision.main(["--cases", str(TWO_D), "--tols", "1e-6,1e-3,1e-4",
                                "--target", "3e-4", "--dtypes", "float64",
                                "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["meta"]["tol"] == [1e-3, 1e-4, 1e-6] and result["target"] == 3e-4
    rows, summary = result["rows"], result["summary"]
    runs = {r["run"] for r in rows}
    assert len(runs) == 5 and {r["dtype"] for r in rows} == {"float64"}
    assert {s["run"] for s in summary} == runs and len(summary) == 5
    for s in summary:
        mine = sorted((r for r in rows if r["run"] == s["run"]), key=lambda r: -r["tol"])
        assert [r["tol"] for r in mine] == [1e-3, 1e-4, 1e-6]
        # More work at tighter tolerances, and the tightest solve meets the target.
        assert mine[0]["nfe"] < mine[1]["nfe"] < mine[2]["nfe"]
        assert mine[-1]["max_abs_dbpd"] < 3e-4
        passing = [r["tol"] for r in mine if r["tol"] <= s["tol"]]
        assert all(r["max_abs_dbpd"] <= 3e-4 for r in mine if r["tol"] in passing)
        looser = [r for r in mine if r["tol"] > s["tol"]]
        assert not looser or looser[-1]["max_abs_dbpd"] > 3e-4
        assert s["nfe"] == next(r["nfe"] for r in mine if r["tol"] == s["tol"])


@pytest.mark.parametrize("argv", [["--tols", "1e-5,x"], ["--tols", "0"], ["--tols", "nan"],
                                  ["--target", "-1"], ["--dtypes", "float16"], ["--cases", "6"],
                                  ["--cases", "0,x"]])
def test_work_precision_rejects_bad_arguments(work_precision, argv):
    with pytest.raises(SystemExit) as exc:
        work_precision.main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("script", ["likelihood_accuracy", "likelihood_step_checks"])
def test_unknown_cases_exit_2(script):
    with pytest.raises(SystemExit) as exc:
        load_script(f"benchmarks/{script}.py").main(["--cases", "-1"])
    assert exc.value.code == 2


@pytest.mark.parametrize("script", ["likelihood_accuracy", "likelihood_step_checks",
                                    "likelihood_error_sources"])
@pytest.mark.parametrize("tol", ["-1", "0", "nan"])
def test_tolerances_that_are_not_positive_exit_2(script, tol, capsys):
    """A negative tolerance once ran (and exited 0) with meaningless numbers."""
    with pytest.raises(SystemExit) as exc:
        load_script(f"benchmarks/{script}.py").main(["--tol", tol])
    assert exc.value.code == 2
    assert f"--tol must be a finite number > 0, got {float(tol)}" in capsys.readouterr().err


def test_error_sources_follow_the_tolerance(sources):
    for tol, bound in ((1e-7, 1e-6), (1e-3, None)):
        rows, total = sources.analyse(TWO_D, "max", tol)
        assert rows and all(0 <= r["sample"] < 64 and r["h"] > 0 for r in rows)
        # The accepted steps tile [eps, T].
        assert rows[0]["t"] == pytest.approx(sources.EPS)
        ends = [r["t"] + r["h"] for r in rows]
        assert ends[-1] == pytest.approx(1.0)
        assert [r["t"] for r in rows[1:]] == pytest.approx(ends[:-1])
        worst = max(abs(r["dopri5"]) for r in rows)
        if bound is None:
            assert worst > 1e-4 and float(total.max()) > 1e-4
        else:
            assert worst < bound and max(abs(r["quadrature"]) for r in rows) < bound
            assert float(total.max()) < bound


def test_error_sources_command_line(sources, capsys):
    assert sources.main(["--case", str(TWO_D), "--tol", "1e-3", "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "accepted steps" in lines[0] and len(lines) == 4
    with pytest.raises(SystemExit) as exc:
        sources.main(["--case", "99"])
    assert exc.value.code == 2


def test_step_checks_converge_and_count_their_evaluations(checks, tmp_path):
    # At a tight tolerance every variant is a convergent dopri5 solve of the same ODE (within
    # 1e-6 bits/dim of the 1e-10 truth); each attempted step costs 6 evaluations plus the
    # check's own (Simpson 1, Lobatto 2), after the 2 of the first step.
    out = tmp_path / "checks.json"
    assert checks.main(["--cases", str(TWO_D), "--tol", "1e-8", "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["norm"], r["check"]) for r in rows} == {
        (n, c) for n in ("rms", "max") for c in checks.CHECKS}
    per_step = {"none": 6, "stages": 6, "stage6": 6, "simpson": 7, "lobatto": 8}
    for r in rows:
        assert r["max_abs_dbpd"] < 1e-6, r
        assert (r["nfe"] - 2) % per_step[r["check"]] == 0 and r["nfe"] > 2, r
    with pytest.raises(SystemExit) as exc:
        checks.main(["--checks", "gauss"])
    assert exc.value.code == 2
