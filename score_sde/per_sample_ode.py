"""Batched Dormand–Prince 5(4) with a time and a step size of its own for every sample.

torchdiffeq controls one step size for the whole state, so one stiff sample (an image whose
trajectory is hard near t = eps, say) makes every batch-mate take its small steps, and each
sample's result depends on who it was batched with. Here each sample keeps its own time t_b,
step h_b and error estimate; one stage evaluation runs the right-hand side once on all samples
still integrating, each at its own time, so the network still sees batches. A sample's result
is the one it would get alone, up to the batched network's own floating-point dependence on
the batch.

Error control per sample: the max (or, with error_norm="rms", the root mean square) over its
elements of |err| / (atol + rtol max(|y|, |y_new|)), the norms of `score_sde.ode`; step
factor 0.9 err^(-1/5) clipped to [0.2, 10], the first step by Hairer, Nørsett & Wanner's
heuristic (Solving ODEs I, II.4) inside the interval.
"""
from typing import Callable, Tuple

import torch

from ._utils import check_choice
from .ode import ERROR_NORMS, per_sample_rms

Tensors = Tuple[torch.Tensor, ...]
# rhs(t [b] float64, y (each [b, ...]), idx [b] int64 sample indices) -> dy/dt (each [b, ...])
RHS = Callable[[torch.Tensor, Tensors, torch.Tensor], Tensors]

# Dormand & Prince (1980) tableau: nodes, stage weights, 5th-order weights (= last stage row,
# so the last stage is the next step's first: FSAL) and 5th-minus-4th-order error weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - 1)).to(like.dtype)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample mask [b] shaped to broadcast against `like` [b, ...]."""
    return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


def _combine(y: Tensors, h: torch.Tensor, ks, weights) -> Tensors:
    """y + h sum_j w_j k_j for every state tensor."""
    out = []
    for i, yi in enumerate(y):
        acc = yi.clone()
        for w, k in zip(weights, ks):
            if w != 0.0:
                acc = acc + _bcast(h * w, yi) * k[i]
        out.append(acc)
    return tuple(out)


def _scaled_norm(v: Tensors, y0: Tensors, y1: Tensors, rtol: float, atol: float,
                 rms: bool) -> torch.Tensor:
    """[B]: per sample, the max (or root mean square) over its elements of
    |v| / (atol + rtol max(|y0|, |y1|))."""
    scaled = tuple(vi.abs() / (atol + rtol * torch.maximum(a.abs(), b.abs()))
                   for vi, a, b in zip(v, y0, y1))
    if rms:
        return per_sample_rms(scaled)
    return torch.stack([r.reshape(r.shape[0], -1).amax(dim=1) for r in scaled]).amax(dim=0)


def _first_step(rhs: RHS, t0: torch.Tensor, y0: Tensors, f0: Tensors, idx: torch.Tensor,
                span: torch.Tensor, rtol: float, atol: float, rms: bool) -> torch.Tensor:
    """|h0| per sample (Hairer et al.), at most the interval length; costs one evaluation."""
    d0 = _scaled_norm(y0, y0, y0, rtol, atol, rms)
    d1 = _scaled_norm(f0, y0, y0, rtol, atol, rms)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span.abs())
    sign = torch.sign(span)
    y1 = _combine(y0, sign * h0, [f0], [1.0])
    f1 = rhs(t0 + sign * h0, y1, idx)
    # An empty interval (h0 = 0) needs no step: keep d2 finite so that h stays 0 there.
    d2 = (_scaled_norm(tuple(b - a for a, b in zip(f0, f1)), y0, y0, rtol, atol, rms)
          / torch.where(h0 > 0, h0, torch.ones_like(h0)))
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / big) ** (1 / 5))
    return torch.minimum(torch.minimum(100 * h0, h1), span.abs())


def _rows_finite(values: Tensors) -> torch.Tensor:
    """[B] whether every element of each sample's rows is finite."""
    finite = torch.ones(values[0].shape[0], dtype=torch.bool, device=values[0].device)
    for v in values:
        finite &= torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1)
    return finite


def _check_start(finite: torch.Tensor, t: torch.Tensor) -> None:
    """Raises RuntimeError naming the first sample whose start is not finite (one host read)."""
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise RuntimeError(f"sample {bad}'s derivative is non-finite at t={float(t[bad]):.6g}; "
                           f"check that score_fn is finite there")


def odeint_per_sample(rhs: RHS, y0: Tensors, t_start: float, t_end: float, *, rtol: float,
                      atol: float, max_steps: int = 100_000, error_norm: str = "max"
                      ) -> Tuple[Tensors, torch.Tensor, int]:
    """Integrates dy/dt = rhs(t, y, idx) from t_start to t_end for every sample on its own.

    Args:
        rhs: right-hand side evaluated on a subset of the samples: times [b] (float64), the
            subset's state tensors and their indices [b] into the batch.
        y0: state tensors, each [B, ...] (float64 recommended).
        t_start, t_end: the interval (either direction).
        rtol, atol: tolerances of the per-sample error control.
        max_steps: accepted plus rejected steps allowed per sample.
        error_norm: "max" or "rms" over each sample's elements (`score_sde.ode.ERROR_NORMS`).

    Returns:
        (y(t_end) as a tuple, steps [B] accepted plus rejected steps per sample, number of rhs
        calls, i.e. batched evaluations).

    Raises:
        RuntimeError: a sample exceeded max_steps or its state became non-finite (the message
            names the sample and the time it reached).
    """
    check_choice("error_norm", error_norm, ERROR_NORMS)
    rms = error_norm == "rms"
    ref = y0[0]
    batch, device = ref.shape[0], ref.device
    t = torch.full((batch,), float(t_start), dtype=torch.float64, device=device)
    end = torch.full_like(t, float(t_end))
    sign = 1.0 if t_end >= t_start else -1.0
    y = tuple(v.clone() for v in y0)
    steps = torch.zeros(batch, dtype=torch.long, device=device)
    calls = 0
    idx_all = torch.arange(batch, device=device)
    k1 = rhs(t, y, idx_all)
    calls += 1
    _check_start(_rows_finite(k1), t)  # else the first step and the next time become NaN
    h = _first_step(rhs, t, y, k1, idx_all, end - t, rtol, atol, rms)
    calls += 1
    _check_start(torch.isfinite(h), t)
    # Two host reads per step: which samples are still integrating (the indices), and
    # whether any state turned non-finite or ran out of steps.
    idx = ((end - t).abs() > 0).nonzero().squeeze(1)
    while idx.numel():
        ta, ya, ha = t[idx], tuple(v[idx] for v in y), h[idx]
        remaining = (end[idx] - ta).abs()
        last = ha >= remaining
        step = sign * torch.where(last, remaining, ha)
        ks = [tuple(k[idx] for k in k1)]
        for s in range(1, 7):
            ys = _combine(ya, step, ks, _A[s])
            ts = torch.where(last & (s >= 5), end[idx], ta + _C[s] * step)
            ks.append(rhs(ts, ys, idx))
            calls += 1
        y_new = _combine(ya, step, ks, _A[6])
        err = _scaled_norm(_combine(tuple(torch.zeros_like(v) for v in ya), step, ks, _E), ya,
                           y_new, rtol, atol, rms)
        finite = torch.isfinite(err) & _rows_finite(y_new)
        accept = (err <= 1.0) & finite
        factor = torch.where(err > 0, SAFETY * err.clamp(min=1e-30) ** (-1 / 5),
                             torch.full_like(err, MAX_FACTOR)).clamp(MIN_FACTOR, MAX_FACTOR)
        h[idx] = torch.where(accept, ha * factor, _retry_step(ha, factor, remaining, last))
        steps[idx] += 1
        # Accepted samples move on (FSAL: the last stage is the next step's first stage);
        # the others keep their state and retry with the smaller step.
        t[idx] = torch.where(accept, torch.where(last, end[idx], ta + step), ta)
        for v, vn in zip(y, y_new):
            v[idx] = torch.where(_rows(accept, vn), vn, v[idx])
        for k, kn in zip(k1, ks[6]):
            k[idx] = torch.where(_rows(accept, kn), kn, k[idx])
        active = (end - t).abs() > 0
        over = active & (steps >= max_steps)
        bad_state, bad_steps = torch.stack([(~finite).any(), over.any()]).tolist()
        if bad_state:
            bad = int(idx[~finite][0])
            raise RuntimeError(f"sample {bad}'s state became non-finite after t="
                               f"{float(t[bad]):.6g}; check that score_fn is finite there")
        if bad_steps:
            bad = int(over.nonzero()[0])
            raise RuntimeError(f"sample {bad} took {max_steps} steps and stopped at t="
                               f"{float(t[bad]):.6g}; loosen rtol/atol (now {rtol:g}/{atol:g})")
        idx = active.nonzero().squeeze(1)
    return y, steps, calls


def _retry_step(h: torch.Tensor, factor: torch.Tensor, remaining: torch.Tensor,
                last: torch.Tensor) -> torch.Tensor:
    """The step after a rejection: h times the factor (at most 1). A rejected last step was
    cut to `remaining`; while the smaller step still covers it, the retry would be that same
    cut step with the same error, so the factor is applied again at once as often as such
    retries would apply it (the smallest m >= 1 with h f^m < remaining), evaluating none of
    them."""
    shrink = torch.minimum(factor, torch.ones_like(factor))
    repeat = last & (h * shrink >= remaining) & (shrink < 1)
    ratio = torch.where(repeat, remaining / h, torch.ones_like(h))
    times = torch.floor(torch.log(ratio) / torch.log(torch.where(repeat, shrink, 0.5))) + 1
    return h * shrink ** torch.where(repeat, times, torch.ones_like(times))
