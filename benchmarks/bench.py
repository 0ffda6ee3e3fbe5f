"""The project's speed and accuracy numbers in one command: training, likelihood, samplers.

    python benchmarks/bench.py --output bench.json            # CUDA when available
    python benchmarks/bench.py --device cpu --sections samplers

Prints one table per section and writes every measured row, with the device, library versions,
date and command line, to --output (JSON). Sizes default to the device: the paper's CIFAR-10
models on CUDA, a tiny DDPM++ on the CPU (where only the samplers' numbers mean much).

Sections
- train: images/s, ms/step and peak memory of `Trainer.train_step` per model and precision mode
  on synthetic 8-bit CIFAR-10 pickles (benchmarks/train_speed.py, which also runs alone).
- likelihood, two parts (--lik_parts cost,solves).
  Evaluation cost: ms per evaluation of the probability-flow drift with its Hutchinson
  divergence for DDPM++ cont. (random weights, its zero-initialised layers redrawn; the cost
  does not depend on the weights), at batch 64 and --lik_batch: the library's right-hand side
  (one forward and one vector-Jacobian product on the device) in strict fp32, TF32 and, on
  CUDA, TF32 replayed from a CUDA graph (`CudaGraphed`), and the paper's public code's (a
  float64 NumPy state copied to the device and back, the drift and the divergence from two
  separate forward passes) at batch 64, the ratio to the latter.
  Solves: the same data with the same Rademacher probes solved by `log_likelihood` in strict
  fp32 with the max error norm at batch 64 (the accuracy reference), the paper code's way
  (SciPy RK45 on one flattened float64 NumPy state, a host round trip per evaluation), and the
  library with the rms norm, TF32, --lik_batch, CUDA graphs (on CUDA) and per-sample step
  control. Each row: NFE per solve, ms per evaluation (solve time / evaluations), images/s,
  mean bits/dim, the largest per-sample |bits/dim - the reference's| and the images/s ratio
  to the paper-code solve. The data are the test split of --checkpoint's dataset
  (dequantized), or without it --lik_images exact samples of a --solve_dim-dimensional
  Gaussian mixture with its closed-form score (a smooth, well-posed flow; random network
  weights are not).
  Every row that claims a CUDA graph carries `replayed` and the recording's `cuda_graph`
  counts, and the benchmark stops with an error if such a row ran eagerly instead.
- samplers: on a 64-d Gaussian mixture whose score is closed-form at every t (from each SDE's
  own marginal_coeffs), every sampler's NFE, seconds and Frechet distance to the exact moments
  of its target, divided by the finite-sample floor (the mean distance of as many exact
  samples); for the few-step samplers also the smallest NFE tried (6, 8, 9, 10, 15, 20, 30,
  40, 60; Heun 9 to 81; --quick: 10 and 20, Heun 19) below 1.5 x the floor; and the
  probability-flow ODE solved the paper code's way (SciPy RK45, float64 host round trip per
  evaluation) against `sample_ode`. Then both published forms of each higher-order DPM-Solver update
  (`solver_type`) at 10, 15 and 20 evaluations (--quick: 10): the median error against the ODE
  from the same prior draws, and which form is the more accurate.

All timings synchronise the device before reading the clock. Numbers from a shared or busy
machine are noisy; say so next to them.
"""
import argparse
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import scipy.integrate
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _args  # noqa: E402
import train_speed  # noqa: E402
from score_sde import (VESDE, VPSDE, CosineVPSDE, ReverseSDE, SubVPSDE,  # noqa: E402
                      log_likelihood, sample_ddim, sample_dpm_solver,
                      sample_heun, sample_ode, sample_pc)
from score_sde._utils import host_checked_times  # noqa: E402
from score_sde.cuda_graphs import CudaGraphed  # noqa: E402
from score_sde.fast_sampling import (DPM_DEFAULT_SOLVER_TYPES, DPM_METHODS,  # noqa: E402
                                     DPM_PREDICTIONS, DPM_SOLVER_TYPES)
from score_sde.likelihood import augmented_rhs  # noqa: E402
from score_sde.ode import odeint_interval  # noqa: E402
from score_sde.datasets import DataInfo, load_dataset, to_model_range  # noqa: E402
from score_sde.metrics import frechet_distance  # noqa: E402
from score_sde.runs import load_trained  # noqa: E402
from score_sde.build import build_model, build_sde, model_score_fn  # noqa: E402
from score_sde.config import apply_overrides, load_config_file  # noqa: E402

SECTIONS = ("train", "likelihood", "samplers")
SDES = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE, "cosine": CosineVPSDE}
SAMPLE_EPS = {"vp": 1e-3, "subvp": 1e-3, "ve": 1e-5, "cosine": 1e-3}
FD_FACTOR = 1.5
REFERENCE_BATCH = 64  # the batch of the paper code's likelihood measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


# --- likelihood -----------------------------------------------------------------------------------

def random_ddpmpp(config: str, model_kwargs: Dict, device: torch.device, seed: int):
    """(sde, score_fn, shape) of a freshly initialised model; weights that are all zero (the
    zero-initialised output layers) are redrawn from N(0, 0.02^2) so the score is not zero."""
    cfg = load_config_file(str(REPO / "configs" / config))
    if model_kwargs:
        cfg = apply_overrides(cfg, {"model.kwargs": {**cfg.model.kwargs, **model_kwargs}})
    info = DataInfo(name="cifar10", shape=(3, 32, 32), discrete=True, num_levels=256,
                    data_range=(-1.0, 1.0), num_classes=10)
    torch.manual_seed(seed)
    model = build_model(cfg, info)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.02)
    model = model.to(device).eval().requires_grad_(False)
    sde = build_sde(cfg)
    fn = model_score_fn(model, sde, cfg)
    return sde, fn, info.shape


def noise_images(n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n,) + tuple(shape), generator=g, dtype=torch.uint8)
    return to_model_range(raw, generator=g)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of fn after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def evaluation_cost(args, device: torch.device) -> Dict:
    """ms per evaluation of the augmented right-hand side (drift and Hutchinson divergence) of a
    freshly initialised network: the library's (one forward, one vector-Jacobian product, on
    the device) in strict fp32 and TF32, and the paper code's (float64 NumPy state copied to
    the device and back, two forwards and one product) at the paper's batch of 64."""
    kwargs = train_speed.MODEL_KWARGS.get(args.lik_model, {})
    sde, score_fn, shape = random_ddpmpp(train_speed.CONFIGS[args.lik_model], kwargs, device,
                                         args.seed)
    rsde = ReverseSDE(sde, score_fn, probability_flow=True)
    rows = []
    for batch in sorted({REFERENCE_BATCH, args.lik_batch}):
        x = noise_images(batch, shape, args.seed).to(device)
        probes = (torch.randint(0, 2, (1,) + tuple(x.shape), device=device) * 2 - 1).float()
        t = torch.full((batch,), 0.5, dtype=torch.float64, device=device)
        state = (x.double(), torch.zeros(batch, dtype=torch.float64, device=device))
        rhs = augmented_rhs(rsde, torch.float32, probes)
        # strict: a row that claims a CUDA graph fails loudly instead of timing eager calls.
        graphed = CudaGraphed(lambda tt, y, d: rhs(tt, (y, d)), strict=True)
        runs = [("strict fp32", lambda: (set_tf32(False), rhs(t, state))),
                ("TF32", lambda: (set_tf32(True), rhs(t, state)))]
        if device.type == "cuda":  # elsewhere there is nothing to record
            runs.append(("TF32, CUDA graph", lambda: (set_tf32(True), graphed(t, *state))))
        if batch == REFERENCE_BATCH:
            flat = np.concatenate([x.double().cpu().numpy().reshape(-1), np.zeros(batch)])
            ode_func = _paper_code_rhs(rsde, x.shape, probes, device)

            def paper():
                set_tf32(False)
                torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
                return ode_func(0.5, flat)
            runs.append(("paper-code style (2 forwards, host round trip)", paper))
        for name, fn in runs:
            # As inside log_likelihood: times were validated on the host, none is read back.
            with host_checked_times():
                seconds = _timed(fn, device, args.cost_evals)
            rows.append(dict(run=name, batch=batch, ms_per_eval=1e3 * seconds,
                             image_evals_per_s=batch / seconds))
            if "CUDA graph" in name:
                rows[-1].update(_graph_fields(graphed.stats()))
                # The replay computes what the eager TF32 call computes.
                set_tf32(True)
                with host_checked_times():
                    ref, out = rhs(t, state), graphed(t, *state)
                rows[-1]["max_rel_diff_vs_eager"] = max(
                    float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                    for a, b in zip(out, ref))
            print(json.dumps(rows[-1]), flush=True)
    set_tf32(False)
    base = next(r for r in rows if r["run"].startswith("paper"))["image_evals_per_s"]
    for r in rows:
        r["speedup_vs_paper_code"] = r["image_evals_per_s"] / base
    solver = [r for batch in sorted({REFERENCE_BATCH, args.lik_batch})
              for r in solver_arithmetic(shape, batch, device, args.seed, args.cost_evals)]
    return dict(model=f"{args.lik_model}, random weights", shape=list(shape), rows=rows,
                solver_rows=solver)


def solver_arithmetic(shape: Sequence[int], batch: int, device: torch.device, seed: int,
                      repeats: int) -> List[Dict]:
    """ms per evaluation that `log_likelihood`'s dopri5 solve spends outside the network: the
    Runge-Kutta combinations and the error norm on the (images, log-density) state, with a
    float64 state (what the library integrates, whatever the data's dtype) and a float32 one.
    The right-hand side is a cheap linear ODE of the same shapes, so nearly all the time is the
    solver's; both states take the same steps, so the two rows compare like with like."""
    rows = []
    for dtype in (torch.float64, torch.float32):
        x = noise_images(batch, shape, seed).to(device=device, dtype=dtype)
        state = (x, torch.zeros(batch, dtype=dtype, device=device))
        calls = 0

        def rhs(t, y):
            nonlocal calls
            calls += 1
            return -0.5 * y[0], torch.ones_like(y[1])

        def solve():
            return odeint_interval(rhs, state, 1e-5, 1.0, batch=batch, rtol=1e-5, atol=1e-5,
                                   method="dopri5")

        solve()
        calls = 0
        seconds = _timed(solve, device, repeats)
        nfe = calls / (repeats + 2)  # _timed's two warm-up calls count too
        rows.append(dict(state=str(dtype).replace("torch.", ""), batch=batch, nfe=nfe,
                         ms_per_eval=1e3 * seconds / nfe))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _graph_fields(stats: Dict) -> Dict:
    """The JSON fields of a row that claims a CUDA graph; raises if it did not replay."""
    replayed = stats["replays"] > 0 and not stats["failures"]
    if not replayed:
        raise RuntimeError(f"a benchmark row claims a CUDA graph but ran eagerly: {stats}")
    return dict(replayed=True, cuda_graph=stats)


def _paper_code_rhs(rsde, shape, probes, device) -> Callable[[float, np.ndarray], np.ndarray]:
    """The paper code's ODE function: float64 NumPy state in and out, the drift from one forward
    pass without gradients and the Hutchinson divergence from a second with them."""
    batch, probe = shape[0], probes[0]

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y[:-batch]).reshape(shape).to(device, torch.float32)
        vec_t = torch.full((batch,), t, device=device, dtype=torch.float32)
        with torch.no_grad():
            drift = rsde.sde(xt, vec_t)[0]
        with torch.enable_grad():
            xg = xt.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad((rsde.sde(xg, vec_t)[0] * probe).sum(), xg)
        div = (grad * probe).reshape(batch, -1).sum(1)
        return np.concatenate([drift.cpu().numpy().reshape(-1),
                               div.cpu().numpy()]).astype(np.float64)

    return ode_func


def paper_code_loglik(sde, score_fn, x: torch.Tensor, probes: torch.Tensor, *,
                      rtol: float, atol: float, eps: float) -> Tuple[torch.Tensor, int]:
    """log p(x) as the paper's public code computes it: scipy.integrate.solve_ivp(RK45) from eps
    to T on a flattened float64 NumPy state [x, delta], calling `_paper_code_rhs`. Returns
    (logp [B] float64 on the CPU, NFE)."""
    rsde = ReverseSDE(sde, score_fn, probability_flow=True)
    batch = x.shape[0]
    init = np.concatenate([x.double().cpu().numpy().reshape(-1), np.zeros(batch)])
    sol = scipy.integrate.solve_ivp(_paper_code_rhs(rsde, x.shape, probes, x.device),
                                    (eps, sde.T), init, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"SciPy RK45 failed: {sol.message}")
    z = torch.from_numpy(sol.y[:-batch, -1]).reshape(x.shape)
    delta = torch.from_numpy(sol.y[-batch:, -1])
    return sde.prior_logp(z) + delta, int(sol.nfev)


def solve_data(args, device: torch.device):
    """(sde, score_fn, data [N, ...] in the model's range, bpd offset, description)."""
    if args.checkpoint:
        run = load_trained(args.checkpoint, device=device)
        data, _ = load_dataset(run.info.name, split="test",
                               data_dir=args.data_dir or run.cfg.data.data_dir,
                               num_samples=args.lik_images)
        raw = data.tensors[0]
        if run.info.discrete:
            x = to_model_range(raw, generator=torch.Generator().manual_seed(args.seed))
        else:
            x = raw.float()
        what = "images of" if run.info.discrete else "samples of"
        return (run.sde, run.score_fn(), x, run.info.discrete,
                f"{args.checkpoint} (step {run.step}), first {len(x)} test {what} "
                f"{run.info.name}" + (", dequantized" if run.info.discrete else ""))
    mixture = Mixture(args.solve_dim, 4, seed=1, scale=0.3, std_range=(0.1, 0.3))
    sde = VPSDE()
    x = mixture.sample(args.lik_images, torch.Generator().manual_seed(args.seed)).float()
    return (sde, mixture.score_fn(sde), x, False,
            f"closed-form score of a {args.solve_dim}-d Gaussian mixture (4 modes), VP SDE, "
            f"{len(x)} exact samples")


def likelihood_solves(args, device: torch.device) -> Dict:
    """Full adaptive solves of the same data with the same probes: the library's variants
    against the paper code's, bits/dim against strict fp32 with the max norm at batch 64."""
    sde, score_fn, x_all, images, source = solve_data(args, device)
    n, dims = x_all.shape[0], x_all[0].numel()
    g = torch.Generator().manual_seed(args.seed + 1)
    probes_all = torch.randint(0, 2, (1,) + tuple(x_all.shape), generator=g).float() * 2 - 1
    settings = dict(rtol=args.rtol, atol=args.atol, eps=1e-5)

    def batches(batch: int, solve: Callable):
        logps, nfes, seconds = [], [], 0.0
        for start in range(0, n, batch):
            x = x_all[start:start + batch].to(device)
            probes = probes_all[:, start:start + batch].to(device)
            sync(device)
            t0 = time.perf_counter()
            logp, nfe = solve(x, probes)
            sync(device)
            seconds += time.perf_counter() - t0
            logps.append(logp.double().cpu())
            nfes.append(nfe)
        return torch.cat(logps), nfes, seconds

    graph_stats: Dict = {}

    def ours(tf32: bool, step_control: str = "batch", error_norm: str = "max",
             cuda_graph: bool = False):
        def solve(x, probes):
            set_tf32(tf32)
            stats: Dict = {}
            logp, _, nfe = log_likelihood(sde, score_fn, x, probes=probes,
                                          step_control=step_control, error_norm=error_norm,
                                          cuda_graph=cuda_graph, cuda_graph_stats=stats,
                                          **settings)
            for key, value in stats.items():
                graph_stats[key] = graph_stats.get(key, 0 if key != "failures" else []) + value
            return logp, nfe
        return solve

    def paper(x, probes):
        set_tf32(False)
        torch.backends.cudnn.allow_tf32 = True  # PyTorch's default
        return paper_code_loglik(sde, score_fn, x, probes, **settings)

    big = args.lik_batch
    plan = [("strict fp32, max norm (accuracy reference)", REFERENCE_BATCH, ours(False)),
            ("paper-code style: SciPy RK45, float64 host round trip", REFERENCE_BATCH, paper),
            ("strict fp32, rms norm", REFERENCE_BATCH, ours(False, "batch", "rms")),
            ("TF32, rms norm", REFERENCE_BATCH, ours(True, "batch", "rms")),
            ("TF32, rms norm", big, ours(True, "batch", "rms")),
            ("TF32, rms norm, CUDA graph", big, ours(True, "batch", "rms", True)),
            ("TF32, rms norm, per-sample step control", big, ours(True, "per_sample", "rms")),
            ("TF32, max norm", big, ours(True))]
    if device.type != "cuda":  # elsewhere there is nothing to record
        plan = [row for row in plan if "CUDA graph" not in row[0]]
    rows, ref_bpd = [], None
    offset = 7.0 if images else 0.0  # 8-bit data in [-1, 1]; continuous data: none
    for name, batch, solve in plan:
        batch = min(batch, n)
        graph_stats.clear()
        logp, nfes, seconds = batches(batch, solve)
        bpd = -logp / (dims * math.log(2)) + offset
        ref_bpd = bpd if ref_bpd is None else ref_bpd
        evals = sum(nfes)
        rows.append(dict(run=name, batch=batch, images=n, nfe_per_solve=float(np.mean(nfes)),
                         evaluations=evals, seconds=seconds, ms_per_eval=1e3 * seconds / evals,
                         images_per_s=n / seconds, bpd=float(bpd.mean()),
                         max_abs_dbpd=float((bpd - ref_bpd).abs().max())))
        if "CUDA graph" in name:
            rows[-1].update(_graph_fields(dict(graph_stats)))
        print(json.dumps(rows[-1]), flush=True)
    set_tf32(False)
    base = rows[1]["images_per_s"]
    for r in rows:
        r["speedup_vs_paper_code"] = r["images_per_s"] / base
    return dict(source=source, dims=dims, bpd="bits/dim" if images else
                "-log p / (D ln 2) (continuous data)",
                probes="1 Rademacher per sample, shared by all runs", **settings, rows=rows)


# --- samplers on a closed-form mixture ------------------------------------------------------------

class Mixture:
    """sum_k w_k N(mu_k, s_k^2 I) in R^D, float64, and its law after x -> a x + sigma z."""

    def __init__(self, dim: int, modes: int, seed: int, scale: float = 1.0,
                 std_range: Tuple[float, float] = (0.3, 0.8)):
        g = torch.Generator().manual_seed(seed)
        self.means = scale * torch.randn(modes, dim, generator=g, dtype=torch.float64)
        lo, hi = std_range
        self.stds = lo + (hi - lo) * torch.rand(modes, generator=g, dtype=torch.float64)
        w = 0.5 + torch.rand(modes, generator=g, dtype=torch.float64)
        self.weights = w / w.sum()

    def moments(self, a: float = 1.0, sigma: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
        mu = a * self.means
        var = a ** 2 * self.stds ** 2 + sigma ** 2
        mean = self.weights @ mu
        second = (self.weights[:, None, None] * mu[:, :, None] * mu[:, None, :]).sum(0)
        cov = second - torch.outer(mean, mean) + torch.diag(
            (self.weights @ var).expand(mu.shape[1]))
        return mean.numpy(), cov.numpy()

    def sample(self, n: int, g: torch.Generator, a: float = 1.0, sigma: float = 0.0):
        k = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.means.shape[1], generator=g, dtype=torch.float64)
        std = torch.sqrt(a ** 2 * self.stds[k] ** 2 + sigma ** 2)
        return a * self.means[k] + std[:, None] * z

    def score_fn(self, sde) -> Callable:
        dim = self.means.shape[1]
        tables: Dict = {}  # the mixture's parameters per device, copied there once

        def on(device):
            if device not in tables:
                tables[device] = (self.means.to(device), self.stds.to(device) ** 2,
                                  (self.means ** 2).sum(1).to(device),
                                  torch.log(self.weights).to(device))
            return tables[device]

        def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            means, stds_sq, means_sq, log_w = on(x.device)
            a, sigma = sde.marginal_coeffs(t.double())
            a, var_noise = a.to(x.device)[:, None], sigma.to(x.device)[:, None] ** 2
            xf = x.double().reshape(x.shape[0], -1)
            var = a ** 2 * stds_sq + var_noise  # [B, K]
            sq = (xf * xf).sum(1, keepdim=True) - 2 * a * (xf @ means.T) + a ** 2 * means_sq
            logits = log_w - 0.5 * sq / var - 0.5 * dim * torch.log(var)
            r = torch.softmax(logits, dim=1) / var
            out = a * (r @ means) - xf * r.sum(1, keepdim=True)
            return out.reshape(x.shape).to(x.dtype)

        return score


def _fd(x: torch.Tensor, moments) -> float:
    x = x.double().cpu()
    return frechet_distance(x.mean(0).numpy(), torch.cov(x.T).numpy(), *moments)


def scipy_flow(sde, score_fn, shape, *, eps: float, rtol: float, atol: float,
               generator: torch.Generator, device) -> Tuple[torch.Tensor, int]:
    """The probability-flow ODE from T to eps the paper code's way (SciPy RK45 on a flattened
    float64 NumPy state, a host round trip per evaluation), then Tweedie denoising at eps."""
    rsde = ReverseSDE(sde, score_fn, probability_flow=True)
    x = sde.prior_sampling(shape, generator=generator, dtype=torch.float64)

    def ode_func(t: float, y: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(y).reshape(shape).to(device)
        vec_t = torch.full((shape[0],), t, device=device, dtype=torch.float64)
        return rsde.sde(xt, vec_t)[0].cpu().numpy().reshape(-1)

    sol = scipy.integrate.solve_ivp(ode_func, (sde.T, eps), x.numpy().reshape(-1), rtol=rtol,
                                    atol=atol, method="RK45")
    xe = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(device)
    t_eps = torch.full((shape[0],), eps, device=device, dtype=torch.float64)
    a, sigma = sde.marginal_coeffs(t_eps)
    x0 = (xe + sigma.to(device)[:, None] ** 2 * score_fn(xe, t_eps)) / a.to(device)[:, None]
    return x0, int(sol.nfev) + 1


def sampler_plan(quick: bool) -> List[Tuple[str, str, Callable, List[int]]]:
    """(name, target 'data' | 'eps', run(sde, score, shape, nfe, g, device, eps), NFE list)."""

    def pc(sde, score, shape, nfe, g, device, eps):
        return sample_pc(sde, score, shape, num_steps=nfe // 2, eps=eps, generator=g,
                         device=device, dtype=torch.float64)

    def ode(sde, score, shape, nfe, g, device, eps):
        return sample_ode(sde, score, shape, eps=eps, generator=g, device=device,
                          dtype=torch.float64)

    def ode_rms(sde, score, shape, nfe, g, device, eps):
        return sample_ode(sde, score, shape, eps=eps, generator=g, device=device,
                          dtype=torch.float64, error_norm="rms")

    def scipy_rk45(sde, score, shape, nfe, g, device, eps):
        return scipy_flow(sde, score, shape, eps=eps, rtol=1e-5, atol=1e-5, generator=g,
                          device=device)

    def ddim(sde, score, shape, nfe, g, device, eps):
        return sample_ddim(sde, score, shape, num_steps=nfe, eps=eps, generator=g,
                           device=device, dtype=torch.float64)

    def dpm(order, method, prediction, time_grid=None):
        def run(sde, score, shape, nfe, g, device, eps):
            return sample_dpm_solver(sde, score, shape, num_steps=nfe, order=order,
                                     method=method, prediction=prediction, eps=eps,
                                     time_grid=time_grid, generator=g, device=device,
                                     dtype=torch.float64)
        return run

    def heun(sde, score, shape, nfe, g, device, eps):
        return sample_heun(sde, score, shape, num_steps=(nfe + 1) // 2, generator=g,
                           device=device, dtype=torch.float64)

    few = [10, 20] if quick else [6, 8, 9, 10, 15, 20, 30, 40, 60]
    heun_nfe = [19] if quick else [9, 19, 31, 41, 61, 81]
    plan = [
        ("pc: reverse diffusion + Langevin", "data", pc, [2000] if not quick else [200]),
        ("ode: sample_ode (dopri5, 1e-5)", "data", ode, [0]),
        ("ode: sample_ode, rms norm", "data", ode_rms, [0]),
        ("ode: SciPy RK45 float64 host round trip", "data", scipy_rk45, [0]),
        ("ddim (eta 0)", "eps", ddim, few),
        ("dpm_solver multistep order 2 (EDM grid)", "eps", dpm(2, "multistep", "noise"), few),
        ("dpm_solver multistep order 3 (EDM grid)", "eps", dpm(3, "multistep", "noise"), few),
        ("dpm_solver multistep order 3, logSNR grid", "eps",
         dpm(3, "multistep", "noise", "logsnr"), few),
        ("dpm_solver++ singlestep order 3", "eps", dpm(3, "singlestep", "data"), few),
        ("heun (EDM grid, rho 7, sigma_max 80)", "data", heun, heun_nfe),
    ]
    return plan


def sampler_runs(args, device: torch.device) -> Dict:
    mixture = Mixture(args.dim, 4, seed=0)
    shape = (args.num_samples, args.dim)
    rows = []
    for name in args.sdes:
        sde = SDES[name]()
        eps = SAMPLE_EPS[name]
        score = mixture.score_fn(sde)
        a, sigma = (float(v) for v in sde.marginal_coeffs(torch.tensor([eps], dtype=torch.float64)))
        targets = {"data": (1.0, 0.0), "eps": (a, sigma)}
        floors = {}
        for key, (ta, ts) in targets.items():
            moments = mixture.moments(ta, ts)
            floors[key] = float(np.mean([
                _fd(mixture.sample(args.num_samples, torch.Generator().manual_seed(1000 + s),
                                   ta, ts), moments) for s in range(args.floor_seeds)]))
        for label, target, run, nfes in sampler_plan(args.quick):
            moments = mixture.moments(*targets[target])
            for nfe in nfes:
                dists, seconds, used = [], 0.0, 0
                for seed in range(args.sampler_seeds):
                    g = torch.Generator(device="cpu").manual_seed(seed)
                    sync(device)
                    t0 = time.perf_counter()
                    x, used = run(sde, score, shape, nfe, g, device, eps)
                    sync(device)
                    seconds += time.perf_counter() - t0
                    dists.append(_fd(x, moments))
                ratio = float(np.mean(dists)) / floors[target]
                rows.append(dict(sde=name, sampler=label, nfe=used,
                                 seconds=seconds / args.sampler_seeds, fd=float(np.mean(dists)),
                                 floor=floors[target], fd_over_floor=ratio))
                print(json.dumps(rows[-1]), flush=True)
    summary = []
    for name in args.sdes:
        for label, *_ in sampler_plan(args.quick):
            mine = [r for r in rows if r["sde"] == name and r["sampler"] == label]
            ok = [r["nfe"] for r in mine if r["fd_over_floor"] < FD_FACTOR]
            summary.append(dict(sde=name, sampler=label,
                                smallest_nfe_below_1_5x=min(ok) if ok else None,
                                tried=[r["nfe"] for r in mine]))
    ref = {(r["sde"], r["sampler"]): r for r in rows}
    for name in args.sdes:
        base = ref[(name, "ode: SciPy RK45 float64 host round trip")]
        for label in ("ode: sample_ode (dopri5, 1e-5)", "ode: sample_ode, rms norm"):
            ref[(name, label)]["speedup_vs_paper_code"] = base["seconds"] / ref[(name, label)][
                "seconds"]
    return dict(dim=args.dim, num_samples=args.num_samples, seeds=args.sampler_seeds,
                floor_seeds=args.floor_seeds, rows=rows, smallest_nfe=summary)


SOLVER_TYPE_NFE = (10, 15, 20)
SOLVER_TYPE_SAMPLES = 500


def solver_type_runs(args, device: torch.device) -> Dict:
    """Both published forms of every higher-order DPM-Solver update on the samplers' mixture:
    the median over samples of the relative error |x - x*| / |x*|_rms at eps against the
    probability-flow ODE solved from the same prior draws at rtol = atol = 1e-9 (the median,
    so that the few trajectories that end in another mode than x* at 10-20 steps do not decide
    it), per SDE and NFE, and per
    (method, order, prediction) the form with the smaller error averaged (geometrically) over
    the SDEs and NFE."""
    mixture = Mixture(args.dim, 4, seed=0)
    shape = (100 if args.quick else SOLVER_TYPE_SAMPLES, args.dim)
    nfes = SOLVER_TYPE_NFE[:1] if args.quick else SOLVER_TYPE_NFE
    rows = []
    for name in args.sdes:
        sde, eps = SDES[name](), SAMPLE_EPS[name]
        score = mixture.score_fn(sde)
        exact, _ = sample_ode(sde, score, shape, rtol=1e-9, atol=1e-9, eps=eps, denoise=False,
                              generator=torch.Generator().manual_seed(0), device=device,
                              dtype=torch.float64)
        for method in DPM_METHODS:
            for order in (2, 3):
                for prediction in DPM_PREDICTIONS:
                    for nfe in nfes:
                        row = dict(sde=name, method=method, order=order, prediction=prediction,
                                   nfe=nfe)
                        for solver_type in DPM_SOLVER_TYPES:
                            x, _ = sample_dpm_solver(
                                sde, score, shape, num_steps=nfe, order=order, method=method,
                                prediction=prediction, solver_type=solver_type, eps=eps,
                                generator=torch.Generator().manual_seed(0), device=device,
                                dtype=torch.float64)
                            err = (x - exact).norm(dim=1) / exact.norm(dim=1).pow(2).mean().sqrt()
                            row[solver_type] = float(err.median())
                        rows.append(row)
                        print(json.dumps(rows[-1]), flush=True)
    best = []
    for method in DPM_METHODS:
        for order in (2, 3):
            for prediction in DPM_PREDICTIONS:
                mine = [r for r in rows if (r["method"], r["order"], r["prediction"])
                        == (method, order, prediction)]
                log_ratio = float(np.mean([math.log(r["taylor"] / r["dpmsolver"])
                                           for r in mine]))
                best.append(dict(method=method, order=order, prediction=prediction,
                                 taylor_over_dpmsolver=math.exp(log_ratio),
                                 better="dpmsolver" if log_ratio > 0 else "taylor",
                                 default=DPM_DEFAULT_SOLVER_TYPES[method, order, prediction]))
    return dict(num_samples=shape[0], nfe=list(nfes), rows=rows, best=best)


# --- training -------------------------------------------------------------------------------------

def train_runs(args, device: torch.device) -> List[Dict]:
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        train_speed.write_synthetic_cifar(Path(data_dir), n_train=max(5 * args.train_batch,
                                                                      1280))
        for model in args.train_models:
            for mode in args.train_modes:
                rows.append(train_speed.measure(model, mode, data_dir=data_dir,
                                                batch_size=args.train_batch,
                                                warmup=args.train_warmup,
                                                steps=args.train_steps, device=str(device)))
                print(json.dumps(rows[-1]), flush=True)
    set_tf32(False)
    return rows


# --- tables and the command line 

def print_tables(result: Dict) -> None:
    if "train" in result:
        print(f"\n{'model':<14}{'mode':<18}{'params':>8}{'img/s':>9}{'ms/step':>9}{'peak GiB':>9}")
        for r in result["train"]:
            peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
            print(f"{r['model']:<14}{r['mode']:<18}{r['params_m']:>7.1f}M"
                  f"{r['images_per_s']:>9.0f}{r['ms_per_step']:>9.1f}{peak:>9}")
    cost = result.get("likelihood", {}).get("evaluation_cost")
    if cost:
        print(f"\nlikelihood, one evaluation of drift + divergence: {cost['model']}")
        print(f"{'run':<56}{'batch':>6}{'ms/eval':>9}{'img-evals/s':>13}{'x paper':>9}")
        for r in cost["rows"]:
            print(f"{r['run']:<56}{r['batch']:>6}{r['ms_per_eval']:>9.1f}"
                  f"{r['image_evals_per_s']:>13.0f}{r['speedup_vs_paper_code']:>9.2f}")
        print("\ndopri5 arithmetic outside the network, ms per evaluation (cheap linear "
              "right-hand side of the same shapes)")
        print(f"{'state':<10}{'batch':>6}{'NFE':>7}{'ms/eval':>10}")
        for r in cost["solver_rows"]:
            print(f"{r['state']:<10}{r['batch']:>6}{r['nfe']:>7.0f}{r['ms_per_eval']:>10.3f}")
    lik = result.get("likelihood", {}).get("solves")
    if lik:
        print(f"\nlikelihood solves: {lik['source']}; rtol = atol = {lik['rtol']:g}; "
              f"bpd: {lik['bpd']}")
        print(f"{'run':<56}{'batch':>6}{'NFE':>7}{'ms/eval':>9}{'img/s':>9}{'bpd':>9}"
              f"{'max|dbpd|':>11}{'x paper':>9}")
        for r in lik["rows"]:
            print(f"{r['run']:<56}{r['batch']:>6}{r['nfe_per_solve']:>7.0f}"
                  f"{r['ms_per_eval']:>9.1f}{r['images_per_s']:>9.2f}{r['bpd']:>9.4f}"
                  f"{r['max_abs_dbpd']:>11.2e}{r['speedup_vs_paper_code']:>9.2f}")
    if "samplers" in result:
        s = result["samplers"]
        print(f"\nsamplers: {s['dim']}-d Gaussian mixture, {s['num_samples']} samples, mean of "
              f"{s['seeds']} seeds")
        print(f"{'sde':<8}{'sampler':<44}{'NFE':>6}{'seconds':>9}{'FD/floor':>10}")
        for r in s["rows"]:
            print(f"{r['sde']:<8}{r['sampler']:<44}{r['nfe']:>6}{r['seconds']:>9.3f}"
                  f"{r['fd_over_floor']:>10.2f}")
        print(f"\n{'sde':<8}{'sampler':<44}{'smallest NFE < 1.5 x floor':>28}")
        for r in s["smallest_nfe"]:
            best = r["smallest_nfe_below_1_5x"]
            print(f"{r['sde']:<8}{r['sampler']:<44}"
                  f"{(str(best) if best is not None else 'none of ' + str(r['tried'])):>28}")
        st = s["solver_types"]
        print(f"\nDPM-Solver forms: median relative error at eps against the ODE at 1e-9, "
              f"{st['num_samples']} samples")
        print(f"{'sde':<8}{'method':<12}{'order':>6}{'prediction':>11}{'NFE':>5}"
              f"{'dpmsolver':>11}{'taylor':>11}")
        for r in st["rows"]:
            print(f"{r['sde']:<8}{r['method']:<12}{r['order']:>6}{r['prediction']:>11}"
                  f"{r['nfe']:>5}{r['dpmsolver']:>11.2e}{r['taylor']:>11.2e}")
        print(f"\n{'method':<12}{'order':>6}{'prediction':>11}{'taylor/dpmsolver':>18}"
              f"{'better':>11}{'default':>11}")
        for r in st["best"]:
            print(f"{r['method']:<12}{r['order']:>6}{r['prediction']:>11}"
                  f"{r['taylor_over_dpmsolver']:>18.2f}{r['better']:>11}{r['default']:>11}")


def parse(argv) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--output", default=None, help="JSON file for every row")
    p.add_argument("--quick", action="store_true", help="fewer NFE settings (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train_models", default=None,
                   help="default ddpmpp,ncsnpp on CUDA, ddpmpp_tiny on the CPU")
    p.add_argument("--train_modes", default=None,
                   help="default fp32,tf32,bf16_cl,bf16_cl_compile on CUDA, fp32 on the CPU")
    p.add_argument("--train_batch", type=int, default=None, help="default 128 (CUDA), 8")
    p.add_argument("--train_warmup", type=int, default=None, help="default 15 (CUDA), 1")
    p.add_argument("--train_steps", type=int, default=None, help="default 40 (CUDA), 2")
    p.add_argument("--lik_parts", default="cost,solves", help="likelihood parts: cost "
                   "(ms per evaluation), solves (full solves against the paper code's)")
    p.add_argument("--lik_model", default=None, help="ddpmpp (CUDA default) or ddpmpp_tiny")
    p.add_argument("--checkpoint", default=None, help="trained weights for the likelihood")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder for --checkpoint (default: its own)")
    p.add_argument("--lik_images", type=int, default=None, help="default 256 (CUDA), 8")
    p.add_argument("--lik_batch", type=int, default=None, help="default 256 (CUDA), 8")
    p.add_argument("--cost_evals", type=int, default=None, help="timed evaluations per cost "
                   "row; default 20 (CUDA), 2")
    p.add_argument("--solve_dim", type=int, default=3072, help="dimension of the closed-form "
                   "mixture solved without --checkpoint")
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--sdes", default="vp,ve")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--sampler_seeds", type=int, default=3)
    p.add_argument("--floor_seeds", type=int, default=8)
    args = p.parse_args(argv)
    _args.device(p, "device", args.device, allow_auto=True)
    for name in ("rtol", "atol"):
        _args.positive_number(p, name, getattr(args, name))
    _args.existing_file(p, "checkpoint", args.checkpoint)
    _args.output_file(p, "output", args.output)
    device = torch.device("cuda" if args.device == "auto" and cuda else
                          "cpu" if args.device == "auto" else args.device)
    big = device.type == "cuda"
    fill = dict(train_models="ddpmpp,ncsnpp" if big else "ddpmpp_tiny",
                train_modes="fp32,tf32,bf16_cl,bf16_cl_compile" if big else "fp32",
                train_batch=128 if big else 8, train_warmup=15 if big else 1,
                train_steps=40 if big else 2, lik_model="ddpmpp" if big else "ddpmpp_tiny",
                lik_images=256 if big else 8, lik_batch=256 if big else 8,
                cost_evals=20 if big else 2)
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = device
    args.sections = args.sections.split(",")
    args.train_models = args.train_models.split(",")
    args.train_modes = args.train_modes.split(",")
    args.sdes = args.sdes.split(",")
    args.lik_parts = args.lik_parts.split(",")
    checks = [("section", args.sections, SECTIONS), ("model", args.train_models,
                                                      train_speed.CONFIGS),
              ("mode", args.train_modes, train_speed.MODES), ("sde", args.sdes, SDES),
              ("likelihood model", [args.lik_model], train_speed.CONFIGS),
              ("likelihood part", args.lik_parts, ("cost", "solves"))]
    for name, values, known in checks:
        for v in values:
            if v not in known:
                p.error(f"unknown {name} {v!r}; accepted: {', '.join(known)}")
    for name in ("train_batch", "train_steps", "lik_images", "lik_batch", "cost_evals",
                 "solve_dim", "dim", "num_samples", "sampler_seeds", "floor_seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.train_warmup < 0:
        p.error(f"--train_warmup must be >= 0, got {args.train_warmup}")
    if device.type == "cuda" and not cuda:
        p.error("--device cuda but CUDA is not available; use --device cpu")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    device = args.device
    meta = dict(command=" ".join([Path(sys.argv[0]).name] + list(argv if argv is not None
                                                                  else sys.argv[1:])),
                date=datetime.date.today().isoformat(), device=str(device),
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                torch=torch.__version__, python=platform.python_version())
    result: Dict = dict(meta=meta)
    t0 = time.perf_counter()
    if "samplers" in args.sections:
        result["samplers"] = sampler_runs(args, device)
        result["samplers"]["solver_types"] = solver_type_runs(args, device)
    if "likelihood" in args.sections:
        result["likelihood"] = {}
        if "cost" in args.lik_parts:
            result["likelihood"]["evaluation_cost"] = evaluation_cost(args, device)
        if "solves" in args.lik_parts:
            result["likelihood"]["solves"] = likelihood_solves(args, device)
    if "train" in args.sections:
        result["train"] = train_runs(args, device)
    meta["seconds"] = time.perf_counter() - t0
    print_tables(result)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
