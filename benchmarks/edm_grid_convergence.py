"""Convergence of DPM-Solver on the "edm" time grid as the number of steps grows.

    python benchmarks/edm_grid_convergence.py --output edm_grid.json

Where the SDE's noise level sigma / alpha at T exceeds EDM's sigma_max = 80 (VP, sub-VP, cosine
VP), the "edm" grid spans T to 80 with a few steps uniform in log-SNR and follows EDM's rho = 7
grid below 80. How many: `EDM_SHARE_ABOVE_SIGMA_MAX` times the steps a uniform log-SNR grid puts
above 80 (rounded, at least one). This script runs multistep DPM-Solver with noise prediction
(the default of `sample_dpm_solver`, whose default grid this is) for each --shares value (0: one
step above 80 whatever num_steps) and, as a reference, on the log-SNR grid, and prints the median
over samples of |x - x*| / |x*|, where x* is the probability-flow ODE from the same prior draw
solved by `sample_ode` at rtol = atol = 1e-10 (both end at eps, undenoised). Data: the 64-d
4-mode mixture of bench.py's samplers, with its exact score.
"""
import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
from bench import SAMPLE_EPS, SDES, Mixture  # noqa: E402
from score_sde import _fast_common, sample_dpm_solver, sample_ode  # noqa: E402
from score_sde.cli import write_atomic  # noqa: E402


def parse_list(p, name: str, text: str, kind, *, minimum) -> list:
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        p.error(f"--{name} must be comma-separated numbers, got {text!r}")
    if any(not (v >= minimum and math.isfinite(v)) for v in values):
        p.error(f"--{name} values must be finite and >= {minimum}, got {text!r}")
    return values


def errors(sde, score, shape, eps, reference, steps, order, grid):
    out = []
    for num_steps in steps:
        x, _ = sample_dpm_solver(sde, score, shape, num_steps=num_steps, order=order, eps=eps,
                                 time_grid=grid, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(0))
        rel = (x - reference).norm(dim=1) / reference.norm(dim=1)
        out.append(float(rel.median()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sdes", default="vp,subvp,cosine",
                   help=f"comma-separated, of {', '.join(SDES)}")
    p.add_argument("--steps", default="8,10,15,20,30,100,300")
    p.add_argument("--orders", default="2,3")
    p.add_argument("--shares", default="0,0.25,0.5,1")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=200)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    sdes = args.sdes.split(",")
    bad = [s for s in sdes if s not in SDES]
    if bad:
        p.error(f"unknown SDE(s) {bad}; accepted: {', '.join(SDES)}")
    steps = parse_list(p, "steps", args.steps, int, minimum=1)
    orders = parse_list(p, "orders", args.orders, int, minimum=1)
    if any(o > 3 for o in orders):
        p.error(f"--orders must be of 1, 2, 3, got {args.orders!r}")
    shares = parse_list(p, "shares", args.shares, float, minimum=0)
    _args.at_least(p, "dim", args.dim, 1)
    _args.at_least(p, "num_samples", args.num_samples, 1)
    _args.output_file(p, "output", args.output)

    mixture, shape, rows = Mixture(args.dim, 4, seed=0), (args.num_samples, args.dim), []
    for name in sdes:
        sde, eps = SDES[name](), SAMPLE_EPS[name]
        score = mixture.score_fn(sde)
        reference, _ = sample_ode(sde, score, shape, rtol=1e-10, atol=1e-10, eps=eps,
                                  denoise=False, dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(0))
        runs = [(f"edm, share {share:g}", "edm", share) for share in shares]
        runs.append(("logsnr", "logsnr", None))
        for order in orders:
            for label, grid, share in runs:
                with mock.patch.object(_fast_common, "EDM_SHARE_ABOVE_SIGMA_MAX",
                                       _fast_common.EDM_SHARE_ABOVE_SIGMA_MAX
                                       if share is None else share):
                    errs = errors(sde, score, shape, eps, reference, steps, order, grid)
                rows.append(dict(sde=name, order=order, grid=label, steps=steps,
                                 median_rel_error=errs))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n| sde | order | grid | {' | '.join(str(n) for n in steps)} |")
    print(f"| --- | ---: | --- |{' ---: |' * len(steps)}")
    for r in rows:
        cells = " | ".join(f"{e:.1e}" for e in r["median_rel_error"])
        print(f"| {r['sde']} | {r['order']} | {r['grid']} | {cells} |")
    if args.output is not None:
        command = ["edm_grid_convergence.py"] + list(sys.argv[1:] if argv is None else argv)
        result = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                      command=" ".join(command),
                      default_share=_fast_common.EDM_SHARE_ABOVE_SIGMA_MAX, dim=args.dim,
                      num_samples=args.num_samples, rows=rows)
        text = json.dumps(result, indent=1) + "\n"
        write_atomic(Path(args.output), lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
