"""score_sde.cuda_graphs.CudaGraphed and the cuda_graph options of log_likelihood and the tools.

On the CPU the wrapper must be a transparent pass-through (every call runs the function, the
results are the function's); on CUDA (tests marked gpu) replays must equal eager calls, one
graph per call signature, and a function that cannot be recorded must still give its eager
result, with one warning.
"""
import math
import warnings

import pytest
import torch

from score_sde import VPSDE, log_likelihood, make_score_fn, sample_dpm_solver, sample_pc
from score_sde.cuda_graphs import CudaGraphed
from score_sde.models import SmallUNet
from tests.problems import KERNELS, exact_score_fn, random_mixture

cuda = pytest.mark.gpu


# --- the CPU: a pass-through --------------------------------------------------------------------

def test_cpu_calls_run_the_function():
    calls = []

    def fn(x, t):
        calls.append(1)
        return x * t[:, None], x.sum(1)

    graphed = CudaGraphed(fn)
    x, t = torch.randn(3, 2), torch.rand(3)
    a, b = graphed(x, t)
    torch.testing.assert_close(a, x * t[:, None], rtol=0, atol=0)
    torch.testing.assert_close(b, x.sum(1), rtol=0, atol=0)
    assert len(calls) == 1 and graphed.eager_calls == 1
    assert graphed.replays == 0 and graphed.num_graphs == 0


@pytest.mark.parametrize("args, match", [
    (dict(fn=None), "fn must be callable"),
    (dict(fn=abs, max_graphs=0), "max_graphs must be an int >= 1"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        CudaGraphed(**args)


@pytest.mark.parametrize("step_control", ["batch", "per_sample"])
def test_likelihood_cuda_graph_option_on_the_cpu_changes_nothing(step_control):
    mixture, sde = random_mixture(8, seed=2), VPSDE()
    score_fn = exact_score_fn(mixture, KERNELS["vp"])
    x, _ = mixture.sample(4, torch.Generator().manual_seed(0))
    a = log_likelihood(sde, score_fn, x, step_control=step_control,
                       generator=torch.Generator().manual_seed(3))
    b = log_likelihood(sde, score_fn, x, step_control=step_control, cuda_graph=True,
                       generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[2] == b[2] > 0  # NFE counted at the right-hand side equals CountingScore's


# --- CUDA 

def _unet_score(device):
    torch.manual_seed(0)
    net = SmallUNet(image_size=8, in_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), dropout=0.0)
    with torch.no_grad():  # redraw the zero-initialised output so the score is not zero
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    net = net.to(device).eval().requires_grad_(False)
    return make_score_fn(net, VPSDE(), prediction="noise", time_input="t")


@cuda
def test_replays_equal_eager_calls_one_graph_per_signature():
    score = _unet_score("cuda")
    graphed = CudaGraphed(score)
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch in (4, 4, 6, 4):
        x = torch.randn(batch, 1, 8, 8, device="cuda", generator=g)
        t = torch.rand(batch, device="cuda", generator=g) * 0.9 + 0.05
        with torch.no_grad():
            torch.testing.assert_close(graphed(x, t), score(x, t), rtol=1e-5, atol=1e-5)
    assert graphed.num_graphs == 2 and graphed.replays == 4


@cuda
def test_fixed_step_samplers_with_a_graphed_score_match_eager():
    score = _unet_score("cuda")
    for sampler, kw in ((sample_dpm_solver, dict(num_steps=10)),
                        (sample_pc, dict(num_steps=20))):
        graphed = CudaGraphed(score)
        a, nfe_a = sampler(VPSDE(), score, (8, 1, 8, 8), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(1), **kw)
        b, nfe_b = sampler(VPSDE(), graphed, (8, 1, 8, 8), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(1), **kw)
        assert nfe_a == nfe_b and graphed.num_graphs == 1 and graphed.replays == nfe_b
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@cuda
@pytest.mark.parametrize("step_control", ["batch", "per_sample"])
def test_graphed_likelihood_matches_eager(step_control):
    score = _unet_score("cuda")
    x = torch.rand(6, 1, 8, 8, device="cuda", generator=torch.Generator(device="cuda")
                   .manual_seed(2)) * 2 - 1
    probes = torch.randn((1,) + tuple(x.shape), device="cuda",
                         generator=torch.Generator(device="cuda").manual_seed(3))
    kw = dict(probes=probes, step_control=step_control, rtol=1e-4, atol=1e-4)
    eager, _, nfe_eager = log_likelihood(VPSDE(), score, x, **kw)
    graphed, _, nfe_graphed = log_likelihood(VPSDE(), score, x, cuda_graph=True, **kw)
    # Recorded kernels may round differently, which can move an adaptive step or two.
    assert abs(nfe_graphed - nfe_eager) <= 0.1 * nfe_eager
    bpd = 1 / (x[0].numel() * math.log(2))
    assert ((graphed - eager).abs() * bpd).max() < 1e-3


@cuda
def test_unrecordable_function_runs_eagerly_with_one_warning():
    def reads_the_host(x):
        return x * float(x.abs().max())  # a host read: not allowed while recording

    graphed = CudaGraphed(reads_the_host)
    x = torch.randn(5, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = graphed(x), graphed(x)
    torch.testing.assert_close(first, reads_the_host(x))
    torch.testing.assert_close(second, reads_the_host(x))
    assert graphed.num_graphs == 0 and graphed.replays == 0
    assert sum("CUDA graph recording failed" in str(w.message) for w in caught) == 1
