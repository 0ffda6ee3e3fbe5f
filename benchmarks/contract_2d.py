"""The 2-D end-to-end check: train the default model on a Gaussian mixture, then compare its
test NLL from tools/likelihood.py with the mixture's exact entropy.

    python benchmarks/contract_2d.py --workdir /tmp/contract --seed 0

Writes train.npy (50,000 samples) and test.npy (10,000 fresh samples) of an 8-mode ring
mixture (radius 4, std 0.5, unequal weights), runs

    python -m score_sde.train --sde vp --dataset array --data_path train.npy \
        --workdir W --n_iters 4000 --seed S
    python tools/likelihood.py --workdir W --dataset array --data_path test.npy \
        --divergence exact

and prints one JSON line: the NLL with its standard error, the exact entropy (Monte Carlo
over 400,000 samples of the closed-form density), the exact NLL of the same test samples,
and the gaps to both.
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_iters", type=int, default=4000)
    args = p.parse_args()
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
    run = root / f"run_seed{args.seed}"
    start = time.time()
    subprocess.run([sys.executable, "-m", "score_sde.train", "--sde", "vp", "--dataset",
                    "array", "--data_path", str(root / "train.npy"), "--workdir", str(run),
                    "--n_iters", str(args.n_iters), "--seed", str(args.seed)],
                   cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    train_s = time.time() - start
    out = subprocess.run([sys.executable, "tools/likelihood.py", "--workdir", str(run),
                          "--dataset", "array", "--data_path", str(root / "test.npy"),
                          "--divergence", "exact", "--batch_size", "1000"],
                         cwd=REPO, env=env, check=True, capture_output=True, text=True)
    nll = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({
        "nll_nats": nll["nll_nats"], "stderr": nll["stderr"], "entropy": entropy,
        "test_exact_nll": test_exact, "gap_to_entropy": nll["nll_nats"] - entropy,
        "gap_to_test_exact": nll["nll_nats"] - test_exact, "nfe_mean": nll["nfe_mean"],
        "train_seconds": train_s, "likelihood_seconds": nll["seconds"], "seed": args.seed,
        "n_iters": args.n_iters}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
