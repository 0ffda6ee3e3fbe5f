"""The 2-D end-to-end check: train the default model on a Gaussian mixture under each SDE, then
compare its test NLL from tools/likelihood.py with the mixture's exact entropy.

    OMP_NUM_THREADS=1 python benchmarks/contract_2d.py --workdir /tmp/contract --seed 0

(one thread per process keeps the small MLP fast on a shared machine)

Writes train.npy (50,000 samples) and test.npy (10,000 fresh samples) of an 8-mode ring
mixture (radius 4, std 0.5, unequal weights), runs

    python -m score_sde.train --sde SDE --dataset array --data_path train.npy \
        --workdir W --n_iters 4000 --seed S
    python tools/likelihood.py --workdir W --dataset array --data_path test.npy \
        --divergence exact

for each SDE of --sdes (default vp, subvp, ve, cosine), and prints one JSON line per SDE: the
NLL with its standard error, the exact entropy (Monte Carlo over 400,000 samples of the
closed-form density), the exact NLL of the same test samples and the gaps to both; then a
table.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
from score_sde.config import find_config  # noqa: E402


def ring_log_prob(x: torch.Tensor, num_modes=8, radius=4.0, std=0.5) -> torch.Tensor:
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    weights = torch.arange(1, num_modes + 1, dtype=torch.float64)
    weights = weights / weights.sum()
    d2 = ((x.double()[:, None] - means[None]) ** 2).sum(-1)
    comp = -0.5 * d2 / std ** 2 - math.log(2 * math.pi * std ** 2)
    return torch.logsumexp(comp + weights.log(), 1)


def ring_sample(n: int, generator: torch.Generator, num_modes=8, radius=4.0, std=0.5):
    weights = torch.arange(1, num_modes + 1, dtype=torch.float64)
    k = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=generator)
    angles = k.double() * (2 * math.pi / num_modes)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return means + std * torch.randn(n, 2, generator=generator, dtype=torch.float64)


SDE_NAMES = ("vp", "subvp", "ve", "cosine")


def run_one(root: Path, sde: str, args, env) -> dict:
    """Trains one SDE's default model on root/train.npy and returns its test NLL record."""
    run = root / f"run_{sde}_seed{args.seed}"
    start = time.time()
    subprocess.run([sys.executable, "-m", "score_sde.train", "--sde", sde, "--dataset",
                    "array", "--data_path", str(root / "train.npy"), "--workdir", str(run),
                    "--n_iters", str(args.n_iters), "--seed", str(args.seed)]
                   + (["--config", args.config] if args.config else []),
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - start
    out = subprocess.run([sys.executable, "tools/likelihood.py", "--workdir", str(run),
                          "--dataset", "array", "--data_path", str(root / "test.npy"),
                          "--divergence", "exact", "--batch_size", "1000"],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True)
    nll = json.loads(out.stdout.strip().splitlines()[-1])
    return dict(sde=sde, nll_nats=nll["nll_nats"], stderr=nll["stderr"],
                nfe_mean=nll["nfe_mean"], train_seconds=train_s,
                likelihood_seconds=nll["seconds"], seed=args.seed, n_iters=args.n_iters)


def parse(argv=None) -> argparse.Namespace:
    """The checked arguments, with --workdir and --config as absolute paths."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_iters", type=int, default=4000)
    p.add_argument("--sdes", default=",".join(SDE_NAMES),
                   help="comma-separated SDEs, each trained and evaluated in turn")
    p.add_argument("--config", default=None, help="config file (default: the training "
                   "script's for --dataset array, configs/toy.py)")
    args = p.parse_args(argv)
    for sde in args.sdes.split(","):
        if sde not in SDE_NAMES:
            p.error(f"unknown SDE {sde!r}; accepted: {', '.join(SDE_NAMES)}")
    _args.at_least(p, "n_iters", args.n_iters, 1)
    _args.at_least(p, "seed", args.seed, 0)
    # The training and evaluation run as subprocesses in the repository root: paths given
    # relative to this folder are made absolute first.
    if args.config is not None:
        try:
            args.config = str(find_config(args.config).resolve())
        except (ValueError, FileNotFoundError) as err:
            p.error(str(err))
    _args.output_folder(p, "workdir", args.workdir)
    args.workdir = str(Path(args.workdir).resolve())
    return args


def main(argv=None) -> int:
    args = parse(argv)
    sdes = args.sdes.split(",")
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(12345)
    np.save(root / "train.npy", ring_sample(50_000, gen).float().numpy())
    test = ring_sample(10_000, gen).float()
    np.save(root / "test.npy", test.numpy())
    big = ring_sample(400_000, gen)
    entropy = -ring_log_prob(big).mean().item()
    test_exact = -ring_log_prob(test).mean().item()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rows = []
    for sde in sdes:
        row = run_one(root, sde, args, env)
        row.update(entropy=entropy, test_exact_nll=test_exact,
                   gap_to_entropy=row["nll_nats"] - entropy,
                   gap_to_test_exact=row["nll_nats"] - test_exact)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'sde':<8}{'test NLL':>18}{'entropy':>9}{'gap':>8}{'gap (test)':>11}{'NFE':>6}"
          f"{'train s':>9}")
    for r in rows:
        print(f"{r['sde']:<8}{r['nll_nats']:>10.4f} +- {r['stderr']:.4f}{r['entropy']:>9.4f}"
              f"{r['gap_to_entropy']:>8.3f}{r['gap_to_test_exact']:>11.3f}{r['nfe_mean']:>6.0f}"
              f"{r['train_seconds']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
