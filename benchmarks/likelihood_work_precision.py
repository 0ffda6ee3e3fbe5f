"""Evaluations against accuracy: the tolerance and cost at which each likelihood solve holds
every sample within a target, on the closed-form mixtures.

    python benchmarks/likelihood_work_precision.py --output work_precision.json

For every mixture of `likelihood_accuracy.CASES` and every tolerance of --tols, the runs of
`likelihood_accuracy.solve_runs` (`log_likelihood` with the max and rms norms, batch and
per-sample step control, and SciPy's RK45 as the paper code solves it) at rtol = atol = tol,
each row holding the evaluations and the largest |bits/dim - truth| over the samples (the truth
is `likelihood_accuracy.tight_truth`). The summary names, per mixture, data dtype and run, the
loosest tolerance of the grid from which that tolerance and every tighter one keep every
sample within --target bits/dim, and the evaluations it took there: the cost of the target
accuracy, which compares solvers whose norms mean different things at the same tolerance.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
from likelihood_accuracy import (CASES, case_indices, case_problem, report,  # noqa: E402
                                 solve_runs, tight_truth)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def cost_of_target(rows: List[Dict], target: float) -> Optional[Dict]:
    """Of one run's rows (one per tolerance), the row of the loosest tolerance at which it and
    every tighter tolerance of the grid are within `target`; None when the tightest is not."""
    found = None
    for row in sorted(rows, key=lambda r: r["tol"]):
        if row["max_abs_dbpd"] > target:
            break
        found = row
    return found


def summarize(rows: List[Dict], target: float) -> List[Dict]:
    """One entry per (case, dtype, run): `cost_of_target` of its rows (tol and nfe, or None)."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["case"], r["dtype"], r["run"]), []).append(r)
    out = []
    for (case, dtype, run), group in groups.items():
        best = cost_of_target(group, target)
        out.append(dict(case=case, dtype=dtype, run=run,
                        tol=best["tol"] if best else None, nfe=best["nfe"] if best else None))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tols", default="1e-5,6e-6,3e-6,2e-6,1e-6,6e-7,3e-7",
                   help="comma-separated rtol = atol values")
    p.add_argument("--target", type=float, default=1e-4,
                   help="the largest |bits/dim error| allowed on any sample")
    p.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                   help="indices into likelihood_accuracy.CASES")
    p.add_argument("--dtypes", default="float32,float64", help="data dtypes, comma-separated")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    try:
        tols = sorted({float(t) for t in args.tols.split(",")}, reverse=True)
    except ValueError:
        p.error(f"--tols must be comma-separated numbers, got {args.tols!r}")
    if not tols or not all(math.isfinite(t) and t > 0 for t in tols):
        p.error(f"--tols must be finite positive numbers, got {args.tols!r}")
    _args.positive_number(p, "target", args.target)
    _args.output_file(p, "output", args.output)
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPES):
        p.error(f"unknown dtype(s) in --dtypes {args.dtypes!r}; accepted: {', '.join(DTYPES)}")
    rows = []
    for i in case_indices(p, args.cases):
        name, dim, sde, score, x, probes = case_problem(i)
        truth, _ = tight_truth(sde, score, x, probes)
        for dtype in dtypes:
            for tol in tols:
                for row in solve_runs(sde, score, x, probes, truth, dim, DTYPES[dtype], tol):
                    rows.append(dict(case=name, tol=tol, **row))
                    print(json.dumps(rows[-1]), flush=True)
    summary = summarize(rows, args.target)
    report(rows, [("case", 38), ("dtype", 9), ("run", 26), ("tol", 8)], output=args.output,
           script="likelihood_work_precision.py", argv=argv, tol=tols,
           extra=dict(target=args.target, summary=summary))
    print(f"\nThe loosest tolerance of the grid from which every sample stays within "
          f"{args.target:g} bits/dim, and its evaluations:")
    for s in summary:
        cost = f"{s['tol']:g} / {s['nfe']}" if s["tol"] else f"none down to {tols[-1]:g}"
        print(f"{s['case']:<38}{s['dtype']:<9}{s['run']:<26}{cost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
