"""The CUDA paths: training in fp32, bf16 autocast, channels-last and torch.compile; CUDA
checkpoints resumed on the CPU; samplers and the likelihood on the GPU against closed forms.

Every test here needs CUDA (conftest skips them without it); the CPU versions of the same code
paths are tested in the other modules.
"""
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from score_sde import log_likelihood, sample_ode, sample_pc
from score_sde.checkpoint import read_checkpoint
from score_sde.models import NCSNpp, SmallUNet
from score_sde.sde import VPSDE, VESDE
from score_sde.config import apply_overrides, load_config_file
from score_sde.trainer import Trainer, train
from tests.problems import KERNELS, exact_log_prob_t, exact_score_fn, ring_mixture

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parent.parent


def _idx(arr):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.tobytes()


def _fashion_cfg(tmp_path, **training):
    """Fashion-MNIST-shaped IDX files of smooth random images and a small U-Net for them."""
    data_dir = tmp_path / "fashion"
    if not data_dir.exists():
        data_dir.mkdir()
        rng = np.random.default_rng(0)
        for stem, n in (("train", 256), ("t10k", 64)):
            base = rng.normal(size=(n, 7, 7)).repeat(4, axis=1).repeat(4, axis=2)
            img = np.clip(128 + 60 * base, 0, 255)
            (data_dir / f"{stem}-images-idx3-ubyte").write_bytes(_idx(img))
            (data_dir / f"{stem}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))
    cfg = load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    base = dict(n_iters=30, batch_size=32, warmup=5, lr=1e-3, ema_rate=0.9, log_every=10,
                eval_every=30,
                eval_batches=1, sample_every=30, num_samples=16, checkpoint_every=10,
                snapshot_every=30, device="cuda")
    base.update(training)
    overrides = {f"training.{k}": v for k, v in base.items()}
    overrides.update({"data.data_dir": str(data_dir), "sde.num_steps": 50,
                      "model.kwargs": dict(nf=16, ch_mult=(1, 2), num_res_blocks=1,
                                           attn_resolutions=(14,), dropout=0.0)})
    return apply_overrides(cfg, overrides)


def _relerr(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("model_fn", [
    lambda: SmallUNet(in_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(14,)),
    lambda: NCSNpp(image_size=16, in_channels=3, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(8,), fir=True, progressive="output_skip",
                   progressive_input="input_skip", embedding_type="fourier"),
], ids=["small_unet", "ncsnpp_fir"])
def test_bf16_channels_last_forward_matches_fp32(model_fn):
    torch.manual_seed(0)
    model = model_fn().cuda().eval()
    for p in model.parameters():  # the zero-initialised output layer would make this trivial
        if p.dim() > 1 and float(p.detach().abs().max()) == 0:
            torch.nn.init.normal_(p, std=0.05)
    size = 28 if isinstance(model, SmallUNet) else 16
    ch = 1 if isinstance(model, SmallUNet) else 3
    x = torch.randn(8, ch, size, size, device="cuda")
    t = torch.rand(8, device="cuda") * 999
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:  # the TF32 flags are process-wide: later tests in this worker must not inherit them
        with torch.no_grad():
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            ref = model(x, t).float()
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            cl = model.to(memory_format=torch.channels_last)(
                x.contiguous(memory_format=torch.channels_last), t)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                bf = model(x.contiguous(memory_format=torch.channels_last), t)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert torch.isfinite(bf).all() and bf.dtype == torch.bfloat16
    assert _relerr(cl.float(), ref) < 3e-3  # TF32 rounding only
    assert _relerr(bf.float(), ref) < 3e-2  # bf16 operands


@pytest.mark.parametrize("mode", ["fp32", "bf16_channels_last", "compile", "compile_blocks",
                                  "compile_reduce_overhead"])
def test_training_on_cuda_runs_and_learns(mode, tmp_path):
    extra = {"fp32": {}, "bf16_channels_last": dict(bf16=True, channels_last=True),
             "compile": dict(compile=True, bf16=True, channels_last=True),
             "compile_blocks": dict(compile=True, compile_scope="blocks", bf16=True,
                                    channels_last=True),
             "compile_reduce_overhead": dict(compile=True, compile_mode="reduce-overhead",
                                             bf16=True, channels_last=True)}[mode]
    cfg = _fashion_cfg(tmp_path, n_iters=60, **extra)
    metrics = train(cfg, str(tmp_path / mode))
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["eval_loss"])
    # The initial sigma^2-weighted noise-prediction loss is E|eps|^2 / D = 1 (zero output).
    assert metrics["eval_loss"] < 0.7, metrics
    assert (tmp_path / mode / "samples" / "samples_00000060.png").exists()
    state = read_checkpoint(tmp_path / mode / "checkpoint.pt")
    assert all(v.device.type == "cpu" for v in state["model"].values())


def test_bf16_loss_curve_tracks_fp32(tmp_path):
    curves = {}
    for mode, extra in (("fp32", {}), ("bf16", dict(bf16=True, channels_last=True))):
        cfg = _fashion_cfg(tmp_path, n_iters=100, log_every=1, eval_every=100, **extra)
        trainer = Trainer(cfg, str(tmp_path / mode))
        losses = []
        while trainer.step < 100:
            losses.append(float(trainer.train_step(_Silent())[0]))
        curves[mode] = np.array(losses)
    # Same batches, same noise: per-step losses agree to bf16 rounding early on, and the
    # smoothed curves stay together after the trajectories have separated.
    assert np.abs(curves["bf16"][:5] / curves["fp32"][:5] - 1).max() < 0.02
    late = slice(60, 100)
    assert abs(curves["bf16"][late].mean() / curves["fp32"][late].mean() - 1) < 0.05


class _Silent:
    def line(self, *_):
        pass

    def scalars(self, *_a, **_k):
        pass


def test_cuda_checkpoint_resumes_on_cpu(tmp_path):
    cfg = _fashion_cfg(tmp_path, n_iters=20, sample_every=0)
    train(cfg, str(tmp_path / "run"))
    cpu = apply_overrides(cfg, {"training.n_iters": 30, "training.device": "cpu"})
    metrics = train(cpu, str(tmp_path / "run"))
    assert math.isfinite(metrics["loss"])
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 30


def test_command_line_trains_on_cuda_with_all_gpu_options(tmp_path):
    data = np.random.default_rng(0).normal(size=(2000, 2)).astype(np.float32)
    np.save(tmp_path / "train.npy", data)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "score_sde.train", "--sde", "subvp",
                          "--dataset", "array", "--data_path", str(tmp_path / "train.npy"),
                          "--n_iters", "50", "--device", "cuda", "--bf16", "--compile",
                          "--workdir", str(tmp_path / "w")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "on cuda" in (tmp_path / "w" / "log.txt").read_text()


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_likelihood_and_samplers_on_cuda_match_closed_forms(name):
    mix = ring_mixture(num_modes=4, radius=2.0, std=0.5)
    sde = VPSDE() if name == "vp" else VESDE()
    kernel = KERNELS[name]
    exact = exact_score_fn(mix, kernel)
    gen = torch.Generator().manual_seed(0)
    x = mix.sample(256, gen)[0].cuda()
    logp, z, nfe = log_likelihood(sde, exact, x, divergence="exact", eps=1e-5)
    assert logp.device.type == "cuda" and nfe > 0
    # The prior term swapped for the exact density of the diffused data at T.
    z = z.cpu().double()
    swap = exact_log_prob_t(mix, kernel, z, sde.T) - sde.prior_logp(z)
    true = exact_log_prob_t(mix, kernel, x.cpu().double(), 1e-5)
    assert float((logp.cpu().double() + swap - true).abs().max()) < 2e-3
    g = torch.Generator(device="cuda").manual_seed(0)
    ode = sample_ode(sde, exact, (4000, 2), device="cuda", generator=g)[0]
    pc = sample_pc(sde, exact, (4000, 2), num_steps=500, device="cuda", generator=g)[0]
    for samples in (ode, pc):
        assert samples.device.type == "cuda" and torch.isfinite(samples).all()
        second = float((samples.double() ** 2).sum(1).mean())
        want = float((mix.means ** 2).sum(1) @ mix.weights) + 2 * 0.25
        assert abs(second / want - 1) < 0.05, (second, want)


def test_tool_likelihood_on_cuda(tmp_path):
    cfg = _fashion_cfg(tmp_path, n_iters=10, sample_every=0)
    train(cfg, str(tmp_path / "run"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "tools/likelihood.py", "--workdir",
                          str(tmp_path / "run"), "--num_samples", "16", "--batch_size", "8",
                          "--rtol", "1e-3", "--atol", "1e-3", "--device", "cuda",
                          "--output", str(tmp_path / "r.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["device"].startswith("cuda") and math.isfinite(result["bpd"])
    assert result["n"] == 16 * result["num_repeats"] and result["num_data"] == 16
