"""tools/likelihood.py: smoke run, closed-form numbers, bits/dim, resume, errors, torchrun.

Ground truth: the exact score of a Gaussian mixture (tests/problems.py) for the core function,
and for the command line an image model whose output is exactly zero with prediction "score":
its probability-flow ODE is dx/dt = -beta(t) x / 2, so z = a x with a = exp(-B / 2),
B = int_eps^1 beta, and log p(y) = log N(a y; 0, I) + D log a in closed form.
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

import score_sde
from score_sde.checkpoint import read_checkpoint, save_checkpoint
from score_sde.config import to_dict
from score_sde.datasets import DataInfo, load_dataset
from score_sde.build import build_model
from score_sde.config import apply_overrides, load_config_file
from tests.problems import (KERNELS, GaussianMixture, exact_log_prob_t, exact_score_fn,
                            random_mixture)
from tests.scripts import load_script
from tests.test_tool_sample import CPU_OUT_OF_MEMORY, run_interrupted_at_import

REPO = Path(__file__).resolve().parent.parent
tool = load_script("tools/likelihood.py")

# One thread per process: on a shared, loaded CPU, OpenMP threads of small convolutions spin
# against each other and a solve slows down tenfold.
# These are the CPU tests (the tool's default device "auto" would pick a GPU where there is
# one; tests/test_cuda.py covers that path).
ENV = dict(os.environ, PYTHONPATH=str(REPO), MKL_DYNAMIC="FALSE", OMP_DYNAMIC="FALSE",
           OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
EPS = 1e-5
FAST = ["--rtol", "1e-3", "--atol", "1e-3"]  # where the tolerance is not what is tested
FIELDS = {"nll_nats", "stderr", "stderr_samples", "bpd", "bpd_stderr", "n", "num_data",
          "nfe_mean", "nfe_total", "seconds", "solve_seconds", "complete", "checkpoint", "step",
          "use_ema", "sde", "model", "dataset", "split", "data_source", "data_sha256", "num_dims",
          "batch_size", "divergence", "num_probes", "method", "rtol", "atol", "eps",
          "num_repeats", "seed", "dequantization", "data_width", "num_levels", "class_labels",
          "world_size", "device", "weights_sha256", "noise_seeding"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _main(*args):
    args = list(map(str, args))
    if "--device" not in args:
        args += ["--device", "cpu"]
    return tool.main(["likelihood.py", *args])


def _one_line(capsys):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


# --- 1. smoke test --------------------------------------------------------------------------

def test_smoke_command_line_on_toy_checkpoint(toy_run, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "likelihood.py"), "--workdir", str(toy_run),
         "--num_samples", "32", "--batch_size", "16", "--output", str(out),
         "--partial_dir", str(tmp_path / "partial")],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert FIELDS <= set(result)
    for name in ("nll_nats", "stderr", "stderr_samples", "nfe_mean", "seconds"):
        assert math.isfinite(result[name]), name
    assert result["bpd"] is None and result["bpd_stderr"] is None  # continuous data
    assert result["complete"] and result["n"] == result["num_data"] == 32
    assert result["dataset"] == "toy_8gaussians" and result["split"] == "test"
    assert result["step"] == 10 and result["use_ema"] is True
    # The paper's protocol is the default; continuous data takes one pass.
    assert (result["rtol"], result["atol"], result["eps"]) == (1e-5, 1e-5, 1e-5)
    assert result["divergence"] == "rademacher" and result["num_probes"] == 1
    assert result["method"] == "dopri5" and result["num_repeats"] == 1
    assert result["nfe_total"] == 2 * result["nfe_mean"]  # two batches
    assert len(list((tmp_path / "partial").glob("*.rank0.jsonl"))) == 1
    # For people, one line on stderr with the JSON's numbers.
    assert proc.stderr.strip().splitlines()[-1] == (
        f"NLL {result['nll_nats']:.2f} ± {result['stderr']:.2f} nats, n = 32 (32 samples x 1 "
        f"passes), mean NFE {result['nfe_mean']:.1f}, {result['seconds']:.1f} s")


def test_summary_line_of_an_image_result():
    result = dict(nll_nats=2012.345, stderr=3.21, bpd=3.70126, bpd_stderr=0.00594, n=500,
                  num_data=100, num_repeats=5, nfe_mean=468.25, seconds=812.44)
    assert tool.summary_line(result) == ("NLL 2012.35 ± 3.21 nats, 3.7013 ± 0.0059 bits/dim, "
                                         "n = 500 (100 samples x 5 passes), mean NFE 468.2, "
                                         "812.4 s")
    single = dict(result, stderr=None, bpd_stderr=None, n=1, num_data=1, num_repeats=1)
    assert tool.summary_line(single).startswith("NLL 2012.35 nats, 3.7013 bits/dim, n = 1 ")


# --- 2. numbers against closed forms ----------------------------------------------------------

# dopri5 takes about 6 evaluations per accepted step (FSAL) and holds each step's local error
# in -log p to rtol |log p| + atol; summed over the steps, those local tolerances estimate the
# global error (an estimate, not a guarantee: BENCHMARKS.md shows estimates missing the error
# at mode switches at 1e-5; at 1e-7 the steps resolve them).
TIGHT_TOL = 1e-7
DEFAULT_TOL = 1e-5  # the tool's default rtol and atol
DOPRI5_EVALS_PER_STEP = 6


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_core_matches_exact_mixture_nll(name):
    # Exact score and exact divergence: each reported NLL is the exact -log p_eps(x) once the
    # prior term is swapped for the exact density of the diffused data at T (as in
    # tests/test_likelihood.py); z comes from the package's data_to_latent.
    sde = {"vp": score_sde.VPSDE, "ve": score_sde.VESDE}[name]()
    mixture, kernel = random_mixture(2, seed=11), KERNELS[name]
    score_fn = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(12, torch.Generator().manual_seed(0), dtype=torch.float32)
    records = tool.evaluate(sde, score_fn, x, prepare=tool._prepare_continuous, batch_size=5,
                            num_repeats=1, divergence="exact", eps=EPS)
    assert [(r["repeat"], r["batch"]) for r in records] == [(0, 0), (0, 1), (0, 2)]
    nll = torch.tensor([v for r in records for v in r["nll"]], dtype=torch.float64)
    z, _ = score_sde.data_to_latent(sde, score_fn, x.double(), eps=EPS)
    swap = exact_log_prob_t(mixture, kernel, z, sde.T) - sde.prior_logp(z)
    exact = -(exact_log_prob_t(mixture, kernel, x.double(), EPS) - swap)
    # Within the summed local tolerances of the costliest batch at the tool's default
    # rtol = atol (see DOPRI5_EVALS_PER_STEP), far below the NLLs' spread.
    steps = max(r["nfe"] for r in records) / DOPRI5_EVALS_PER_STEP
    bound = steps * (DEFAULT_TOL * exact.abs().max().item() + DEFAULT_TOL)
    assert (exact.max() - exact.min()).item() > 100 * bound
    assert (nll - exact).abs().max().item() < bound
    info = DataInfo("array", (2,), False, None, None, None)
    summary = tool.summarize(records, num_data=12, num_repeats=1, info=info)
    assert abs(summary["nll_nats"] - exact.mean().item()) < bound
    assert summary["bpd"] is None and summary["n"] == 12


# The paper's priors: N(0, I) for VP, N(0, sigma_max^2 I) with sigma_max = 50 for VE.
PRIOR_STDS = {"vp": 1.0, "ve": 50.0}


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_core_matches_the_closed_form_flow_of_a_gaussian(name):
    # Data N(mu, s^2 I) stay Gaussian, p_t = N(a mu, (a^2 s^2 + v) I), and the probability-flow
    # ODE keeps (x_t - a mu) / sqrt(a^2 s^2 + v) constant, so the latent z of each x is known in
    # closed form too. With the exact score the reported NLL must then be
    # -log p_eps(x) + log p_T(z) - log N(z; 0, prior_std^2 I): no number here comes from the
    # package, unlike the mixture test above, whose z is the package's own solve.
    sde = {"vp": score_sde.VPSDE, "ve": score_sde.VESDE}[name]()
    mu, s = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
    gaussian = GaussianMixture(torch.ones(1, dtype=torch.float64), mu[None],
                               torch.tensor([s], dtype=torch.float64))
    kernel = KERNELS[name]
    x, _ = gaussian.sample(12, torch.Generator().manual_seed(0), dtype=torch.float32)
    records = tool.evaluate(sde, exact_score_fn(gaussian, kernel), x.double(),
                            prepare=tool._prepare_continuous, batch_size=5, num_repeats=1,
                            divergence="exact", eps=EPS, rtol=TIGHT_TOL, atol=TIGHT_TOL)
    nll = torch.tensor([v for r in records for v in r["nll"]], dtype=torch.float64)
    (a_eps, v_eps), (a_T, v_T) = (kernel(torch.tensor(t, dtype=torch.float64))
                                  for t in (EPS, sde.T))
    std_eps, std_T = (torch.sqrt(a ** 2 * s ** 2 + v) for a, v in ((a_eps, v_eps), (a_T, v_T)))
    z = a_T * mu + std_T / std_eps * (x.double() - a_eps * mu)

    def expected_nll(z):
        prior = torch.distributions.Normal(0.0, PRIOR_STDS[name]).log_prob(z).sum(1)
        return -(exact_log_prob_t(gaussian, kernel, x.double(), EPS)
                 - exact_log_prob_t(gaussian, kernel, z, sde.T) + prior)

    exact = expected_nll(z)
    steps = max(r["nfe"] for r in records) / DOPRI5_EVALS_PER_STEP
    bound = steps * (TIGHT_TOL * exact.abs().max().item() + TIGHT_TOL)
    assert (nll - exact).abs().max().item() < bound
    # The check sees the latents: latents 1% off would fail it.
    assert (expected_nll(1.01 * z) - exact).abs().max().item() > 10 * bound


def test_summary_statistics_hand_computed():
    # Two samples, two passes: NLLs 1, 2 (pass 0) and 3, 4 (pass 1).
    records = [{"repeat": 1, "batch": 0, "nll": [3.0, 4.0], "nfe": 10, "seconds": 1.0},
               {"repeat": 0, "batch": 0, "nll": [1.0, 2.0], "nfe": 20, "seconds": 2.0}]
    info = DataInfo("array", (3,), False, None, None, None)
    s = tool.summarize(records, num_data=2, num_repeats=2, info=info)
    assert s["nll_nats"] == 2.5 and s["n"] == 4
    assert s["stderr"] == pytest.approx(math.sqrt(5 / 3) / 2)  # std(1, 2, 3, 4) / sqrt(4)
    assert s["stderr_samples"] == pytest.approx(0.5)  # per-sample means 2 and 3
    assert s["nfe_mean"] == 15 and s["nfe_total"] == 30 and s["solve_seconds"] == 3.0
    # 8-bit data in [-1, 1]: bpd = nll / (D ln 2) - 1 + 8.
    info = DataInfo("img", (3,), True, 256, (-1.0, 1.0), None)
    s = tool.summarize(records, num_data=2, num_repeats=2, info=info)
    assert s["bpd"] == pytest.approx(2.5 / (3 * math.log(2)) + 7)
    assert s["bpd_stderr"] == pytest.approx(s["stderr"] / (3 * math.log(2)))


# --- 3. bits/dim through the image path ---------------------------------------------------

def _idx(arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def zero_image_run(tmp_path_factory):
    """A workdir whose small U-Net outputs exactly zero (prediction "score"), plus fake
    Fashion-MNIST IDX files (4 test images) for it."""
    root = tmp_path_factory.mktemp("zero_image_run")
    data_dir = root / "fashion"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for split, stem, n in (("train", "train", 2), ("test", "t10k", 4)):
        (data_dir / f"{stem}-images-idx3-ubyte").write_bytes(
            _idx(rng.integers(0, 256, (n, 28, 28))))
        (data_dir / f"{stem}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, n)))
    cfg = load_config_file(str(REPO / "configs" / "fashion_mnist.py"))
    cfg = apply_overrides(cfg, {"data.data_dir": str(data_dir), "model.prediction": "score",
                                "model.time_input": "t",
                                "model.kwargs": dict(nf=8, ch_mult=(1, 1, 1), num_res_blocks=1,
                                                     attn_resolutions=(), dropout=0.0)})
    _, info = load_dataset("fashion_mnist", split="test", data_dir=str(data_dir))
    model = build_model(cfg, info)
    with torch.no_grad():
        model.conv_out.weight.zero_()
        model.conv_out.bias.zero_()
    weights = model.state_dict()
    save_checkpoint({"model": weights, "ema": weights, "optimizer": {}, "step": 7,
                     "config": to_dict(cfg)}, root / "checkpoint.pt")
    return root


def test_a_conditional_run_without_label_dropout_is_refused(zero_image_run, tmp_path, capsys):
    # Evaluated with the null label, which label_dropout 0 never trains: no number, one line.
    from score_sde.checkpoint import read_checkpoint

    state = read_checkpoint(zero_image_run / "checkpoint.pt")
    state["config"]["model"]["class_conditional"] = True
    state["config"]["training"]["label_dropout"] = 0.0
    save_checkpoint(state, tmp_path / "c.pt")
    assert _main("--checkpoint", tmp_path / "c.pt", "--workdir", tmp_path / "w",
                 "--data_dir", zero_image_run / "fashion", "--num_samples", 2) == 2
    assert _one_line(capsys) == (
        f"error: {tmp_path / 'c.pt'} is class-conditional and was trained with label_dropout 0: "
        f"the null label it is evaluated with (the unconditional model) was never trained; "
        f"train with --label_dropout > 0 (e.g. 0.1)")


def test_image_path_bits_per_dim_closed_form(zero_image_run, tmp_path):
    out = tmp_path / "r.json"
    assert _main("--workdir", zero_image_run, "--num_samples", 2, "--batch_size", 2,
                 "--output", out, "--partial_dir", tmp_path / "partial") == 0
    r = json.loads(out.read_text())
    d = 28 * 28
    assert (r["num_dims"], r["num_data"], r["num_repeats"], r["n"]) == (d, 2, 5, 10)
    assert r["dequantization"] == "uniform" and r["data_width"] == 2.0
    assert r["num_levels"] == 256 and r["dataset"] == "fashion_mnist" and r["step"] == 7
    # The reported numbers obey bpd = nll / (D ln 2) - log2(2) + log2(256).
    assert r["bpd"] == pytest.approx(r["nll_nats"] / (d * math.log(2)) - 1 + 8, abs=1e-9)
    assert r["bpd_stderr"] == pytest.approx(r["stderr"] / (d * math.log(2)), rel=1e-9)
    # Hand-computed: -log p(y) = D/2 log(2 pi) + a^2 |y|^2 / 2 + D B / 2, with a^2 |y|^2 / 2
    # below D e^-B / 2 (|y| <= sqrt(D)), i.e. < 3e-5 bits/dim.
    big_b = 0.1 * (1 - EPS) + (20.0 - 0.1) * (1 - EPS ** 2) / 2
    expected = 0.5 * math.log2(2 * math.pi) + big_b / (2 * math.log(2)) + 7
    # Plus the solver's error: at most the summed local tolerances of the costliest solve, in
    # bits/dim (see DOPRI5_EVALS_PER_STEP).
    lines = [json.loads(s) for p in (tmp_path / "partial").iterdir()
             for s in p.read_text().splitlines()]
    steps = max(rec["nfe"] for rec in lines if "batch" in rec) / DOPRI5_EVALS_PER_STEP
    solver = steps * (DEFAULT_TOL * r["nll_nats"] + DEFAULT_TOL) / (d * math.log(2))
    assert abs(r["bpd"] - expected) < 3e-5 + solver
    assert len({(rec["repeat"], rec["batch"]) for rec in lines if "batch" in rec}) == 5


def test_each_sample_draws_its_own_noise_in_each_pass():
    # Dequantization noise and probes depend on (seed, pass, sample index) only: the same
    # sample gets the same draws in any batch, another pass or sample other draws.
    data = torch.randint(0, 256, (5, 1, 2, 2), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)

    def draws(rows, repeat, seed=0):
        return tool.unit_inputs(data, rows, tool._prepare_discrete, seed=seed, repeat=repeat,
                                divergence="gaussian", num_probes=2, device=torch.device("cpu"))

    x, probes = draws(slice(0, 5), 0)
    assert x.shape == (5, 1, 2, 2) and probes.shape == (2, 5, 1, 2, 2)
    x_alone, probes_alone = draws(slice(3, 4), 0)
    assert torch.equal(x_alone, x[3:4]) and torch.equal(probes_alone, probes[:, 3:4])
    for other in (draws(slice(0, 5), 1), draws(slice(0, 5), 0, seed=1)):
        assert not torch.isclose(other[0], x).any() and not torch.isclose(other[1], probes).any()
    # Samples with the same pixels still get their own noise.
    same = tool.unit_inputs(data[:1].expand(2, 1, 2, 2), slice(0, 2), tool._prepare_discrete,
                            seed=0, repeat=0, divergence="exact", num_probes=1,
                            device=torch.device("cpu"))
    assert same[1] is None and not torch.isclose(same[0][0], same[0][1]).any()


# --- 4. resume --------------------------------------------------------------------------------

def test_core_resume_after_interruption_gives_identical_numbers(tmp_path):
    # 8-bit 2-D data, Rademacher probes, two passes: dequantization and probes are seeded per
    # (pass, sample), so stopping after 3 batches (with a torn line) and resuming gives the
    # numbers of an uninterrupted run.
    sde = score_sde.VPSDE()
    score_fn = exact_score_fn(random_mixture(2, seed=3, scale=0.5), KERNELS["vp"])
    data = torch.randint(0, 256, (10, 2), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    settings = {"test": 1}
    common = dict(prepare=tool._prepare_discrete, batch_size=4, num_repeats=2, seed=5,
                  rtol=1e-3, atol=1e-3)
    straight = tool.evaluate(sde, score_fn, data, **common,
                             partial=tool.PartialLog(tmp_path / "a", settings))
    log = tool.PartialLog(tmp_path / "b", settings)
    first = tool.evaluate(sde, score_fn, data, **common, partial=log, max_batches=3)
    assert len(first) == 3
    with open(log.path, "a") as f:
        f.write('{"repeat": 1, "batch": 1, "nl')  # killed while writing
    calls = []

    def counted(x, t):
        calls.append(1)
        return score_fn(x, t)

    resumed = tool.evaluate(sde, counted, data, **common, partial=log)
    assert resumed == [{**r, "seconds": s["seconds"]} for r, s in zip(straight, resumed)]
    assert len(resumed) == 6 and sum(r["nfe"] for r in resumed[3:]) == len(calls)
    # A rerun finds everything done and evaluates nothing.
    assert tool.evaluate(sde, counted, data, **common, partial=log) == resumed
    assert sum(r["nfe"] for r in resumed[3:]) == len(calls)


def test_core_per_sample_results_do_not_depend_on_the_batch_size():
    # 8-bit data, Rademacher probes, per-sample step control: each sample's dequantization
    # noise and probes are seeded by its index in the data, so every batch size gives it the
    # same value (they came from the batch's generators, and changed with --batch_size).
    sde = score_sde.VPSDE()
    score_fn = exact_score_fn(random_mixture(2, seed=3, scale=0.5), KERNELS["vp"])
    data = torch.randint(0, 256, (7, 2), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    nll = {}
    for batch_size in (1, 3, 7):
        records = tool.evaluate(sde, score_fn, data, prepare=tool._prepare_discrete,
                                batch_size=batch_size, num_repeats=2, seed=5,
                                step_control="per_sample", rtol=1e-6, atol=1e-6)
        nll[batch_size] = torch.tensor([[v for r in records if r["repeat"] == k for v in r["nll"]]
                                        for k in range(2)], dtype=torch.float64)
    torch.testing.assert_close(nll[1], nll[3], rtol=0, atol=1e-9)
    torch.testing.assert_close(nll[1], nll[7], rtol=0, atol=1e-9)
    assert (nll[1][0] - nll[1][1]).abs().min() > 1e-4  # the passes draw other noise


def test_command_line_resume_with_max_batches(toy_run, tmp_path, capsys):
    args = ["--workdir", toy_run, "--num_samples", 24, "--batch_size", 8, "--num_repeats", 2,
            *FAST]
    assert _main(*args, "--partial_dir", tmp_path / "a", "--output", tmp_path / "a.json") == 0
    capsys.readouterr()
    assert _main(*args, "--partial_dir", tmp_path / "b", "--max_batches", 4) == 0
    captured = capsys.readouterr()
    stopped = json.loads(captured.out)
    assert stopped["complete"] is False and stopped["batches_done"] == 4
    assert captured.err.strip().splitlines()[-1] == (
        "4 of 6 batches done (--max_batches); rerun the same command to continue")
    assert stopped["batches_total"] == 6
    assert _main(*args, "--partial_dir", tmp_path / "b", "--output", tmp_path / "b.json") == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    for name in ("nll_nats", "stderr", "stderr_samples", "nfe_mean", "n"):
        assert a[name] == b[name], name


def test_resumed_batches_come_from_the_same_data(toy_run, tmp_path, capsys, monkeypatch):
    """The resume key holds the data's content: the same relative --data_path run from
    another folder, or a file rewritten in place, gets no batches of the other data."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "x.npy", rng.normal(size=(8, 2)).astype(np.float32))
    args = ["--workdir", toy_run, "--dataset", "array", "--data_path", "x.npy",
            "--partial_dir", tmp_path / "partial", *FAST]
    results = {}
    for name in ("a", "b"):
        monkeypatch.chdir(tmp_path / name)
        assert _main(*args) == 0
        results[name] = json.loads(capsys.readouterr().out)
    assert results["a"]["data_sha256"] != results["b"]["data_sha256"]
    assert results["a"]["nll_nats"] != results["b"]["nll_nats"]
    np.save(tmp_path / "a" / "x.npy", np.load(tmp_path / "b" / "x.npy"))  # rewritten in place
    monkeypatch.chdir(tmp_path / "a")
    assert _main(*args) == 0
    rerun = json.loads(capsys.readouterr().out)
    assert rerun["nll_nats"] == results["b"]["nll_nats"]  # b's data, hence b's batches


def test_resumed_batches_come_from_the_same_weights(toy_run, tmp_path, capsys):
    """Weights replaced under the same path and step (exported or converted again) get no
    batches of the old weights."""
    from score_sde.checkpoint import read_checkpoint, save_checkpoint

    state = read_checkpoint(toy_run / "checkpoint.pt")
    checkpoint = tmp_path / "weights.pt"
    save_checkpoint(state, checkpoint)
    args = ["--workdir", toy_run, "--checkpoint", checkpoint, "--num_samples", 8,
            "--partial_dir", tmp_path / "partial", *FAST]
    assert _main(*args) == 0
    first = json.loads(capsys.readouterr().out)
    state["ema"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_checkpoint(state, checkpoint)
    assert _main(*args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["weights_sha256"] != first["weights_sha256"]
    assert second["nll_nats"] != first["nll_nats"] and second["step"] == first["step"]


# --- 5. bad input and numerical failure -------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    ([], "--workdir"),
    (["--workdir", "{tmp}/nowhere"], "is not a directory"),
    (["--workdir", "{tmp}"], "checkpoint.pt does not exist"),
    (["--workdir", "{run}", "--checkpoint", "{tmp}/nope.pt"], "nope.pt does not exist"),
    (["--workdir", "{run}", "--checkpoint", "{tmp}/torn.pt"], "not a score_sde checkpoint"),
    (["--workdir", "{run}", "--dataset", "imagenet"], "--dataset"),
    (["--workdir", "{run}", "--rtol", "0"], "--rtol must be > 0"),
    (["--workdir", "{run}", "--atol", "-1e-5"], "--atol must be > 0"),
    (["--workdir", "{run}", "--eps", "1"], "--eps must lie in (0, 1)"),
    (["--workdir", "{run}", "--batch_size", "0"], "--batch_size"),
    (["--workdir", "{run}", "--divergence", "hutchinson"], "--divergence"),
    (["--workdir", "{run}", "--data_dir", "a", "--data_path", "b.npy"], "data_dir, data_path"),
    (["--workdir", "{run}", "--dataset", "array", "--data_path", "{tmp}/x.npy", "--split",
      "test"], "--split does not apply"),
    (["--workdir", "{run}", "--dataset", "array"], "needs --data_path"),
    (["--workdir", "{run}", "--dataset", "array", "--data_path", "{tmp}/x.npy"],
     "does not exist"),
    (["--workdir", "{run}", "--dataset", "fashion_mnist", "--data_dir", "{tmp}"],
     "Fashion-MNIST not found"),
    (["--workdir", "{run}", "--data_dir", "{tmp}"], "does not use data_dir"),
    (["--workdir", "{run}", "extra"], "unexpected arguments"),
    (["--workdir", "{run}", "--output", "{tmp}"], "is a folder; give a file name"),
    (["--workdir", "{run}", "--output", "{run}/checkpoint.pt"],
     "--output and --checkpoint are the same file"),
    (["--workdir", "{run}", "--dataset", "array", "--data_path", "{tmp}/torn.pt", "--output",
      "{tmp}/torn.pt"], "--output and --data_path are the same file"),
    (["--workdir", "{run}", "--checkpoint", "{tmp}"], "is a folder; pass --checkpoint FILE"),
    (["--workdir", "{run}", "--output", "{tmp}/torn.pt/r.json"], "which is a file, not a folder"),
    (["--workdir", "{run}", "--partial_dir", "{tmp}/torn.pt"], "is a file; give a folder"),
    (["--workdir", "{tmp}", "--checkpoint", "{run}/checkpoint.pt"],
     "likelihood_partial is a file; give a folder"),  # the default WORKDIR/likelihood_partial
    (["--workdir", "{tmp}/torn.pt/w", "--checkpoint", "{run}/checkpoint.pt"],
     "--workdir {tmp}/torn.pt/w lies under"),
    (["--workdir", "{run}", "--device", "cuda"] if not torch.cuda.is_available() else
     ["--workdir", "{run}", "--split", "bogus"], "--"),
])
def test_bad_input_exits_2_with_one_line(args, message, toy_run, tmp_path, capsys):
    (tmp_path / "torn.pt").write_bytes(b"score_sde-check")
    (tmp_path / "likelihood_partial").write_bytes(b"")
    args = [a.format(tmp=tmp_path, run=toy_run) for a in args]
    assert _main(*args) == 2
    line = _one_line(capsys)
    assert line.startswith("error: ") and message.format(tmp=tmp_path) in line, line


def test_seeds_are_bounded_by_what_torch_takes(toy_run, tmp_path, capsys):
    # 2^64 - 1, the largest seed torch's generators take, as in the other tools.
    assert _main("--workdir", toy_run, "--num_samples", 2, "--seed", 2 ** 64 - 1,
                 "--partial_dir", tmp_path / "p", *FAST) == 0
    capsys.readouterr()
    assert _main("--workdir", toy_run, "--seed", 2 ** 64, "--partial_dir", tmp_path / "p") == 2
    assert _one_line(capsys) == ("error: flag --seed=18446744073709551616: 18446744073709551616 "
                                 "is not an integer in the range [0, 18446744073709551615]")

def test_output_onto_the_data_it_reads_exits_2(toy_run, tmp_path, capsys):
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"")  # one file of the data folder
    before = (tmp_path / "train-labels-idx1-ubyte").stat()
    assert _main("--workdir", toy_run, "--dataset", "fashion_mnist", "--data_dir", tmp_path,
                 "--output", tmp_path / "train-labels-idx1-ubyte") == 2
    assert "is a file of the fashion_mnist data it reads" in _one_line(capsys)
    assert (tmp_path / "train-labels-idx1-ubyte").stat() == before


def test_a_new_workdir_beside_a_checkpoint_is_made(toy_run, tmp_path):
    """With --checkpoint the workdir only holds the evaluation's own files (the resumable
    per-batch results), so it need not exist yet."""
    workdir = tmp_path / "eval" / "new"
    assert _main("--workdir", workdir, "--checkpoint", toy_run / "checkpoint.pt",
                 "--num_samples", 8, *FAST) == 0
    assert len(list((workdir / "likelihood_partial").glob("*.rank0.jsonl"))) == 1


def test_weights_that_do_not_fit_the_data_exit_2(toy_run, tmp_path, capsys):
    np.save(tmp_path / "x3.npy", np.zeros((4, 3), dtype=np.float32))  # 3-D data, 2-D model
    assert _main("--workdir", toy_run, "--dataset", "array", "--data_path",
                 tmp_path / "x3.npy", "--partial_dir", tmp_path / "p") == 2
    assert "do not fit a mlp for data of shape (3,)" in _one_line(capsys)


def test_non_finite_weights_exit_3_naming_the_batch(toy_run, tmp_path, capsys):
    state = read_checkpoint(toy_run / "checkpoint.pt")
    for tensor in state["ema"].values():
        tensor.fill_(float("nan"))
    save_checkpoint(state, tmp_path / "nan.pt")
    assert _main("--workdir", toy_run, "--checkpoint", tmp_path / "nan.pt", "--num_samples", 4,
                 "--partial_dir", tmp_path / "p") == 3
    line = _one_line(capsys)
    assert line.startswith("error: non-finite or failed likelihood solve at pass 0, batch 0:")


def test_bad_input_process_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "likelihood.py"), "--workdir",
                           str(tmp_path), "--eps", "0"], env=ENV, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: flag --eps=0.0: --eps must lie in (0, 1)"]


def test_help_lists_the_flags(capsys):
    assert _main("--help") == 0
    assert "--num_repeats" in capsys.readouterr().out


# --- multiple processes -----------------------------------------------------------------------

def test_torchrun_two_processes_match_one(toy_run, tmp_path):
    # gloo on the CPU: batches sharded by rank, results gathered once; the numbers equal a
    # single process's because each batch's noise depends only on (seed, pass, batch).
    args = ["--workdir", toy_run, "--num_samples", 24, "--batch_size", 6, *FAST]
    assert _main(*args, "--partial_dir", tmp_path / "one", "--output", tmp_path / "one.json") == 0
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tools" / "likelihood.py"), *map(str, args), "--partial_dir",
         str(tmp_path / "two"), "--output", str(tmp_path / "two.json")],
        env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    for name in ("nll_nats", "stderr", "n", "nfe_total"):
        assert one[name] == two[name], name
    assert sorted(p.name.split(".")[1] for p in (tmp_path / "two").iterdir()) == [
        "rank0", "rank1"]



@pytest.mark.parametrize("step_control", ["batch", "per_sample"])
@pytest.mark.parametrize("error_norm", ["max", "rms"])
def test_every_step_control_and_norm_meets_the_exact_nll(step_control, error_norm):
    # Exact score and divergence of a 2-D mixture: each sample's NLL against its closed form
    # (prior term swapped for the diffused mixture's exact density at T), within the summed
    # local tolerances of its batch's solve, far below the spread of the NLLs.
    sde = score_sde.VPSDE()
    mixture, kernel = random_mixture(2, seed=11), KERNELS["vp"]
    score_fn = exact_score_fn(mixture, kernel)
    x, _ = mixture.sample(12, torch.Generator().manual_seed(0), dtype=torch.float64)
    records = tool.evaluate(sde, score_fn, x, prepare=tool._prepare_continuous, batch_size=6,
                            num_repeats=1, divergence="exact", eps=EPS, rtol=TIGHT_TOL,
                            atol=TIGHT_TOL, step_control=step_control, error_norm=error_norm)
    nll = torch.tensor([v for r in records for v in r["nll"]], dtype=torch.float64)
    z, _ = score_sde.data_to_latent(sde, score_fn, x, eps=EPS, rtol=TIGHT_TOL, atol=TIGHT_TOL)
    swap = exact_log_prob_t(mixture, kernel, z, sde.T) - sde.prior_logp(z)
    exact = -(exact_log_prob_t(mixture, kernel, x, EPS) - swap)
    steps = max(r["nfe"] for r in records) / DOPRI5_EVALS_PER_STEP
    bound = steps * (TIGHT_TOL * exact.abs().max().item() + TIGHT_TOL)
    assert (exact.max() - exact.min()).item() > 100 * bound
    assert (nll - exact).abs().max().item() < bound


def test_step_control_and_error_norm_flags(toy_run, tmp_path):
    args = ["--workdir", toy_run, "--num_samples", 8, "--batch_size", 8]
    for flags, name in (([], "default"), (["--step_control", "per_sample"], "ps"),
                        (["--error_norm", "rms"], "rms")):
        assert _main(*args, *flags, "--output", tmp_path / f"{name}.json", "--partial_dir",
                     tmp_path / name) == 0
    default, ps, rms = (json.loads((tmp_path / f"{n}.json").read_text())
                        for n in ("default", "ps", "rms"))
    assert (default["step_control"], default["error_norm"]) == ("batch", "max")
    assert (ps["step_control"], ps["error_norm"]) == ("per_sample", "max")
    assert (rms["step_control"], rms["error_norm"]) == ("batch", "rms")
    # A sample's rms over its elements never exceeds their max: from the same state and step,
    # rms accepts whatever max accepts, and over the solve it takes no more evaluations.
    assert rms["nfe_total"] <= default["nfe_total"]


def test_cuda_graph_flag_on_the_cpu_changes_nothing(toy_run, tmp_path):
    # Without CUDA the graph wrapper calls the network eagerly, so the run with the flag is
    # compared with the run without it: equal numbers and evaluation counts, flag recorded.
    args = ["--workdir", toy_run, "--num_samples", 8, "--batch_size", 8, "--divergence",
            "exact"]
    assert _main(*args, "--output", tmp_path / "a.json", "--partial_dir", tmp_path / "p1") == 0
    assert _main(*args, "--cuda_graph", "--output", tmp_path / "b.json", "--partial_dir",
                 tmp_path / "p2") == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b["cuda_graph"] is True and a["cuda_graph"] is False
    assert a["nll_nats"] == b["nll_nats"] and a["nfe_total"] == b["nfe_total"]


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("out of memory evaluating the likelihood of a batch of 8 on "
                                "cuda:0: evaluate fewer samples at once"),
    RuntimeError(CPU_OUT_OF_MEMORY),  # the CPU allocator's
], ids=["device", "cpu"])
def test_out_of_memory_is_one_line_naming_the_batch_size(error, toy_run, tmp_path, capsys,
                                                         monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(tool, "log_likelihood", out_of_memory)
    assert _main("--workdir", toy_run, "--num_samples", 12, "--batch_size", 8, "--partial_dir",
                 tmp_path / "p") == 2
    assert _one_line(capsys) == (f"error: out of memory ({error}): rerun with a smaller "
                                 f"--batch_size (now 8)")


@pytest.mark.parametrize("num_samples, now", [(100000000000, 100000000000), (None, "all")])
def test_out_of_memory_for_the_data_is_one_line_naming_num_samples(num_samples, now, toy_run,
                                                                   tmp_path, capsys,
                                                                   monkeypatch):
    # A 2-D toy split of --num_samples points is drawn at once.
    def out_of_memory(*args, **kwargs):
        raise RuntimeError(CPU_OUT_OF_MEMORY)

    monkeypatch.setattr(tool, "load_dataset", out_of_memory)
    extra = [] if num_samples is None else ["--num_samples", num_samples]
    assert _main("--workdir", toy_run, *extra, "--partial_dir", tmp_path / "p") == 2
    assert _one_line(capsys) == (f"error: out of memory ({CPU_OUT_OF_MEMORY}): lower "
                                 f"--batch_size (now 128) or --num_samples (now {now})")


def test_ctrl_c_is_one_line_and_exit_130(toy_run, tmp_path, capsys, monkeypatch):
    """A KeyboardInterrupt (Ctrl-C) in the middle of a solve: one line on stderr instead of a
    traceback, exit status 130 (128 + SIGINT); the batches finished before stay for a rerun."""
    calls = []
    real = tool.log_likelihood

    def interrupted_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tool, "log_likelihood", interrupted_second_batch)
    args = ["--workdir", toy_run, "--num_samples", 16, "--batch_size", 8,
            "--partial_dir", tmp_path / "p", *FAST]
    assert _main(*args) == 130
    assert _one_line(capsys) == "interrupted (SIGINT)"
    (log,) = (tmp_path / "p").glob("*.rank0.jsonl")
    assert len(log.read_text().splitlines()) >= 1  # the first batch, kept for the rerun
    monkeypatch.undo()
    assert _main(*args) == 0


# torch: the tool's first heavy import; absl: the flags, defined before `run_tool` handles
# Ctrl-C itself.
@pytest.mark.parametrize("module", ["torch", "absl"])
def test_ctrl_c_while_starting_prints_one_line_and_exits_130(module, tmp_path):
    proc = run_interrupted_at_import("tools/likelihood.py", module, "--workdir", tmp_path)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "interrupted (SIGINT)\n", "")
