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
_G = 1 / math.sqrt(5)
LOBATTO = ((0.0, 1 / 12), ((1 - _G) / 2, 5 / 12), ((1 + _G) / 2, 5 / 12), (1.0, 1 / 12))


def solve(rhs, x, *, norm: str, check: str, tol: float):
    """(delta, z, evaluations) of a batch dopri5 solve of the augmented ODE from EPS to T."""
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
            ys = tuple(v + h * sum(a * k[j] for a, k in zip(_A[s], ks) if a)
                       for j, v in enumerate(y))
            ks.append(f(T if last and s >= 5 else t + _C[s] * h, ys))
        y_new = ys
        err = scaled(tuple(h * sum(w * k[j] for w, k in zip(_E, ks) if w) for j in range(2)),
                     y, y_new)
        if check != "none":
            if check == "stages":
                ref = y_new[1] + h * (ks[5][1] - ks[6][1])
            elif check == "stage6":
                ref = y_new[1] + h * _A[6][5] * (ks[5][1] - ks[6][1])
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
    rows = []
    for i in case_indices(p, args.cases):
        name, dim, sde, score, x, probes = case_problem(i)
        truth, _ = tight_truth(sde, score, x, probes)
        rhs = augmented_rhs(ReverseSDE(sde, score, probability_flow=True), torch.float64,
                            probes)
        for norm in norms:
            for check in checks:
                delta, z, evals = solve(rhs, x, norm=norm, check=check, tol=args.tol)
                logp = sde.prior_logp(z) + delta
                rows.append(dict(case=name, norm=norm, check=check, nfe=evals,
                                 max_abs_dbpd=float(((logp - truth) / (dim * math.log(2)))
                                                    .abs().max())))
                print(json.dumps(rows[-1]), flush=True)
    report(rows, [("case", 38), ("norm", 10), ("check", 9)], output=args.output,
           script="likelihood_step_checks.py", argv=argv, tol=args.tol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
