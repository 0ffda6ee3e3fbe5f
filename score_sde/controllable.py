"""Controllable generation with an unconditional score (Song et al. 2021, Sec. 5, Appendix I).

- `inpaint`: predictor–corrector sampling of the unknown part of x_known (Appendix I.2). After
  every predictor and corrector step the known region is replaced by a fresh draw of its
  forward marginal alpha(t) x_known + sigma(t) z, so the unknown region follows the reverse
  SDE of p_t(x_unknown | x_known,t). Unlike the reference code, the known region at T is a
  marginal draw (not the clean data), the replacement after a predictor step uses the time
  reached (t_next, not t), and the result carries no noise: the unknown region is the last
  step's noise-free mean (as `sample_pc(denoise=True)`) and the known region is x_known
  itself.
- `colorize`: an orthogonal change of colour basis whose first coordinate is
  (r + g + b) / sqrt(3) turns colorization into inpainting of the other two coordinates
  (Appendix I.3); scores transform with the same orthogonal matrix.
- `classifier_guided_score`: s(x, t) + scale grad_x log p_t(y | x) (Sec. 5, Eq. 14; Dhariwal &
  Nichol 2021 for the scale).
- `classifier_free_score`: (1 + w) s_cond - w s_uncond (Ho & Salimans 2021, Eq. 6).
- `slerp` and `interpolate`: spherical interpolation of probability-flow latents (Sec. 4.3).
"""
import math
from typing import Optional, Sequence, Tuple, Type, Union

import torch

from ._utils import append_dims, check_int, check_positive, checks_times_on_host
from .checks import check_data, check_pc_inputs
from .ode import data_to_latent, latent_to_data
from .sampling import Corrector, Predictor, normal_noise, pc_components, run_pc
from .sde import SDE, ScoreFn

__all__ = ["inpaint", "colorize", "classifier_guided_score", "classifier_free_score", "slerp",
           "interpolate"]

# Below this sin(angle) the two latents count as (anti)parallel and slerp interpolates linearly.
SLERP_MIN_SIN = 1e-6


# --- predictor-corrector sampling with a known region -----------------------------------------

def _check_generator(generator, x):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got "
                         f"{type(generator).__name__}")
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, but the data are on {x.device}; "
                         f"pass a generator on the data's device")


def _check_mask(mask, x_known):
    """The boolean known-region mask, broadcastable to x_known."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a tensor of 0s and 1s broadcastable to x_known "
                         f"{tuple(x_known.shape)}, got {type(mask).__name__}")
    try:
        shape = torch.broadcast_shapes(mask.shape, x_known.shape)
    except RuntimeError:
        shape = None
    if shape != x_known.shape:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x_known of "
                         f"shape {tuple(x_known.shape)}")
    if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("mask must contain only 0 (unknown) and 1 (known), got other values")
    return mask.to(device=x_known.device, dtype=torch.bool)


def _inpaint_pc(sde, score_fn, x_known, known, *, num_steps, predictor_cls, corrector_cls,
                snr, corrector_steps, eps, generator, probability_flow, task="inpainting"):
    """`sample_pc`'s loop (`run_pc`) with the known region imposed after every step, on
    validated inputs (`known` a bool mask); `task` names the caller in errors."""
    ndim, dtype = x_known.ndim, x_known.dtype
    noise = normal_noise(generator)

    def replace_known(x, t):
        # Known region <- a draw of p_t(x_t | x_0 = x_known) = N(alpha x_known, sigma^2 I).
        alpha, sigma = sde.marginal_coeffs(t)
        x_t = (append_dims(alpha.to(dtype), ndim) * x_known
               + append_dims(sigma.to(dtype), ndim) * noise(x))
        return torch.where(known, x_t, x)

    # denoise: the generated region without the last step's noise (Tweedie at the last step
    # time when no predictor moves x); the known region is then the data itself.
    x, nfe = run_pc(sde, score_fn, x_known.shape, predictor_cls=predictor_cls,
                    corrector_cls=corrector_cls, snr=snr, corrector_steps=corrector_steps,
                    num_steps=num_steps, eps=eps, denoise=True,
                    probability_flow=probability_flow, device=x_known.device, dtype=dtype,
                    generator=generator, project=replace_known)
    with torch.no_grad():
        x = torch.where(known, x_known, x)
    if not torch.isfinite(x).all():
        raise RuntimeError(f"{task} produced non-finite samples; check that score_fn is "
                           f"finite on [eps, T] and that snr / step sizes are not too large")
    return x, nfe


@checks_times_on_host
def inpaint(sde: SDE, score_fn: ScoreFn, x_known: torch.Tensor, mask: torch.Tensor, *,
            num_steps: Optional[int] = None,
            predictor: Union[str, Type[Predictor]] = "reverse_diffusion",
            corrector: Union[str, Type[Corrector]] = "langevin", snr: float = 0.16,
            corrector_steps: int = 1, eps: float = 1e-3,
            generator: Optional[torch.Generator] = None,
            probability_flow: bool = False) -> Tuple[torch.Tensor, int]:
    """Fills in the unknown part of x_known by predictor–corrector sampling (Song et al. 2021,
    Appendix I.2).

    The loop is that of `sample_pc` with `denoise=True` (step times linspace(T, eps, N), the
    last step ending at t = 0; corrector steps then one predictor step per time point), with
    the known region replaced after every predictor and every corrector step by a draw of its
    forward marginal alpha(t) x_known + sigma(t) z. The last step is taken without noise (with
    predictor "none", Tweedie's formula at eps instead, one more score evaluation) and the
    known region is set to x_known, bit for bit.

    The replacement method is approximate: the unknown region follows the score of
    p_t(x_u | x_k,t) for a fresh draw x_k,t, not that of p_t(x_u,t | x_known), and where the
    two regions are correlated the samples lag towards the unconditional distribution; only
    the corrector pulls them back, so the bias falls as num_steps and corrector_steps grow. With
    the exact score of a 4-d Gaussian (correlations up to 0.6) under VP, the conditional mean
    was off by 0.27 sd at 200 steps with one corrector step and by 0.02 sd at 300 steps with
    five (VE: 0.05 sd at 200 x 1, 0.01 sd at 300 x 2).

    Args:
        sde: the forward SDE; needs closed-form marginals (`sde.has_marginal`).
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        x_known: data [B, ...] (rank >= 2, floating); only its known region is read (and
            must be finite), the rest may hold anything, NaN included.
        mask: 1 (or True) where x_known is known, 0 elsewhere; broadcastable to x_known.
        num_steps: predictor steps; defaults to `sde.num_steps`.
        predictor: a name in `PREDICTORS` or a `Predictor` subclass.
        corrector: a name in `CORRECTORS` or a `Corrector` subclass.
        snr: corrector signal-to-noise ratio (> 0).
        corrector_steps: corrector steps per time point (>= 0).
        eps: time of the last step (> 0).
        generator: torch.Generator (on x_known's device) for all noise.
        probability_flow: predictors step the probability-flow ODE.

    Returns:
        (x, nfe): samples shaped like x_known in its dtype and device, equal to x_known where
        mask is 1, and the number of score evaluations made.

    Raises:
        ValueError: invalid arguments, a mask that is not 0/1 or does not broadcast, or an SDE
            without closed-form marginals.
        RuntimeError: the samples became non-finite.
    """
    _, num_steps = check_pc_inputs(sde, score_fn, snr=snr, corrector_steps=corrector_steps,
                                   num_steps=num_steps, eps=eps, marginals_for="conditional")
    sde, predictor_cls, corrector_cls = pc_components(
        sde, predictor, corrector, corrector_steps=corrector_steps, num_steps=num_steps, eps=eps)
    known = None
    if isinstance(x_known, torch.Tensor) and x_known.is_floating_point() and x_known.ndim >= 2:
        known = _check_mask(mask, x_known)  # the unknown region is never read: NaN is fine
        x_known = torch.where(known, x_known, torch.zeros((), dtype=x_known.dtype,
                                                          device=x_known.device))
    check_data(x_known, "x_known")
    _check_generator(generator, x_known)
    return _inpaint_pc(sde, score_fn, x_known, known, num_steps=num_steps,
                       predictor_cls=predictor_cls, corrector_cls=corrector_cls, snr=snr,
                       corrector_steps=corrector_steps, eps=eps, generator=generator,
                       probability_flow=probability_flow)


# --- colorization ------------------------------------------------------------------------------

def _colour_basis(device) -> torch.Tensor:
    """Orthogonal 3x3 matrix, float64; row 0 is (1, 1, 1) / sqrt(3), so y = M x has the
    normalised channel mean as its first coordinate."""
    return torch.tensor([[1 / math.sqrt(3)] * 3,
                         [2 / math.sqrt(6), -1 / math.sqrt(6), -1 / math.sqrt(6)],
                         [0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)]],
                        dtype=torch.float64, device=device)


def _mix_channels(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Applies a 3x3 matrix to the channel dimension (dim 1) of x [B, 3, ...]; the result is
    contiguous, as every sampler's input to a score function is (einsum returns a permuted
    view, which a score calling `.view` cannot take)."""
    return torch.einsum("ij,bj...->bi...", matrix.to(x.dtype), x).contiguous()


@checks_times_on_host
def colorize(sde: SDE, score_fn: ScoreFn, gray: torch.Tensor, *,
             num_steps: Optional[int] = None,
             predictor: Union[str, Type[Predictor]] = "reverse_diffusion",
             corrector: Union[str, Type[Corrector]] = "langevin", snr: float = 0.16,
             corrector_steps: int = 1, eps: float = 1e-3,
             generator: Optional[torch.Generator] = None,
             probability_flow: bool = False) -> Tuple[torch.Tensor, int]:
    """Generates colour images whose channel mean is a given gray image (Song et al. 2021,
    Appendix I.3).

    With the orthogonal matrix M whose first row is (1, 1, 1) / sqrt(3), y = M x (per pixel,
    over channels) has first coordinate sqrt(3) gray. That coordinate is known and the other two
    are inpainted (`inpaint`'s loop) under the score in the decoupled basis,
    s_y(y, t) = M s_x(M^T y, t): the forward SDE is isotropic, so y diffuses by the same SDE.
    The result is M^T y.

    Args:
        sde: the forward SDE; needs closed-form marginals.
        score_fn: score function of colour images (x [B, 3, ...], t [B]) -> score.
        gray: gray images [B, 1, ...], or [B, 3, ...] with equal channels, floating, in the
            model's data range.
        num_steps, predictor, corrector, snr, corrector_steps, eps, generator,
            probability_flow: as in `inpaint`.

    Returns:
        (x, nfe): colour images [B, 3, ...] in gray's dtype whose channel mean equals gray up
        to the rounding of the orthogonal transform, and the number of score evaluations.

    Raises:
        ValueError: invalid arguments, gray without 1 or 3 equal channels, or an SDE without
            closed-form marginals.
        RuntimeError: the samples became non-finite.
    """
    _, num_steps = check_pc_inputs(sde, score_fn, snr=snr, corrector_steps=corrector_steps,
                                   num_steps=num_steps, eps=eps, marginals_for="conditional")
    sde, predictor_cls, corrector_cls = pc_components(
        sde, predictor, corrector, corrector_steps=corrector_steps, num_steps=num_steps, eps=eps)
    check_data(gray, "gray")
    if gray.shape[1] == 3:
        if not (torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 0], gray[:, 2])):
            raise ValueError("gray with 3 channels must have equal channels; pass [B, 1, ...] "
                             "or a gray image repeated over 3 channels")
        gray = gray[:, :1]
    elif gray.shape[1] != 1:
        raise ValueError(f"gray must have 1 channel (or 3 equal ones) in dim 1, got shape "
                         f"{tuple(gray.shape)}")
    _check_generator(generator, gray)

    basis = _colour_basis(gray.device)  # M
    # y_known: sqrt(3) gray in the first coordinate; the other two are unknown.
    y_known = torch.cat([math.sqrt(3) * gray, torch.zeros_like(gray).expand(
        (-1, 2) + gray.shape[2:])], dim=1)
    known = torch.zeros((1, 3) + (1,) * (gray.ndim - 2), dtype=torch.bool, device=gray.device)
    known[:, 0] = True

    def decoupled_score(y, t):
        return _mix_channels(basis, score_fn(_mix_channels(basis.T, y), t))

    decoupled_score.takes_float64_time = _take_float64_time(score_fn)
    y, nfe = _inpaint_pc(sde, decoupled_score, y_known, known, num_steps=num_steps,
                         predictor_cls=predictor_cls, corrector_cls=corrector_cls, snr=snr,
                         corrector_steps=corrector_steps, eps=eps, generator=generator,
                         probability_flow=probability_flow, task="colorization")
    return _mix_channels(basis.T, y), nfe


# --- guidance ---------------------------------------------------------------------------------

def classifier_guided_score(score_fn: ScoreFn, log_prob_fn, labels: torch.Tensor,
                            scale: float = 1.0) -> ScoreFn:
    """Classifier guidance (Song et al. 2021, Sec. 5, Eq. 14; Dhariwal & Nichol 2021, Alg. 1):
    s(x, t) + scale grad_x log p_t(y | x).

    With scale = 1 this is the score of p_t(x | y); larger scales sharpen the classes. The
    gradient is taken by autograd with gradients enabled locally, so the result can be called
    by samplers that run under `torch.no_grad()`.

    Args:
        score_fn: unconditional score function (x [B, ...], t [B]) -> score shaped like x.
        log_prob_fn: time-dependent classifier (x [B, ...], t [B]) -> [B, K] log-probabilities
            or logits (log_softmax is applied), differentiable in x.
        labels: target classes, integer tensor [B] with values in [0, K).
        scale: guidance scale (finite, >= 0).

    Returns:
        score_fn(x, t) -> guided score shaped like x, in x's dtype.

    Raises:
        ValueError: (at construction) invalid labels or scale; (when called) a batch size that
            differs from len(labels), a classifier output that is not [B, K] with K above every
            label, or one that does not depend differentiably on x.
    """
    if not callable(score_fn):
        raise ValueError(f"score_fn must be callable, got {type(score_fn).__name__}")
    if not callable(log_prob_fn):
        raise ValueError(f"log_prob_fn must be callable, got {type(log_prob_fn).__name__}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 \
            or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8,
                                    torch.uint8):
        got = (f"dtype {labels.dtype} and shape {tuple(labels.shape)}"
               if isinstance(labels, torch.Tensor) else type(labels).__name__)
        raise ValueError(f"labels must be an integer tensor [B] (int64), got {got}")
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, got {labels.min().item()}")
    check_positive("scale", scale, allow_zero=True)
    labels = labels.long()
    max_label = int(labels.max()) if labels.numel() else -1

    def guided_score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"x has batch size {x.shape[0]} but labels has {labels.shape[0]}")
        score = score_fn(x, t)
        if scale == 0:
            return score
        # Where the caller differentiates the score itself (the likelihood's divergence), the
        # gradient keeps its graph, so that the classifier's Hessian enters the divergence.
        keep = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            x_in = x if keep else x.detach().requires_grad_(True)
            logits = log_prob_fn(x_in, t)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 \
                    or logits.shape[0] != x.shape[0]:
                got = (tuple(logits.shape) if isinstance(logits, torch.Tensor)
                       else type(logits).__name__)
                raise ValueError(f"log_prob_fn must return [B, K] = [{x.shape[0]}, K] "
                                 f"log-probabilities, got {got}")
            if max_label >= logits.shape[1]:
                raise ValueError(f"labels must be < K = {logits.shape[1]} (classes of "
                                 f"log_prob_fn), got {max_label}")
            log_p = torch.log_softmax(logits, dim=1)
            selected = log_p.gather(1, labels.to(logits.device)[:, None]).sum()
            if not selected.requires_grad:
                if torch.is_inference_mode_enabled():
                    raise ValueError("classifier guidance differentiates log_prob_fn, which "
                                     "torch.inference_mode() forbids; sample outside inference "
                                     "mode (torch.no_grad() is fine)")
                raise ValueError("log_prob_fn's output does not depend differentiably on x")
            grad, = torch.autograd.grad(selected, x_in, allow_unused=True, create_graph=keep)
        if grad is None:  # the classifier ignores x
            return score
        return score + scale * grad.to(score.dtype)

    guided_score_fn.takes_float64_time = _take_float64_time(score_fn, log_prob_fn)
    return guided_score_fn


def _take_float64_time(*fns) -> bool:
    """Whether every one of `fns` takes float64 t (`score_sde.score.CountingScore`)."""
    return all(getattr(fn, "takes_float64_time", False) for fn in fns)


def classifier_free_score(cond_score_fn: ScoreFn, uncond_score_fn: ScoreFn,
                          scale: float) -> ScoreFn:
    """Classifier-free guidance (Ho & Salimans 2021, Eq. 6): (1 + w) s_cond - w s_uncond.

    w = 0 gives the conditional score; w > 0 moves away from the unconditional one.

    Args:
        cond_score_fn: conditional score function (x [B, ...], t [B]) -> score shaped like x
            (the condition bound in, e.g. with functools.partial).
        uncond_score_fn: unconditional score function, same signature.
        scale: guidance weight w (finite, >= 0).

    Returns:
        score_fn(x, t) -> guided score shaped like x.

    Raises:
        ValueError: a score function that is not callable or an invalid scale.
    """
    for name, fn in (("cond_score_fn", cond_score_fn), ("uncond_score_fn", uncond_score_fn)):
        if not callable(fn):
            raise ValueError(f"{name} must be callable, got {type(fn).__name__}")
    check_positive("scale", scale, allow_zero=True)

    def guided_score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = cond_score_fn(x, t)
        if scale == 0:
            return cond
        return (1 + scale) * cond - scale * uncond_score_fn(x, t)

    guided_score_fn.takes_float64_time = _take_float64_time(cond_score_fn, uncond_score_fn)
    return guided_score_fn


# --- latent interpolation ---------------------------------------------------------------------

def slerp(z0: torch.Tensor, z1: torch.Tensor,
          alphas: Union[torch.Tensor, Sequence[float]]) -> torch.Tensor:
    """Spherical linear interpolation of each pair (z0[b], z1[b]) (Shoemake 1985):
    sin((1 - a) theta) / sin(theta) z0 + sin(a theta) / sin(theta) z1, with theta the angle
    between z0[b] and z1[b] over all non-batch dimensions.

    Pairs that are nearly parallel or antiparallel (sin theta < `SLERP_MIN_SIN`), or contain a
    zero vector, are interpolated linearly. The angle is computed as
    2 atan2(|u0 - u1|, |u0 + u1|) from the unit vectors, accurate at every angle; the
    arithmetic is float64.

    Args:
        z0, z1: tensors [B, ...] of the same shape, floating.
        alphas: interpolation weights [N] (0 gives z0, 1 gives z1), finite.

    Returns:
        tensor [N, B, ...] in z0's dtype.

    Raises:
        ValueError: mismatched or non-floating z0, z1, or alphas that are not a finite 1-D
            sequence.
    """
    for name, z in (("z0", z0), ("z1", z1)):
        if not isinstance(z, torch.Tensor) or z.ndim < 1 or not z.is_floating_point():
            got = (f"dtype {z.dtype} and shape {tuple(z.shape)}" if isinstance(z, torch.Tensor)
                   else type(z).__name__)
            raise ValueError(f"{name} must be a floating tensor [B, ...], got {got}")
    if z0.shape != z1.shape:
        raise ValueError(f"z0 and z1 must have the same shape, got {tuple(z0.shape)} and "
                         f"{tuple(z1.shape)}")
    try:
        alphas = torch.as_tensor(alphas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"alphas must be a 1-D sequence of numbers, got {alphas!r}") from None
    if alphas.ndim != 1 or not torch.isfinite(alphas).all():
        raise ValueError(f"alphas must be a finite 1-D sequence of numbers, got {alphas}")
    wide = torch.float64 if z0.device.type != "mps" else torch.float32
    a = alphas.to(device=z0.device, dtype=wide)[:, None]  # [N, 1]
    v0 = z0.reshape(z0.shape[0], -1).to(wide)
    v1 = z1.reshape(z1.shape[0], -1).to(wide)
    n0 = torch.linalg.vector_norm(v0, dim=1)
    n1 = torch.linalg.vector_norm(v1, dim=1)
    u0 = v0 / n0.clamp_min(torch.finfo(wide).tiny)[:, None]
    u1 = v1 / n1.clamp_min(torch.finfo(wide).tiny)[:, None]
    theta = 2 * torch.atan2(torch.linalg.vector_norm(u0 - u1, dim=1),
                            torch.linalg.vector_norm(u0 + u1, dim=1))  # [B]
    sin = torch.sin(theta)
    spherical = (sin >= SLERP_MIN_SIN) & (n0 > 0) & (n1 > 0)
    safe_sin = torch.where(spherical, sin, torch.ones_like(sin))
    c0 = torch.where(spherical, torch.sin((1 - a) * theta) / safe_sin, 1 - a)  # [N, B]
    c1 = torch.where(spherical, torch.sin(a * theta) / safe_sin, a.expand_as(c0))
    out = c0[:, :, None] * v0 + c1[:, :, None] * v1
    return out.reshape((len(alphas),) + tuple(z0.shape)).to(z0.dtype)


@checks_times_on_host
def interpolate(sde: SDE, score_fn: ScoreFn, x0: torch.Tensor, x1: torch.Tensor,
                num: int = 8, *, rtol: float = 1e-5, atol: float = 1e-5,
                eps: float = 1e-3) -> Tuple[torch.Tensor, int]:
    """Interpolates between data points through their probability-flow latents (Song et al.
    2021, Sec. 4.3): encode x0 and x1 with `data_to_latent`, `slerp` the latents at `num`
    evenly spaced weights from 0 to 1, decode with `latent_to_data`.

    Spherical interpolation keeps intermediate latents at the typical norm of the prior, where
    a straight line would pass through its low-norm interior. No denoising is applied, so the
    first and last frames reproduce x0 and x1 up to the solver tolerance.

    Args:
        sde: the forward SDE.
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        x0, x1: data [B, ...] of the same shape (rank >= 2), floating.
        num: number of frames (>= 2), endpoints included.
        rtol, atol: tolerances of both ODE solves (dopri5).
        eps: the data end of the ODE (> 0).

    Returns:
        (frames, nfe): tensor [num, B, ...] in x0's dtype, frames[0] ~ x0 and frames[-1] ~ x1,
        and the number of score evaluations of both solves.

    Raises:
        ValueError: invalid arguments. RuntimeError: an ODE solve failed.
    """
    check_data(x0, "x0")
    check_data(x1, "x1")
    if x0.shape != x1.shape or x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(f"x0 and x1 must have the same shape, dtype and device, got "
                         f"{tuple(x0.shape)} {x0.dtype} {x0.device} and "
                         f"{tuple(x1.shape)} {x1.dtype} {x1.device}")
    check_int("num", num, minimum=2)
    batch = x0.shape[0]
    # One solve for both endpoints and one for all frames.
    z, nfe_enc = data_to_latent(sde, score_fn, torch.cat([x0, x1]), rtol=rtol, atol=atol,
                                eps=eps)
    alphas = torch.linspace(0, 1, num, dtype=torch.float64)
    latents = slerp(z[:batch], z[batch:], alphas)  # [num, B, ...]
    frames, nfe_dec = latent_to_data(sde, score_fn, latents.reshape((num * batch,) + x0.shape[1:]),
                                     rtol=rtol, atol=atol, eps=eps)
    return frames.reshape((num,) + tuple(x0.shape)), nfe_enc + nfe_dec
