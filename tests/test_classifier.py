"""score_sde.classifier, tools/train_classifier.py and tools/fid.py.

The classifiers are checked for shapes, time conditioning, the time-input conventions of the
score models, gradients (gradcheck in float64: classifier guidance needs grad_x log p_t(y | x))
and exact save/load round trips. The tools run on tiny synthetic Fashion-MNIST IDX files
written here, with three trivially separable classes (flat noise, horizontal stripes,
vertical stripes), so a few dozen steps must beat chance (1/3). tools/fid.py is checked with
a random FeatureClassifier and a fake TorchScript "Inception" scripted here: a set against
itself gives ~0, and the tool's numbers equal `score_sde.metrics` on the same features.
"""
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from score_sde.checkpoint import CheckpointError, save_checkpoint
from score_sde.classifier import (CLASSIFIERS, FeatureClassifier, NoiseConditionalClassifier,
                                  classifier_log_prob_fn, load_classifier,
                                  noisy_classifier_loss, save_classifier)
from score_sde.datasets import load_dataset, to_model_range
from score_sde.metrics import frechet_distance_from_features
from score_sde.sde import SDE, VESDE, VPSDE
from tests.scripts import load_script
from tests.test_tool_sample import run_interrupted_at_import

REPO = Path(__file__).resolve().parent.parent
NUM_TRAIN, NUM_TEST, NUM_CLASSES = 96, 48, 3  # labels 0..2 of Fashion-MNIST's 10
TINY_TRAINING = ["--n_iters", "30", "--batch_size", "16", "--width", "4", "--lr", "1e-2",
                 "--device", "cpu"]
SELF_FD_TOL = 1e-6  # |FD| of a feature set against itself (round-off of sqrtm)


train_tool, fid_tool = load_script("tools/train_classifier.py"), load_script("tools/fid.py")

# torch 2.13 deprecates TorchScript, the format of the Inception file tools/fid.py must read.
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:DeprecationWarning")]


def _idx(arr):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.tobytes()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Fashion-MNIST-shaped IDX files: class k = noise plus pattern k (flat, horizontal or
    vertical stripes of period 4)."""
    folder = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(0)
    stripes = (np.arange(28) // 2) % 2 * 120.0
    patterns = np.stack([np.zeros((28, 28)), np.repeat(stripes[:, None], 28, 1),
                         np.repeat(stripes[None, :], 28, 0)])
    for stem, n in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
        labels = np.arange(n) % NUM_CLASSES
        images = np.clip(rng.normal(60, 20, (n, 28, 28)) + patterns[labels], 0, 255)
        (folder / f"{stem}-images-idx3-ubyte").write_bytes(_idx(images))
        (folder / f"{stem}-labels-idx1-ubyte").write_bytes(_idx(labels))
    return folder


def _one_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _tiny_noisy(**kwargs):
    opts = dict(image_size=8, in_channels=1, num_classes=3, nf=4, ch_mult=(1, 2))
    opts.update(kwargs)
    return NoiseConditionalClassifier(**opts)


# --- the classifiers ----------------------------------------------------------------------------

@pytest.mark.parametrize("size, channels, embedding", [(28, 1, "positional"),
                                                       (32, 3, "fourier")])
def test_noise_conditional_shapes_and_time_conditioning(size, channels, embedding):
    torch.manual_seed(0)
    model = NoiseConditionalClassifier(image_size=size, in_channels=channels, num_classes=5,
                                       nf=8, embedding_type=embedding)
    x = torch.randn(3, channels, size, size)
    t_in = torch.tensor([0.5, 0.5, 0.5])
    logits = model(x, t_in)
    assert logits.shape == (3, 5) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    other = model(x, torch.tensor([50.0, 50.0, 50.0]))
    assert (other - logits).abs().max() > 1e-3  # the time input matters


def test_feature_classifier_shapes_and_per_image_features():
    torch.manual_seed(0)
    model = FeatureClassifier(in_channels=3, num_classes=4, width=4, feature_dim=16).eval()
    for size in (28, 32):
        x = torch.rand(5, 3, size, size) * 2 - 1
        assert model.features(x).shape == (5, 16)
        assert model(x).shape == (5, 4)
    # In eval mode an image's features do not depend on the rest of the batch.
    torch.testing.assert_close(model.features(x[:2]), model.features(x)[:2])


@pytest.mark.parametrize("make, match", [
    (lambda: NoiseConditionalClassifier(image_size=30, ch_mult=(1, 2, 2)), "divisible by"),
    (lambda: NoiseConditionalClassifier(num_classes=1), "num_classes"),
    (lambda: NoiseConditionalClassifier(ch_mult=()), "ch_mult"),
    (lambda: NoiseConditionalClassifier(dropout=1.0), "dropout"),
    (lambda: NoiseConditionalClassifier(embedding_type="learned"), "embedding_type"),
    (lambda: FeatureClassifier(width=2), "width"),
    (lambda: FeatureClassifier(feature_dim=0), "feature_dim"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_forward_errors():
    model, feature = _tiny_noisy(), FeatureClassifier(width=4)
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[B, 1, H, W\]"):
        model(torch.randn(2, 3, 8, 8), torch.ones(2))
    with pytest.raises(ValueError, match="time_input must have shape"):
        model(torch.randn(2, 1, 8, 8), torch.ones(3))
    with pytest.raises(ValueError, match="at least 4x4"):
        feature.features(torch.randn(2, 1, 2, 2))


def test_log_prob_fn_follows_the_time_input_conventions():
    torch.manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([1e-3, 0.2, 0.7, 1.0])
    vp, ve = VPSDE(), VESDE()
    model = _tiny_noisy()
    log_p = classifier_log_prob_fn(model, vp, "scaled_t")(x, t)
    torch.testing.assert_close(log_p, F.log_softmax(model(x, 999 * t), dim=1))
    torch.testing.assert_close(log_p.logsumexp(dim=1), torch.zeros(4))
    fourier = _tiny_noisy(embedding_type="fourier")
    sigma = ve.marginal_coeffs(t.double())[1].float()
    torch.testing.assert_close(classifier_log_prob_fn(fourier, ve, time_input="std")(x, t),
                               F.log_softmax(fourier(x, sigma), dim=1))


def test_log_prob_fn_gradient_matches_finite_differences():
    """grad_x log p_t(y | x), the guidance term, against central differences (float64)."""
    torch.manual_seed(0)
    model = _tiny_noisy().double()
    fn = classifier_log_prob_fn(model, VPSDE())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.6], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fn(x, t), (x,))
    y = torch.tensor([0, 2])
    grad = torch.autograd.grad(fn(x, t)[torch.arange(2), y].sum(), x)[0]
    v, h = torch.randn_like(x), 1e-6
    with torch.no_grad():
        diff = (fn(x + h * v, t) - fn(x - h * v, t))[torch.arange(2), y].sum() / (2 * h)
    assert (grad * v).sum().item() == pytest.approx(diff.item(), rel=1e-6)


class _NoMarginal(SDE):
    def sde(self, x, t):
        return -x, torch.ones_like(t)

    def prior_sampling(self, shape, *, generator=None, device=None, dtype=None):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)

    def prior_logp(self, z):
        return torch.zeros(z.shape[0], dtype=z.dtype)


def test_log_prob_fn_errors():
    model = _tiny_noisy()
    with pytest.raises(ValueError, match="time_input"):
        classifier_log_prob_fn(model, VPSDE(), "sigma")
    with pytest.raises(ValueError, match="marginal"):
        classifier_log_prob_fn(model, _NoMarginal(), "std")
    fn = classifier_log_prob_fn(model, VPSDE())
    with pytest.raises(ValueError, match="shape"):
        fn(torch.randn(2, 1, 8, 8), torch.ones(3))
    bad = classifier_log_prob_fn(lambda x, t: torch.zeros(x.shape[0]), VPSDE())
    with pytest.raises(ValueError, match=r"logits \[B=2, K\]"):
        bad(torch.randn(2, 1, 8, 8), torch.ones(2))
    # Times outside the SDE's range, and t = 0 where the embedding takes log sigma(t).
    x = torch.randn(2, 1, 8, 8)
    for time_input, t, match in [
            ("scaled_t", [0.5, 1.5], r"t must lie in \[0, 1\], got 1.5"),
            ("scaled_t", [0.5, float("nan")], r"t must lie in \[0, 1\], got nan"),
            ("std", [0.0, 0.5], r"t must lie in \(0, 1\] for time_input='std': sigma\(0\) = 0, "
                                r"got 0")]:
        with pytest.raises(ValueError, match=match):
            classifier_log_prob_fn(model, VPSDE(), time_input)(x, torch.tensor(t))
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        noisy_classifier_loss(model, VPSDE(), x, torch.tensor([0, 1]), time_input="std",
                              t=torch.tensor([0.0, 0.5]))


def test_noisy_classifier_loss():
    torch.manual_seed(0)
    sde, model = VPSDE(), _tiny_noisy()
    x, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.tensor([0, 1, 2, 0])
    t = torch.tensor([0.1, 0.3, 0.5, 0.9], dtype=torch.float64)
    loss, log_p = noisy_classifier_loss(model, sde, x, y, t=t,
                                        generator=torch.Generator().manual_seed(1))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    alpha, sigma = (c.float()[:, None, None, None] for c in sde.marginal_coeffs(t))
    expected = F.log_softmax(model(alpha * x + sigma * z, 999 * t.float()), dim=1)
    torch.testing.assert_close(log_p, expected)
    torch.testing.assert_close(loss, F.nll_loss(expected, y))

    seen = []

    def recorder(x, t_in):
        seen.append(t_in)
        return torch.zeros(x.shape[0], 3)

    noisy_classifier_loss(recorder, sde, x, y, eps=0.25, generator=torch.Generator())
    assert ((seen[0] >= 999 * 0.25 - 1e-3) & (seen[0] <= 999)).all()
    for args, kwargs, match in [
            ((model, sde, x, y.float()), {}, "integer tensor"),
            ((model, sde, x, y + 2), {}, r"labels must lie in \[0, 2\]"),
            ((model, sde, x, y), dict(eps=1.0), "eps"),
            ((model, _NoMarginal(), x, y), {}, "marginals")]:
        with pytest.raises(ValueError, match=match):
            noisy_classifier_loss(*args, **kwargs)


@pytest.mark.parametrize("make, call", [
    (lambda: _tiny_noisy(embedding_type="fourier"), lambda m, x: m(x, torch.full((3,), 2.0))),
    (lambda: FeatureClassifier(width=4, feature_dim=8), lambda m, x: m.features(x)),
])
def test_save_load_round_trip(tmp_path, make, call):
    torch.manual_seed(0)
    model = make()
    with torch.no_grad():  # move BatchNorm statistics away from their defaults
        for buf in model.buffers():
            buf.add_(torch.rand_like(buf.float()).to(buf.dtype))
    model.eval()
    path = tmp_path / "deep" / "clf.pt"
    meta = {"dataset": "fashion_mnist", "time_input": "std", "test_accuracy": 0.5}
    save_classifier(path, model, meta)
    loaded, loaded_meta = load_classifier(path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded_meta == meta and loaded.config == model.config
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(call(loaded, x), call(model, x))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing.pt")
    path = tmp_path / "clf.pt"
    save_classifier(path, FeatureClassifier(width=4))
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(CheckpointError):
        load_classifier(path)
    save_checkpoint({"model": {}, "step": 3}, path)
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(path)
    state = {"format": "score_sde-classifier-v1", "kind": "resnet", "config": {},
             "state_dict": {}}
    save_checkpoint(state, path)
    with pytest.raises(ValueError, match="unknown classifier kind 'resnet'"):
        load_classifier(path)
    model = FeatureClassifier(width=4)
    state.update(kind="feature", config=dict(model.config, width=8),
                 state_dict=model.state_dict())
    save_checkpoint(state, path)
    with pytest.raises(ValueError, match="weights do not fit"):
        load_classifier(path)
    with pytest.raises(ValueError, match="must be one of"):
        save_classifier(path, torch.nn.Linear(2, 2))
    assert set(CLASSIFIERS) == {"noise_conditional", "feature"}


# --- tools/train_classifier.py ------------------------------------------------------------------

def _train(*args):
    return train_tool.main(["train_classifier.py", *map(str, args)])


@pytest.fixture(scope="module")
def clean_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.pt"
    assert _train("--kind", "clean", "--data_dir", data_dir, "--feature_dim", 8,
                  "--output", out, *TINY_TRAINING) == 0
    return out


def test_train_clean_classifier(clean_run, capsys):
    summary = json.loads(clean_run.with_suffix(".json").read_text())
    assert summary["kind"] == "clean" and summary["num_train"] == NUM_TRAIN
    assert summary["num_test"] == NUM_TEST and summary["test_accuracy_at_t"] is None
    assert summary["test_accuracy"] > 0.8  # chance: 1/3
    model, meta = load_classifier(clean_run)
    assert isinstance(model, FeatureClassifier) and meta["test_accuracy"] == \
        summary["test_accuracy"]
    assert meta["dataset"] == "fashion_mnist" and meta["image_shape"] == [1, 28, 28]


def test_train_noisy_classifier(data_dir, tmp_path, capsys):
    out = tmp_path / "noisy.pt"
    assert _train("--kind", "noisy", "--sde", "vp", "--data_dir", data_dir, "--output", out,
                  "--eval_times", "0.001,0.5", "--summary", tmp_path / "s.json",
                  *TINY_TRAINING) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == json.loads((tmp_path / "s.json").read_text())
    assert summary["time_input"] == "scaled_t" and summary["sde_config"]["name"] == "vp"
    assert set(summary["test_accuracy_at_t"]) == {"0.001", "0.5"}
    assert summary["test_accuracy_at_t"]["0.001"] > 0.6  # chance: 1/3
    model, meta = load_classifier(out)
    assert isinstance(model, NoiseConditionalClassifier) and meta["sde"] == "vp"
    # What guidance does with it: a finite gradient of log p_t(y | x).
    x = torch.zeros(2, 1, 28, 28, requires_grad=True)
    fn = classifier_log_prob_fn(model, VPSDE(), meta["time_input"])
    grad = torch.autograd.grad(fn(x, torch.full((2,), 0.5))[:, 1].sum(), x)[0]
    assert torch.isfinite(grad).all() and grad.abs().max() > 0


def test_train_noisy_classifier_for_the_cosine_sde(data_dir, tmp_path, capsys):
    # score_sde.train trains cosine VP runs; their guidance needs a classifier of that SDE.
    out = tmp_path / "cosine.pt"
    assert _train("--kind", "noisy", "--sde", "cosine", "--data_dir", data_dir, "--output",
                  out, "--eval_times", "0.001", *TINY_TRAINING) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sde_config"]["name"] == "cosine" and summary["time_input"] == "scaled_t"
    assert summary["test_accuracy_at_t"]["0.001"] > 0.6  # chance: 1/3


def test_noisy_classifier_takes_a_runs_sde_settings(data_dir, tmp_path, capsys):
    # A run trained with non-default SDE parameters (a config file) is guided only by a
    # classifier of that exact SDE (tools/sample.py compares them): --sde_of copies it.
    from score_sde.config import Config, SDEConfig, from_dict, to_dict
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config(sde=SDEConfig(name="subvp", beta_max=10.0, num_steps=500))
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    out = tmp_path / "clf.pt"
    assert _train("--kind", "noisy", "--sde_of", run, "--data_dir", data_dir, "--output", out,
                  "--eval_times", "0.5", *TINY_TRAINING) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sde"] == "subvp" and summary["time_input"] == "scaled_t"
    assert from_dict({"sde": load_classifier(out)[1]["sde_config"]}).sde == cfg.sde
    for args, message in [(["--sde", "vp"], "give --sde or --sde_of, not both"),
                          (["--sde_of", tmp_path], "is not a run folder (it has no config.json)")]:
        extra = [] if "--sde_of" in args else ["--sde_of", run]
        assert _train("--kind", "noisy", *extra, *args, "--data_dir", data_dir, "--output",
                      tmp_path / "x.pt", *TINY_TRAINING) == 2
        assert message in capsys.readouterr().err
    # The outputs must not replace the config or the checkpoint --sde_of reads.
    before = (run / "config.json").read_text()
    for output, clash in (("config.pt", "--summary"), ("checkpoint.pt", "--output")):
        assert _train("--kind", "noisy", "--sde_of", run, "--data_dir", data_dir, "--output",
                      run / output, *TINY_TRAINING) == 2
        assert f"{clash} and --sde_of are the same file" in capsys.readouterr().err
    assert (run / "config.json").read_text() == before
    assert not (run / "checkpoint.pt").exists()


def test_train_classifier_refuses_what_would_end_non_finite(data_dir, tmp_path, capsys):
    # Adam's first step is 10 lr: beyond float32 it is refused up front. An update that blows
    # the network up on the last step ends with exit 3 and writes nothing.
    assert _train("--kind", "clean", "--data_dir", data_dir, "--output", tmp_path / "a.pt",
                  *TINY_TRAINING, "--lr", "1e38") == 2
    assert "--lr must be a number in (0, 3.4e+37]" in capsys.readouterr().err
    status = _train("--kind", "clean", "--data_dir", data_dir, "--output", tmp_path / "b.pt",
                    *TINY_TRAINING, "--n_iters", "1", "--lr", "1e30")
    err = capsys.readouterr().err
    assert status == 3 and "non-finite" in err, err
    assert not (tmp_path / "b.pt").exists() and not (tmp_path / "b.json").exists()


def test_train_noisy_ve_defaults_to_the_noise_level(data_dir, tmp_path, capsys):
    out = tmp_path / "ve.pt"
    assert _train("--kind", "noisy", "--sde", "ve", "--data_dir", data_dir, "--output", out,
                  "--n_iters", 2, "--width", 4, "--num_test", 8, "--device", "cpu") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["time_input"] == "std" and summary["num_test"] == 8
    assert summary["model_config"]["embedding_type"] == "fourier"


@pytest.mark.parametrize("args, match", [
    (["--kind", "clean", "--data_dir", "{missing}"], "Fashion-MNIST not found"),
    (["--kind", "clean", "--sde", "ve"], "--sde do not apply to --kind clean"),
    (["--kind", "noisy", "--feature_dim", "8"], "--feature_dim do not apply to --kind noisy"),
    (["--kind", "noisy", "--eval_times", "0.1,x"], "--eval_times must be comma-separated"),
    (["--kind", "noisy", "--eval_times", "0"], r"--eval_times must be numbers in \(0, 1\]"),
    (["--kind", "clean", "--lr", "0"], "--lr must be"),
    (["--kind", "clean", "--lr", "1e39"], r"--lr must be a number in \(0, 3.4e\+37\]"),
    (["--kind", "clean", "--summary", "{out}"], "are the same file"),
    (["--kind", "clean", "--summary", "{folder}"], "--summary .* is a folder; give a file name"),
    (["--kind", "clean", "--summary", "{data}/train-labels-idx1-ubyte"],
     "--summary .*train-labels-idx1-ubyte is a file of the fashion_mnist data it reads"),
    (["--kind", "bogus"], "kind"),
    (["--data_dir", "{data}"], "kind"),
    (["--kind", "clean", "extra"], "unexpected arguments"),
])
def test_train_classifier_errors(data_dir, tmp_path, capsys, args, match):
    out = tmp_path / "clf.pt"
    fill = dict(missing=tmp_path / "nowhere", out=out, data=data_dir, folder=tmp_path)
    args = [a.format(**fill) for a in args]
    if "--data_dir" not in args:
        args += ["--data_dir", str(data_dir)]
    assert _train(*args, "--output", out, "--n_iters", 1, "--device", "cpu") == 2
    line = _one_line(capsys)
    assert line.startswith("error: ") and re.search(match, line), line
    assert not out.exists()


def test_train_classifier_seeds_are_bounded_by_what_torch_takes(data_dir, tmp_path, capsys):
    common = ["--kind", "clean", "--data_dir", data_dir, "--output", tmp_path / "clf.pt",
              "--n_iters", 1, "--width", 4, "--num_test", 8, "--device", "cpu"]
    assert _train(*common, "--seed", 2 ** 64 - 1) == 0  # the largest seed torch takes
    capsys.readouterr()
    assert _train(*common, "--seed", 2 ** 64) == 2
    assert _one_line(capsys) == ("error: flag --seed=18446744073709551616: 18446744073709551616 "
                                 "is not an integer in the range [0, 18446744073709551615]")

# --- tools/fid.py -------------------------------------------------------------------------------

class FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: uint8 [B, 3, H, W] -> 16 pooled features."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3:
            raise ValueError("expected uint8 images [B, 3, H, W]")
        features = F.avg_pool2d(x[:, :1].float(), 7).flatten(1)
        return features if return_features else features.softmax(dim=1)


@pytest.fixture(scope="module")
def fid_files(data_dir, tmp_path_factory):
    """A random FeatureClassifier, the fake Inception and sample archives."""
    folder = tmp_path_factory.mktemp("fid")
    torch.manual_seed(0)
    save_classifier(folder / "clf.pt", FeatureClassifier(width=4, feature_dim=8),
                    {"dataset": "fashion_mnist"})
    torch.jit.script(FakeInception()).save(str(folder / "inception.pt"))
    test = load_dataset("fashion_mnist", split="test", data_dir=str(data_dir))[0].tensors[0]
    train = load_dataset("fashion_mnist", split="train", data_dir=str(data_dir))[0].tensors[0]
    np.savez(folder / "test.npz", samples=test[:, 0].numpy())  # [N, H, W]
    np.savez(folder / "train.npz", samples=train.numpy())  # [N, 1, H, W]
    floats = to_model_range(train, dequantize=False).numpy()
    floats[0, 0, 0, :3] = [-1.5, 1.0, 2.0]  # saturate: 0 and 255 after quantization
    np.savez(folder / "floats.npz", samples=floats)
    return folder


def _fid(*args):
    return fid_tool.main(["fid.py", *map(str, args), "--device", "cpu"])


def _result(capsys):
    return json.loads(capsys.readouterr().out)


def test_fid_set_against_itself_is_zero(fid_files, data_dir, capsys):
    assert _fid("--samples", fid_files / "test.npz", "--data_dir", data_dir,
                "--classifier", fid_files / "clf.pt",
                "--inception_weights", fid_files / "inception.pt") == 0
    result = _result(capsys)
    assert abs(result["classifier_fd"]) < SELF_FD_TOL and abs(result["fid"]) < SELF_FD_TOL
    assert result["num_samples"] == result["num_ref"] == NUM_TEST
    assert result["dataset"] == "fashion_mnist" and result["split"] == "test"
    assert result["feature_spaces"]["classifier"]["dim"] == 8
    assert result["feature_spaces"]["inception"]["dim"] == 16
    assert result["fid_note"] is None and result["ref_stats_status"] == {
        "classifier": "not cached", "inception": "not cached"}


def test_fid_matches_the_metric_and_caches_reference_stats(fid_files, data_dir, tmp_path,
                                                            capsys):
    common = ["--data_dir", data_dir, "--classifier", fid_files / "clf.pt",
              "--inception_weights", fid_files / "inception.pt",
              "--ref_stats", tmp_path / "ref.npz"]
    assert _fid("--samples", fid_files / "train.npz", "--num_samples", 40, *common,
                "--output", tmp_path / "fd.json") == 0
    first = _result(capsys)
    assert first == json.loads((tmp_path / "fd.json").read_text())
    assert first["ref_stats_status"] == {"classifier": "computed", "inception": "computed"}
    assert first["num_samples"] == 40 and first["num_ref"] == NUM_TEST

    model, _ = load_classifier(fid_files / "clf.pt")
    train = load_dataset("fashion_mnist", data_dir=str(data_dir))[0].tensors[0][:40]
    test = load_dataset("fashion_mnist", split="test", data_dir=str(data_dir))[0].tensors[0]
    detector = FakeInception()
    with torch.no_grad():
        feats = {name: [f(x) for x in (train, test)] for name, f in [
            ("classifier", lambda x: model.features(to_model_range(x, dequantize=False))),
            ("inception", lambda x: detector(x.expand(-1, 3, -1, -1), True))]}
    expected_cfd = frechet_distance_from_features(*feats["classifier"])
    expected_fid = frechet_distance_from_features(*feats["inception"])
    assert first["classifier_fd"] == pytest.approx(expected_cfd, rel=1e-6)
    assert first["fid"] == pytest.approx(expected_fid, rel=1e-6) and expected_fid > 1

    # Floats in [-1, 1] are quantized like the dataset: same distance, saturation counted.
    assert _fid("--samples", fid_files / "floats.npz", "--num_samples", 40, *common) == 0
    second = _result(capsys)
    assert second["ref_stats_status"] == {"classifier": "loaded", "inception": "loaded"}
    assert second["samples_dtype"] == "float32" and second["samples_clipped"] == 2
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-3)

    assert _fid("--samples", fid_files / "train.npz", *common, "--num_ref", 12) == 0
    third = _result(capsys)
    assert third["ref_stats_status"]["classifier"].startswith("recomputed")
    assert third["num_ref"] == 12 and third["num_samples"] == NUM_TRAIN
    assert [note.split(":")[0] for note in third["notes"]] == ["inception"]  # 12 < 16 dims


def test_fid_without_inception_weights_is_not_computed(fid_files, data_dir, capsys):
    assert _fid("--samples", fid_files / "train.npz", "--data_dir", data_dir,
                "--classifier", fid_files / "clf.pt", "--split", "train") == 0
    result = _result(capsys)
    assert result["fid"] is None and "--inception_weights" in result["fid_note"]
    assert abs(result["classifier_fd"]) < SELF_FD_TOL  # the train split against itself


def _bad_files(folder):
    np.save(folder / "plain.npy", np.zeros((4, 28, 28), np.uint8))
    np.savez(folder / "nokey.npz", images=np.zeros((4, 28, 28), np.uint8))
    np.savez(folder / "vector.npz", samples=np.zeros((4, 784), np.uint8))
    np.savez(folder / "nan.npz", samples=np.full((4, 28, 28), np.nan, np.float32))
    np.savez(folder / "ints.npz", samples=np.zeros((4, 28, 28), np.int32))
    np.savez(folder / "big.npz", samples=np.zeros((4, 32, 32), np.uint8))
    (folder / "junk.pt").write_bytes(b"not torchscript")
    (folder / "junk.npz").write_bytes(b"not a zip")
    np.savez(folder / "crc.npz", samples=np.zeros((4, 28, 28), np.uint8))
    damaged = bytearray((folder / "crc.npz").read_bytes())
    damaged[2000] ^= 0xFF  # inside the stored array: its CRC-32 no longer matches
    (folder / "crc.npz").write_bytes(bytes(damaged))
    save_classifier(folder / "noisy.pt", _tiny_noisy(in_channels=1))
    (folder / "empty.npz").write_bytes(b"")
    np.savez(folder / "long.npz", samples=np.zeros((4, 28, 28), np.longdouble))
    np.savez(folder / "other.npz", samples=np.zeros((4, 28, 28), np.uint8))  # not a cache


@pytest.mark.parametrize("args, match", [
    (["--samples", "{t}/missing.npz", "--classifier", "{f}/clf.pt"], "does not exist"),
    (["--samples", "{t}/empty.npz", "--classifier", "{f}/clf.pt"], "not a readable .npz"),
    (["--samples", "{t}/long.npz", "--classifier", "{f}/clf.pt"],
     "must be uint8 or floats \\(float16, float32 or float64\\)"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--ref_stats",
      "{t}/empty.npz"], "--ref_stats .* is not a readable"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--ref_stats",
      "{t}/plain.npy"], "--ref_stats .* is not a readable .npz archive \\(a plain .npy"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--ref_stats",
      "{t}/other.npz"], "holds arrays that are not reference statistics \\(samples\\)"),
    (["--samples", "{t}/plain.npy", "--classifier", "{f}/clf.pt"], "plain .npy"),
    (["--samples", "{t}/junk.npz", "--classifier", "{f}/clf.pt"], "not a readable .npz"),
    (["--samples", "{t}/crc.npz", "--classifier", "{f}/clf.pt"], "'samples' is unreadable"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--output", "{t}"],
     "--output .* is a folder; give a file name"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--output", "{f}/test.npz"],
     "--samples and --output are the same file"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--ref_stats", "{t}/r.npz",
      "--output", "{t}/r.npz"], "--ref_stats and --output are the same file"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--output", "{f}/clf.pt"],
     "--classifier and --output are the same file"),
    (["--samples", "{f}/test.npz", "--inception_weights", "{f}/inception.pt", "--ref_stats",
      "{f}/inception.pt"], "--inception_weights and --ref_stats are the same file"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--output",
      "{d}/t10k-labels-idx1-ubyte"], "--output .*t10k-labels-idx1-ubyte is a file of the "
                                     "fashion_mnist data it reads"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--ref_stats",
      "{d}/train-images-idx3-ubyte"], "--ref_stats .* is a file of the fashion_mnist data"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--ref_stats",
      "{t}/junk.pt/r.npz"], "--ref_stats .* lies under .*junk.pt, which is a file"),
    (["--samples", "{t}/nokey.npz", "--classifier", "{f}/clf.pt"],
     "no array 'samples' \\(it has images\\)"),
    (["--samples", "{t}/vector.npz", "--classifier", "{f}/clf.pt"], "must be images"),
    (["--samples", "{t}/nan.npz", "--classifier", "{f}/clf.pt"], "non-finite"),
    (["--samples", "{t}/ints.npz", "--classifier", "{f}/clf.pt"], "dtype int32"),
    (["--samples", "{t}/big.npz", "--classifier", "{f}/clf.pt"], "do not match"),
    (["--samples", "{f}/test.npz"], "nothing to compute"),
    (["--samples", "{f}/test.npz", "--classifier", "{t}/missing.pt"], "does not exist"),
    (["--samples", "{f}/test.npz", "--classifier", "{t}/junk.pt"], "not a score_sde checkpoint"),
    (["--samples", "{f}/test.npz", "--classifier", "{t}/noisy.pt"], "clean FeatureClassifier"),
    (["--samples", "{f}/test.npz", "--inception_weights", "{t}/missing.pt"],
     "nothing is downloaded"),
    (["--samples", "{f}/test.npz", "--inception_weights", "{t}/junk.pt"], "not a TorchScript"),
    (["--samples", "{f}/test.npz", "--inception_weights", "{f}/inception.pt"],
     "--dataset is needed"),
    (["--samples", "{f}/test.npz", "--inception_weights", "{f}/clf.pt"], "not a TorchScript"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--ref_stats", "{t}/junk.npz"],
     "--ref_stats .* is not a readable"),
    (["--classifier", "{f}/clf.pt"], "samples"),
    (["--samples", "{f}/test.npz", "--classifier", "{f}/clf.pt", "--num_samples", "1"],
     "num_samples"),
])
def test_fid_errors(fid_files, data_dir, tmp_path, capsys, args, match):
    _bad_files(tmp_path)
    args = [a.format(t=tmp_path, f=fid_files, d=data_dir) for a in args] + [
        "--data_dir", str(data_dir)]
    before = {p: p.read_bytes() for p in (*Path(data_dir).iterdir(), *fid_files.iterdir())}
    assert _fid(*args) == 2
    assert all(p.read_bytes() == data for p, data in before.items())  # inputs untouched
    line = _one_line(capsys)
    assert line.startswith("error: ") and re.search(match, line), line


def test_fid_big_endian_samples_are_the_same_samples(fid_files, data_dir, tmp_path, capsys):
    floats = np.load(fid_files / "floats.npz")["samples"]
    np.savez(tmp_path / "be.npz", samples=floats.astype(">f4"))
    results = []
    for path in (fid_files / "floats.npz", tmp_path / "be.npz"):
        assert _fid("--samples", path, "--classifier", fid_files / "clf.pt", "--data_dir",
                    data_dir) == 0
        results.append(_result(capsys))
    assert results[0]["classifier_fd"] == results[1]["classifier_fd"]


def test_fid_inception_that_rejects_the_images(fid_files, data_dir, tmp_path, capsys):
    class Picky(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            if x.shape[2] != 299:
                raise ValueError("expected 299x299 images")
            return x.float().flatten(1)

    torch.jit.script(Picky()).save(str(tmp_path / "picky.pt"))
    assert _fid("--samples", fid_files / "test.npz", "--data_dir", data_dir, "--dataset",
                "fashion_mnist", "--inception_weights", tmp_path / "picky.pt") == 2
    line = _one_line(capsys)
    assert "failed on uint8 images (48, 3, 28, 28)" in line and "299x299" in line


def test_fid_command_line_exit_status(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "fid.py"), "--samples",
                           str(tmp_path / "missing.npz"), "--classifier", "x.pt"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: --samples {tmp_path / 'missing.npz'} does not exist"]


# torch: the tools' first heavy import; absl: the flags, defined before `run_tool` handles
# Ctrl-C itself.
@pytest.mark.parametrize("module", ["torch", "absl"])
@pytest.mark.parametrize("script", ["tools/train_classifier.py", "tools/fid.py"])
def test_ctrl_c_while_starting_prints_one_line_and_exits_130(script, module):
    proc = run_interrupted_at_import(script, module, "--help")
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted (SIGINT)\n", "")
