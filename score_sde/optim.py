"""The optimizer side of training: Adam, the learning-rate schedule and the EMA of the weights.

The paper's code trains with Adam after a linear learning-rate warm-up and keeps an exponential
moving average (EMA) of the weights, at rate 0.9999 for VP-type SDEs and 0.999 for VE; samples
and held-out losses are computed with the EMA. The schedules are pure functions of the
step, so a resumed run continues them exactly. `score_sde.trainer` uses them.
"""
import math
from typing import Optional, Tuple

import torch

from .config import Config

# The paper's EMA rates: 0.9999 for VP-type SDEs, 0.999 for VE.
EMA_RATES = {"vp": 0.9999, "subvp": 0.9999, "cosine": 0.9999, "ve": 0.999}


def learning_rate(step: int, cfg: Config) -> float:
    """Linear warm-up to cfg.training.lr over cfg.training.warmup steps, then constant
    (lr_decay "none") or a half-cosine from lr down to lr_final * lr at step n_iters."""
    tc = cfg.training
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    if tc.lr_decay == "none" or tc.n_iters <= tc.warmup:
        return tc.lr
    progress = min(1.0, (step - tc.warmup) / (tc.n_iters - tc.warmup))
    return tc.lr * (tc.lr_final + (1 - tc.lr_final) * 0.5 * (1 + math.cos(math.pi * progress)))


def ema_decay(step: int, rate: float, warmup: bool) -> float:
    """The EMA decay of update number `step` (0-based): `rate`, or with `warmup`
    min(rate, (1 + step) / (10 + step)), so the average forgets the initial weights in a short
    run (at rate 0.999, 1.8% of the initialisation would remain after 4000 plain updates)."""
    return min(rate, (1 + step) / (10 + step)) if warmup else rate


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float,
               apply: Optional[torch.Tensor] = None) -> None:
    """ema <- rate * ema + (1 - rate) * model for the parameters; buffers are copied.

    `apply`, a 0-dim boolean tensor on the device, makes the update conditional without
    reading it on the host: where it is false the parameters are left as they are.
    """
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    if apply is None:
        torch._foreach_lerp_(e_params, m_params, 1.0 - rate)
    elif e_params:
        weight = apply.to(e_params[0].dtype) * (1.0 - rate)
        torch._foreach_lerp_(e_params, m_params, [weight] * len(e_params))
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


def make_adam(params, *, lr: float, betas: Tuple[float, float], eps: float,
              weight_decay: float) -> Tuple[torch.optim.Adam, bool]:
    """Adam, fused (one kernel for all parameters) where the parameters' device supports it;
    returns (optimizer, fused). Only the fused form can skip a step on the device
    (`found_inf`), which spares the host a wait for the device at every step."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                fused=True), True
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps,
                                weight_decay=weight_decay), False
