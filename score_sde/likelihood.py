"""Exact log-likelihoods with the probability-flow ODE (Song et al. 2021, Sec. 4.3, App. D.2).

Along the probability-flow ODE dx/dt = f~(x, t), the log-density obeys
d log p_t(x_t) / dt = -div f~(x_t, t) (instantaneous change of variables; Chen et al. 2018), so

    log p_eps(x) = log p_T(z) + int_eps^T div f~(x_t, t) dt,   z = x_T.

The divergence is exact (the trace of the Jacobian, one vector–Jacobian product per dimension)
or the Hutchinson–Skilling estimate eps^T (d f~ / dx) eps with probes drawn once per solve, so the
ODE the solver sees is a fixed smooth function. The network runs once per function evaluation:
the drift and its vector–Jacobian products share one forward pass.
"""
import math
from typing import Optional, Tuple

import torch

from ._utils import (append_dims, at_least_float32, check_choice, check_int, check_positive,
                     checks_times_on_host, flat_sum, float64_like, out_of_memory,
                     python_number)
from .checks import check_data, check_solve_inputs, sample_device
from .ode import (ADAPTIVE_METHODS, ERROR_NORMS, MAX_SOLVER_STEPS, _check_finite,
                  odeint_interval)
from .cuda_graphs import CudaGraphed
from .per_sample_ode import odeint_per_sample
from .score import CountingScore
from .sde import SDE, ReverseSDE, ScoreFn

__all__ = ["log_likelihood", "bits_per_dim", "DIVERGENCES"]

DIVERGENCES = ("rademacher", "gaussian", "exact")
STEP_CONTROLS = ("batch", "per_sample")
# Cotangent elements handed to one batched vector–Jacobian product in the exact divergence.
_EXACT_CHUNK_ELEMENTS = 1 << 22


def _vjps(out: torch.Tensor, inp: torch.Tensor, cotangents: torch.Tensor,
          retain_graph: bool) -> torch.Tensor:
    """Vector–Jacobian products of out w.r.t. inp for a stack of cotangents [K, *out.shape]."""
    if cotangents.shape[0] == 1:
        (g,) = torch.autograd.grad(out, inp, cotangents[0], retain_graph=retain_graph)
        return g.unsqueeze(0)
    try:
        (g,) = torch.autograd.grad(out, inp, cotangents, retain_graph=True,
                                   is_grads_batched=True)
        return g
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:
        # Some operations have no batching rule; fall back to one product per cotangent.
        return torch.stack([torch.autograd.grad(out, inp, c, retain_graph=True)[0]
                            for c in cotangents])


def _hutchinson_divergence(drift, x, probes):
    """Mean over probes of probe^T J probe, [B]."""
    grads = _vjps(drift, x, probes.to(drift.dtype), retain_graph=False)
    acc = at_least_float32(grads.dtype)
    return flat_sum((grads.to(acc) * probes.to(acc)).sum(0)) / probes.shape[0]


def _exact_divergence(drift, x):
    """Trace of the per-sample Jacobian d drift / d x, [B], by chunks of basis cotangents.

    Everything is built on the device from index arithmetic (no host values are copied in),
    so the evaluation can be recorded as a CUDA graph."""
    batch, dim = x.shape[0], x[0].numel()
    chunk = max(1, min(dim, _EXACT_CHUNK_ELEMENTS // max(1, batch * dim)))
    columns = torch.arange(dim, device=x.device)
    div = torch.zeros(batch, dtype=at_least_float32(x.dtype), device=x.device)
    for start in range(0, dim, chunk):
        idx = columns[start:start + chunk]
        basis = (columns[None, :] == idx[:, None]).to(x.dtype)  # [k, dim] rows of the identity
        basis = basis[:, None, :].expand(len(idx), batch, dim)
        last = start + chunk >= dim
        grads = _vjps(drift, x, basis.reshape((len(idx),) + x.shape), retain_graph=not last)
        # The diagonal entries d drift_i / d x_i of the chunk's columns, summed per sample.
        rows = torch.arange(len(idx), device=x.device)
        div = div + grads.reshape(len(idx), batch, dim)[rows, :, idx].to(div.dtype).sum(0)
    return div


def augmented_rhs(rsde: ReverseSDE, dtype: torch.dtype, probes: Optional[torch.Tensor],
                  batch: Optional[int] = None):
    """The right-hand side (t [B], (y, delta), idx=None) -> (drift, divergence) of the
    probability-flow ODE augmented with its divergence: one network forward pass and the
    vector–Jacobian products of the divergence (`probes` [K, B, ...] for Hutchinson's
    estimate, or None for the exact trace). The network sees y in `dtype`; the drift and its
    divergence are formed in at least float32 (g^2 overflows float16 under VE) and come back
    in y's dtype. `idx` selects the probes of a subset of the samples (of `batch`, whose
    failing score on a subset is then reported as such)."""
    work = at_least_float32(dtype)

    def rhs(t, state, idx=None):
        y, _ = state
        with torch.enable_grad():
            xw = y.to(work).detach().requires_grad_(True)
            xt = xw.to(dtype)  # the network's input; the cast is differentiated through
            try:
                score = rsde.score_fn(xt, t)
            except (ValueError, RuntimeError) as err:
                if idx is None or batch is None or len(idx) == batch or out_of_memory(err):
                    raise
                first = str(err).strip().splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(
                    f"step_control='per_sample' calls score_fn on the {len(idx)} samples still "
                    f"integrating, and it failed there ({first[:200]}); a score with labels or "
                    f"other per-sample data bound in needs step_control='batch'") from None
            if not score.requires_grad:
                if torch.is_inference_mode_enabled():
                    raise ValueError("the likelihood differentiates score_fn for its "
                                     "divergence, which torch.inference_mode() forbids; call "
                                     "it outside inference mode (torch.no_grad() is fine)")
                raise ValueError("score_fn output is not differentiable in x; the likelihood "
                                 "needs its divergence (do not detach or use torch.no_grad)")
            drift, _ = rsde.sde(xw, t, score=score.to(work))
            # The products flow back through the network in `dtype` scaled by g^2 / 2 (1e6
            # under VE), beyond float16's 65504: a half-precision network is differentiated
            # through drift / s, s = max(g^2 / 2, 1) per sample, and the trace scaled back.
            scale = None
            if work != dtype:
                _, g = rsde.forward_sde.sde(xw.detach(), t)
                scale = (0.5 * g.to(work) ** 2).clamp(min=1.0)
            target = drift if scale is None else drift / append_dims(scale, drift.ndim)
            if probes is None:
                div = _exact_divergence(target, xw)
            else:
                div = _hutchinson_divergence(target, xw,
                                             probes if idx is None else probes[:, idx])
            if scale is not None:
                div = div * scale.to(div.dtype)
        return drift.detach().to(y.dtype), div.detach().to(y.dtype)

    return rhs


def draw_probes(divergence: str, shape, *, generator: Optional[torch.Generator],
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Hutchinson probes of `shape` ([K, B, ...]) as `log_likelihood` draws them: standard
    normal ("gaussian"), or their signs with 0 counted as + ("rademacher")."""
    probes = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if divergence == "rademacher":
        probes = torch.ones_like(probes).masked_fill_(probes < 0, -1.0)
    return probes


def _check_drift_differentiable(sde: SDE, x: torch.Tensor, eps: float) -> None:
    """Raises ValueError when `sde.sde`'s drift depends on x but carries no gradient (computed
    under torch.no_grad, say): its divergence would silently drop out of the likelihood. A
    drift without a gradient that ignores x (VE's zero) has no divergence and passes."""
    if torch.is_inference_mode_enabled():
        return  # no gradients at all: the solve says so of the score
    t = torch.full((x.shape[0],), 0.5 * (eps + sde.T), dtype=torch.float64, device=x.device)
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        drift, _ = sde.sde(xg, t)
        if not isinstance(drift, torch.Tensor) or drift.requires_grad:
            return  # a malformed drift is reported by the solve's own checks
        moved, _ = sde.sde(2 * xg.detach() + 1, t)
    if not torch.equal(drift, moved):
        raise ValueError(f"{type(sde).__name__}.sde returns a drift that depends on x but has "
                         f"no gradient (torch.no_grad or detach?): the likelihood needs its "
                         f"divergence; compute it with differentiable torch operations")


def _check_probes(probes: torch.Tensor, x: torch.Tensor, divergence: str) -> torch.Tensor:
    if divergence == "exact":
        raise ValueError("probes are for the Hutchinson divergences ('rademacher', "
                         "'gaussian'); divergence='exact' uses none")
    if (not isinstance(probes, torch.Tensor) or probes.ndim != x.ndim + 1
            or tuple(probes.shape[1:]) != tuple(x.shape) or probes.shape[0] < 1
            or probes.device != x.device):
        got = (f"{tuple(probes.shape)} on {probes.device}" if isinstance(probes, torch.Tensor)
               else type(probes).__name__)
        want = ", ".join(map(str, x.shape))
        raise ValueError(f"probes must be a tensor [K, {want}] (K >= 1 probes of x's shape) "
                         f"on {x.device}, got {got}")
    if not torch.isfinite(probes).all():
        raise ValueError("probes contain non-finite values")
    return probes.to(x.dtype)


@checks_times_on_host
def log_likelihood(sde: SDE, score_fn: ScoreFn, x: torch.Tensor, *, rtol: float = 1e-5,
                   atol: float = 1e-5, method: str = "dopri5", eps: float = 1e-5,
                   divergence: str = "rademacher", num_probes: int = 1,
                   generator: Optional[torch.Generator] = None,
                   step_control: str = "batch", probes: Optional[torch.Tensor] = None,
                   error_norm: str = "max", cuda_graph: bool = False,
                   cuda_graph_stats: Optional[dict] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-sample log-density log p_eps(x) in nats by the probability-flow ODE from eps to T.

    The score function must treat batch elements independently (no batch statistics) and be
    differentiable in x. The log-density includes the prior term `sde.prior_logp(z)`.

    Args:
        sde: the forward SDE.
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        x: data [B, ...] (rank >= 2), floating; the density is that of the data diffused to eps.
        rtol, atol: solver tolerances (the paper uses 1e-5 for both).
        method: a torchdiffeq adaptive method (see `score_sde.ode.ADAPTIVE_METHODS`).
        eps: start time of the integration (> 0; 1e-5 in the paper).
        divergence: "rademacher" or "gaussian" (Hutchinson–Skilling estimates with probes drawn
            once per solve; unbiased) or "exact" (full Jacobian trace; one vector–Jacobian
            product per dimension, for low dimensions).
        num_probes: Hutchinson probes averaged per sample (ignored for "exact").
        generator: torch.Generator for the probes.
        step_control: "batch" (one torchdiffeq solve for the batch; its step size is set by
            the hardest sample) or "per_sample" (Dormand–Prince with a time and step size per
            sample, `score_sde.per_sample_ode`; `method` must be "dopri5"): each result is the
            one the sample would get alone with the same probes, and easy samples stop early.
            The score is then called on the samples still integrating, a subset of the batch:
            a score with labels or other per-sample data bound in needs "batch".
        probes: explicit Hutchinson probes [K, B, ...] (K probes per sample, on x's device)
            instead of drawing them; for comparing solvers, precisions or batch sizes on the
            same estimator. Not allowed with divergence="exact"; `num_probes` and `generator`
            are then unused.
        error_norm: how a step's error is measured (`score_sde.ode.ERROR_NORMS`): "max" over
            every element, or "rms" over each sample's elements (the norm of SciPy's RK45, as
            in the paper's code, but per sample), the largest over the batch. Each sample meets
            its own tolerance either way; "rms" takes fewer steps on images.
        cuda_graph: on CUDA, record one evaluation of the right-hand side (the network's
            forward pass and the divergence's vector–Jacobian products) as a CUDA graph and
            replay it (`score_sde.cuda_graphs.CudaGraphed`; it runs eagerly where recording
            fails, with a warning). The score function must then be free of host reads and
            randomness. Pays with batch step control, whose batch never changes; per-sample
            control records at most a few of its shrinking batch sizes. No effect on the CPU.
        cuda_graph_stats: with `cuda_graph`, a dict that is filled with what the recording
            did (`CudaGraphed.stats`: graphs recorded, replays, eager calls, failures), so a
            caller can tell replayed evaluations from an eager fallback.

    Returns:
        (logp, z, nfe): logp [B] in nats in x's dtype (float32 for half-precision x, whose
        range ends at 65504, below a large image's log-density), the latent z = x_T shaped
        like x, and the number of score (network) evaluations; with per-sample control, the
        number of batched evaluations (each over the samples still integrating).

    Raises:
        ValueError: invalid arguments, or a score that is not differentiable in x.
        RuntimeError: the solve failed or produced non-finite values.
        torch.cuda.OutOfMemoryError: the batch does not fit on the device (the message says
            so; evaluate fewer samples at once).
    """
    check_solve_inputs(sde, score_fn, rtol=rtol, atol=atol, method=method, eps=eps,
                       error_norm=error_norm, methods=ADAPTIVE_METHODS, error_norms=ERROR_NORMS)
    check_data(x, "x")
    sample_device(x.device, generator)  # a torch.Generator on x's kind of device, or None
    check_choice("divergence", divergence, DIVERGENCES)
    check_int("num_probes", num_probes, minimum=1)
    check_choice("step_control", step_control, STEP_CONTROLS)
    if cuda_graph_stats is not None and not isinstance(cuda_graph_stats, dict):
        raise ValueError(f"cuda_graph_stats must be a dict to fill or None, got "
                         f"{type(cuda_graph_stats).__name__}")
    if step_control == "per_sample" and method != "dopri5":
        raise ValueError(f"step_control='per_sample' integrates with dopri5; got method "
                         f"{method!r}")

    dtype, batch = x.dtype, x.shape[0]
    _check_drift_differentiable(sde, x, eps)
    counting = CountingScore(score_fn, eps, sde.T)
    rsde = ReverseSDE(sde, counting, probability_flow=True)
    if probes is not None:
        probes = _check_probes(probes, x, divergence)
    elif divergence != "exact":
        probes = draw_probes(divergence, (num_probes,) + tuple(x.shape), generator=generator,
                             device=x.device, dtype=dtype)

    rhs = augmented_rhs(rsde, dtype, probes, batch)
    calls = 0
    if cuda_graph:
        eager, all_idx = rhs, torch.arange(batch, device=x.device)
        graphed = CudaGraphed(lambda t, y, delta, idx: eager(t, (y, delta), idx))

        def rhs(t, state, idx=None):  # noqa: F811 - the recorded form of the same function
            nonlocal calls
            calls += 1
            return graphed(t, *state, all_idx if idx is None else idx)
    wide = float64_like(x)
    y0 = (x.detach().to(wide), torch.zeros(batch, dtype=wide, device=x.device))
    try:
        if step_control == "per_sample":
            (z, delta), _, _ = odeint_per_sample(rhs, y0, eps, sde.T, rtol=rtol, atol=atol,
                                                 max_steps=MAX_SOLVER_STEPS,
                                                 error_norm=error_norm)
        else:
            z, delta = odeint_interval(rhs, y0, eps, sde.T, batch=batch, rtol=rtol, atol=atol,
                                       method=method, error_norm=error_norm)
    except torch.cuda.OutOfMemoryError as err:
        raise torch.cuda.OutOfMemoryError(
            f"out of memory evaluating the likelihood of a batch of {batch} on {x.device}: "
            f"evaluate fewer samples at once (tools/likelihood.py --batch_size) "
            f"[{str(err).splitlines()[0][:160] if str(err) else 'no details'}]") from None
    finally:
        if cuda_graph and cuda_graph_stats is not None:
            cuda_graph_stats.update(graphed.stats())
    # The prior of the solver's z in at least float32, not of z rounded to half precision (a
    # user SDE's prior may hold float32 tensors, so not float64 either).
    prior = sde.prior_logp(z.to(at_least_float32(dtype)))
    if not isinstance(prior, torch.Tensor) or prior.shape != (batch,):
        got = tuple(prior.shape) if isinstance(prior, torch.Tensor) else type(prior).__name__
        raise ValueError(f"{type(sde).__name__}.prior_logp must return one log-density per "
                         f"sample, shape [B] = ({batch},), got {got}")
    prior = prior.to(wide)
    z = z.to(dtype)
    _check_finite(z, "the latent z")
    logp = (prior + delta).to(at_least_float32(dtype))
    _check_finite(logp, "the log-likelihood")
    # Replayed evaluations bypass CountingScore; each call of the right-hand side is one.
    return logp, z, calls if cuda_graph else counting.nfe


def bits_per_dim(logp: torch.Tensor, num_dims: int, *, data_width: float = 2.0,
                 num_levels: int = 256) -> torch.Tensor:
    """Bits per dimension of discrete data from a continuous log-density of dequantized data.

    Discrete values k in {0, ..., num_levels - 1} are dequantized to u = (k + U) / num_levels,
    U ~ Uniform[0, 1)^D, and the model sees y = a + data_width * u (e.g. [-1, 1]: width 2).
    The density of v = k + U is p_v(v) = p_y(y) * (data_width / num_levels)^D, so

        bpd = -log p_v / (D ln 2) = -log p_y / (D ln 2) - log2(data_width) + log2(num_levels),

    an offset of 7 bits for 8-bit data scaled to [-1, 1] and 8 bits for [0, 1]. The result is an
    upper bound on the discrete model's bits/dim (Jensen over U) when averaged over U.

    Args:
        logp: log-density of the scaled, dequantized data in nats, any shape.
        num_dims: number of dimensions D per sample (e.g. 3 * 32 * 32).
        data_width: width of the interval the model's data occupies.
        num_levels: number of discrete levels of the raw data (256 for 8-bit).

    Returns:
        bits/dim with the shape of `logp`.
    """
    num_dims, num_levels, data_width = (python_number(v) for v in
                                        (num_dims, num_levels, data_width))
    check_int("num_dims", num_dims, minimum=1)
    check_int("num_levels", num_levels, minimum=2)
    check_positive("data_width", data_width)
    return -logp / (num_dims * math.log(2)) - math.log2(data_width) + math.log2(num_levels)
