"""Tests of score_sde/models: NCSN++ / DDPM++, FIR resampling, the small networks.

Ground truth: the parameter counts Song et al. 2021 report for their CIFAR-10 models (built on
the meta device, never run), a naive FIR reference written here (explicit zero insertion,
padding and a loop over kernel taps, StyleGAN2's definition of upfirdn2d), and the attention
formula written out with einsum. Forward passes only use tiny configurations.
"""
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from score_sde.models import MODELS, MLPScoreNet, NCSNpp, SmallUNet, paper_config
from score_sde.models import fir
from score_sde.models.layers import AttnBlockpp, TimeEmbedding
from score_sde.score import make_score_fn
from score_sde.sde import VESDE, VPSDE

F64 = torch.float64

# Parameter counts in millions, Song et al. 2021 (Sec. 4.4 / App. H), rounded to 0.1M.
PAPER_PARAMS = {"ddpmpp_cont": 61.8, "ncsnpp_cont": 62.8, "ddpmpp_deep": 106.6,
                "ncsnpp_deep": 107.6}

TINY = dict(image_size=8, in_channels=3, nf=16, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.0)

# Relative tolerance of bfloat16 autocast against float32 (8-bit mantissa, a few layers deep).
BF16_RTOL = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kwargs):
    return NCSNpp(**dict(TINY, **kwargs))


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def perturb_(model, scale=0.05, seed=0):
    """Adds noise to every parameter, so zero-initialised layers no longer hide the rest."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def inputs(batch=2, channels=3, size=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=gen, dtype=dtype)
    sigma = torch.rand(batch, generator=gen, dtype=dtype) * 10 + 0.1
    return x, sigma


# --- naive FIR reference ----------------------------------------------------------------------

def naive_upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """Zero insertion, zero padding (crop when negative), true convolution, decimation."""
    b, c, h, w = x.shape
    u = torch.zeros(b, c, h * up, w * up, dtype=x.dtype)
    u[:, :, ::up, ::up] = x
    u = F.pad(u, (pad[0], pad[1], pad[0], pad[1]))
    size = kernel.shape[0]
    ho, wo = u.shape[2] - size + 1, u.shape[3] - size + 1
    out = torch.zeros(b, c, ho, wo, dtype=x.dtype)
    flipped = kernel.flip(0, 1)
    for i, j in itertools.product(range(size), range(size)):
        out += flipped[i, j] * u[:, :, i:i + ho, j:j + wo]
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 6, 10), (1, 1, 5, 7)])
@pytest.mark.parametrize("up,down,pad", [(1, 1, (1, 2)), (2, 1, (2, 1)), (1, 2, (1, 1)),
                                         (2, 2, (3, 0)), (3, 1, (2, 2)), (1, 1, (-1, 2))])
def test_upfirdn2d_matches_naive(shape, up, down, pad):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen, dtype=F64)
    kernel = torch.randn(4, 4, generator=gen, dtype=F64)  # asymmetric: catches a missing flip
    out = fir.upfirdn2d(x, kernel, up=up, down=down, pad=pad)
    torch.testing.assert_close(out, naive_upfirdn2d(x, kernel, up, down, pad),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [4, 8, 16])
def test_fir_resampling_matches_naive_and_keeps_constants(size):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, size, size, generator=gen, dtype=F64)
    k_up = fir.fir_kernel((1, 3, 3, 1), gain=4.0).double()
    k_down = fir.fir_kernel((1, 3, 3, 1)).double()
    up, down = fir.upsample_2d(x, k_up), fir.downsample_2d(x, k_down)
    assert up.shape == (2, 3, 2 * size, 2 * size) and down.shape == (2, 3, size // 2, size // 2)
    # StyleGAN2 paddings for K = 4, factor 2: (2, 1) when upsampling, (1, 1) when downsampling.
    torch.testing.assert_close(up, naive_upfirdn2d(x, k_up, up=2, pad=(2, 1)))
    torch.testing.assert_close(down, naive_upfirdn2d(x, k_down, down=2, pad=(1, 1)))
    ones = torch.ones(1, 1, size, size, dtype=F64)
    torch.testing.assert_close(fir.upsample_2d(ones, k_up)[..., 2:-2, 2:-2],
                               torch.ones(1, 1, 2 * size - 4, 2 * size - 4, dtype=F64))
    if size > 4:
        torch.testing.assert_close(fir.downsample_2d(ones, k_down)[..., 1:-1, 1:-1],
                                   torch.ones(1, 1, size // 2 - 2, size // 2 - 2, dtype=F64))


def test_fir_kernel_normalisation_and_trivial_taps():
    torch.testing.assert_close(fir.fir_kernel((1, 3, 3, 1)).sum(), torch.tensor(1.0))
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    nearest = fir.upsample_2d(x, fir.fir_kernel((1, 1), gain=4.0).double())
    torch.testing.assert_close(nearest, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    pooled = fir.downsample_2d(x, fir.fir_kernel((1, 1)).double())
    torch.testing.assert_close(pooled, F.avg_pool2d(x, 2))
    with pytest.raises(ValueError, match="taps"):
        fir.fir_kernel(())
    with pytest.raises(ValueError, match="taps"):
        fir.fir_kernel((1, -1))


@pytest.mark.parametrize("size", [4, 8])
def test_fused_fir_convolutions_match_naive(size):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, size, size, generator=gen, dtype=F64)
    w = torch.randn(5, 3, 3, 3, generator=gen, dtype=F64)
    k_up = fir.fir_kernel((1, 3, 3, 1), gain=4.0).double()
    k_down = fir.fir_kernel((1, 3, 3, 1)).double()
    # Upsample-convolution: zero insertion, full cross-correlation with w, FIR with pad (1, 1).
    u = torch.zeros(2, 3, 2 * size - 1, 2 * size - 1, dtype=F64)
    u[:, :, ::2, ::2] = x
    expected = naive_upfirdn2d(F.conv2d(u, w, padding=2), k_up, pad=(1, 1))
    out = fir.upsample_conv_2d(x, w, k_up)
    assert out.shape == (2, 5, 2 * size, 2 * size)
    torch.testing.assert_close(out, expected)
    # Away from the border it is FIR upsampling followed by a 'same' convolution.
    unfused = F.conv2d(fir.upsample_2d(x, k_up), w, padding=1)
    torch.testing.assert_close(out[..., 2:-2, 2:-2], unfused[..., 2:-2, 2:-2])
    # Convolution-downsample: FIR blur with pad (2, 2), then a stride-2 convolution.
    expected = F.conv2d(naive_upfirdn2d(x, k_down, pad=(2, 2)), w, stride=2)
    out = fir.conv_downsample_2d(x, w, k_down)
    assert out.shape == (2, 5, size // 2, size // 2)
    torch.testing.assert_close(out, expected)


def test_fir_under_bfloat16_autocast():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    w = torch.randn(6, 4, 3, 3, generator=gen)
    k_up, k_down = fir.fir_kernel((1, 3, 3, 1), gain=4.0), fir.fir_kernel((1, 3, 3, 1))
    ops = [lambda v: fir.upsample_2d(v, k_up), lambda v: fir.downsample_2d(v, k_down),
           lambda v: fir.upsample_conv_2d(v, w, k_up),
           lambda v: fir.conv_downsample_2d(v, w, k_down)]
    for op in ops:
        ref = op(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = op(x)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=BF16_RTOL * ref.abs().max())
    out = fir.upsample_2d(x.bfloat16(), k_up)  # plain bfloat16 tensors too
    assert out.dtype == torch.bfloat16


# --- NCSN++ / DDPM++ --------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        model = NCSNpp(**paper_config(name))
    assert round(num_params(model) / 1e5) / 10 == PAPER_PARAMS[name]


def test_paper_config_returns_fresh_dicts_and_rejects_unknown_names():
    config = paper_config("ncsnpp_cont")
    assert config["embedding_type"] == "fourier" and config["progressive_input"] == "residual"
    config["nf"] = 1
    assert paper_config("ncsnpp_cont")["nf"] == 128
    with pytest.raises(ValueError, match="ddpmpp_cont"):
        paper_config("ddpm++")


# Every resblock type x FIR x progressive combination; the embedding alternates between cases.
OPTIONS = list(itertools.product(
    ["biggan", "ddpm"], [False, True],
    [("none", "none", "sum"), ("output_skip", "input_skip", "sum"),
     ("residual", "residual", "sum"), ("output_skip", "input_skip", "cat"),
     ("none", "residual", "sum")]))


@pytest.mark.parametrize("case", range(len(OPTIONS)))
def test_forward_shape_dtype_every_option(case):
    resblock_type, use_fir, (progressive, progressive_input, combine) = OPTIONS[case]
    embedding_type = ("positional", "fourier")[case % 2]
    torch.manual_seed(0)
    model = tiny(resblock_type=resblock_type, fir=use_fir, embedding_type=embedding_type,
                 progressive=progressive, progressive_input=progressive_input,
                 progressive_combine=combine)
    x, sigma = inputs()
    out = perturb_(model)(x, sigma)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all() and out.abs().max() > 0


@pytest.mark.parametrize("progressive,progressive_input", [("none", "none"),
                                                           ("output_skip", "input_skip"),
                                                           ("residual", "residual")])
@pytest.mark.parametrize("resblock_type", ["biggan", "ddpm"])
def test_output_is_exactly_zero_at_init(progressive, progressive_input, resblock_type):
    torch.manual_seed(0)
    model = tiny(progressive=progressive, progressive_input=progressive_input,
                 resblock_type=resblock_type, fir=True)
    x, sigma = inputs()
    assert torch.equal(model(x, sigma), torch.zeros_like(x))
    assert not torch.equal(tiny(init_scale=1.0)(x, sigma), torch.zeros_like(x))


def test_float64_and_unconditional_and_uncentered():
    torch.manual_seed(0)
    model = perturb_(tiny(conditional=False)).double()
    x, sigma = inputs(dtype=F64)
    out = model(x, sigma)
    assert out.dtype == F64
    torch.testing.assert_close(out, model(x, sigma + 1))  # ignores time entirely
    torch.manual_seed(0)
    centered = perturb_(tiny())
    torch.manual_seed(0)
    uncentered = perturb_(tiny(centered=False))
    torch.testing.assert_close(uncentered((x.float() + 1) / 2, sigma.float()),
                               centered(x.float(), sigma.float()))


def test_scale_by_sigma_divides_the_output_by_the_noise_level():
    x, sigma = inputs()
    outputs = {}
    for scale in (False, True):
        torch.manual_seed(0)
        outputs[scale] = perturb_(tiny(embedding_type="fourier", scale_by_sigma=scale))(x, sigma)
    torch.testing.assert_close(outputs[True], outputs[False] / sigma[:, None, None, None])
    with pytest.raises(ValueError, match="scale_by_sigma.*fourier"):
        tiny(scale_by_sigma=True)  # positional embedding: the input is no noise level
    with pytest.raises(ValueError, match="scale_by_sigma.*conditional"):
        tiny(embedding_type="fourier", conditional=False, scale_by_sigma=True)


def test_time_embeddings():
    c = torch.tensor([0.5, 3.0, 40.0], dtype=F64)
    fourier = TimeEmbedding("fourier", 8, fourier_scale=16.0)
    arg = 2 * math.pi * torch.log(c)[:, None] * fourier.freqs.double()
    torch.testing.assert_close(fourier(c), torch.cat([arg.sin(), arg.cos()], dim=1))
    positional = TimeEmbedding("positional", 9)
    emb = positional(torch.tensor([0, 7, 999]))
    assert emb.shape == (3, 9) and torch.all(emb[:, -1] == 0)
    torch.testing.assert_close(emb, positional(torch.tensor([0.0, 7.0, 999.0])))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0]))
    # float64 input gets float64-accurate features, whatever dtype the module was cast to:
    # sin / cos of c 10000^(-i / 3), i < 4, derived here.
    c = torch.tensor([7.0, 999.0], dtype=F64)
    arg = c[:, None] * torch.tensor([10000.0 ** (-i / 3) for i in range(4)], dtype=F64)
    exact = torch.cat([arg.sin(), arg.cos(), torch.zeros(2, 1, dtype=F64)], dim=1)
    for module in (positional, TimeEmbedding("positional", 9).double()):
        torch.testing.assert_close(module(c), exact, rtol=0, atol=1e-12)


def test_attention_matches_formula():
    torch.manual_seed(0)
    block = perturb_(AttnBlockpp(8, skip_rescale=True, init_scale=1.0)).double()
    x = torch.randn(2, 8, 3, 4, dtype=F64)
    h = block.norm(x)
    q, k, v = block.qkv(h).chunk(3, dim=1)
    w = torch.einsum("bchw,bcij->bhwij", q, k).reshape(2, 3, 4, 12) / math.sqrt(8)
    w = w.softmax(dim=-1).reshape(2, 3, 4, 3, 4)
    expected = (x + block.proj(torch.einsum("bhwij,bcij->bchw", w, v))) / math.sqrt(2)
    torch.testing.assert_close(block(x), expected)


def test_class_conditioning_with_null_label():
    torch.manual_seed(0)
    model = perturb_(tiny(num_classes=3)).eval()
    x, sigma = inputs(batch=3)
    null = torch.full((3,), 3)
    torch.testing.assert_close(model(x, sigma), model(x, sigma, null))
    labelled = model(x, sigma, torch.tensor([0, 1, 2]))
    assert not torch.allclose(labelled, model(x, sigma, null))
    assert not torch.allclose(labelled[0], model(x, sigma, torch.tensor([1, 1, 2]))[0])
    with pytest.raises(ValueError, match="class_labels"):
        model(x, sigma, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="class_labels"):
        model(x, sigma, torch.tensor([0, 1]))
    for bad in (4, -1):  # 3 is the null label
        with pytest.raises(ValueError, match=rf"class_labels must lie in \[0, 3\] .*got {bad}"):
            model(x, sigma, torch.tensor([0, bad, 2]))
    with pytest.raises(ValueError, match="without num_classes"):
        tiny()(x, sigma, null)
    with pytest.raises(ValueError, match="conditional"):
        tiny(num_classes=3, conditional=False)


def test_gradients_flow_and_are_finite():
    torch.manual_seed(0)
    model = perturb_(tiny(fir=True, progressive="residual", progressive_input="residual",
                          embedding_type="fourier", num_classes=2))
    x, sigma = inputs()
    x.requires_grad_(True)
    model(x, sigma, torch.tensor([0, 2])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if not name.startswith("label_embed"):  # only rows 0 and 2 of the table are used
            assert p.grad.abs().max() > 0, name
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_same_seed_same_init():
    states = []
    for _ in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(123)
            states.append(tiny(embedding_type="fourier", init_scale=1.0).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    with torch.random.fork_rng():
        torch.manual_seed(124)
        other = tiny(embedding_type="fourier", init_scale=1.0).state_dict()
    assert not torch.equal(other["conv_in.weight"], states[0]["conv_in.weight"])


def test_bfloat16_autocast_forward_close_to_float32():
    torch.manual_seed(0)
    model = perturb_(tiny(fir=True, progressive="output_skip", progressive_input="residual",
                          embedding_type="fourier")).eval()
    x, sigma = inputs()
    ref = model(x, sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, sigma)
    assert out.shape == x.shape and torch.isfinite(out).all()
    err = (out.float() - ref).norm() / ref.norm()
    assert err < BF16_RTOL, err


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="resblock_type"):
        tiny(resblock_type="resnet")
    with pytest.raises(ValueError, match="progressive"):
        tiny(progressive="skip")
    with pytest.raises(ValueError, match="progressive_input"):
        tiny(progressive_input="output_skip")
    with pytest.raises(ValueError, match="progressive_combine"):
        tiny(progressive_combine="mean")
    with pytest.raises(ValueError, match="embedding_type"):
        tiny(embedding_type="learned")
    with pytest.raises(ValueError, match="image_size"):
        tiny(image_size=10, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="ch_mult"):
        tiny(ch_mult=())
    with pytest.raises(ValueError, match="dropout"):
        tiny(dropout=1.0)
    with pytest.raises(ValueError, match="dropout must be a number"):
        tiny(dropout="0.1")
    with pytest.raises(ValueError, match=r"attn_resolutions must be a sequence of ints .*got 16"):
        tiny(attn_resolutions=16)  # (16,) was meant
    with pytest.raises(ValueError, match="init_scale must be a finite number >= 0, got -1"):
        tiny(init_scale=-1.0)
    with pytest.raises(ValueError, match="fourier_scale must be a finite number > 0"):
        tiny(embedding_type="fourier", fourier_scale=0.0)
    with pytest.raises(ValueError, match="fourier_scale must be a finite number > 0, got inf"):
        tiny(embedding_type="fourier", fourier_scale=math.inf)
    model = tiny()
    x, sigma = inputs()
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[:, :2], sigma)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 3, 7, 7), sigma)
    with pytest.raises(ValueError, match="time_input"):
        model(x, sigma[:1])
    with pytest.raises(ValueError, match="fourier"):
        tiny(embedding_type="fourier")(x, torch.tensor([1, 2]))


def test_make_score_fn_conventions():
    """VP: noise prediction read with scaled t; VE: noise prediction read with the std."""
    x, _ = inputs()
    t = torch.tensor([0.3, 0.8])
    torch.manual_seed(0)
    vp_model = tiny()
    score = make_score_fn(vp_model, VPSDE(), prediction="noise", time_input="scaled_t")(x, t)
    assert torch.equal(score, torch.zeros_like(x))  # zero-initialised output
    torch.manual_seed(0)
    ve_model = perturb_(tiny(embedding_type="fourier"))
    sde = VESDE()
    score = make_score_fn(ve_model, sde, prediction="noise", time_input="std")(x, t)
    std = sde.marginal_coeffs(t.double())[1].float()
    torch.testing.assert_close(score, -ve_model(x, std) / std[:, None, None, None])


# --- small networks ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [28, 32])
def test_small_unet(size):
    torch.manual_seed(0)
    model = SmallUNet(image_size=size, nf=16, num_classes=10)
    # 28 -> 14 -> 7 (32 -> 16 -> 8), attention only at the lowest resolution by default.
    attns = [type(a).__name__ for level in model.down_levels for a in level["attns"]]
    assert attns == ["Identity"] * 4 + ["AttnBlockpp"] * 2
    assert ["attn" in level for level in model.up_levels] == [True, False, False]
    assert num_params(model) < 1_000_000
    x = torch.randn(2, 1, size, size)
    t = torch.tensor([10.0, 900.0])
    assert torch.equal(model(x, t), torch.zeros_like(x))
    out = perturb_(model)(x, t, torch.tensor([3, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_mlp_score_net(embedding_type):
    torch.manual_seed(0)
    model = MLPScoreNet(dim=2, hidden=32, num_layers=3, embedding_type=embedding_type,
                        num_classes=4)
    x = torch.randn(5, 2)
    t = torch.linspace(0.1, 5.0, 5)
    assert torch.equal(model(x, t), torch.zeros_like(x))
    perturb_(model)
    out = model(x, t)
    assert out.shape == (5, 2) and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(x, t, torch.full((5,), 4)))
    assert not torch.allclose(out, model(x, t + 1.0))
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(5, 3), t)
    with pytest.raises(ValueError, match="embedding_type"):
        MLPScoreNet(dim=2, embedding_type="sinusoidal")


def test_models_registry():
    assert MODELS == {"ncsnpp": NCSNpp, "mlp": MLPScoreNet, "small_unet": SmallUNet}
    assert isinstance(MODELS["mlp"](dim=3), torch.nn.Module)


def test_mlp_linear_skip_is_a_time_dependent_diagonal_map():
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    t = torch.linspace(0.1, 2.0, 6)
    plain = MLPScoreNet(dim=3, hidden=16, num_layers=2, linear_skip=False)
    assert not any(name.startswith("skip") for name, _ in plain.named_parameters())
    model = MLPScoreNet(dim=3, hidden=16, num_layers=2)
    assert torch.equal(model(x, t), torch.zeros_like(x))  # zero at initialisation
    with torch.no_grad():  # skip(temb) = (1, 2, 3) for every time: out = (1, 2, 3) * x
        model.skip.weight.zero_()
        model.skip.bias.copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(model(x, t), x * torch.tensor([1.0, 2.0, 3.0]))


def test_numpy_settings_build_the_same_network():
    """NumPy scalars and arrays (settings computed with NumPy) are valid arguments and give
    the network the Python-number settings give, weights included."""
    torch.manual_seed(0)
    plain = tiny(dropout=0.25, attn_resolutions=(8,), embedding_type="fourier",
                 fourier_scale=16.0, init_scale=0.5, ch_mult=(1, 2))
    torch.manual_seed(0)
    numpy = tiny(dropout=np.float32(0.25), attn_resolutions=np.array([8]),
                 embedding_type="fourier", fourier_scale=np.float32(16), init_scale=np.float64(0.5),
                 ch_mult=[np.int64(1), np.int64(2)])
    a, b = plain.state_dict(), numpy.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert repr(plain) == repr(numpy)


def test_widths_groupnorm_cannot_divide_are_refused_naming_nf():
    # nf = 48 with ch_mult (1, 2): the decoder's first block sees 96 + 48 = 144 channels, and
    # min(144 // 4, 32) = 32 groups do not divide 144; nf = 32 gives only multiples of 32.
    for build in (lambda nf: NCSNpp(**{**TINY, "nf": nf}),
                  lambda nf: SmallUNet(image_size=8, in_channels=1, nf=nf, ch_mult=(1, 2))):
        with pytest.raises(ValueError, match=r"144 channels .* 32 groups.*nf a multiple of 32"):
            build(48)
        build(32)
