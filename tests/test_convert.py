"""Tests of score_sde/convert.py and tools/convert_checkpoint.py.

Nothing is downloaded and the paper's code is not run. Ground truth:
- the reference's state-dict layout (keys, shapes, the order of `model.parameters()`, which is
  the order of the EMA's shadow_params), stated in `reference_keys` below from reading its
  public source (score_sde_pytorch models/ncsnpp.py, layerspp.py, layers.py,
  up_or_down_sampling.py, ema.py), independently of the converter's walk over our modules;
- the reference's score-function conventions (models/utils.py `get_score_fn` with
  continuous=True, sde_lib.py) as closed forms: VP / sub-VP score = -net(x, 999 t) / std(t)
  with std(t) of FIELD_NOTES; VE score = h(x, sigma(t)) / sigma(t) with
  sigma(t) = sigma_min (sigma_max / sigma_min)^t on data in [0, 1];
- the NIN layer's definition, y = x W + b contracted over channels (einsum), for the transposes;
- perturbation: replacing one reference tensor changes exactly one converted tensor (the rows
  of one of q, k, v for the attention) and the network output.
"""
import dataclasses
import itertools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from score_sde.convert import (REFERENCE_CONFIGS, convert_checkpoint, from_reference,
                               reference_layout, to_reference, write_run)
from score_sde.models import NCSNpp
from score_sde.runs import load_trained
from tests.scripts import load_script

REPO = Path(__file__).resolve().parent.parent


convert_tool = load_script("tools/convert_checkpoint.py")
likelihood_tool = load_script("tools/likelihood.py")
sample_tool = load_script("tools/sample.py")

pytestmark = pytest.mark.usefixtures("one_thread")

# The configs the converter must know (the continuous CIFAR-10 models for every SDE, and the
# high-resolution NCSN++ VE ones).
REQUIRED = [f"{sde}/cifar10_{arch}{deep}_continuous" for sde in ("vp", "subvp")
            for arch in ("ddpmpp", "ncsnpp") for deep in ("", "_deep")] + \
    ["ve/cifar10_ncsnpp_continuous", "ve/cifar10_ncsnpp_deep_continuous",
     "ve/celebahq_256_ncsnpp_continuous", "ve/ffhq_256_ncsnpp_continuous",
     "ve/church_ncsnpp_continuous", "ve/bedroom_ncsnpp_continuous"]


# --- the reference's layout, from its source --------------------------------------------------

def reference_keys(net):
    """[(key, shape, trainable)] of the reference NCSNpp's state dict (no "module." prefix, no
    `sigmas` buffer) for our keyword arguments `net`, in parameter order.

    From the reference's source: one flat list `all_modules`, built as: Fourier projection
    (fourier embedding only; W fixed), two Linear layers, the input conv; per resolution the
    residual blocks, each followed by attention at attention resolutions, then (but at the
    lowest) a downsampling block and the pyramid layer ("residual": a resampling conv;
    "input_skip": Combine, the FIR resampler itself living outside the list); the middle
    block, attention, block; per resolution upwards num_res_blocks + 1 blocks on concatenated
    skips, attention, the output pyramid ("output_skip": GroupNorm and conv) and (but at the
    top) an upsampling block; then GroupNorm and conv unless "output_skip". Layer names: Conv_0,
    Dense_0, GroupNorm_0, ... in residual blocks (BigGAN shortcut Conv_2 = 1x1 conv; DDPM
    shortcut NIN_0), GroupNorm_0 and NIN_0..NIN_3 in attention, NIN weights W [in, out] with
    bias b; Conv2d_0 (FIR) or Conv_0 in resamplers; Conv_0 in Combine.
    """
    nf, channels, temb = net["nf"], net["in_channels"], 4 * net["nf"]
    biggan = net["resblock_type"] == "biggan"
    keys, counter = [], itertools.count()

    def module(*tensors):
        i = next(counter)
        for name, shape, *fixed in tensors:
            keys.append((f"all_modules.{i}.{name}", tuple(shape), not fixed))

    def wb(name, shape):
        prefix = f"{name}." if name else ""
        return [(prefix + "weight", shape), (prefix + "bias", shape[:1])]

    def conv(cin, cout, k=3, name=""):
        return wb(name, (cout, cin, k, k))

    def norm(c, name=""):
        return wb(name, (c,))

    def nin(cin, cout, name):
        return [(f"{name}.W", (cin, cout)), (f"{name}.b", (cout,))]

    def resblock(cin, cout=None, resample=False):
        cout = cout or cin
        tensors = norm(cin, "GroupNorm_0") + conv(cin, cout, name="Conv_0") + \
            wb("Dense_0", (cout, temb)) + norm(cout, "GroupNorm_1") + \
            conv(cout, cout, name="Conv_1")
        if biggan and (cin != cout or resample):
            tensors += conv(cin, cout, 1, "Conv_2")
        elif not biggan and cin != cout:
            tensors += nin(cin, cout, "NIN_0")
        module(*tensors)

    def attention(c):
        module(*norm(c, "GroupNorm_0"), *[t for j in range(4) for t in nin(c, c, f"NIN_{j}")])

    def resampler(cin, cout, with_conv):
        module(*(conv(cin, cout, name="Conv2d_0" if net["fir"] else "Conv_0")
                 if with_conv else []))

    if net["embedding_type"] == "fourier":
        module(("W", (nf,), "fixed"))
    embed = 2 * nf if net["embedding_type"] == "fourier" else nf
    module(*wb("", (temb, embed)))
    module(*wb("", (temb, temb)))
    module(*conv(channels, nf))
    levels = len(net["ch_mult"])
    sizes = [net["image_size"] >> i for i in range(levels)]
    skips, c, pyramid = [nf], nf, channels
    for level, mult in enumerate(net["ch_mult"]):
        for _ in range(net["num_res_blocks"]):
            resblock(c, nf * mult)
            c = nf * mult
            if sizes[level] in net["attn_resolutions"]:
                attention(c)
            skips.append(c)
        if level < levels - 1:
            if biggan:
                resblock(c, resample=True)
            else:
                resampler(c, c, net["resamp_with_conv"])
            if net["progressive_input"] == "input_skip":
                module(*conv(channels, c, 1, "Conv_0"))
            elif net["progressive_input"] == "residual":
                resampler(pyramid, c, True)
                pyramid = c
            skips.append(c)
    resblock(c)
    attention(c)
    resblock(c)
    for level in reversed(range(levels)):
        for _ in range(net["num_res_blocks"] + 1):
            resblock(c + skips.pop(), nf * net["ch_mult"][level])
            c = nf * net["ch_mult"][level]
        if sizes[level] in net["attn_resolutions"]:
            attention(c)
        if net["progressive"] == "output_skip":
            module(*norm(c))
            module(*conv(c, channels))
        if level > 0:
            if biggan:
                resblock(c, resample=True)
            else:
                resampler(c, c, net["resamp_with_conv"])
    if net["progressive"] != "output_skip":
        module(*norm(c))
        module(*conv(c, channels))
    assert not skips
    return keys


def converter_keys(ref):
    return [(e.ref_key, e.shape, e.trainable) for e in reference_layout(ref.meta_network())]


def variant(name, **network):
    ref = REFERENCE_CONFIGS[name]
    return dataclasses.replace(ref, network=dict(ref.network, **network))


# Small networks of the same structure, for tests that run them.
SMALL = dict(nf=8, num_res_blocks=1, image_size=16, ch_mult=(1, 2, 2), attn_resolutions=(8,))
VARIANTS = {
    "vp_ddpmpp": variant("vp/cifar10_ddpmpp_continuous", **SMALL),
    "subvp_ncsnpp": variant("subvp/cifar10_ncsnpp_continuous", **SMALL),
    "ve_ncsnpp": variant("ve/cifar10_ncsnpp_continuous", **SMALL),
    "ve_256": variant("ve/ffhq_256_ncsnpp_continuous", **SMALL),
    # DDPM residual blocks (NIN shortcut) and weightless resamplers that still take a slot.
    "ddpm_blocks": variant("vp/cifar10_ddpmpp_continuous", resblock_type="ddpm",
                           resamp_with_conv=False, **SMALL),
}


def random_reference(ref, seed=0, scale=0.1, prefix="module."):
    """A reference checkpoint dict of random values: model (with the `sigmas` buffer), EMA
    shadow_params (other random values), optimizer and step."""
    gen = torch.Generator().manual_seed(seed)
    keys = reference_keys(ref.network)
    model = {prefix + k: scale * torch.randn(shape, generator=gen) for k, shape, _ in keys}
    model[prefix + "sigmas"] = torch.exp(torch.linspace(
        math.log(ref.sigma_max), math.log(ref.sigma_min), ref.num_scales, dtype=torch.float64))
    shadow = [scale * torch.randn(shape, generator=gen) for _, shape, trainable in keys
              if trainable]
    return {"model": model, "ema": {"decay": ref.ema_rate, "num_updates": 7,
                                    "shadow_params": shadow},
            "optimizer": {"state": {}, "param_groups": []}, "step": 1234}


def network(ref, state):
    net = NCSNpp(**ref.network).eval()
    net.load_state_dict(state)
    return net


def time_input(ref, batch, seed=1):
    t = torch.rand(batch, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05
    if ref.sde == "ve":
        return ref.sigma_min * (ref.sigma_max / ref.sigma_min) ** t
    return 999 * t


def images(ref, batch=1, seed=2):
    size = ref.network["image_size"]
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- layout -----------------------------------------------------------------------------------

def test_required_configs_are_known():
    assert set(REQUIRED) <= set(REFERENCE_CONFIGS)


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_layout_matches_the_reference_source(name):
    """Every reference key, its shape and parameter order, at full size (meta device)."""
    ref = REFERENCE_CONFIGS[name]
    keys = converter_keys(ref)
    assert keys == reference_keys(ref.network)
    # Trainable tensors are exactly our parameters; the one fixed tensor is the Fourier W.
    trainable = sum(math.prod(shape) for _, shape, train in keys if train)
    assert trainable == sum(p.numel() for p in ref.meta_network().parameters())
    fixed = [k for k, _, train in keys if not train]
    assert fixed == (["all_modules.0.W"] if ref.sde == "ve" else [])


def test_layout_facts_counted_by_hand():
    """Module counts and positions read off the reference's construction of the CIFAR-10
    models: DDPM++ 2 dense + conv + 4 blocks + down + 4 (block, attention) + down + 4 + down
    + 4 + 3 middle + 3 x (5 blocks + up) + attention + 5 blocks + norm + conv = 55 modules."""
    def count(name):
        return 1 + max(int(k.split(".")[1]) for k, _, _ in converter_keys(REFERENCE_CONFIGS[name]))

    assert count("vp/cifar10_ddpmpp_continuous") == 55
    assert count("vp/cifar10_ncsnpp_continuous") == 58  # + 3 pyramid convs
    assert count("ve/cifar10_ncsnpp_continuous") == 59  # + the Fourier projection
    keys = dict((k, s) for k, s, _ in converter_keys(REFERENCE_CONFIGS[
        "vp/cifar10_ddpmpp_continuous"]))
    assert keys["all_modules.9.NIN_1.W"] == (256, 256)  # first attention, 16 x 16
    assert keys["all_modules.8.Conv_2.weight"] == (256, 128, 1, 1)
    assert keys["all_modules.54.weight"] == (3, 128, 3, 3)
    ve = dict((k, s) for k, s, _ in converter_keys(REFERENCE_CONFIGS[
        "ve/cifar10_ncsnpp_continuous"]))
    assert ve["all_modules.9.Conv2d_0.weight"] == (128, 3, 3, 3)  # first input-pyramid conv
    assert ve["all_modules.1.weight"] == (512, 256)


@pytest.mark.parametrize("name", ["vp/cifar10_ddpmpp_continuous",
                                  "ve/cifar10_ncsnpp_continuous"])
def test_full_size_cifar10_checkpoint_every_key_maps(name):
    ref = REFERENCE_CONFIGS[name]
    source = random_reference(ref, scale=1.0)
    state = convert_checkpoint(source, name)  # loads strictly into the network (meta)
    model, shadow = source["model"], source["ema"]["shadow_params"]
    ema, raw = state["ema"], state["model"]
    assert set(ema) == set(raw) == set(ref.meta_network().state_dict())
    # Positions read off the reference's construction order.
    if name.startswith("vp"):
        w = shadow[[k for k, _, t in reference_keys(ref.network) if t].index(
            "all_modules.9.NIN_1.W")]
        torch.testing.assert_close(ema["down_levels.1.attns.0.qkv.weight"][256:512, :, 0, 0],
                                   w.t(), rtol=0, atol=0)
        assert torch.equal(raw["down_levels.1.attns.0.qkv.bias"][:256],
                           model["module.all_modules.9.NIN_0.b"])
        assert torch.equal(raw["down_levels.1.blocks.0.shortcut.weight"],
                           model["module.all_modules.8.Conv_2.weight"])
        assert torch.equal(raw["conv_out.weight"], model["module.all_modules.54.weight"])
        assert torch.equal(ema["conv_out.bias"], shadow[-1])
        assert torch.equal(ema["time_mlp.0.weight"], shadow[0])
    else:
        # The fixed Fourier frequencies come from the model dict, for the EMA weights too.
        assert torch.equal(ema["time_embed.freqs"], model["module.all_modules.0.W"])
        assert torch.equal(raw["time_embed.freqs"], model["module.all_modules.0.W"])
        assert torch.equal(raw["down_levels.0.pyramid_down.conv.weight"],
                           model["module.all_modules.9.Conv2d_0.weight"])
        assert torch.equal(ema["time_mlp.0.weight"], shadow[0])
    # Round trip: back to the reference's form, every tensor bit for bit.
    net = ref.meta_network()
    back_model, _ = to_reference(raw, net)
    del model["module.sigmas"]
    assert back_model.keys() == model.keys()
    assert all(torch.equal(back_model[k], model[k]) for k in model)
    _, back_shadow = to_reference(ema, net)
    assert len(back_shadow) == len(shadow)
    assert all(torch.equal(a, b) for a, b in zip(back_shadow, shadow))
    assert state["step"] == 1234
    assert state["data_info"]["data_range"] == ((0.0, 1.0) if name.startswith("ve")
                                                else (-1.0, 1.0))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_reference_tensor_lands_in_one_place(name):
    """Replacing any one reference tensor changes exactly one converted tensor, by exactly
    the new values (transposed for NIN weights, one row block of qkv for q, k, v), and the
    network output depends on it (a non-zero gradient of a random projection of the output,
    or, for the fixed Fourier frequencies, a changed output); the unchanged checkpoint
    converts back bit for bit."""
    ref = VARIANTS[name]
    net_meta = ref.meta_network()
    source = random_reference(ref)["model"]
    base = from_reference(source, net_meta, config=ref)
    back, _ = to_reference(base, net_meta)
    assert all(torch.equal(back[k], source[k]) for k in back) and \
        set(back) | {"module.sigmas"} == set(source)
    net = network(ref, base)
    x, c = images(ref), time_input(ref, 1)
    y0 = net(x, c)
    (y0 * torch.randn(y0.shape, generator=torch.Generator().manual_seed(4))).sum().backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(3)
    for key, shape, _ in reference_keys(ref.network):
        key = "module." + key
        new = 0.1 * torch.randn(shape, generator=gen)
        state = from_reference({**source, key: new}, net_meta, config=ref)
        changed = [k for k in base if not torch.equal(base[k], state[k])]
        assert len(changed) == 1, (key, changed)
        ours, before = state[changed[0]], base[changed[0]]
        grad = grads.get(changed[0])
        if ".NIN_" in key and ours.shape[0] == 3 * new.shape[-1]:  # q, k or v of attention
            j = int(key.split(".")[-2][-1])
            assert all(torch.equal(ours.chunk(3)[i], before.chunk(3)[i]) for i in range(3)
                       if i != j), key
            ours, grad = ours.chunk(3)[j], grad.chunk(3)[j]
        if ".NIN_" in key and key.endswith(".W"):  # W [in, out] -> conv [out, in, 1, 1]
            ours = ours[:, :, 0, 0].t()
        assert torch.equal(ours, new), key
        if grad is not None:
            assert grad.abs().sum() > 0, key
        else:  # a buffer: the Fourier frequencies
            with torch.no_grad():
                assert not torch.equal(network(ref, state)(x, c), y0), key


def test_nin_layers_keep_the_reference_orientation():
    """The converted attention equals the reference's formula with NIN y = x W + b (einsum
    over channels); the DDPM block's NIN shortcut likewise."""
    ref = VARIANTS["ddpm_blocks"]
    source = random_reference(ref, scale=0.3)["model"]
    net = network(ref, from_reference(source, ref.meta_network()))
    # The middle attention is the second of the three attention modules (encoder at 8 x 8,
    # middle, decoder at 8 x 8).
    names = [k for k, _, _ in reference_keys(ref.network)]
    index = sorted(int(k.split(".")[1]) for k in names if k.endswith("NIN_3.W"))[1]
    p = {name: source[f"module.all_modules.{index}.{name}"]
         for name in ["GroupNorm_0.weight", "GroupNorm_0.bias"] +
         [f"NIN_{j}.{w}" for j in range(4) for w in "Wb"]}
    block = net.mid[1]
    c = p["NIN_0.W"].shape[0]
    x = torch.randn(2, c, 4, 4, generator=torch.Generator().manual_seed(0))

    def nin(h, j):
        return torch.einsum("bchw,co->bohw", h, p[f"NIN_{j}.W"]) + p[f"NIN_{j}.b"][:, None, None]

    h = F.group_norm(x, block.norm.num_groups, p["GroupNorm_0.weight"], p["GroupNorm_0.bias"],
                     eps=1e-6)
    q, k, v = nin(h, 0), nin(h, 1), nin(h, 2)
    w = torch.einsum("bchw,bcij->bhwij", q, k).reshape(2, 4, 4, 16) / math.sqrt(c)
    w = w.softmax(-1).reshape(2, 4, 4, 4, 4)
    expected = (x + nin(torch.einsum("bhwij,bcij->bchw", w, v), 3)) / math.sqrt(2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # A DDPM block whose channel count changes, 8 -> 16: the first block of the second level,
    # module 5 (after the two dense layers, the input conv, a block and a downsampler).
    W, b = source["module.all_modules.5.NIN_0.W"], source["module.all_modules.5.NIN_0.b"]
    assert W.shape == (8, 16)
    shortcut = net.down_levels[1]["blocks"][0].shortcut
    x = torch.randn(2, W.shape[0], 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(shortcut(x), torch.einsum("bchw,co->bohw", x, W)
                                   + b[:, None, None], rtol=1e-5, atol=1e-6)


# --- score-function conventions ---------------------------------------------------------------

@pytest.fixture(scope="module")
def converted_runs(tmp_path_factory):
    """Small converted runs (VP DDPM++, sub-VP NCSN++, VE NCSN++) loaded by load_trained."""
    runs = {}
    for name in ("vp_ddpmpp", "subvp_ncsnpp", "ve_ncsnpp"):
        ref = VARIANTS[name]
        state = convert_checkpoint(random_reference(ref, scale=0.3), ref)
        workdir = tmp_path_factory.mktemp(name)
        write_run(state, workdir)
        runs[name] = (ref, load_trained(workdir / "checkpoint.pt"))
    return runs


def recorded_time_inputs(model):
    seen = []
    model.time_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen


@pytest.mark.parametrize("name", ["vp_ddpmpp", "subvp_ncsnpp"])
def test_vp_score_reads_999t_and_divides_the_noise_by_its_std(name, converted_runs):
    ref, run = converted_runs[name]
    x = 2 * images(ref, batch=3) - 1
    t = torch.tensor([1e-3, 0.4, 1.0])
    seen = recorded_time_inputs(run.model)
    with torch.no_grad():
        score = run.score_fn()(x, t)
        t64 = t.double()
        log_alpha = -0.25 * t64 ** 2 * (20.0 - 0.1) - 0.5 * t64 * 0.1
        std = (torch.sqrt(1 - torch.exp(2 * log_alpha)) if name.startswith("vp")
               else 1 - torch.exp(2 * log_alpha))
        expected = -run.model(x, 999 * t) / std.float()[:, None, None, None]
    torch.testing.assert_close(seen[0], 999 * t, rtol=1e-7, atol=0)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=0)
    assert run.info.data_range == (-1.0, 1.0) and run.model.centered


def test_ve_score_reads_sigma_and_divides_by_it_on_unit_interval_data(converted_runs):
    ref, run = converted_runs["ve_ncsnpp"]
    x = images(ref, batch=3)
    t = torch.tensor([0.0, 0.3, 1.0])
    seen = recorded_time_inputs(run.model)
    sigma = 0.01 * (50.0 / 0.01) ** t.double()
    # The same weights without the division; centered, so the [0, 1] -> [-1, 1] map is ours.
    plain = NCSNpp(**dict(ref.network, scale_by_sigma=False, centered=True)).eval()
    plain.load_state_dict(run.model.state_dict())
    with torch.no_grad():
        score = run.score_fn()(x, t)
        expected = plain(2 * x - 1, sigma.float()) / sigma.float()[:, None, None, None]
    torch.testing.assert_close(seen[0].double(), sigma, rtol=1e-6, atol=0)
    torch.testing.assert_close(score, expected, rtol=1e-5, atol=1e-6)
    assert run.info.data_range == (0.0, 1.0) and not run.model.centered
    assert run.cfg.model.time_input == "sigma" and run.cfg.model.prediction == "score"
    assert (run.sde.sigma_min, run.sde.sigma_max, run.sde.num_steps) == (0.01, 50.0, 1000)


def test_raw_weights_are_kept_beside_the_ema(converted_runs, tmp_path):
    ref, run = converted_runs["vp_ddpmpp"]
    source = random_reference(ref, scale=0.3)
    state = convert_checkpoint(source, ref)
    write_run(state, tmp_path)
    raw = load_trained(tmp_path / "checkpoint.pt", use_ema=False)
    assert torch.equal(raw.model.conv_out.weight,
                       source["model"]["module.all_modules.22.weight"])
    assert torch.equal(run.model.conv_out.weight, source["ema"]["shadow_params"][-2])
    assert raw.step == run.step == 1234


# --- errors -----------------------------------------------------------------------------------

def meta_reference(name, **change):
    """A full-size reference checkpoint of shapes only (meta tensors)."""
    ref = REFERENCE_CONFIGS[name]
    keys = reference_keys(ref.network)
    model = {"module." + k: torch.empty(s, device="meta") for k, s, _ in keys}
    shadow = [torch.empty(s, device="meta") for _, s, t in keys if t]
    model.update(change)
    return {"model": model, "ema": {"shadow_params": shadow}, "step": 1}


@pytest.mark.parametrize("checkpoint,config,message", [
    (meta_reference("vp/cifar10_ddpmpp_continuous"), "ve/cifar10_ncsnpp_continuous",
     r"model has no key module\.all_modules\.0\.W \(shape \(128,\)\).*right --config"),
    (meta_reference("ve/cifar10_ncsnpp_continuous"), "vp/cifar10_ncsnpp_continuous",
     r"model has no key module\.all_modules\.0\.weight \(shape \(512, 128\)\)"),
    (meta_reference("vp/cifar10_ddpmpp_continuous"), "vp/cifar10_ddpmpp_deep_continuous",
     r"model key module\.all_modules\.8\.Conv_0\.weight has shape \(256, 128, 3, 3\), the "
     r"config expects \(128, 128, 3, 3\)"),
    (meta_reference("vp/cifar10_ddpmpp_continuous", **{
        "module.all_modules.3.Conv_0.weight": torch.empty(128, 128, 3, 2, device="meta")}),
     "vp/cifar10_ddpmpp_continuous", r"module\.all_modules\.3\.Conv_0\.weight has shape"),
    (meta_reference("vp/cifar10_ddpmpp_continuous", **{"module.extra": torch.zeros(1)}),
     "vp/cifar10_ddpmpp_continuous", r"has key module\.extra, which the config's network"),
    (meta_reference("vp/cifar10_ddpmpp_continuous", **{"module.sigmas": torch.ones(1000)}),
     "vp/cifar10_ddpmpp_continuous", r"module\.sigmas holds noise levels from 1 to 1"),
    (meta_reference("vp/cifar10_ddpmpp_deep_continuous"), "vp/cifar10_ddpmpp_typo",
     r"unknown --config 'vp/cifar10_ddpmpp_typo'.*supported: vp/cifar10_ddpmpp_continuous"),
    ({"model": {}, "step": 1}, "vp/cifar10_ddpmpp_continuous", r"no key 'ema'"),
    ({"model": {}, "ema": {}, "step": 1}, "vp/cifar10_ddpmpp_continuous",
     r"ema has no key 'shadow_params'"),
    ({"model": {}, "ema": {"shadow_params": []}, "step": -3}, "vp/cifar10_ddpmpp_continuous",
     r"step must be an integer >= 0, got -3"),
])
def test_mismatches_name_the_first_bad_key(checkpoint, config, message):
    with pytest.raises(ValueError, match=message) as info:
        convert_checkpoint(checkpoint, config)
    assert "\n" not in str(info.value)


def test_bad_shadow_params_are_named():
    name = "vp/cifar10_ddpmpp_continuous"
    checkpoint = meta_reference(name)
    shadow = checkpoint["ema"]["shadow_params"]
    with pytest.raises(ValueError, match=r"list of 564 tensors .*got 563"):
        convert_checkpoint(dict(checkpoint, ema={"shadow_params": shadow[:-1]}), name)
    bad = list(shadow)
    bad[4] = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"shadow_params \[4\] \(module\.all_modules\.2\.weight\)"
                                         r" has shape \(3,\), the config expects \(128, 3, 3, 3\)"):
        convert_checkpoint(dict(checkpoint, ema={"shadow_params": bad}), name)


def test_sigmas_buffer_tells_church_from_bedroom():
    """Same network, different sigma_max (380 vs 378): only the `sigmas` buffer tells."""
    church = REFERENCE_CONFIGS["ve/church_ncsnpp_continuous"]
    sigmas = torch.exp(torch.linspace(math.log(380.0), math.log(0.01), 2000,
                                      dtype=torch.float64))
    checkpoint = meta_reference("ve/church_ncsnpp_continuous", **{"module.sigmas": sigmas})
    with pytest.raises(ValueError, match=r"sigmas holds noise levels from 380 to 0\.01.*"
                                         r"sigma_max=378"):
        from_reference(checkpoint["model"], church.meta_network(),
                       config=REFERENCE_CONFIGS["ve/bedroom_ncsnpp_continuous"])
    assert REFERENCE_CONFIGS["ve/bedroom_ncsnpp_continuous"].network == church.network


def test_sigmas_buffer_in_half_precision_is_accepted(tiny_config):
    # The right table stored in float16 differs from it by the dtype's rounding (up to 5e-4),
    # more than float32's 1e-5: accepted up to the buffer's own precision.
    ref = REFERENCE_CONFIGS[tiny_config]
    model = random_reference(ref)["model"]
    model["module.sigmas"] = model["module.sigmas"].half()
    state = from_reference(model, ref.meta_network(), config=ref)
    network(ref, state)  # loads


# --- command line and the tools on a converted run --------------------------------------------

TINY = variant("ve/cifar10_ncsnpp_continuous", nf=8, num_res_blocks=1, ch_mult=(1, 2),
               attn_resolutions=(16,))
# sigma_max = 1 makes the data's scale visible in the likelihood (see below).
TINY = dataclasses.replace(TINY, sigma_max=1.0)


@pytest.fixture
def tiny_config(monkeypatch):
    monkeypatch.setitem(REFERENCE_CONFIGS, "ve/tiny_test", TINY)
    return "ve/tiny_test"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint file in the paper code's format whose network outputs exactly zero, and
    CIFAR-10 pickles: random training images, all-black test images."""
    root = tmp_path_factory.mktemp("tiny_reference")
    source = random_reference(TINY, scale=0.3)
    last = max(int(k.split(".")[2]) for k in source["model"] if k.startswith("module.all_"))
    for suffix in ("weight", "bias"):
        key = f"module.all_modules.{last}.{suffix}"
        source["model"][key].zero_()
        trainable = [k for k, _, t in reference_keys(TINY.network) if t]
        source["ema"]["shadow_params"][trainable.index(key[len("module."):])].zero_()
    torch.save(source, root / "checkpoint_8.pth")
    data = root / "cifar"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (4, 3072)) if name != "test_batch" else np.zeros((4, 3072))
        batch = {b"data": pixels.astype(np.uint8), b"labels": [0, 1, 2, 3]}
        (data / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root / "checkpoint_8.pth", data


def test_command_line_and_tools_on_a_converted_run(tiny_config, tiny_checkpoint, tmp_path,
                                                   capsys):
    path, data = tiny_checkpoint
    workdir = tmp_path / "run"
    assert convert_tool.main(["convert_checkpoint.py", str(path), "--config", tiny_config,
                              "--workdir", str(workdir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 1234 and summary["data_range"] == [0.0, 1.0]
    assert json.loads((workdir / "config.json").read_text())["model"]["time_input"] == "sigma"
    run = load_trained(workdir / "checkpoint.pt")
    assert run.cfg.data.dataset == "cifar10" and run.info.shape == (3, 32, 32)

    # Likelihood of all-black images with the zero score: the ODE does not move x, so
    # -log p(y) = D/2 log(2 pi) + |y|^2 / 2 (sigma_max = 1) with y in [0, 1/256): data read in
    # [0, 1] (in [-1, 1] they would sit near -1, |y|^2 / 2 ~ D / 2), and the offset is 8 bits.
    out = tmp_path / "nll.json"
    assert likelihood_tool.main(["likelihood.py", "--workdir", str(workdir), "--data_dir",
                                 str(data), "--num_samples", "2", "--batch_size", "2",
                                 "--num_repeats", "1", "--device", "cpu", "--rtol", "1e-3",
                                 "--atol", "1e-3", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    mean_y2 = 1 / (3 * 256 ** 2)  # E[(u / 256)^2], u ~ U[0, 1)
    expected = (0.5 * math.log(2 * math.pi) + mean_y2 / 2) / math.log(2) + 8
    assert r["data_width"] == 1.0
    assert abs(r["bpd"] - expected) < 1e-4

    # Inpainting returns the known pixels exactly: the [0, 1] map and its inverse agree.
    samples = tmp_path / "samples"
    assert sample_tool.main(["sample.py", "--workdir", str(workdir), "--task", "inpaint",
                             "--mask", "right", "--num_samples", "2", "--num_steps", "3",
                             "--corrector", "none",  # Langevin's step divides by |score| = 0
                             "--split", "train", "--data_dir", str(data), "--device", "cpu",
                             "--output_dir", str(samples), "--noprogress"]) == 0
    arrays = np.load(samples / "samples.npz")
    from score_sde.datasets import load_dataset
    source_images = load_dataset("cifar10", split="train", data_dir=str(data))[0].tensors[0][:2]
    known = arrays["masks"].astype(bool)
    assert arrays["samples"].dtype == np.uint8
    assert np.array_equal(arrays["samples"][known], source_images.numpy()[known])
    assert np.array_equal(arrays["inputs"], source_images.numpy())

    # An existing checkpoint is only replaced with --overwrite.
    args = ["convert_checkpoint.py", str(path), "--config", tiny_config, "--workdir",
            str(workdir)]
    assert convert_tool.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert convert_tool.main(args + ["--overwrite"]) == 0


@pytest.mark.parametrize("args,message", [
    (["--config", "ve/tiny_test", "--workdir", "{tmp}/w"], "missing argument CHECKPOINT"),
    (["{ckpt}", "--config", "ve/unknown", "--workdir", "{tmp}/w"], "unknown --config"),
    (["{tmp}/none.pth", "--config", "ve/tiny_test", "--workdir", "{tmp}/w"], "does not exist"),
    (["{garbage}", "--config", "ve/tiny_test", "--workdir", "{tmp}/w"],
     "is not a readable PyTorch checkpoint"),
    (["{ckpt}", "--config", "vp/cifar10_ddpmpp_continuous", "--workdir", "{tmp}/w"],
     "has no key module.all_modules.0.weight"),
    (["{ckpt}", "extra", "--config", "ve/tiny_test", "--workdir", "{tmp}/w"],
     "unexpected arguments ['extra']"),
    (["{ckpt}", "--workdir", "{tmp}/w"], "--config"),
    # The run folder is checked before the checkpoint is read (a paper checkpoint is large).
    (["{garbage}", "--config", "ve/tiny_test", "--workdir", "{garbage}"],
     "garbage.pth is a file; give a folder"),
    (["{garbage}", "--config", "ve/tiny_test", "--workdir", "{garbage}/run"],
     "lies under"),
    (["{tmp}/checkpoint.pt", "--config", "ve/tiny_test", "--workdir", "{tmp}", "--overwrite"],
     "would replace CHECKPOINT {tmp}/checkpoint.pt itself"),
])
def test_bad_input_exits_2_with_one_line(args, message, tiny_config, tiny_checkpoint, tmp_path,
                                         capsys):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    args = [a.format(tmp=tmp_path, ckpt=tiny_checkpoint[0], garbage=garbage) for a in args]
    assert convert_tool.main(["convert_checkpoint.py", *args]) == 2
    err = capsys.readouterr().err
    assert message.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "w" / "checkpoint.pt").exists()


def test_help_lists_the_configs(capsys):
    assert convert_tool.main(["convert_checkpoint.py", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REQUIRED)
