"""The training script: configuration, command line, checkpoints, exact resumption, and a
short CPU run that must learn (its held-out loss against that of the exact scores)."""
import dataclasses
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from score_sde.checkpoint import read_checkpoint
from score_sde.config import from_dict, to_dict
from score_sde.datasets import load_dataset
from score_sde.models import SmallUNet
from score_sde.config import (apply_overrides, check_config, config_dir, find_config,
                              load_config_file, shipped_configs)
from score_sde.trainer import Trainer, TrainingError, ema_decay, learning_rate, train
from tests.problems import KERNELS, GaussianMixture, exact_score_fn

REPO = Path(__file__).resolve().parent.parent
STAT_LEVEL = 1e-3  # significance level of the statistical tests


def _toy_cfg(**training):
    cfg = load_config_file(str(REPO / "configs" / "toy.py"))
    base = dict(n_iters=40, batch_size=64, log_every=10, eval_every=20, eval_batches=2,
                sample_every=40, num_samples=200, checkpoint_every=10, snapshot_every=20,
                keep_snapshots=2, device="cpu")
    base.update(training)
    cfg = apply_overrides(cfg, {f"training.{k}": v for k, v in base.items()})
    return apply_overrides(cfg, {"data.num_samples": 2000,
                                 "model.kwargs": dict(hidden=32, num_layers=2)})


# Bitwise-identical CPU runs need a fixed thread count: MKL and OpenMP may otherwise drop
# threads under load, which changes the order of floating-point reductions. One thread: these
# small networks run several times faster on a shared CPU than with contended threads.
ENV = dict(os.environ, PYTHONPATH=str(REPO), MKL_DYNAMIC="FALSE", OMP_DYNAMIC="FALSE",
           OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # CPU tests
for _name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # a single process, even under torchrun
    ENV.pop(_name, None)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args, timeout=120):
    env = ENV
    return subprocess.run([sys.executable, "-m", "score_sde.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_config_round_trips_through_dict():
    cfg = _toy_cfg()
    assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == dataclasses.replace(cfg)
    with pytest.raises(ValueError, match="unknown training config fields"):
        from_dict({"training": {"n_iter": 3}})


def test_every_config_file_builds():
    names = shipped_configs()
    assert {p.stem for p in (REPO / "configs").glob("*.py")} == set(names) | {"__init__"}
    for name in names:
        path = find_config(name)
        assert path == find_config(f"{name}.py") == config_dir() / f"{name}.py"
        cfg = load_config_file(str(path))
        assert cfg.training.n_iters > 0, path
        check_config(cfg)


@pytest.mark.parametrize("name", ["cifar10_ncsnpp_cont", "cifar10_ncsnpp_deep"])
def test_ve_cifar_configs_scale_the_papers_noise_levels_with_the_data(name):
    # The paper's VE models see CIFAR-10 in [0, 1] with sigma from 0.01 to 50 (sigma_max about
    # the largest distance between two training images). Our pipeline gives [-1, 1], twice
    # as wide, and the network is told its input is centred: every sigma doubles.
    cfg = load_config_file(str(find_config(name)))
    paper_min, paper_max, width = 0.01, 50.0, 2.0  # width of [-1, 1] over that of [0, 1]
    assert cfg.model.kwargs["centered"] is True and cfg.sde.name == "ve"
    assert (cfg.sde.sigma_min, cfg.sde.sigma_max) == (width * paper_min, width * paper_max)


def test_train_writes_run_folder_and_is_finite(tmp_path):
    metrics = train(_toy_cfg(), str(tmp_path))
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["eval_loss"])
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "log.txt", "checkpoint.pt", "snapshots", "samples", "tb"} <= names
    assert [p.name for p in (tmp_path / "samples").iterdir()] == ["samples_00000040.png"]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        "snapshot_00000020.pt", "snapshot_00000040.pt"]
    state = read_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 40 and from_dict(state["config"]) == _toy_cfg()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"train/loss", "train/samples_per_s", "train/peak_mem_mib", "train/skipped_steps",
            "eval/loss_ema"} <= set(events.Tags()["scalars"])
    assert all(e.value > 0 for e in events.Scalars("train/peak_mem_mib"))


def _eight_gaussians():
    """The toy dataset's law, from FFJORD's definition: equal weights, centres
    2 sqrt(2) (cos k pi/4, sin k pi/4), standard deviation 0.5 / sqrt(2)."""
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = 2 * math.sqrt(2) * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture(torch.full((8,), 1 / 8, dtype=torch.float64), means,
                           torch.full((8,), 0.5 / math.sqrt(2), dtype=torch.float64))


def test_training_lowers_the_held_out_loss_towards_the_exact_scores(tmp_path):
    # The model learns: after 200 steps on the 8-Gaussian toy the EMA's denoising loss on the
    # 2000 held-out points, each scored with the same t and z before and after training, has
    # covered at least half of the way from the untrained network's loss down to that of the
    # exact score (the loss's minimum, from the closed-form mixture). A one-sided test at
    # level STAT_LEVEL on the per-sample values d = (before + exact) / 2 - after: the margin
    # is the normal quantile times d's Monte-Carlo standard error, estimated from the sample.
    trainer = Trainer(_toy_cfg(n_iters=200, sample_every=0, eval_every=200,
                               checkpoint_every=200, snapshot_every=200), str(tmp_path))
    x = trainer.eval_x.float()
    g = torch.Generator().manual_seed(1)
    t = trainer.loss_fn.sample_time(len(x), generator=g)[0].float()
    z = torch.randn(x.shape, generator=g)

    def losses(score_fn):
        with torch.no_grad():
            return trainer.loss_fn.per_sample(score_fn, x, t, z).double()

    exact = losses(exact_score_fn(_eight_gaussians(), KERNELS["vp"]))
    before = losses(trainer.score_fn(trainer.ema))
    metrics = trainer.run()
    after = losses(trainer.score_fn(trainer.ema))
    assert len(x) == 2000 and trainer.step == 200 and np.isfinite(metrics["eval_loss"])
    d = (before + exact) / 2 - after
    margin = stats.norm.isf(STAT_LEVEL) * d.std() / math.sqrt(len(d))
    assert d.mean() > margin, (before.mean(), after.mean(), exact.mean())


def _final_weights(workdir):
    state = read_checkpoint(Path(workdir) / "checkpoint.pt")
    return state["model"], state["ema"], state["optimizer"]["state"]


def _assert_same_state(a, b):
    for da, db in zip(a, b):
        flat_a = torch.nn.utils.parameters_to_vector([v.float().flatten() for v in _tensors(da)])
        flat_b = torch.nn.utils.parameters_to_vector([v.float().flatten() for v in _tensors(db)])
        assert torch.equal(flat_a, flat_b)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    return []


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    train(_toy_cfg(n_iters=40), str(tmp_path / "straight"))
    train(_toy_cfg(n_iters=20), str(tmp_path / "resumed"))
    train(_toy_cfg(n_iters=40), str(tmp_path / "resumed"))
    _assert_same_state(_final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed"))
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "start at step 0 " in log and "resuming from step 20 " in log  # appended


def test_relative_data_paths_are_recorded_as_absolute(tmp_path):
    # config.json is read by the tools from any folder: a relative path would find another
    # file there (or none), so the run records where its data really were.
    (tmp_path / "sub").mkdir()
    np.save(tmp_path / "sub" / "train.npy", np.zeros((50, 2), dtype=np.float32))
    out = subprocess.run([sys.executable, "-m", "score_sde.train", "--dataset", "array",
                          "--data_path", "sub/train.npy", "--workdir", "w", "--dry_run"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["data"]["data_path"] == str(tmp_path / "sub" / "train.npy")
    out = subprocess.run([sys.executable, "-m", "score_sde.train", "--dataset", "fashion_mnist",
                          "--data_dir", "./sub/../sub", "--dry_run"],
                         cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["data"]["data_dir"] == str(tmp_path / "sub")


def test_killed_process_resumes_exactly(tmp_path):
    # A real training process killed with SIGKILL after its first checkpoints, then restarted
    # with the same workdir, must end with the weights of an uninterrupted run.
    data = np.random.default_rng(0).normal(size=(3000, 2)).astype(np.float32)
    np.save(tmp_path / "train.npy", data)
    args = ["--sde", "vp", "--dataset", "array", "--data_path", str(tmp_path / "train.npy"),
            "--n_iters", "400", "--batch_size", "64", "--checkpoint_every", "25",
            "--snapshot_every", "100", "--sample_every", "0", "--eval_every", "200",
            "--log_every", "50", "--device", "cpu"]
    straight = _cli(*args, "--workdir", str(tmp_path / "straight"), timeout=300)
    assert straight.returncode == 0, straight.stderr
    env = ENV
    workdir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "score_sde.train", *args, "--workdir",
                             str(workdir)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        ckpt = workdir / "checkpoint.pt"
        if ckpt.exists() and read_checkpoint(ckpt)["step"] >= 50:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = read_checkpoint(workdir / "checkpoint.pt")["step"]
    assert 50 <= killed_at < 400
    resumed = _cli(*args, "--workdir", str(workdir), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_state(_final_weights(tmp_path / "straight"), _final_weights(workdir))


def test_resume_with_a_different_model_is_refused(tmp_path):
    train(_toy_cfg(n_iters=10), str(tmp_path))
    other = apply_overrides(_toy_cfg(n_iters=20), {"model.kwargs": dict(hidden=16, num_layers=2)})
    # The message names what differs (a resumed run of "the same" model puzzled users).
    with pytest.raises(RuntimeError, match=r"different model or SDE configuration \(model\."
                                           r"kwargs \{'hidden': 32, 'num_layers': 2\} -> "
                                           r"\{'hidden': 16, 'num_layers': 2\}\)"):
        train(other, str(tmp_path))


def test_resume_compares_only_the_sde_settings_the_sde_reads(tmp_path, capsys):
    # A VP run never reads sigma_min / sigma_max: a config differing only there is the same
    # run; a different beta_max is another SDE.
    train(_toy_cfg(n_iters=10), str(tmp_path))
    inert = apply_overrides(_toy_cfg(n_iters=20), {"sde.sigma_max": 123.0,
                                                   "sde.sigma_min": 0.5})
    capsys.readouterr()
    train(inert, str(tmp_path), quiet=True)
    assert capsys.readouterr().err == ""  # nor a changed-settings warning
    other = apply_overrides(_toy_cfg(n_iters=30), {"sde.beta_max": 10.0})
    with pytest.raises(RuntimeError, match=r"different model or SDE configuration \(sde\."
                                           r"beta_max 20.0 -> 10.0\); use a new --workdir"):
        train(other, str(tmp_path))


def test_a_config_rebuilt_from_config_json_resumes(tmp_path):
    # config.json stores the U-Net's ch_mult (1, 2) as [1, 2]: a config read back from it is
    # the same configuration, not a different model.
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(64, 1, 8, 8))
            .astype(np.float32))
    unet = dict(image_size=8, in_channels=1, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(), dropout=0.0)
    cfg = apply_overrides(_toy_cfg(n_iters=2, batch_size=8, eval_every=2, sample_every=0,
                                   checkpoint_every=2), {
        "data.dataset": "array", "data.data_path": str(tmp_path / "x.npy"),
        "data.num_samples": None, "model.name": "small_unet", "model.kwargs": unet})
    workdir = tmp_path / "run"
    train(cfg, str(workdir))
    again = from_dict(json.loads((workdir / "config.json").read_text()))
    assert again.model.kwargs["ch_mult"] == [1, 2]
    train(apply_overrides(again, {"training.n_iters": 4}), str(workdir))
    log = (workdir / "log.txt").read_text()
    assert "resuming from step 2 " in log and "settings changed" not in log
    assert read_checkpoint(workdir / "checkpoint.pt")["step"] == 4


def test_resume_past_n_iters_is_refused_and_leaves_the_run_as_it_was(tmp_path):
    train(_toy_cfg(n_iters=10), str(tmp_path))
    config, weights = (tmp_path / "config.json").read_text(), read_checkpoint(
        tmp_path / "checkpoint.pt")
    with pytest.raises(TrainingError, match=r"at step 10, past --n_iters 5; pass --n_iters 10 "
                                            r"or more"):
        train(_toy_cfg(n_iters=5), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == config
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == weights["step"] == 10
    # Already done: nothing runs, and the result is the finished run's (its saved metrics).
    assert train(_toy_cfg(n_iters=10), str(tmp_path)) == weights["metrics"]
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 10
    assert {"loss", "eval_loss"} <= set(weights["metrics"])


@pytest.mark.parametrize("field, value, message", [
    ("training.n_iters", 20.5, r"training.n_iters must be an integer, got float 20.5"),
    ("training.n_iters", True, r"training.n_iters must be an integer, got bool True"),
    ("training.batch_size", "32", r"training.batch_size must be an integer, got str '32'"),
    ("training.lr", math.inf, r"training.lr must be a finite number, got inf"),
    ("training.grad_clip", math.nan,
     r"training.grad_clip must be a finite number or inf, got nan"),
    ("training.grad_clip", -math.inf,
     r"training.grad_clip must be a finite number or inf, got -inf"),
    ("training.ema_rate", "0.999", r"training.ema_rate must be a number or None, got str"),
    ("training.bf16", 1, r"training.bf16 must be True or False, got int 1"),
    ("sde.beta_max", None, r"sde.beta_max must be a number, got NoneType None"),
    ("model.kwargs", [("hidden", 8)], r"model.kwargs must be a dict, got list"),
    ("data.num_samples", 2.0, r"data.num_samples must be an integer or None, got float 2.0"),
])
def test_config_values_of_the_wrong_type_are_refused(field, value, message):
    """Config files are Python: nothing but check_config stands between a float n_iters (no
    step ever equals it: no final checkpoint) and the loop."""
    check_config(_toy_cfg())
    with pytest.raises(ValueError, match=message):
        check_config(apply_overrides(_toy_cfg(), {field: value}))


def test_config_data_settings_the_dataset_does_not_use_are_refused():
    check_config(apply_overrides(_toy_cfg(), {"data.dataset": "array", "data.data_path": "x.npy"}))
    for overrides, message in (
            ({"data.dataset": "toy_moonz"}, r"unknown dataset 'toy_moonz'; accepted: "),
            ({"data.dataset": "toy_moonz", "data.data_dir": "/d"}, r"unknown dataset"),
            ({"data.data_dir": "/d"}, r"dataset 'toy_8gaussians' does not use data_dir"),
            ({"data.dataset": "cifar10", "data.data_path": "x.npy"},
             r"dataset 'cifar10' does not use data_path \(got 'x.npy'\)"),
            ({"data.dataset": "array", "data.data_path": "x.npy", "data.data_dir": "/d"},
             r"dataset 'array' does not use data_dir")):
        with pytest.raises(ValueError, match=message):
            check_config(apply_overrides(_toy_cfg(), overrides))


def test_a_class_conditional_run_that_would_drop_every_label_is_refused():
    cfg = apply_overrides(_toy_cfg(label_dropout=1.0), {"model.class_conditional": True})
    with pytest.raises(ValueError, match=r"^label_dropout 1 replaces every label by the null "
                                         r"label, so the class labels would never be trained"):
        check_config(cfg)
    check_config(apply_overrides(cfg, {"training.label_dropout": 0.999}))
    check_config(apply_overrides(_toy_cfg(label_dropout=1.0), {}))  # unconditional: inert


def test_infinite_grad_clip_means_no_clipping(tmp_path):
    """grad_clip = inf (clip_grad_norm_'s "no limit") is a valid config value, and trains
    exactly as grad_clip = 0 (the documented off switch) does."""
    check_config(_toy_cfg(grad_clip=math.inf))
    states = []
    for clip in (math.inf, 0.0):
        workdir = tmp_path / f"clip{clip}"
        train(_toy_cfg(n_iters=3, grad_clip=clip, sample_every=0), str(workdir), quiet=True)
        states.append(read_checkpoint(workdir / "checkpoint.pt")["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_model_flag_drops_the_config_s_model_kwargs(tmp_path):
    """toy.py's kwargs (hidden, num_layers) belong to its MLP; another model gets its own
    defaults."""
    out = _cli("--config", "toy", "--model", "small_unet", "--dry_run")
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["model"] == dict(resolved["model"], name="small_unet", kwargs={})
    same = json.loads(_cli("--config", "toy", "--model", "mlp", "--dry_run").stdout)
    toy = load_config_file(str(REPO / "configs" / "toy.py"))
    assert same["model"]["kwargs"] == toy.model.kwargs != {}


def test_workdir_under_a_file_exits_2(tmp_path):
    (tmp_path / "file").write_text("x")
    out = _cli("--dataset", "toy_moons", "--n_iters", "2", "--workdir",
               str(tmp_path / "file" / "w"))
    assert out.returncode == 2, out.stderr
    assert "lies under" in out.stderr and "which is a file, not a folder" in out.stderr


def test_dry_run_prints_resolved_config(tmp_path):
    out = _cli("--dataset", "toy_moons", "--sde", "ve", "--n_iters", "7", "--dry_run")
    assert out.returncode == 0, out.stderr
    resolved = json.loads(out.stdout)
    assert resolved["sde"]["name"] == "ve" and resolved["data"]["dataset"] == "toy_moons"
    assert resolved["training"]["n_iters"] == 7 and resolved["model"]["name"] == "mlp"
    assert resolved["workdir"] == os.path.join("runs", "ve_toy_moons")


def test_ve_on_cifar10_defaults_to_the_papers_ve_model_and_noise_levels():
    # The CIFAR-10 default is DDPM++ (VP); --sde ve takes NCSN++ with sigma 0.02 to 100 (data
    # in [-1, 1]) rather than that config with SDEConfig's 0.01 to 50.
    resolved = {}
    for sde in ("vp", "ve"):
        out = _cli("--dataset", "cifar10", "--sde", sde, "--dry_run")
        assert out.returncode == 0, out.stderr
        resolved[sde] = json.loads(out.stdout)
    kwargs = {sde: r["model"]["kwargs"] for sde, r in resolved.items()}
    assert (kwargs["vp"]["fir"], kwargs["vp"]["embedding_type"]) == (False, "positional")
    assert (kwargs["ve"]["fir"], kwargs["ve"]["embedding_type"]) == (True, "fourier")  # NCSN++
    assert resolved["ve"]["model"]["time_input"] == "std"
    ve = resolved["ve"]["sde"]
    assert (ve["name"], ve["sigma_min"], ve["sigma_max"]) == ("ve", 0.02, 100.0)


@pytest.mark.parametrize("args, message", [
    (["--importance_sampling"], "--importance_sampling needs --likelihood_weighting"),
    (["--dataset", "array"], "--dataset array needs --data_path"),
    (["--dataset", "array", "--data_path", "/nonexistent/x.npy"], "/nonexistent/x.npy"),
    (["--sde", "vpp"], "sde"),
    (["--n_iters", "0"], "n_iters"),
    (["--config", "/nonexistent/cfg.py"], "does not exist"),
    (["--dataset", "fashion_mnist", "--data_dir", "/nonexistent"], "dataset-fashion-mnist"),
    (["--device", "cuda:0"], "CUDA is not available"),  # ENV hides any GPU
    (["--class_conditional"], "--class_conditional needs a labelled dataset; 'toy_moons'"),
    (["--label_dropout", "0.2"], "--label_dropout needs --class_conditional"),
    (["--class_conditional", "--label_dropout", "1.5"], "label_dropout"),
    (["--max_nonfinite", "3"], "--max_nonfinite needs --skip_nonfinite"),
    (["--data_dir", "/tmp", "--dry_run"], "dataset 'toy_moons' does not use data_dir"),
    (["--dataset", "fashion_mnist", "--data_path", "x.npy", "--dry_run"],
     "dataset 'fashion_mnist' does not use data_path"),
    (["--sample_every", "0", "--sample_steps", "5"],
     "--sample_steps sets the sampler of the sample grids, which --sample_every 0 turns off"),
    (["--sample_every", "0", "--sampler", "pc"], "--sampler sets the sampler of the sample grids"),
    (["--bf16", "--device", "cpu"], "--bf16 autocast is for CUDA"),
    (["--bf16"], "--bf16 autocast is for CUDA; --device auto runs on cpu here"),  # ENV: no GPU
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    (["--device", "meta"], "--device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--lr", "inf"], "training.lr must be a finite number, got inf"),
    (["--compile_mode", "reduce-overhead"], "--compile_mode reduce-overhead needs --compile"),
    (["--compile", "--compile_mode", "fast"], "compile_mode"),
    (["--compile_scope", "blocks"], "--compile_scope blocks needs --compile"),
    (["--compile", "--compile_scope", "layers"], "compile_scope"),
    (["--config", ""], "--config is empty"),  # an unset shell variable: not the default
    (["--workdir", " "], "--workdir is empty"),
])
def test_bad_command_lines_exit_2_with_one_line(args, message, tmp_path):
    out = _cli("--workdir", str(tmp_path / "w"), "--dataset", "toy_moons", *args)
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_workdir_link_to_nowhere_exits_2_naming_its_target(tmp_path):
    (tmp_path / "w").symlink_to(tmp_path / "gone" / "run")
    out = _cli("--workdir", str(tmp_path / "w"), "--dataset", "toy_moons", "--n_iters", "1")
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.strip() == (f"error: --workdir {tmp_path / 'w'} is a link to "
                                  f"{tmp_path / 'gone' / 'run'}, which does not exist")
    out = _cli("--workdir", str(tmp_path / "w" / "run"), "--dataset", "toy_moons", "--n_iters",
               "1")
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert out.stderr.strip() == (f"error: --workdir {tmp_path / 'w' / 'run'} lies under "
                                  f"{tmp_path / 'w'}, a link to {tmp_path / 'gone' / 'run'}, "
                                  f"which does not exist")


# --- class-conditional training (classifier-free guidance's label dropout) --------------------

NUM_CLASSES = 10


def _idx(arr):
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + \
        arr.tobytes()


def _fashion_cfg(tmp_path, **training):
    """Tiny Fashion-MNIST IDX files (train 48, test 16 images) and a tiny class-conditional
    U-Net for them."""
    data_dir = tmp_path / "fashion"
    if not data_dir.exists():
        data_dir.mkdir()
        rng = np.random.default_rng(0)
        for stem, n in (("train", 48), ("t10k", 16)):
            (data_dir / f"{stem}-images-idx3-ubyte").write_bytes(
                _idx(rng.integers(0, 256, (n, 28, 28))))
            (data_dir / f"{stem}-labels-idx1-ubyte").write_bytes(
                _idx(rng.integers(0, NUM_CLASSES, n)))
    cfg = load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    base = dict(n_iters=3, batch_size=8, warmup=2, log_every=1, eval_every=3, eval_batches=1,
                sample_every=3, num_samples=12, checkpoint_every=1, snapshot_every=2,
                label_dropout=0.3, device="cpu")
    base.update(training)
    overrides = {f"training.{k}": v for k, v in base.items()}
    overrides.update({"data.data_dir": str(data_dir), "sde.num_steps": 25,
                      "model.class_conditional": True,
                      "model.kwargs": dict(nf=8, ch_mult=(1,), num_res_blocks=1,
                                           attn_resolutions=(), dropout=0.0)})
    return apply_overrides(cfg, overrides)


def test_class_conditional_model_gets_labels(tmp_path, monkeypatch):
    calls = []
    forward = SmallUNet.forward

    def spy(self, x, time_input, class_labels=None):
        calls.append((self.training, None if class_labels is None else class_labels.clone()))
        return forward(self, x, time_input, class_labels)

    monkeypatch.setattr(SmallUNet, "forward", spy)
    cfg = _fashion_cfg(tmp_path)
    train(cfg, str(tmp_path / "run"))
    assert all(labels is not None for _, labels in calls)
    trained = [labels for training, labels in calls if training]
    assert len(trained) == 3 and all(lab.shape == (8,) for lab in trained)
    assert all(0 <= lab.min() and lab.max() <= NUM_CLASSES for lab in trained)
    ema = [labels for training, labels in calls if not training]
    _, test_labels = load_dataset("fashion_mnist", split="test", data_dir=cfg.data.data_dir)[0][:8]
    assert torch.equal(ema[0], test_labels)  # held-out loss: the true labels, no dropout
    assert len(ema) == 1 + 20  # then the sample grid: 20 DPM-Solver steps, cyclic labels
    assert all(torch.equal(lab, torch.arange(12) % NUM_CLASSES) for lab in ema[1:])
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["model"]["label_embed.table.weight"].shape[0] == NUM_CLASSES + 1


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compile_scope_reaches_the_trainer(scope, tmp_path):
    # torch.compile compiles on the first call: building the trainer compiles nothing.
    from score_sde.models import REPEATED_BLOCKS
    trainer = Trainer(_fashion_cfg(tmp_path, compile=True, compile_scope=scope),
                      str(tmp_path / "run"))
    blocks = [m for m in trainer.model.modules() if isinstance(m, REPEATED_BLOCKS)]
    assert blocks and all((m._compiled_call_impl is not None) == (scope == "blocks")
                          for m in blocks)
    assert (trainer.forward is trainer.model) == (scope == "blocks")
    assert not any(m._compiled_call_impl is not None for m in trainer.ema.modules())


def test_label_dropout_rate_and_shards(tmp_path):
    # Over 200 steps x 8 labels, the share replaced by the null label is Binomial(1600, p);
    # kept labels are the data's.
    p = 0.3
    trainer = Trainer(_fashion_cfg(tmp_path, label_dropout=p), str(tmp_path / "run"))
    dropped = total = 0
    for step in range(200):
        x, labels = trainer.step_batch(step)
        true = trainer.train_y[trainer.order.global_indices(step)]
        null = labels == NUM_CLASSES
        assert torch.equal(labels[~null], true[~null]) and x.shape == (8, 1, 28, 28)
        dropped, total = dropped + int(null.sum()), total + len(labels)
    assert stats.binomtest(dropped, total, p).pvalue > STAT_LEVEL, dropped / total
    x0, labels0 = trainer.step_batch(5)
    x1, labels1 = trainer.step_batch(5)  # a pure function of the step
    assert torch.equal(x0, x1) and torch.equal(labels0, labels1)
    trainer = Trainer(_fashion_cfg(tmp_path, label_dropout=0.0), str(tmp_path / "run"))
    assert int((trainer.step_batch(3)[1] == NUM_CLASSES).sum()) == 0
    with pytest.raises(ValueError, match="label_dropout 1 replaces every label"):
        Trainer(_fashion_cfg(tmp_path, label_dropout=1.0), str(tmp_path / "run"))


def test_class_conditional_resume_is_exact(tmp_path):
    common = dict(sample_every=0, eval_every=10)
    train(_fashion_cfg(tmp_path, n_iters=4, **common), str(tmp_path / "straight"))
    train(_fashion_cfg(tmp_path, n_iters=2, **common), str(tmp_path / "resumed"))
    train(_fashion_cfg(tmp_path, n_iters=4, **common), str(tmp_path / "resumed"))
    _assert_same_state(_final_weights(tmp_path / "straight"), _final_weights(tmp_path / "resumed"))


def test_class_labels_come_from_the_config_only(tmp_path):
    cfg = apply_overrides(_toy_cfg(), {"model.kwargs": dict(hidden=8, num_classes=3)})
    with pytest.raises(ValueError, match="must not set num_classes; use --class_conditional"):
        train(cfg, str(tmp_path))
    cfg = apply_overrides(_toy_cfg(), {"model.class_conditional": True})
    with pytest.raises(ValueError, match="needs a labelled dataset; 'toy_8gaussians'"):
        train(cfg, str(tmp_path))


# --- non-finite steps -------------------------------------------------------------------------

class _NanGrad(torch.autograd.Function):
    """Identity whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _poison(monkeypatch, bad_steps):
    """Makes the loss of `bad_steps` NaN ("loss") or its gradient NaN ("grad")."""
    train_loss = Trainer.train_loss

    def poisoned(self, x, labels, generator):
        loss = train_loss(self, x, labels, generator)
        kind = bad_steps.get(self.step)
        if kind == "loss":
            return loss * float("nan")
        return _NanGrad.apply(loss) if kind == "grad" else loss

    monkeypatch.setattr(Trainer, "train_loss", poisoned)


def test_out_of_memory_in_a_sample_grid_keeps_that_steps_checkpoint(tmp_path, monkeypatch):
    # The CPU allocator's error (a RuntimeError, as torch raises it) during step 20's samples:
    # one TrainingError naming the memory and the knobs, with step 20's checkpoint written
    # before the grid was drawn.
    def no_memory(self, report):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                           "4800000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(Trainer, "write_samples", no_memory)
    with pytest.raises(TrainingError, match=r"out of memory on cpu after step 20 \("
                                            r"DefaultCPUAllocator.*lower --batch_size \(now 64\)"
                                            r" or the config's num_samples \(now 200\); the "
                                            r"last good checkpoint \(step 20\) is kept"):
        train(_toy_cfg(n_iters=40, sample_every=20), str(tmp_path / "a"))
    assert read_checkpoint(tmp_path / "a" / "checkpoint.pt")["step"] == 20
    assert "out of memory" in (tmp_path / "a" / "log.txt").read_text()
    # At the last step too, with the samples still to do: the rerun draws them and is done.
    cfg = _toy_cfg(n_iters=40, checkpoint_every=30, sample_every=40)
    with pytest.raises(TrainingError, match=r"after step 40 .* checkpoint \(step 40\) is kept"):
        train(cfg, str(tmp_path / "b"))
    state = read_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state["step"] == 40 and state["final_work_pending"] == ["eval", "samples"]
    monkeypatch.undo()
    train(cfg, str(tmp_path / "b"))
    assert not read_checkpoint(tmp_path / "b" / "checkpoint.pt")["final_work_pending"]
    assert (tmp_path / "b" / "samples" / "samples_00000040.png").is_file()


def test_config_json_is_replaced_whole_and_a_failure_names_it(tmp_path, monkeypatch):
    import errno

    import score_sde.cli
    import score_sde.trainer

    train(_toy_cfg(n_iters=10, sample_every=0), str(tmp_path))
    before = (tmp_path / "config.json").read_text()

    def full_disk(tmp):  # write_atomic's writer: a disk that fills after 100 bytes
        tmp.write_text(before[:100])
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(score_sde.trainer, "write_json",
                        lambda path, obj: score_sde.cli.write_atomic(path, full_disk))
    with pytest.raises(OSError, match=rf"cannot write {re.escape(str(tmp_path))}/config.json: "
                                      rf"File too large"):
        train(_toy_cfg(n_iters=20, sample_every=0), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_nonfinite_steps_stop_or_are_skipped(tmp_path, monkeypatch):
    _poison(monkeypatch, {2: "loss", 3: "grad", 6: "loss"})
    fast = dict(n_iters=8, sample_every=0, eval_every=8, log_every=4, num_samples=10)
    with pytest.raises(TrainingError, match="non-finite loss at step 3; no checkpoint was "
                                            "written before .*--skip_nonfinite"):
        train(_toy_cfg(**fast), str(tmp_path / "stop"))
    assert not (tmp_path / "stop" / "checkpoint.pt").exists()  # no checkpoint after step 2

    metrics = train(_toy_cfg(skip_nonfinite=True, **fast), str(tmp_path / "skip"))
    assert metrics["skipped_steps"] == 3 and np.isfinite(metrics["loss"])
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert "step 3 skipped: non-finite loss at step 3 (1 in a row, 1 in all)" in log
    assert "step 4 skipped: non-finite gradient norm at step 4 (2 in a row, 2 in all)" in log
    assert "step 7 skipped: non-finite loss at step 7 (1 in a row, 3 in all)" in log
    state = read_checkpoint(tmp_path / "skip" / "checkpoint.pt")
    assert state["skipped"] == 3 and state["step"] == 8
    assert all(s["step"] == 5 for s in state["optimizer"]["state"].values())  # Adam updates
    assert all(torch.isfinite(v).all() for v in state["model"].values())

    with pytest.raises(TrainingError, match="2 skipped steps in a row, more than "
                                            "max_nonfinite=1"):
        train(_toy_cfg(skip_nonfinite=True, max_nonfinite=1, **fast), str(tmp_path / "many"))


class _Lines:
    def __init__(self):
        self.lines = []

    def line(self, text):
        self.lines.append(text)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_a_nonfinite_step_changes_no_state(tmp_path, monkeypatch, fused, kind):
    # Fused Adam skips the step on the device and the host reads the outcome later (settle);
    # the unfused path decides at once. Either way weights, EMA and Adam moments are untouched.
    if not fused:
        import score_sde.trainer as train_module

        monkeypatch.setattr(train_module, "make_adam",
                            lambda *a, **k: (torch.optim.Adam(*a, **k), False))
    _poison(monkeypatch, {1: kind})
    trainer = Trainer(_toy_cfg(skip_nonfinite=True), str(tmp_path))
    assert trainer.fused_adam == fused
    report = _Lines()
    trainer.train_step(report)  # step 0: a real update

    def snapshot():
        return ([p.clone() for p in trainer.model.parameters()],
                [p.clone() for p in trainer.ema.parameters()],
                [{k: v.clone() for k, v in st.items()} for st in trainer.optimizer.state.values()])

    before = snapshot()
    trainer.train_step(report)  # step 1: poisoned
    after = snapshot()
    for a, b in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(a, b)
    for sa, sb in zip(before[2], after[2]):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    trainer.settle(report)
    assert trainer.skipped == 1 and trainer.nonfinite_streak == 1
    what = "loss" if kind == "loss" else "gradient norm"
    assert report.lines == [f"step 2 skipped: non-finite {what} at step 2 (1 in a row, 1 in all)"]
    trainer.train_step(report)  # step 2: updates again
    trainer.settle(report)
    assert trainer.nonfinite_streak == 0
    assert not torch.equal(after[0][0], next(trainer.model.parameters()))


@pytest.mark.parametrize("sampler, steps, evaluations", [
    ("dpm_solver", None, 20),  # the default: cheap grids
    ("dpm_solver", 7, 7),
    ("pc", 9, 9),  # one evaluation per Euler-Maruyama step; the last step drops its noise
])
def test_sample_grid_sampler_and_its_evaluations(tmp_path, monkeypatch, sampler, steps,
                                                 evaluations):
    trainer = Trainer(_toy_cfg(sampler=sampler, sample_steps=steps, num_samples=10),
                      str(tmp_path))
    calls = []
    forward = type(trainer.ema).forward

    def counting(self, *args, **kwargs):
        calls.append(self is trainer.ema)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(trainer.ema), "forward", counting)
    x = trainer.sample_grid()
    assert x.shape == (10, 2) and torch.isfinite(x).all()
    assert len(calls) == evaluations and all(calls)  # the EMA weights


@pytest.mark.parametrize("field, value, message", [
    ("sampler", "ddim", "unknown sampler 'ddim'; accepted: 'dpm_solver', 'pc'"),
    ("sample_steps", 0, "sample_steps must be >= 1 or None"),
])
def test_sample_grid_settings_are_checked(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_config(_toy_cfg(**{field: value}))


def test_learning_rate_schedule_closed_form():
    cfg = apply_overrides(_toy_cfg(n_iters=1100), {"training.lr": 2e-3, "training.warmup": 100,
                                                   "training.lr_decay": "none"})
    assert learning_rate(0, cfg) == pytest.approx(2e-3 / 100)
    assert learning_rate(49, cfg) == pytest.approx(1e-3)
    assert learning_rate(700, cfg) == pytest.approx(2e-3)  # constant after warm-up
    cos = apply_overrides(cfg, {"training.lr_decay": "cosine", "training.lr_final": 0.1})
    # lr (f + (1 - f) (1 + cos(pi p)) / 2) with p = (step - warmup) / (n_iters - warmup)
    assert learning_rate(99, cos) == pytest.approx(2e-3)
    assert learning_rate(100, cos) == pytest.approx(2e-3)
    assert learning_rate(600, cos) == pytest.approx(2e-3 * 0.55)
    assert learning_rate(350, cos) == pytest.approx(2e-3 * (0.1 + 0.9 * (1 + 2 ** -0.5) / 2))
    assert learning_rate(1100, cos) == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="unknown lr_decay 'linear'"):
        train(apply_overrides(cfg, {"training.lr_decay": "linear"}), "unused")
    with pytest.raises(ValueError, match="lr_final must lie in"):
        train(apply_overrides(cos, {"training.lr_final": 1.5}), "unused")


def test_ema_warmup_closed_form():
    assert ema_decay(0, 0.999, True) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema_decay(90, 0.999, True) == pytest.approx(0.91)
    assert ema_decay(8991, 0.999, True) == pytest.approx(0.999)
    assert ema_decay(10 ** 6, 0.999, True) == 0.999
    assert ema_decay(0, 0.999, False) == 0.999
    # With warm-up, the weight left on the initial parameters after n updates is
    # prod_k (1 + k) / (10 + k) = 9! n! / (n + 9)!, about 3.6e5 / n^9: none after 4000 updates.
    keep = math.prod(ema_decay(k, 0.999, True) for k in range(4000))
    assert keep == pytest.approx(math.factorial(9) * math.factorial(3999) /
                                 math.factorial(4008), rel=1e-9)
    assert keep < 1e-25 < 0.999 ** 4000


def test_ema_update_of_a_copy_that_still_requires_grad():
    """ema <- rate ema + (1 - rate) model, in place, on a plain deep copy of the model (whose
    parameters still require gradients)."""
    import copy

    from score_sde.optim import ema_update

    model = torch.nn.Linear(3, 2)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for e, b, m in zip(ema.parameters(), before, model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * m.detach(), rtol=1e-6, atol=1e-7)
        assert e.requires_grad


def test_resume_with_changed_settings_warns_naming_them(tmp_path):
    def warnings():
        return [line for line in (tmp_path / "log.txt").read_text().splitlines()
                if "resuming with settings changed" in line]

    # A constant learning rate after warm-up: the run's length changes nothing else.
    train(_toy_cfg(n_iters=10, lr_decay="none"), str(tmp_path))
    # Length, logging and the like change nothing the run computes: no warning.
    train(_toy_cfg(n_iters=20, log_every=5, lr_decay="none"), str(tmp_path))
    assert warnings() == []
    changed = apply_overrides(_toy_cfg(n_iters=30, lr_decay="none"),
                              {"training.lr": 5e-4, "data.dataset": "toy_moons"})
    train(changed, str(tmp_path))
    (warning,) = warnings()
    assert "training.lr 0.001 -> 0.0005" in warning
    assert "data.dataset 'toy_8gaussians' -> 'toy_moons'" in warning
    assert "n_iters" not in warning and "log_every" not in warning


def test_resume_on_other_data_under_the_same_path_warns(tmp_path):
    # The settings name a file; replacing the file's contents changes the run all the same.
    path = tmp_path / "points.npy"
    np.save(path, np.random.default_rng(0).normal(size=(400, 2)).astype(np.float32))
    cfg = apply_overrides(_toy_cfg(n_iters=10, lr_decay="none", sample_every=0), {
        "data.dataset": "array", "data.data_path": str(path), "data.num_samples": None})
    workdir = tmp_path / "run"
    train(cfg, str(workdir))
    train(apply_overrides(cfg, {"training.n_iters": 20}), str(workdir))  # same data: silent
    np.save(path, np.random.default_rng(1).normal(size=(1000, 2)).astype(np.float32) + 5)
    train(apply_overrides(cfg, {"training.n_iters": 30}), str(workdir))
    # Another seed splits the same file differently: the seed alone is named.
    train(apply_overrides(cfg, {"training.n_iters": 40, "training.seed": 7}), str(workdir))
    warnings = [line for line in (workdir / "log.txt").read_text().splitlines()
                if "resuming with settings changed" in line]
    assert len(warnings) == 2
    assert "the training data: same settings, other contents (" in warnings[0]
    assert "training.seed 0 -> 7" in warnings[1] and "training data" not in warnings[1]


def test_changed_settings_that_change_the_run():
    """n_iters changes the run where the learning rate decays over it (the cosine reaches
    lr_final at n_iters), not with a constant rate; the memory layout never does; a data
    folder counts by where it leads."""
    from score_sde.datasets import FASHION_MNIST_DIR
    from score_sde.config import changed_settings

    def cfg(**training):
        c = to_dict(_toy_cfg())
        return {**c, "training": {**c["training"], **training}}

    assert changed_settings(cfg(n_iters=10, lr_decay="none"),
                            cfg(n_iters=20, lr_decay="none")) == []
    cosine = dict(lr_decay="cosine", warmup=5)
    assert changed_settings(cfg(n_iters=10, **cosine), cfg(n_iters=20, **cosine),
                            step=6) == ["training.n_iters 10 -> 20"]
    # Steps inside the warm-up ran at rates that do not depend on n_iters.
    assert changed_settings(cfg(n_iters=10, **cosine), cfg(n_iters=20, **cosine), step=5) == []
    assert changed_settings(cfg(channels_last=False), cfg(channels_last=True)) == []

    def data(**fields):
        c = to_dict(_toy_cfg())
        return {**c, "data": {**c["data"], "dataset": "fashion_mnist", **fields}}

    assert changed_settings(data(data_dir=None), data(data_dir=FASHION_MNIST_DIR + "/")) == []
    assert changed_settings(data(data_dir=None), data(data_dir="/elsewhere")) == [
        "data.data_dir None -> '/elsewhere'"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX file locks")
def test_a_second_run_on_a_busy_workdir_stops_before_touching_it(tmp_path):
    """While one process holds the run folder (its flock on train.lock), a run started there
    stops at once with the holder's PID: no log line, no checkpoint, exit status 2. Once the
    holder is gone the folder is free again."""
    import fcntl

    with open(tmp_path / "train.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("12345\n")
        holder.flush()
        with pytest.raises(TrainingError, match=r"is in use by another training run \(process "
                                                r"12345\); wait for it to end"):
            train(_toy_cfg(n_iters=2), str(tmp_path), quiet=True)
        out = _cli("--config", "toy", "--workdir", str(tmp_path), "--n_iters", "2", "--quiet")
        assert out.returncode == 2 and "in use by another training run" in out.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["train.lock"]
    train(_toy_cfg(n_iters=2, sample_every=0), str(tmp_path), quiet=True)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    # The run let go of the lock when it ended: the next one in this process takes it.
    train(_toy_cfg(n_iters=3, sample_every=0), str(tmp_path), quiet=True)
    assert read_checkpoint(tmp_path / "checkpoint.pt")["step"] == 3
