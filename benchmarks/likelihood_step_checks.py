"""Candidate checks of the log-density's step error, on the closed-form mixtures.

    python benchmarks/likelihood_step_checks.py --output step_checks.json

`likelihood_error_sources.py` shows that the likelihood's remaining error comes from single
dopri5 steps whose divergence, evaluated at the intermediate stage states, errs far more than
the embedded estimate says. This script measures ways of catching those steps. It runs a
batch Dormand–Prince 5(4) with one shared step (the tableau of `score_sde.per_sample_ode`,
step factor 0.9 err^(-1/5) in [0.2, 10], Hairer's first step) on the augmented state (x,
delta), with the library's per-sample norms ("max", or "rms" over each sample's elements; the
largest over the batch) or, with --norms batch_rms, SciPy RK45's rms over the whole batch's
state (one value for all samples: the paper code's norm), and, besides the embedded estimate,
one of these checks of each sample's delta increment (scaled by atol + rtol |delta|):

- none: the embedded estimate alone (what `log_likelihood` does, up to torchdiffeq's details);
- stages: h |div(Y_6) - div(y_new)|, the stage-6 and next-first-stage divergences at t + h,
  which differ only by the stage state's error (free, but only 4th order in h);
- stage6: the same difference weighted by stage 6's weight in the increment, b_6 = 11/84, i.e.
  the error stage 6's state alone puts into the increment (free, 4th order);
- simpson: the increment against Simpson's rule on the divergence at t, at the dense output's
  midpoint and at t + h, all on accurate states (one more evaluation per step);
- lobatto: against the 4-point Lobatto rule (6th order) at the dense output's Lobatto nodes
  (two more evaluations per step).

--pairs dp5,tsit5 runs the same loop with Tsitouras' 5(4) pair too (Tsitouras 2011, Table 1;
7 stages, FSAL, like Dormand–Prince), whose error estimate is built differently: whether a
better-estimating pair of the same cost catches the switch steps without a check. The
Simpson and Lobatto checks read Dormand–Prince's dense output and run with dp5 only.

Each row: evaluations (the extra ones included) and the largest |bits/dim - truth| over the
samples, the truth being `likelihood_accuracy.tight_truth` (the same probes).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torchdiffeq._impl.dopri5 import DPS_C_MID
from torchdiffeq._impl.interp import _interp_evaluate, _interp_fit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
from likelihood_accuracy import CASES, case_indices, case_problem, report, tight_truth  # noqa: E402
from score_sde.likelihood import augmented_rhs  # noqa: E402
from score_sde.per_sample_ode import _A, _C, _E  # noqa: E402
from score_sde.sde import ReverseSDE  # noqa: E402

EPS, T = 1e-5, 1.0
CHECKS = ("none", "stages", "stage6", "simpson", "lobatto")
NORMS = ("rms", "max", "batch_rms")
# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
# simplifying assumption", Comput. Math. Appl. 62, Table 1: nodes, stage rows (the last row is
# the 5th-order weights: FSAL) and the 5th-minus-4th-order error weights.
TSIT5_C = (0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0)
TSIT5_A = (
    (),
    (0.161,),
    (-0.008480655492356989, 0.335480655492357),
    (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
    (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
    (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
     -0.028269050394068383),
    (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
     2.324710524099774),
)
TSIT5_E = (0.001780011052226, 0.000816434459657, -0.007880878010262, 0.144711007173263,
           -0.582357165452555, 0.458082105929187, -1 / 66)
# name -> (nodes, stage rows, error weights); each pair's stage 6 sits at t + h.
PAIRS = {"dp5": (_C, _A, _E), "tsit5": (TSIT5_C, TSIT5_A, TSIT5_E)}
DENSE_CHECKS = ("simpson", "lobatto")  # read Dormand–Prince's dense output
_G = 1 / math.sqrt(5)
LOBATTO = ((0.0, 1 / 12), ((1 - _G) / 2, 5 / 12), ((1 + _G) / 2, 5 / 12), (1.0, 1 / 12))


def solve(rhs, x, *, norm: str, check: str, tol: float, pair: str = "dp5"):
    """(delta, z, evaluations) of a batch solve of the augmented ODE from EPS to T with the
    5(4) pair `pair` (a name in `PAIRS`)."""
    nodes, rows, error_weights = PAIRS[pair]
    if check in DENSE_CHECKS and pair != "dp5":
        raise ValueError(f"check {check!r} reads Dormand-Prince's dense output; pair {pair!r} "
                         f"runs with {', '.join(c for c in CHECKS if c not in DENSE_CHECKS)}")
    batch = x.shape[0]
    evals = 0

    def f(t, y):
        nonlocal evals
        evals += 1
        return rhs(torch.full((batch,), t, dtype=torch.float64), y)

    def scaled(v, a, b):  # [B]: the per-sample norm of v / (atol + rtol max(|a|, |b|))
        s = [vi.reshape(batch, -1) / (tol + tol * torch.maximum(ai.abs(), bi.abs()))
             .reshape(batch, -1) for vi, ai, bi in zip(v, a, b)]
        s = torch.cat(s, 1)
        if norm == "batch_rms":  # one value for the whole batch, shared by every sample
            return s.pow(2).mean().sqrt().expand(batch)
        return s.pow(2).mean(1).sqrt() if norm == "rms" else s.abs().amax(1)

    t, y = EPS, (x.clone(), torch.zeros(batch, dtype=torch.float64))
    k1 = f(t, y)
    d0, d1 = float(scaled(y, y, y).max()), float(scaled(k1, y, y).max())
    h0 = 1e-6 if min(d0, d1) < 1e-5 else 0.01 * d0 / d1
    f1 = f(t + h0, tuple(a + h0 * k for a, k in zip(y, k1)))
    d2 = float(scaled(tuple(b - a for a, b in zip(k1, f1)), y, y).max()) / h0
    h = min(100 * h0, (0.01 / max(d1, d2, 1e-15)) ** 0.2, T - EPS)
    while t < T:
        last = t + h >= T
        h = T - t if last else h
        ks = [k1]
        for s in range(1, 7):
            ys = tuple(v + h * sum(a * k[j] for a, k in zip(rows[s], ks) if a)
                       for j, v in enumerate(y))
            ks.append(f(T if last and s >= 5 else t + nodes[s] * h, ys))
        y_new = ys
        err = scaled(tuple(h * sum(w * k[j] for w, k in zip(error_weights, ks) if w)
                           for j in range(2)), y, y_new)
        if check != "none":
            if check == "stages":
                ref = y_new[1] + h * (ks[5][1] - ks[6][1])
            elif check == "stage6":
                ref = y_new[1] + h * rows[6][5] * (ks[5][1] - ks[6][1])
            else:
                kx = torch.stack([k[0] for k in ks], -1)
                mid = y[0] + (kx * (h * DPS_C_MID)).sum(-1)
                coeffs = _interp_fit(y[0], y_new[0], mid, ks[0][0], ks[6][0],
                                     torch.tensor(h, dtype=torch.float64))
                ends = (torch.tensor(t, dtype=torch.float64),
                        torch.tensor(t + h, dtype=torch.float64))

                def div_at(c):  # the divergence on the dense output at t + c h
                    xc = _interp_evaluate(coeffs, *ends, torch.tensor(t + c * h,
                                                                      dtype=torch.float64))
                    return f(t + c * h, (xc, y[1]))[1]

                rule = (((0.0, 1 / 6), (0.5, 4 / 6), (1.0, 1 / 6)) if check == "simpson"
                        else LOBATTO)
                divs = {0.0: ks[0][1], 1.0: ks[6][1]}
                ref = y[1] + h * sum(w * (divs[c] if c in divs else div_at(c)) for c, w in rule)
            bad = (y_new[1] - ref).abs() / (tol + tol * torch.maximum(y[1].abs(),
                                                                      y_new[1].abs()))
            err = torch.maximum(err, bad)
        ratio = float(err.max())
        if ratio <= 1:
            t, y, k1 = (T if last else t + h), y_new, ks[6]
            h *= min(10.0, max(0.2, 0.9 * max(ratio, 1e-10) ** -0.2))
        else:
            h *= max(0.2, 0.9 * ratio ** -0.2)
    return y[1], y[0], evals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))))
    p.add_argument("--checks", default=",".join(CHECKS))
    p.add_argument("--norms", default="rms,max", help=f"comma-separated, of {', '.join(NORMS)}")
    p.add_argument("--pairs", default="dp5",
                   help=f"comma-separated 5(4) pairs, of {', '.join(PAIRS)}; the "
                        f"{' and '.join(DENSE_CHECKS)} checks run with dp5 only")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    _args.positive_number(p, "tol", args.tol)
    _args.output_file(p, "output", args.output)
    checks = args.checks.split(",")
    bad = [c for c in checks if c not in CHECKS]
    if bad:
        p.error(f"unknown check(s) {bad}; accepted: {', '.join(CHECKS)}")
    norms = args.norms.split(",")
    bad = [n for n in norms if n not in NORMS]
    if bad:
        p.error(f"unknown norm(s) {bad}; accepted: {', '.join(NORMS)}")
    pairs = args.pairs.split(",")
    bad = [n for n in pairs if n not in PAIRS]
    if bad:
        p.error(f"unknown pair(s) {bad}; accepted: {', '.join(PAIRS)}")
    runs = [(pair, check) for pair in pairs for check in checks
            if pair == "dp5" or check not in DENSE_CHECKS]
    if not runs:
        p.error(f"--pairs {args.pairs} with --checks {args.checks}: the "
                f"{' and '.join(DENSE_CHECKS)} checks run with dp5 only")
    rows = []
    for i in case_indices(p, args.cases):
        name, dim, sde, score, x, probes = case_problem(i)
        truth, _ = tight_truth(sde, score, x, probes)
        rhs = augmented_rhs(ReverseSDE(sde, score, probability_flow=True), torch.float64,
                            probes)
        for norm in norms:
            for pair, check in runs:
                delta, z, evals = solve(rhs, x, norm=norm, check=check, tol=args.tol, pair=pair)
                logp = sde.prior_logp(z) + delta
                rows.append(dict(case=name, norm=norm, pair=pair, check=check, nfe=evals,
                                 max_abs_dbpd=float(((logp - truth) / (dim * math.log(2)))
                                                    .abs().max())))
                print(json.dumps(rows[-1]), flush=True)
    report(rows, [("case", 38), ("norm", 10), ("pair", 6), ("check", 9)], output=args.output,
           script="likelihood_step_checks.py", argv=argv, tol=args.tol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
