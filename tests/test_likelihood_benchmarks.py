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


def _order_conditions(nodes, rows, weights):
    """{tree: sum of `weights` over the tree's elementary differential - 1 / tree's density}
    for the 17 rooted trees of up to 5 nodes (Butcher's order conditions, written out)."""
    n = len(weights)
    a = [[rows[i][j] if j < len(rows[i]) else 0.0 for j in range(n)] for i in range(n)]
    c = list(nodes)

    def dot(u, v):
        return sum(x * y for x, y in zip(u, v))

    def times(u, v):
        return [x * y for x, y in zip(u, v)]

    def A(v):  # the stage matrix applied to v
        return [dot(a[i], v) for i in range(n)]

    one, c2, c3 = [1.0] * n, times(c, c), times(times(c, c), c)
    ac, ac2, aac = A(c), A(c2), A(A(c))
    terms = {  # tree: (b . phi, 1 / gamma)
        "1": (dot(weights, one), 1), "2": (dot(weights, c), 1 / 2),
        "3a": (dot(weights, c2), 1 / 3), "3b": (dot(weights, ac), 1 / 6),
        "4a": (dot(weights, c3), 1 / 4), "4b": (dot(weights, times(c, ac)), 1 / 8),
        "4c": (dot(weights, ac2), 1 / 12), "4d": (dot(weights, aac), 1 / 24),
        "5a": (dot(weights, times(c3, c)), 1 / 5), "5b": (dot(weights, times(c2, ac)), 1 / 10),
        "5c": (dot(weights, times(c, ac2)), 1 / 15), "5d": (dot(weights, times(c, aac)), 1 / 30),
        "5e": (dot(weights, times(ac, ac)), 1 / 20), "5f": (dot(weights, A(c3)), 1 / 20),
        "5g": (dot(weights, A(times(c, ac))), 1 / 40), "5h": (dot(weights, A(ac2)), 1 / 60),
        "5i": (dot(weights, A(aac)), 1 / 120)}
    return {tree: value - exact for tree, (value, exact) in terms.items()}


@pytest.mark.parametrize("pair", ["dp5", "tsit5"])
def test_pairs_have_orders_5_and_4(checks, pair):
    """The script's tableaus against Butcher's order conditions: the propagated weights (the
    last stage row) meet all 17 up to order 5, the embedded ones (weights minus error weights)
    the 8 up to order 4 and not all of order 5, and each row sums to its node."""
    nodes, rows, error_weights = checks.PAIRS[pair]
    assert len(nodes) == len(rows) == len(error_weights) == 7
    for c, row in zip(nodes, rows):
        assert sum(row) == pytest.approx(c, abs=1e-15)
    fifth = list(rows[6]) + [0.0]
    assert max(abs(v) for v in _order_conditions(nodes, rows, fifth).values()) < 1e-13
    fourth = [b - e for b, e in zip(fifth, error_weights)]
    gaps = _order_conditions(nodes, rows, fourth)
    assert max(abs(v) for tree, v in gaps.items() if tree[0] in "1234") < 1e-13
    assert max(abs(v) for tree, v in gaps.items() if tree[0] == "5") > 1e-5


def test_step_checks_with_another_pair(checks, tmp_path):
    # Tsitouras' pair in the same loop: convergent, 6 evaluations an attempted step, and the
    # checks that read Dormand-Prince's dense output are not run with it.
    rows = {}
    for tol in (1e-3, 1e-8):
        out = tmp_path / f"pairs{tol:g}.json"
        assert checks.main(["--cases", str(TWO_D), "--tol", str(tol), "--norms", "rms",
                            "--pairs", "dp5,tsit5", "--checks", "none,stage6,simpson",
                            "--output", str(out)]) == 0
        rows[tol] = json.loads(out.read_text())["rows"]
    assert [(r["pair"], r["check"]) for r in rows[1e-8]] == [
        ("dp5", "none"), ("dp5", "stage6"), ("dp5", "simpson"), ("tsit5", "none"),
        ("tsit5", "stage6")]
    for loose, tight in zip(rows[1e-3], rows[1e-8]):
        assert tight["max_abs_dbpd"] < 1e-6 < loose["max_abs_dbpd"], (loose, tight)
        assert tight["nfe"] > loose["nfe"]
        per_step = 6 + (tight["check"] == "simpson")
        assert (tight["nfe"] - 2) % per_step == 0 and (loose["nfe"] - 2) % per_step == 0


@pytest.mark.parametrize("argv", [["--pairs", "rk4"],
                                  ["--pairs", "tsit5", "--checks", "lobatto"]])
def test_step_checks_reject_unknown_pairs(checks, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        checks.main(argv)
    assert exc.value.code == 2
    assert "pair" in capsys.readouterr().err
