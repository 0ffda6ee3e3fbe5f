"""Fréchet distance between Gaussians fitted to feature sets (FID and its relatives).

The Fréchet (2-Wasserstein) distance between N(mu1, C1) and N(mu2, C2) is (Dowson & Landau
1982; Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
Equilibrium", Eq. 6)

    d^2 = |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2}).

FID is this distance between Inception-v3 pool features of generated and real images; any other
feature extractor gives a different number (here: the "classifier Fréchet distance" of a small
classifier), which must never be reported as FID. Statistics are float64 NumPy arrays: the
matrix square root runs in SciPy, once per evaluation, so there is no reason to stay in torch.

The estimate from N samples is biased upwards: for two independent samples of the same
D-dimensional Gaussian with identity covariance it is about D (D + 5) / (2 N) (2 D / N from the
means, D (D + 1) / (2 N) from the covariances), so distances are only comparable at equal N.
"""
import warnings
from typing import Tuple, Union

import numpy as np
import scipy.linalg
import torch

__all__ = ["feature_statistics", "frechet_distance", "frechet_distance_from_features"]

Array = Union[np.ndarray, torch.Tensor]

# Imaginary parts of sqrtm(C1 C2) up to this fraction of the largest variance are round-off
# (the product is similar to a PSD matrix, so its square root is real in exact arithmetic).
IMAG_RTOL = 1e-3
# A covariance is symmetric up to the round-off of its computation (float32 included).
SYMMETRY_RTOL = 1e-6
# Smallest eigenvalue a covariance may have, relative to its largest in magnitude (round-off).
PSD_RTOL = 1e-5


def _as_float64(name: str, a: Array) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        if a.is_complex() or a.dtype == torch.bool:  # the cast below would accept both
            raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
        a = a.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(a)).sum())} non-finite values")
    return a


def feature_statistics(features: Array) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of a feature set, in float64.

    Args:
        features: [N, D] array or tensor (any real dtype, any device), N >= 2.

    Returns:
        (mu [D], cov [D, D]) as float64 NumPy arrays; cov divides by N - 1.

    Raises:
        ValueError: not two-dimensional, fewer than 2 rows, or non-finite values.
    """
    x = _as_float64("features", features)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"features must have shape [N, D] with N >= 2 and D >= 1, got "
                         f"{x.shape}")
    mu = x.mean(axis=0)
    centred = x - mu
    cov = centred.T @ centred / (x.shape[0] - 1)
    return mu, cov


def _sqrtm_product(cov1: np.ndarray, cov2: np.ndarray) -> Tuple[np.ndarray, bool]:
    """(real part of sqrtm(cov1 cov2), whether it is trustworthy)."""
    with warnings.catch_warnings():
        # A singular product (N <= D, constant features) is expected; the result is checked.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(root).all():
        return root.real, False
    scale = max(np.abs(np.diag(cov1)).max(), np.abs(np.diag(cov2)).max(), np.finfo(float).tiny)
    if np.iscomplexobj(root):
        if np.abs(root.imag).max() > IMAG_RTOL * scale:
            return root.real, False
        root = root.real
    return root, True


def frechet_distance(mu1: Array, cov1: Array, mu2: Array, cov2: Array, *,
                     eps: float = 1e-6) -> float:
    """Squared Fréchet distance |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2}), in float64.

    The square root of C1 C2 comes from `scipy.linalg.sqrtm`. Its imaginary round-off (the
    product of two PSD matrices has real non-negative eigenvalues) is dropped when it stays
    below `IMAG_RTOL` times the largest variance. When the root is not finite or its imaginary
    part is larger (a nearly singular product), both covariances are regularised by eps I and
    the result is the distance between the regularised Gaussians, with a warning (the usual
    remedy of FID code, which keeps the unregularised traces and so gives -2 eps D for
    identical statistics; here it stays 0). This moves the result by up to about sqrt(eps s)
    (s a typical variance) per direction in which a covariance is singular: keep eps small.

    Args:
        mu1, mu2: means [D].
        cov1, cov2: covariances [D, D] (symmetric positive semi-definite, up to round-off:
            eigenvalues down to -1e-5 times the largest are accepted).
        eps: regularisation added to the diagonals in the near-singular case (> 0).

    Returns:
        the distance as a Python float (the squared 2-Wasserstein distance; it can be
        negative by round-off, about 1e-12 times the trace, for identical statistics).

    Raises:
        ValueError: mismatched or wrong shapes, non-finite inputs, covariances that are not
            symmetric positive semi-definite, or eps <= 0.
        FloatingPointError: no usable square root even after regularisation.
    """
    mu1, mu2 = _as_float64("mu1", mu1), _as_float64("mu2", mu2)
    cov1, cov2 = _as_float64("cov1", cov1), _as_float64("cov2", cov2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must be vectors of one length [D], got {mu1.shape} and "
                         f"{mu2.shape}")
    dim = mu1.shape[0]
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        if cov.shape != (dim, dim):
            raise ValueError(f"{name} must have shape [D, D] = ({dim}, {dim}) to match the "
                             f"means, got {cov.shape}")
        asymmetry = float(np.abs(cov - cov.T).max(initial=0.0))
        if asymmetry > SYMMETRY_RTOL * float(np.abs(cov).max(initial=0.0)):
            raise ValueError(f"{name} must be symmetric (a covariance matrix), got "
                             f"max |C - C^T| = {asymmetry:.3g}")
        eigenvalues = np.linalg.eigvalsh(cov) if dim else np.zeros(1)
        if eigenvalues[0] < -PSD_RTOL * max(abs(eigenvalues[0]), abs(eigenvalues[-1])):
            raise ValueError(f"{name} must be positive semi-definite (a covariance matrix), "
                             f"got the eigenvalue {eigenvalues[0]:.3g}")
    if not (isinstance(eps, (int, float)) and np.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")

    root, ok = _sqrtm_product(cov1, cov2)
    if not ok:
        warnings.warn(f"frechet_distance: sqrtm(C1 C2) is singular or not real; adding "
                      f"eps I = {eps:g} I to both covariances")
        cov1, cov2 = cov1 + eps * np.eye(dim), cov2 + eps * np.eye(dim)
        root, ok = _sqrtm_product(cov1, cov2)
        if not ok:
            raise FloatingPointError("frechet_distance: sqrtm(C1 C2) is not finite or not real "
                                     f"even with eps I = {eps:g} I added to both covariances")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(root))


def frechet_distance_from_features(features1: Array, features2: Array, *,
                                   eps: float = 1e-6) -> float:
    """`frechet_distance` between the Gaussians fitted to two feature sets [N1, D], [N2, D].

    Raises:
        ValueError: as `feature_statistics`, or feature sets of different widths D.
    """
    mu1, cov1 = feature_statistics(features1)
    mu2, cov2 = feature_statistics(features2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sets must have the same width D, got {mu1.shape[0]} and "
                         f"{mu2.shape[0]}")
    return frechet_distance(mu1, cov1, mu2, cov2, eps=eps)
