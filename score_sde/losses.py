"""Training losses: continuous denoising score matching and its discrete-time ancestors.

- `ScoreMatchingLoss`: denoising score matching over t ~ U(eps, T), Song et al. 2021 (ICLR),
  Eq. (7), with lambda(t) = sigma(t)^2 or the likelihood weighting lambda(t) = g(t)^2 of
  Song, Durkan, Murray & Ermon 2021 ("Maximum Likelihood Training of Score-Based Diffusion
  Models", Theorem 1), optionally with their importance sampling of t.
- `DDPMLoss`: L_simple of Ho et al. 2020, Eq. (14).
- `SMLDLoss`: Song & Ermon 2019, Eqs. (5)-(6), with lambda(sigma) = sigma^2.
- `HybridLoss`: L_simple + lambda L_vlb with a learned reverse variance, Nichol & Dhariwal 2021,
  Eqs. (15)-(16).

Convention (all four losses): no factor 1/2. Eq. (7) of Song et al. 2021 and Eq. (14) of Ho et
al. have none; Song & Ermon's Eq. (5) and the likelihood bound of Song, Durkan et al. carry a
1/2, so their objectives are half of ours (for the bound, see `ScoreMatchingLoss`). Per-sample
squared errors are reduced over the non-batch dimensions by `reduction` ("mean" or "sum";
"sum" = D * "mean" for D = x[0].numel()), and every `__call__` returns the batch mean.

The continuous loss lives in `score_sde.score_matching`, the discrete ones in
`score_sde.discrete_losses`; this module is where they are imported from.
"""
from .discrete_losses import DDPMLoss, HybridLoss, SMLDLoss
from .score_matching import REDUCTIONS, WEIGHTINGS, ScoreMatchingLoss

__all__ = ["ScoreMatchingLoss", "DDPMLoss", "SMLDLoss", "HybridLoss", "WEIGHTINGS",
           "REDUCTIONS"]
