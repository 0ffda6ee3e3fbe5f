"""Where the log-density error of an adaptive likelihood solve comes from, step by step.

    python benchmarks/likelihood_error_sources.py --case 0 --error_norm rms

Solves the augmented probability-flow ODE of one closed-form mixture of
`likelihood_accuracy.CASES` (VP, one shared Rademacher probe per sample) exactly as
`log_likelihood` does with batch step control (torchdiffeq dopri5 on the float64 state, the
library's error norm), recording the accepted steps. Then, for every accepted step [t, t + h],
it restarts from the exact state at t (a float64 solve at rtol = atol = 1e-10) and compares,
for the log-density component delta, in bits/dim of the sample with the largest error:

- dopri5: the error of one Dormand–Prince step (what the solve commits locally);
- quadrature: the error of the same step's quadrature weights applied to the divergence on the
  exact path at the stage times, i.e. the error left if the stage states were exact;
- estimate: the embedded error estimate of delta that the step control sees.

A dopri5 error far above both the quadrature error and the estimate means the divergence,
evaluated at the stage states (lower-order approximations of the path), is what errs, and the
step control cannot see it.
"""
import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torchdiffeq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
from likelihood_accuracy import CASES, case_problem  # noqa: E402
from score_sde.likelihood import augmented_rhs  # noqa: E402
from score_sde.ode import _NORMS, ERROR_NORMS, _ODEFunc  # noqa: E402
from score_sde.per_sample_ode import _A, _C, _E  # noqa: E402
from score_sde.sde import ReverseSDE  # noqa: E402

EPS = 1e-5


class _Recorded(_ODEFunc):
    """The library's torchdiffeq right-hand side, also recording the accepted steps (t0, dt)."""

    def __init__(self, rhs, batch):
        super().__init__(rhs, batch, EPS, 1.0)
        self.accepted = []

    def callback_accept_step(self, t0, y0, dt):
        super().callback_accept_step(t0, y0, dt)
        self.accepted.append((float(t0), float(dt)))


def analyse(case: int, error_norm: str, tol: float) -> Tuple[List[Dict], torch.Tensor]:
    """(one row per accepted step of the library's solve, |delta error| [B] of the whole solve
    in bits/dim) for `CASES`' entry `case`; see the module docstring."""
    _, dim, sde, score, x, probes = case_problem(case)
    rhs = augmented_rhs(ReverseSDE(sde, score, probability_flow=True), torch.float64, probes)
    batch, bits = x.shape[0], dim * math.log(2)
    y0 = (x, torch.zeros(batch, dtype=torch.float64))

    def solve(y, times, rtol, **options):
        func = _Recorded(rhs, batch)
        out = torchdiffeq.odeint(func, y, times, rtol=rtol, atol=rtol, method="dopri5",
                                 options=dict(step_t=times[-1:], **options))
        return out, func

    def at(t):
        return torch.full((batch,), t, dtype=torch.float64)

    # The library's solve, recording its accepted steps.
    (_, delta), func = solve(y0, torch.tensor([EPS, 1.0], dtype=torch.float64), tol,
                             norm=_NORMS[error_norm])
    # The exact path at every step's stage times.
    nodes = sorted({min(1.0, t + c * h) for t, h in func.accepted for c in _C} | {EPS, 1.0})
    (xs, ds), _ = solve(y0, torch.tensor(nodes, dtype=torch.float64), 1e-10)
    exact = {t: (xs[i], ds[i]) for i, t in enumerate(nodes)}

    rows = []
    for t, h in func.accepted:
        times = [min(1.0, t + c * h) for c in _C]
        state = exact[t]
        ks = [rhs(at(t), state)]
        for s in range(1, 7):
            ys = tuple(v + h * sum(a * k[j] for a, k in zip(_A[s], ks) if a)
                       for j, v in enumerate(state))
            ks.append(rhs(at(times[s]), ys))
        end = exact[times[-1]][1]
        err_step = (ys[1] - end) / bits
        divs = [rhs(at(tc), exact[tc])[1] for tc in times[:6]]
        quad = (state[1] + h * sum(w * d for w, d in zip(_A[6], divs)) - end) / bits
        estimate = h * sum(w * k[1] for w, k in zip(_E, ks) if w) / bits
        j = int(err_step.abs().argmax())
        rows.append(dict(t=t, h=h, sample=j, dopri5=float(err_step[j]),
                         quadrature=float(quad[j]), estimate=float(estimate[j])))
    return rows, ((delta[-1] - ds[-1]) / bits).abs()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", type=int, default=0, choices=range(len(CASES)),
                   help="index into likelihood_accuracy.CASES")
    p.add_argument("--error_norm", default="rms", choices=ERROR_NORMS)
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--top", type=int, default=6, help="steps listed, largest dopri5 error first")
    args = p.parse_args(argv)
    _args.positive_number(p, "tol", args.tol)
    _args.at_least(p, "top", args.top, 1)
    rows, total = analyse(args.case, args.error_norm, args.tol)
    print(f"{list(CASES)[args.case]}, error norm {args.error_norm}, rtol = atol = {args.tol:g}: "
          f"{len(rows)} accepted steps; largest |delta error| of the solve "
          f"{float(total.max()):.2e} bits/dim (sample {int(total.argmax())})")
    print(f"{'t':>9}{'h':>10}{'sample':>8}{'dopri5':>11}{'quadrature':>12}{'estimate':>11}"
          "   (bits/dim, one step from the exact state)")
    for r in sorted(rows, key=lambda r: -abs(r["dopri5"]))[:args.top]:
        print(f"{r['t']:9.4f}{r['h']:10.4f}{r['sample']:8d}{r['dopri5']:11.2e}"
              f"{r['quadrature']:12.2e}{r['estimate']:11.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
