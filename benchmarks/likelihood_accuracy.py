"""Likelihood accuracy of each error norm against a tight float64 solve, on closed-form mixtures.

    python benchmarks/likelihood_accuracy.py --output lik_accuracy.json

For Gaussian mixtures of several dimensions and sharpness (closed-form score under VP, exact
samples, one Rademacher probe per sample shared by every run), `log_likelihood` at rtol = atol
= --tol with the max and rms error norms, batch and per-sample step control, on float32 and
float64 data, and the paper code's solve (SciPy RK45 on a flattened float64 state,
`bench.paper_code_loglik`). The truth is the same estimate (same probes) solved in float64 at
rtol = atol = 1e-10 with the max norm. Each row: evaluations per solve (SciPy: its nfev, each
of which runs the network twice) and the largest |bits/dim - truth| over the samples
(-log p / (D ln 2), continuous data: no dequantization offset).
"""
import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import List

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
from bench import Mixture, paper_code_loglik  # noqa: E402
from score_sde import VPSDE, log_likelihood  # noqa: E402

# name -> (dimension, component std range, scale of the means, seed, samples). "bench.py's"
# is the mixture of bench.py's likelihood solves (seed 1, scale 0.3, stds 0.1-0.3) at 784
# dimensions (bench.py --solve_dim 784; its default, 3072, is the last case).
CASES = {
    "784-d, stds 0.1-0.3 (bench.py's)": (784, (0.1, 0.3), 0.3, 1, 64),
    "784-d, stds 0.3-0.8": (784, (0.3, 0.8), 1.0, 0, 64),
    "256-d, stds 0.02-0.1": (256, (0.02, 0.1), 0.5, 4, 64),
    "64-d, stds 0.05-0.2": (64, (0.05, 0.2), 1.0, 2, 64),
    "2-d, stds 0.05-0.3": (2, (0.05, 0.3), 2.0, 3, 64),
    "3072-d, stds 0.1-0.3": (3072, (0.1, 0.3), 0.3, 1, 16),
}
RUNS = [(norm, control) for norm in ("max", "rms") for control in ("batch", "per_sample")]
SCIPY_RUN = "SciPy RK45 (paper code)"


def case_problem(index: int):
    """(name, dimension, VP SDE, closed-form score, exact samples [n, D] float64 (rounded
    through float32), one Rademacher probe per sample [1, n, D]) of `CASES`' entry `index`;
    the other likelihood benchmarks use the same problems."""
    name = list(CASES)[index]
    dim, stds, scale, seed, n = CASES[name]
    mixture = Mixture(dim, 4, seed=seed, scale=scale, std_range=stds)
    sde = VPSDE()
    x = mixture.sample(n, torch.Generator().manual_seed(0)).float().double()
    g = torch.Generator().manual_seed(1)
    probes = torch.randint(0, 2, (1,) + tuple(x.shape), generator=g).double() * 2 - 1
    return name, dim, sde, mixture.score_fn(sde), x, probes


def case_indices(parser: argparse.ArgumentParser, text: str) -> List[int]:
    """The indices of --cases ("0,3"), or the parser's one-line error (exit 2)."""
    try:
        indices = [int(i) for i in text.split(",")]
    except ValueError:
        indices = []
    if not indices or not all(0 <= i < len(CASES) for i in indices):
        parser.error(f"--cases must be comma-separated indices in 0..{len(CASES) - 1} "
                     f"({', '.join(f'{i}: {name}' for i, name in enumerate(CASES))}), "
                     f"got {text!r}")
    return indices


def tight_truth(sde, score, x, probes):
    """(log p [B] float64, NFE): the estimate with these probes solved in float64 at rtol =
    atol = 1e-10 with the max norm, the reference every likelihood benchmark compares with."""
    truth, _, nfe = log_likelihood(sde, score, x.double(), probes=probes.double(), rtol=1e-10,
                                   atol=1e-10, eps=1e-5)
    return truth, nfe


def max_abs_dbpd(logp: torch.Tensor, truth: torch.Tensor, dim: int) -> float:
    """The largest |bits/dim - truth| over the samples (continuous data: -log p / (D ln 2))."""
    return float(((logp.double() - truth) / (dim * math.log(2))).abs().max())


def solve_runs(sde, score, x, probes, truth, dim: int, dtype: torch.dtype, tol: float):
    """One row (dtype, run, nfe, max_abs_dbpd) per run of `RUNS` and one for SciPy's RK45 (the
    paper code's solve), every solve at rtol = atol = tol on the data cast to dtype."""
    x, probes, dtype_name = x.to(dtype), probes.to(dtype), str(dtype).replace("torch.", "")
    rows = []
    for norm, control in RUNS:
        logp, _, nfe = log_likelihood(sde, score, x, probes=probes, rtol=tol, atol=tol,
                                      eps=1e-5, error_norm=norm, step_control=control)
        rows.append(dict(dtype=dtype_name, run=f"{norm}, {control}", nfe=nfe,
                         max_abs_dbpd=max_abs_dbpd(logp, truth, dim)))
    logp, nfe = paper_code_loglik(sde, score, x, probes, rtol=tol, atol=tol, eps=1e-5)
    rows.append(dict(dtype=dtype_name, run=SCIPY_RUN, nfe=nfe,
                     max_abs_dbpd=max_abs_dbpd(logp, truth, dim)))
    return rows


def report(rows, columns, *, output, script: str, argv, tol, extra=None) -> None:
    """Prints the rows as a table (the `columns` [(key, width)] of text, then NFE and the
    largest |bits/dim error|) and, with `output`, writes them as JSON with the date, torch
    version, command and tolerance(s), plus the entries of `extra` beside the rows."""
    print("\n" + "".join(f"{key:<{width}}" for key, width in columns)
          + f"{'NFE':>6}{'max|dbpd|':>11}")
    for r in rows:
        print("".join(f"{r[key]:<{width}}" for key, width in columns)
              + f"{r['nfe']:>6}{r['max_abs_dbpd']:>11.1e}")
    if output:
        meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__,
                    command=" ".join([script] + list(argv if argv is not None
                                                     else sys.argv[1:])),
                    tol=tol)
        result = dict(meta=meta, rows=rows, **(extra or {}))
        Path(output).write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--cases", default=",".join(str(i) for i in range(len(CASES))),
                   help="indices into CASES")
    p.add_argument("--scipy_per_sample", action="store_true",
                   help="also solve each sample alone with SciPy's RK45 (float64 data); its "
                        "NFE is the largest over the samples, with the mean as nfe_mean")
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    _args.positive_number(p, "tol", args.tol)
    _args.output_file(p, "output", args.output)
    rows = []
    for i in case_indices(p, args.cases):
        name, dim, sde, score, x, probes = case_problem(i)
        t0 = time.perf_counter()
        truth, truth_nfe = tight_truth(sde, score, x, probes)
        truth_s = time.perf_counter() - t0

        for dtype in (torch.float32, torch.float64):
            for row in solve_runs(sde, score, x, probes, truth, dim, dtype, args.tol):
                rows.append(dict(case=name, **row))
                print(json.dumps(rows[-1]), flush=True)
            if args.scipy_per_sample and dtype == torch.float64:
                # The same solve for one sample at a time: its norm is then that sample's own
                # rms, as with error_norm="rms" and per-sample step control.
                solves = [paper_code_loglik(sde, score, x[j:j + 1], probes[:, j:j + 1],
                                            rtol=args.tol, atol=args.tol, eps=1e-5)
                          for j in range(x.shape[0])]
                nfes = [n for _, n in solves]
                rows.append(dict(case=name, dtype="float64", run="SciPy RK45, each sample alone",
                                 nfe=max(nfes), nfe_mean=sum(nfes) / len(nfes),
                                 max_abs_dbpd=max_abs_dbpd(torch.cat([lp for lp, _ in solves]),
                                                           truth, dim)))
                print(json.dumps(rows[-1]), flush=True)
        print(json.dumps(dict(case=name, truth_nfe=truth_nfe, truth_seconds=truth_s)),
              flush=True)
    report(rows, [("case", 38), ("dtype", 9), ("run", 31)], output=args.output,
           script="likelihood_accuracy.py", argv=argv, tol=args.tol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
