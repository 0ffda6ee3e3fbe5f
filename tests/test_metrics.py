"""score_sde.metrics: Fréchet distances against closed forms derived here.

- Commuting covariances (C1 = Q diag(s1) Q^T, C2 = Q diag(s2) Q^T): (C1 C2)^{1/2} =
  Q diag(sqrt(s1 s2)) Q^T, so the trace term is sum_i (sqrt(s1_i) - sqrt(s2_i))^2; in 1-D with
  standard deviations s1, s2 the distance is (m1 - m2)^2 + (s1 - s2)^2.
- 2x2, not commuting: M = C1 C2 is similar to C1^{1/2} C2 C1^{1/2}, so its eigenvalues l1, l2
  are real and >= 0 and tr M^{1/2} = sqrt(l1) + sqrt(l2) = sqrt(tr M + 2 sqrt(det M)).
- Sample covariances C_k = X_k^T X_k / (N_k - 1) of centred features X_k [N_k, D]: the
  non-zero eigenvalues of C1 C2 are those of (X1 X2^T)(X1 X2^T)^T / ((N1 - 1)(N2 - 1)), so
  tr (C1 C2)^{1/2} = |X1 X2^T|_* / sqrt((N1 - 1)(N2 - 1)) (nuclear norm: the sum of singular
  values), a well-conditioned form even for N < D, where C1 C2 is singular.
- Two independent samples of size N from N(0, I_D): to first order in 1/N, E|mu1 - mu2|^2 =
  2 D / N, and the trace term is a quarter of |C1 - C2|_F^2 (the Bures metric near I), whose
  mean is 2 D (D + 1) / N (entries of C - I have variance 2 / N on the diagonal, 1 / N off
  it); so E[FD] = D (D + 5) / (2 N).
"""
import numpy as np
import pytest
import scipy.linalg
import torch

from score_sde.metrics import (feature_statistics, frechet_distance,
                               frechet_distance_from_features)

pytestmark = pytest.mark.usefixtures("one_thread")

# Absolute tolerances, relative to the scale (trace) of the covariances involved.
TOL = {
    "closed_form": 1e-9,  # sqrtm of well-conditioned products
    "identical": 1e-8,  # sqrtm(C^2) vs C, condition number ~1e2
    "singular": 1e-7,  # rank-deficient products: sqrtm keeps about 8 digits (measured 1e-8)
    "regularised": 1e-4,  # eps I = 1e-6 I added in dimension <= 8
}
BIAS_REPEATS = 100
BIAS_RTOL = 0.2  # 5 standard deviations of the mean of BIAS_REPEATS draws (measured 0.4 each)


def _rotation(dim, rng):
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q


def _spd(dim, rng):
    a = rng.standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def _trace_sqrt_sample_product(x1, x2):
    x1, x2 = x1 - x1.mean(0), x2 - x2.mean(0)
    nuclear = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum()
    return nuclear / np.sqrt((len(x1) - 1) * (len(x2) - 1))


def test_feature_statistics_float64_unbiased():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 6)).astype(np.float32) * 3 + 1
    for features in (x, torch.from_numpy(x)):
        mu, cov = feature_statistics(features)
        assert mu.dtype == cov.dtype == np.float64
        np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
        np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False, ddof=1),
                                   rtol=1e-12)


@pytest.mark.parametrize("dim", [1, 5, 32])
def test_commuting_covariances(dim):
    rng = np.random.default_rng(dim)
    s1, s2 = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    q = _rotation(dim, rng)
    for c1, c2 in ((np.diag(s1), np.diag(s2)), (q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T)):
        got = frechet_distance(mu1, c1, mu2, c2)
        assert abs(got - expected) < TOL["closed_form"] * (s1.sum() + s2.sum())


@pytest.mark.parametrize("m1, s1, m2, s2", [(0.0, 1.0, 0.0, 1.0), (1.0, 2.0, -0.5, 0.5),
                                            (3.0, 0.1, 3.0, 10.0)])
def test_one_dimensional(m1, s1, m2, s2):
    got = frechet_distance(np.array([m1]), np.array([[s1 ** 2]]), np.array([m2]),
                           np.array([[s2 ** 2]]))
    assert got == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-12, abs=1e-12)


def test_non_commuting_2x2():
    rng = np.random.default_rng(1)
    for _ in range(5):
        c1, c2 = _spd(2, rng), _spd(2, rng)
        assert not np.allclose(c1 @ c2, c2 @ c1)
        m = c1 @ c2
        trace_root = np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * trace_root
        got = frechet_distance(mu1, c1, mu2, c2)
        assert abs(got - expected) < TOL["closed_form"] * (np.trace(c1) + np.trace(c2))


def test_symmetric_and_zero_for_identical_statistics():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((200, 16)) * 2 + 1
    scale = np.trace(np.cov(a, rowvar=False)) + np.trace(np.cov(b, rowvar=False))
    ab, ba = frechet_distance_from_features(a, b), frechet_distance_from_features(b, a)
    assert ab > 1 and abs(ab - ba) < TOL["closed_form"] * scale
    mu, cov = feature_statistics(a)
    assert abs(frechet_distance(mu, cov, mu, cov)) < TOL["identical"] * np.trace(cov)
    assert abs(frechet_distance_from_features(a, a)) < TOL["identical"] * np.trace(cov)


def test_rank_deficient_covariances():
    """Fewer samples than dimensions (N <= D): the product is singular, sqrtm returns small
    imaginary parts, and the distance still matches the nuclear-norm form."""
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((10, 40)), rng.standard_normal((12, 40)) + 0.3
    (mu1, c1), (mu2, c2) = feature_statistics(a), feature_statistics(b)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2)
                - 2 * _trace_sqrt_sample_product(a, b))
    got = frechet_distance(mu1, c1, mu2, c2)
    assert abs(got - expected) < TOL["singular"] * (np.trace(c1) + np.trace(c2))


def test_regularisation_when_sqrtm_fails(monkeypatch):
    rng = np.random.default_rng(4)
    c1, c2 = _spd(8, rng), _spd(8, rng)
    mu = np.zeros(8)
    exact = frechet_distance(mu, c1, mu, c2)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def flaky(a):  # fails once, as for a singular product
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", flaky)
    with pytest.warns(UserWarning, match="eps I"):
        got = frechet_distance(mu, c1, mu, c2, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (c1 + 1e-6 * np.eye(8)) @ (c2 + 1e-6 * np.eye(8)))
    assert abs(got - exact) < TOL["regularised"]
    # Identical statistics stay at distance 0 when regularised: both traces include eps I.
    calls.clear()
    with pytest.warns(UserWarning, match="eps I"):
        same = frechet_distance(mu, c1, mu, c1, eps=1e-3)
    assert abs(same) < 1e-9 * np.trace(c1)

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) * 1j)
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="not real"):
        frechet_distance(mu, c1, mu, c2)


def test_finite_sample_bias():
    """Two samples of one Gaussian: E[FD] = D (D + 5) / (2 N) to first order, shrinking ~1/N."""
    dim = 4
    means = {}
    for n in (100, 1000):
        draws = [frechet_distance_from_features(*np.random.default_rng(r).standard_normal(
            (2, n, dim))) for r in range(BIAS_REPEATS)]
        assert min(draws) > 0
        means[n] = np.mean(draws)
        assert means[n] == pytest.approx(dim * (dim + 5) / (2 * n), rel=BIAS_RTOL)
    assert means[1000] < means[100] / 5


@pytest.mark.parametrize("args, match", [
    ((np.zeros(2), np.eye(2), np.zeros(3), np.eye(3)), "vectors of one length"),
    ((np.zeros(2), np.eye(3), np.zeros(2), np.eye(2)), "cov1 must have shape"),
    ((np.zeros(2), np.eye(2), np.zeros(2), np.ones(2)), "cov2 must have shape"),
    ((np.zeros(2), np.array([[1.0, 5.0], [0.0, 1.0]]), np.zeros(2), np.eye(2)),
     r"cov1 must be symmetric \(a covariance matrix\), got max \|C - C\^T\| = 5"),
    ((np.zeros(2), -np.eye(2), np.zeros(2), -np.eye(2)),
     r"cov1 must be positive semi-definite \(a covariance matrix\), got the eigenvalue -1"),
    ((np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 2.0], [2.0, 1.0]])),
     "cov2 must be positive semi-definite"),
    ((np.zeros((2, 1)), np.eye(2), np.zeros((2, 1)), np.eye(2)), "vectors"),
    ((np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2)), "mu1 contains 1 non-finite"),
    ((np.zeros(2), np.eye(2), np.zeros(2), np.diag([np.inf, 1])), "cov2 contains"),
    ((np.zeros(2), np.eye(2), np.array(["a", "b"]), np.eye(2)), "real numbers"),
])
def test_frechet_distance_rejects(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_other_input_errors():
    with pytest.raises(ValueError, match="eps must be"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), eps=0.0)
    with pytest.raises(ValueError, match=r"N >= 2"):
        feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="non-finite"):
        feature_statistics(torch.tensor([[0.0], [float("nan")]]))
    # Tensors that a cast to float64 would accept: imaginary parts lost, booleans as 0/1.
    for tensor in (torch.ones(3, 2, dtype=torch.complex64), torch.ones(3, 2, dtype=torch.bool)):
        with pytest.raises(ValueError, match=f"real numbers, got dtype {tensor.dtype}"):
            feature_statistics(tensor)
    with pytest.raises(ValueError, match="same width"):
        frechet_distance_from_features(np.zeros((3, 2)), np.zeros((3, 4)))
