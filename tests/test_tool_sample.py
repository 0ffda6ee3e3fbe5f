"""tools/sample.py: smoke runs of every task on tiny checkpoints trained here, exactness of the
known pixels in inpainting and of the grayscale in colorization, and one-line errors."""
import dataclasses
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from score_sde.datasets import load_dataset, to_model_range
from score_sde.runs import load_trained
from score_sde.config import apply_overrides, load_config_file
from score_sde.trainer import train
from tests.scripts import load_script

REPO = Path(__file__).resolve().parent.parent
tool = load_script("tools/sample.py")

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

pytestmark = pytest.mark.usefixtures("one_thread")


def _idx(arr):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.tobytes()


def _image_run(root, *, rgb, conditional):
    """A 2-step run of a tiny U-Net on 8 random 8-bit images (IDX for gray, CIFAR pickles for
    RGB)."""
    data_dir = root / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    if rgb:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                     b"labels": rng.integers(0, 10, 4).tolist()}
            (data_dir / name).write_bytes(pickle.dumps(batch, protocol=2))
        cfg = load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
        cfg = apply_overrides(cfg, {"data.dataset": "cifar10"})
    else:
        for stem, n in (("train", 8), ("t10k", 8)):
            (data_dir / f"{stem}-images-idx3-ubyte").write_bytes(
                _idx(rng.integers(0, 256, (n, 28, 28))))
            (data_dir / f"{stem}-labels-idx1-ubyte").write_bytes(
                _idx(rng.integers(0, 10, n)))
        cfg = load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    training = dict(n_iters=2, batch_size=4, warmup=1, log_every=1, eval_every=2,
                    eval_batches=1, sample_every=0, checkpoint_every=2, snapshot_every=2,
                    device="cpu")
    overrides = {f"training.{k}": v for k, v in training.items()}
    overrides.update({"data.data_dir": str(data_dir),
                      "model.class_conditional": conditional,
                      "model.kwargs": dict(nf=8, ch_mult=(1,), num_res_blocks=1,
                                           attn_resolutions=(), dropout=0.0)})
    workdir = root / "run"
    train(apply_overrides(cfg, overrides), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    return _image_run(tmp_path_factory.mktemp("gray"), rgb=False, conditional=True)


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    return _image_run(tmp_path_factory.mktemp("rgb"), rgb=True, conditional=False)


def _main(*args):
    args = list(map(str, args))
    if "--device" not in args:
        args += ["--device", "cpu"]
    return tool.main(["sample.py", "--noprogress", *args])


def _result(out_dir):
    summary = json.loads((Path(out_dir) / "summary.json").read_text())
    return summary, np.load(Path(out_dir) / "samples.npz")


@pytest.mark.parametrize("sampler, extra", [
    ("pc", ["--num_steps", 25]), ("ode", ["--rtol", 1e-3, "--atol", 1e-3]),
    ("ald", ["--num_steps", 25])])
def test_generate_on_toy_checkpoint(sampler, extra, toy_run, tmp_path):
    out = tmp_path / sampler
    assert _main("--workdir", toy_run, "--sampler", sampler, "--num_samples", 10,
                 "--batch_size", 4, *extra, "--output_dir", out) == 0
    summary, arrays = _result(out)
    assert arrays["samples"].shape == (10, 2) and arrays["samples"].dtype == np.float32
    assert np.isfinite(arrays["samples"]).all()
    assert len(summary["nfe"]) == 3 and all(v > 0 for v in summary["nfe"])
    if sampler == "pc":  # 25 predictor + 25 corrector steps (the last step denoises)
        assert summary["nfe"] == [50, 50, 50]
    assert summary["num_steps"] == (None if sampler == "ode" else 25)  # adaptive: no steps
    assert summary["sampler"] == sampler and summary["eps"] == 1e-3
    assert (out / "samples.png").exists()


@pytest.mark.parametrize("sampler, extra, nfe", [  # DDIM and DPM-Solver: one more to denoise
    ("ddim", ["--num_steps", 10, "--eta", 0.5], 11),
    ("dpm_solver", ["--num_steps", 12, "--order", 3], 13),
    ("dpm_solver", ["--num_steps", 12, "--dpm_method", "singlestep"], 13),
    ("dpm_solver", ["--num_steps", 12, "--order", 3, "--dpm_solver_type", "taylor"], 13),
    ("heun", ["--num_steps", 6], 11),
])
def test_few_step_samplers(sampler, extra, nfe, toy_run, tmp_path):
    out = tmp_path / sampler
    assert _main("--workdir", toy_run, "--sampler", sampler, *extra, "--num_samples", 8,
                 "--output_dir", out) == 0
    summary, arrays = _result(out)
    assert arrays["samples"].shape == (8, 2) and np.isfinite(arrays["samples"]).all()
    assert summary["nfe"] == [nfe] and summary["sampler"] == sampler
    assert summary["eps"] == 1e-3  # the VP default, where every sampler's last step ends
    if "--dpm_solver_type" in extra:
        assert summary["dpm_solver_type"] == "taylor"


def test_the_picture_of_unscaled_image_arrays_spans_their_values(tmp_path):
    # Arrays are used as is, here images in [0, 255]: the grid shows the samples from their
    # lowest value (black) to their highest (white), not clipped to [-1, 1].
    data = np.random.default_rng(0).uniform(0, 255, (8, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "images.npy", data)
    cfg = load_config_file(str(REPO / "configs" / "toy.py"))
    training = dict(n_iters=2, batch_size=4, log_every=1, eval_every=2, eval_batches=1,
                    sample_every=0, checkpoint_every=2, snapshot_every=2, device="cpu")
    overrides = {f"training.{k}": v for k, v in training.items()}
    overrides.update({"data.dataset": "array", "data.data_path": str(tmp_path / "images.npy"),
                      "data.num_samples": None, "model.name": "small_unet",
                      "model.kwargs": dict(nf=8, ch_mult=(1,), num_res_blocks=1,
                                           attn_resolutions=(), dropout=0.0)})
    train(apply_overrides(cfg, overrides), str(tmp_path / "run"))
    assert _main("--workdir", tmp_path / "run", "--sampler", "dpm_solver", "--num_steps", 3,
                 "--num_samples", 4, "--output_dir", tmp_path / "o") == 0
    x = np.load(tmp_path / "o" / "samples.npz")["samples"]
    lo, hi = float(x.min()), float(x.max())
    expected = np.round((x - lo) / (hi - lo) * 255).astype(np.uint8)  # [4, 1, 8, 8]
    from PIL import Image
    png = np.asarray(Image.open(tmp_path / "o" / "samples.png"))
    cells = [png[2 + r * 10:10 + r * 10, 2 + c * 10:10 + c * 10] for r in (0, 1) for c in (0, 1)]
    assert np.abs(np.stack(cells).astype(int) - expected[:, 0].astype(int)).max() <= 1


def test_samples_go_to_the_workdir_given_beside_a_checkpoint(toy_run, tmp_path):
    """--workdir W --checkpoint FILE (e.g. exported weights) writes W/samples_<task>."""
    assert _main("--workdir", tmp_path / "w", "--checkpoint", toy_run / "checkpoint.pt",
                 "--sampler", "dpm_solver", "--num_steps", 4, "--num_samples", 4) == 0
    summary, arrays = _result(tmp_path / "w" / "samples_generate")
    assert arrays["samples"].shape == (4, 2) and summary["nfe"] == [5]
    assert not (toy_run / "samples_generate").exists()


def test_an_interrupted_write_leaves_no_torn_or_mismatched_files(toy_run, tmp_path,
                                                                 monkeypatch, capsys):
    """The outputs are replaced whole: a write that fails half-way (disk full, a kill) leaves
    the previous samples.npz intact and no summary.json describing other samples."""
    out = tmp_path / "out"
    assert _main("--workdir", toy_run, "--sampler", "dpm_solver", "--num_steps", 4,
                 "--num_samples", 4, "--output_dir", out) == 0
    before = np.load(out / "samples.npz")["samples"]

    def torn(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tool.np, "savez", torn)
    assert _main("--workdir", toy_run, "--sampler", "dpm_solver", "--num_steps", 4,
                 "--num_samples", 6, "--output_dir", out) == 4  # the file system failed
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: [Errno 28] No space left on device")
    monkeypatch.undo()
    assert np.array_equal(np.load(out / "samples.npz")["samples"], before)
    assert not (out / "summary.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "samples.png"]


def test_cuda_graph_flag_on_the_cpu_gives_the_same_samples(toy_run, tmp_path):
    # On the CPU the graph wrapper runs the network eagerly: identical samples, every
    # evaluation an eager call.
    for name, extra in (("plain", []), ("graph", ["--cuda_graph"])):
        assert _main("--workdir", toy_run, "--sampler", "dpm_solver", "--num_steps", 10,
                     "--num_samples", 8, "--output_dir", tmp_path / name, *extra) == 0
    plain, a = _result(tmp_path / "plain")
    graph, b = _result(tmp_path / "graph")
    assert np.array_equal(a["samples"], b["samples"]) and plain["cuda_graph"] is None
    assert graph["cuda_graph"] == {"graphs": 0, "replays": 0, "eager_calls": 11, "failures": []}


def test_same_seed_same_samples(toy_run, tmp_path):
    for name in ("a", "b"):
        assert _main("--workdir", toy_run, "--num_samples", 6, "--num_steps", 25,
                     "--output_dir", tmp_path / name) == 0
    a, b = (_result(tmp_path / n)[1]["samples"] for n in ("a", "b"))
    assert np.array_equal(a, b)
    assert _main("--workdir", toy_run, "--num_samples", 6, "--num_steps", 25, "--seed", 1,
                 "--output_dir", tmp_path / "c") == 0
    assert not np.array_equal(a, _result(tmp_path / "c")[1]["samples"])


def test_inpainting_keeps_known_pixels_exactly(gray_run, tmp_path):
    out = tmp_path / "inpaint"
    assert _main("--workdir", gray_run, "--task", "inpaint", "--mask", "right",
                 "--num_samples", 3, "--num_steps", 25, "--output_dir", out) == 0
    _, arrays = _result(out)
    samples, inputs, masks = arrays["samples"], arrays["inputs"], arrays["masks"]
    assert samples.shape == inputs.shape == masks.shape == (3, 1, 28, 28)
    assert samples.dtype == np.uint8
    known = masks == 1
    assert known[:, :, :, 14:].all() and not known[:, :, :, :14].any()
    assert np.array_equal(samples[known], inputs[known])
    # The inputs are the first test images, unchanged.
    run = load_trained(gray_run / "checkpoint.pt")
    ds, _ = load_dataset("fashion_mnist", split="test", data_dir=run.cfg.data.data_dir)
    assert np.array_equal(inputs, ds.tensors[0][:3].numpy())


def test_inpainting_with_a_mask_file(gray_run, tmp_path):
    mask = (np.arange(28 * 28).reshape(28, 28) % 3 == 0).astype(np.float32)
    np.save(tmp_path / "mask.npy", mask)
    out = tmp_path / "inpaint"
    assert _main("--workdir", gray_run, "--task", "inpaint", "--mask", tmp_path / "mask.npy",
                 "--num_samples", 2, "--num_steps", 25, "--output_dir", out) == 0
    _, arrays = _result(out)
    known = arrays["masks"] == 1
    assert np.array_equal(known[0, 0], mask == 1)
    assert np.array_equal(arrays["samples"][known], arrays["inputs"][known])


class _GaussianNoisePredictor(torch.nn.Module):
    """The exact noise prediction for data N(0, v I) under VP: sigma x / (alpha^2 v + sigma^2),
    fed the plain time t."""

    def __init__(self, sde, v):
        super().__init__()
        self.sde, self.v = sde, v

    def forward(self, x, t, class_labels=None):
        alpha, sigma = self.sde.marginal_coeffs(t)
        shape = (-1,) + (1,) * (x.ndim - 1)
        return x * (sigma / (alpha ** 2 * self.v + sigma ** 2)).reshape(shape)


def test_colorization_keeps_the_grayscale(rgb_run, tmp_path, monkeypatch):
    # A two-step network sends samples far outside [-1, 1], where 8-bit clipping would hide
    # the property; the checkpoint's network is swapped for the exact one of N(0, 0.1 I).
    def load(path, **kwargs):
        run = load_trained(path, **kwargs)
        cfg = dataclasses.replace(run.cfg, model=dataclasses.replace(run.cfg.model,
                                                                     time_input="t"))
        return dataclasses.replace(run, cfg=cfg, model=_GaussianNoisePredictor(run.sde, 0.1))

    monkeypatch.setattr(tool, "load_trained", load)
    out = tmp_path / "color"
    assert _main("--workdir", rgb_run, "--task", "colorize", "--num_samples", 2,
                 "--num_steps", 50, "--output_dir", out) == 0
    _, arrays = _result(out)
    assert arrays["samples"].shape == (2, 3, 32, 32)
    # The channel mean of the generated colours is the input's gray level up to the 8-bit
    # rounding of the channels and of the gray level (half a level each), wherever no channel
    # was clipped to [0, 255].
    samples = arrays["samples"]
    gen = to_model_range(torch.from_numpy(samples), dequantize=False)
    gray = to_model_range(torch.from_numpy(arrays["inputs"]), dequantize=False)
    inside = torch.from_numpy(((samples > 0) & (samples < 255)).all(axis=1, keepdims=True))
    assert inside.float().mean() > 0.3
    err = (gen.mean(1, keepdim=True) - gray).abs()[inside]
    assert float(err.max()) <= 2 / 256 + 1e-6
    # ... and the colours vary: the channels are not all equal to the gray level.
    assert float((gen - gen.mean(1, keepdim=True)).abs().mean()) > 0.05


def test_class_conditional_and_cfg(gray_run, tmp_path):
    for guidance in ("none", "cfg"):
        out = tmp_path / guidance
        args = ["--workdir", gray_run, "--class_label", -1, "--num_samples", 4,
                "--num_steps", 25, "--output_dir", out]
        if guidance == "cfg":
            args += ["--guidance", "cfg", "--guidance_scale", 2.0]
        assert _main(*args) == 0
        summary, arrays = _result(out)
        assert arrays["labels"].tolist() == [0, 1, 2, 3]
        assert summary["guidance"] == guidance
        # 25 predictor + 25 corrector steps; a guided evaluation costs two network passes
        # (label and null label).
        assert summary["nfe"] == [50]
        assert summary["network_passes_per_eval"] == (2 if guidance == "cfg" else 1)


def test_classifier_guidance(gray_run, tmp_path, capsys):
    clf_tool = load_script("tools/train_classifier.py")
    run = load_trained(gray_run / "checkpoint.pt")
    common = ["--dataset", "fashion_mnist", "--data_dir", run.cfg.data.data_dir, "--n_iters",
              "2", "--batch_size", "4", "--device", "cpu", "--num_test", "4"]
    assert clf_tool.main(["train_classifier.py", "--kind", "noisy", "--sde", "vp",
                          "--output", str(tmp_path / "noisy.pt"), *common]) == 0
    out = tmp_path / "guided"
    assert _main("--workdir", gray_run, "--class_label", 2, "--guidance", "classifier",
                 "--classifier", tmp_path / "noisy.pt", "--guidance_scale", 3.0,
                 "--num_samples", 2, "--num_steps", 25, "--output_dir", out) == 0
    summary, arrays = _result(out)
    assert arrays["labels"].tolist() == [2, 2] and summary["guidance"] == "classifier"
    assert arrays["samples"].shape == (2, 1, 28, 28)
    # A classifier of another forward process is refused, as is one for clean images.
    assert clf_tool.main(["train_classifier.py", "--kind", "noisy", "--sde", "ve",
                          "--output", str(tmp_path / "ve.pt"), *common]) == 0
    assert clf_tool.main(["train_classifier.py", "--kind", "clean",
                          "--output", str(tmp_path / "clean.pt"), *common]) == 0
    for name, message in (("ve.pt", "trained on the ve SDE"), ("clean.pt", "not a noisy")):
        assert _main("--workdir", gray_run, "--class_label", 2, "--guidance", "classifier",
                     "--classifier", tmp_path / name, "--num_samples", 1,
                     "--num_steps", 25) == 2, name
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_guidance_checks_what_the_model_and_the_classifier_hold(gray_run, tmp_path, capsys):
    from score_sde.checkpoint import read_checkpoint, save_checkpoint
    from score_sde.classifier import load_classifier, save_classifier

    def last_error():
        return capsys.readouterr().err.strip().splitlines()[-1]

    # cfg at scale 0 is the conditional score alone: one network pass per evaluation.
    out = tmp_path / "w0"
    assert _main("--workdir", gray_run, "--class_label", 1, "--guidance", "cfg",
                 "--guidance_scale", 0.0, "--num_samples", 1, "--num_steps", 25,
                 "--corrector", "none", "--output_dir", out) == 0
    assert _result(out)[0]["network_passes_per_eval"] == 1
    # cfg needs the null label, which label_dropout 0 never trains.
    (tmp_path / "nodrop").mkdir()
    state = read_checkpoint(gray_run / "checkpoint.pt")
    state["config"]["training"]["label_dropout"] = 0.0
    save_checkpoint(state, tmp_path / "nodrop" / "checkpoint.pt")
    assert _main("--workdir", tmp_path / "nodrop", "--class_label", 1, "--guidance", "cfg",
                 "--num_samples", 1, "--num_steps", 25) == 2
    assert last_error() == (
        "error: --guidance cfg needs the unconditional score of the null label, which a run "
        "trained with label_dropout 0 never learnt; train with --label_dropout > 0 (e.g. 0.1)")
    # The classifier: its kind from the model, its SDE by the settings that SDE reads, its
    # classes for the label range, and a clear refusal when its metadata lacks a field.
    clf_tool = load_script("tools/train_classifier.py")
    run = load_trained(gray_run / "checkpoint.pt")
    assert clf_tool.main(["train_classifier.py", "--kind", "noisy", "--sde", "vp", "--dataset",
                          "fashion_mnist", "--data_dir", run.cfg.data.data_dir, "--n_iters",
                          "2", "--batch_size", "4", "--device", "cpu", "--num_test", "4",
                          "--output", str(tmp_path / "noisy.pt")]) == 0
    clf, meta = load_classifier(tmp_path / "noisy.pt")
    inert = dict(meta, kind="other", sde_config=dict(meta["sde_config"], sigma_max=123.0))
    save_classifier(tmp_path / "inert.pt", clf, inert)  # VP does not read sigma_max
    guided = ["--workdir", gray_run, "--guidance", "classifier", "--num_samples", 1,
              "--num_steps", 25, "--corrector", "none"]
    assert _main(*guided, "--class_label", 2, "--classifier", tmp_path / "inert.pt",
                 "--output_dir", tmp_path / "g") == 0
    assert _main(*guided, "--class_label", 10, "--classifier", tmp_path / "inert.pt") == 2
    assert last_error() == ("error: --class_label must lie in [-1, 9] (10 classes; -1 cycles "
                            "through them), got 10")
    save_classifier(tmp_path / "bare.pt", clf, {k: v for k, v in meta.items()
                                                if k != "time_input"})
    assert _main(*guided, "--class_label", 2, "--classifier", tmp_path / "bare.pt") == 2
    assert last_error() == (f"error: --classifier {tmp_path / 'bare.pt'} does not record its "
                            f"time_input; save it with tools/train_classifier.py")


def test_classifier_guidance_reads_the_runs_data_range(gray_run, tmp_path, capsys):
    # A model that reads images in [0, 1] (the paper's VE models, converted) is guided only by a
    # classifier trained on that interval: --sde_of takes it from the run's checkpoint.
    import shutil

    from score_sde.checkpoint import read_checkpoint, save_checkpoint
    from score_sde.classifier import load_classifier

    run = tmp_path / "run01"
    run.mkdir()
    state = read_checkpoint(gray_run / "checkpoint.pt")
    state["data_info"]["data_range"] = [0.0, 1.0]
    save_checkpoint(state, run / "checkpoint.pt")
    shutil.copy(gray_run / "config.json", run / "config.json")
    clf_tool = load_script("tools/train_classifier.py")
    common = ["--kind", "noisy", "--dataset", "fashion_mnist", "--data_dir",
              load_trained(gray_run / "checkpoint.pt").cfg.data.data_dir, "--n_iters", "2",
              "--batch_size", "4", "--device", "cpu", "--num_test", "4"]
    assert clf_tool.main(["train_classifier.py", "--sde_of", str(run), "--output",
                          str(tmp_path / "own.pt"), *common]) == 0
    assert clf_tool.main(["train_classifier.py", "--sde", "vp", "--output",
                          str(tmp_path / "default.pt"), *common]) == 0
    assert load_classifier(tmp_path / "own.pt")[1]["data_range"] == [0.0, 1.0]
    assert load_classifier(tmp_path / "default.pt")[1]["data_range"] == [-1.0, 1.0]
    capsys.readouterr()
    guide = ["--workdir", run, "--class_label", 2, "--guidance", "classifier", "--num_samples",
             1, "--num_steps", 25]
    assert _main(*guide, "--classifier", tmp_path / "own.pt",
                 "--output_dir", tmp_path / "out") == 0
    assert _main(*guide, "--classifier", tmp_path / "default.pt") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --classifier was trained on images scaled to [-1.0, 1.0], the checkpoint's "
        "model reads [0.0, 1.0]; train one for it with tools/train_classifier.py --sde_of "
        "RUN_FOLDER")


def test_interpolation_endpoints(toy_run, tmp_path):
    out = tmp_path / "interp"
    assert _main("--workdir", toy_run, "--task", "interpolate", "--num_samples", 2,
                 "--num_interp", 5, "--output_dir", out) == 0
    _, arrays = _result(out)
    frames = arrays["frames"]
    assert frames.shape == (2, 5, 2)
    run = load_trained(toy_run / "checkpoint.pt")
    ds, _ = load_dataset(run.cfg.data.dataset, split="test", seed=run.cfg.training.seed)
    src = ds.tensors[0][:4].numpy()
    # Encoding then decoding returns the data up to the ODE tolerance.
    assert np.allclose(frames[:, 0], src[0::2], atol=1e-2)
    assert np.allclose(frames[:, -1], src[1::2], atol=1e-2)


def test_interpolation_reports_the_ode_sampler(toy_run, tmp_path):
    # Interpolation encodes and decodes with the probability-flow ODE, whatever --sampler's
    # default: the summary names the solver that ran, not the PC settings.
    assert _main("--workdir", toy_run, "--task", "interpolate", "--num_samples", 1,
                 "--num_interp", 3, "--rtol", 1e-3, "--atol", 1e-3, "--output_dir",
                 tmp_path) == 0
    summary, _ = _result(tmp_path)
    assert summary["sampler"] == "ode"
    assert summary["predictor"] is None and summary["corrector"] is None
    assert summary["num_steps"] is None and summary["snr"] is None


@pytest.mark.parametrize("args, message", [
    (["--workdir", "{toy}", "--task", "interpolate", "--dataset", "array", "--data_path",
      "{tmp}/g8.npy", "--num_samples", 5],
     "--num_samples 5 pairs need 10 points; {tmp}/g8.npy holds 8"),
    (["--workdir", "{gray}", "--task", "inpaint", "--num_samples", 9, "--num_steps", 2],
     "--num_samples 9 exceeds the 8 images in the test split of fashion_mnist"),
], ids=["interpolate", "inpaint"])
def test_too_few_source_samples_is_one_line_with_both_counts(args, message, toy_run, gray_run,
                                                             tmp_path, capsys):
    np.save(tmp_path / "g8.npy", np.zeros((8, 2), dtype=np.float32))
    fill = dict(toy=toy_run, gray=gray_run, tmp=tmp_path)
    assert _main(*[str(a).format(**fill) for a in args], "--output_dir", tmp_path / "o") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: " + message.format(**fill)]

FIXED_STEP = "a fixed-step sampler (--sampler pc, ald, ddim, dpm_solver or heun)"
CORRECTION = ("corrector steps (--sampler ald, or pc with a --corrector other than none; "
              "--corrector_steps > 0)")
SOURCE = "--task inpaint, colorize or interpolate (source images)"


@pytest.mark.parametrize("args, message", [
    (["--sampler", "ode", "--num_steps", 10], f"--num_steps applies only with {FIXED_STEP}, "
     f"not --sampler ode"),
    (["--task", "interpolate", "--num_steps", 10], f"--num_steps applies only with "
     f"{FIXED_STEP}, not --task interpolate (an ODE solve)"),
    (["--eta", 0.5], "--eta applies only with --sampler ddim, not --sampler pc"),
    (["--sampler", "heun", "--order", 3],
     "--order applies only with --sampler dpm_solver, not --sampler heun"),
    (["--sampler", "ddim", "--dpm_method", "singlestep"],
     "--dpm_method applies only with --sampler dpm_solver, not --sampler ddim"),
    (["--sampler", "dpm_solver", "--order", 1, "--dpm_solver_type", "taylor"],
     "--dpm_solver_type applies only with --sampler dpm_solver at --order 2 or 3 (order 1 has "
     "one form), not --order 1"),
    (["--sampler", "ode", "--predictor", "euler_maruyama"],
     "--predictor applies only with --sampler pc, not --sampler ode"),
    (["--sampler", "ald", "--corrector", "langevin"],
     "--corrector applies only with --sampler pc with --corrector_steps > 0, not --sampler ald"),
    (["--corrector_steps", 0, "--corrector", "ald"],
     "--corrector applies only with --sampler pc with --corrector_steps > 0, not "
     "--corrector_steps 0"),
    (["--corrector", "none", "--corrector_steps", 2], "--corrector_steps applies only with "
     "--sampler ald, or pc with a --corrector other than none, not --corrector none"),
    (["--sampler", "ddim", "--snr", 0.2], f"--snr applies only with {CORRECTION}, not "
     f"--sampler ddim"),
    (["--corrector", "none", "--snr", 0.2], f"--snr applies only with {CORRECTION}, not "
     f"--corrector none"),
    (["--sampler", "ald", "--corrector_steps", 0, "--snr", 0.2], f"--snr applies only with "
     f"{CORRECTION}, not --corrector_steps 0"),
    (["--sampler", "dpm_solver", "--rtol", 1e-3],
     "--rtol applies only with --sampler ode or --task interpolate, not --sampler dpm_solver"),
    (["--atol", 1e-3], "--atol applies only with --sampler ode or --task interpolate, not "
     "--sampler pc"),
    (["--mask", "left"], "--mask applies only with --task inpaint, not --task generate"),
    (["--task", "colorize", "--mask", "{tmp}/missing.npy"],
     "--mask applies only with --task inpaint, not --task colorize"),
    (["--num_interp", 4], "--num_interp applies only with --task interpolate, not --task "
     "generate"),
    (["--data_path", "{tmp}/g8.npy"], f"--data_path applies only with {SOURCE}, not --task "
     f"generate"),
    (["--split", "train"], f"--split applies only with {SOURCE}, not --task generate"),
    (["--guidance_scale", 2], "--guidance_scale applies only with --guidance cfg or "
     "classifier, not --guidance none"),
    (["--class_label", 1, "--guidance", "cfg", "--classifier", "{tmp}/c.pt"],
     "--classifier applies only with --guidance classifier, not --guidance cfg"),
    (["--task", "interpolate", "--sampler", "pc"], "--task interpolate encodes and decodes "
     "with the probability-flow ODE solver; drop --sampler pc"),
    (["--task", "interpolate", "--dataset", "array", "--data_path", "{tmp}/g8.npy", "--split",
      "train"], "--split does not apply to array data: {tmp}/g8.npy is read whole"),
])
def test_flags_without_effect_exit_2_naming_what_they_need(args, message, toy_run, tmp_path,
                                                            capsys):
    np.save(tmp_path / "g8.npy", np.zeros((8, 2), dtype=np.float32))
    args = [str(a).format(tmp=tmp_path) for a in args]
    assert _main("--workdir", toy_run, *args, "--output_dir", tmp_path / "o") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: " + message.format(tmp=tmp_path)]
    assert not (tmp_path / "o").exists()


def test_outputs_that_are_inputs_exit_2_and_leave_them_whole(gray_run, tmp_path, capsys):
    data = tmp_path / "samples.npz"  # an array data file named as one of the outputs
    np.savez(data, x=np.zeros((4, 1, 28, 28), dtype=np.float32))
    before = data.read_bytes()
    cases = [
        (["--task", "inpaint", "--dataset", "array", "--data_path", data, "--output_dir",
          tmp_path], "is a file of the array data it reads"),
        (["--task", "inpaint", "--mask", tmp_path / "out" / "samples.npz", "--output_dir",
          tmp_path / "out"], "--output_dir (samples.npz) and --mask are the same file"),
    ]
    for args, message in cases:
        assert _main("--workdir", gray_run, "--num_samples", 1, *args) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert data.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--workdir", "{toy}", "--task", "inpaint"], "needs image data"),
    (["--workdir", "{gray}", "--task", "colorize"], "needs RGB data"),
    (["--workdir", "{toy}", "--class_label", "1"], "class-conditional checkpoint"),
    (["--workdir", "{gray}", "--class_label", "10"], "--class_label must lie in [-1, 9]"),
    (["--workdir", "{gray}", "--guidance", "cfg"], "--guidance cfg needs --class_label"),
    (["--workdir", "{gray}", "--task", "inpaint", "--mask", "{tmp}/nope.npy"],
     "neither one of"),
    (["--workdir", "{gray}", "--task", "inpaint", "--mask", "{tmp}/bad.npy"],
     "must hold only 0 and 1"),
    (["--workdir", "{gray}", "--task", "inpaint", "--mask", "{tmp}/mask.npz"],
     "is not a .npy array of 0 and 1: it is an .npz archive of m"),
    (["--workdir", "{toy}", "--output_dir", ""], "--output_dir is empty"),
    (["--workdir", "{gray}", "--task", "inpaint", "--sampler", "ode"], "predictor-corrector"),
    (["--workdir", "{toy}", "--task", "interpolate", "--sampler", "heun"], "drop --sampler"),
    (["--workdir", "{toy}", "--sampler", "dpm_solver", "--order", "4"], "order"),
    (["--workdir", "{toy}", "--sampler", "ode", "--cuda_graph"],
     "--cuda_graph replays the network of unconditional fixed-step sampling"),
    (["--workdir", "{tmp}"], "does not exist"),
    (["--workdir", "{toy}", "--rtol", "0"], "--rtol must be > 0"),
    (["--workdir", "{toy}", "--output_dir", "{tmp}/bad.npy"], "is a file; give a folder"),
    (["--workdir", "{tmp}", "--checkpoint", "{toy}/checkpoint.pt"],
     "samples_generate is a file; give a folder"),  # the default WORKDIR/samples_<task>
    (["--workdir", "{toy}", "--task", "paint"], "task"),
    (["--workdir", "{gray}", "--class_label", "1", "--guidance", "classifier"],
     "needs --classifier"),
])
def test_bad_input_exits_2_with_one_line(args, message, toy_run, gray_run, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.full((28, 28), 0.5, dtype=np.float32))
    np.savez(tmp_path / "mask.npz", m=np.ones((28, 28), dtype=np.float32))
    (tmp_path / "samples_generate").write_bytes(b"")
    args = [a.format(toy=toy_run, gray=gray_run, tmp=tmp_path) for a in args]
    assert _main(*args, "--num_steps", 2, "--num_samples", 1) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_command_line_process(toy_run, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "sample.py"), "--workdir",
                           str(toy_run), "--num_samples", "4", "--num_steps", "25",
                           "--output_dir", str(tmp_path / "o")],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["num_samples"] == 4
    assert proc.stderr.strip().splitlines()[-1] == (  # for people, on stderr
        f"4 samples (generate, pc sampler), mean NFE 50.0 per batch, "
        f"{summary['seconds']:.1f} s -> {tmp_path / 'o' / 'samples.png'}")
    bad = subprocess.run([sys.executable, str(REPO / "tools" / "sample.py"), "--workdir",
                          str(tmp_path / "none")], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_seeds_are_bounded_by_what_torch_takes(toy_run, tmp_path, capsys):
    # 2^64 - 1 is the largest seed torch's generators take: one more is a one-line flag error.
    assert _main("--workdir", toy_run, "--sampler", "dpm_solver", "--num_steps", 2,
                 "--num_samples", 2, "--seed", 2 ** 64 - 1, "--output_dir", tmp_path) == 0
    capsys.readouterr()
    assert _main("--workdir", toy_run, "--seed", 2 ** 64, "--output_dir", tmp_path) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["error: flag --seed=18446744073709551616: 18446744073709551616 is not an "
                     "integer in the range [0, 18446744073709551615]"]

CPU_OUT_OF_MEMORY = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                     "allocate memory: you tried to allocate 800000000000 bytes. Error code 12 "
                     "(Cannot allocate memory)")


@pytest.mark.parametrize("error", [
    RuntimeError(CPU_OUT_OF_MEMORY),  # the CPU allocator's
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)(
        "CUDA out of memory. Tried to allocate 745.06 GiB"),
    MemoryError("Unable to allocate 745. GiB for an array with shape (100000000000, 2)"),
], ids=["cpu", "device", "numpy"])
def test_out_of_memory_is_one_line_naming_the_batch_size(error, toy_run, tmp_path, capsys,
                                                         monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(tool, "sample_dpm_solver", out_of_memory)
    assert _main("--workdir", toy_run, "--sampler", "dpm_solver", "--num_samples", 6,
                 "--batch_size", 4, "--output_dir", tmp_path) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"error: out of memory ({error}): lower --batch_size (now 4) or "
                     f"--num_samples (now 6)"]


# Runs a script as __main__ with its arguments and sends the process SIGINT, as Ctrl-C does,
# when the script first imports MODULE: an interrupt at a chosen point of its start-up.
_INTERRUPT_AT_IMPORT = """
import importlib.abc, os, runpy, signal, sys

# A shell that starts a job in the background ignores SIGINT for it; a terminal's Ctrl-C
# reaches a foreground process with the default handler, which this restores.
signal.signal(signal.SIGINT, signal.default_int_handler)
module = sys.argv[1]

class Interrupt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == module:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_interrupted_at_import(script: str, module: str, *args) -> subprocess.CompletedProcess:
    """`python REPO/script ARGS` interrupted by SIGINT when it starts importing `module`."""
    return subprocess.run([sys.executable, "-c", _INTERRUPT_AT_IMPORT, module,
                           str(REPO / script), *map(str, args)],
                          env=ENV, capture_output=True, text=True, timeout=120)


# numpy and torch: the tool's first imports; score_sde: after torch; absl: the flags, defined
# by `run_tool` before it handles Ctrl-C itself.
@pytest.mark.parametrize("module", ["numpy", "torch", "score_sde", "absl"])
def test_ctrl_c_while_starting_prints_one_line_and_exits_130(module, tmp_path):
    proc = run_interrupted_at_import("tools/sample.py", module, "--workdir", tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted (SIGINT)\n", "")
