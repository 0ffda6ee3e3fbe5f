"""benchmarks/bench.py end to end on the CPU at smoke-test sizes.

The timings themselves are not checked (they belong in BENCHMARKS.md); what is checked is that
the one command runs every section and that its numbers hang together: the paper-code style
likelihood solve (SciPy RK45 on a float64 host state) and the library's solves agree on the
same data and probes, fixed-step samplers report the evaluations they were asked for, and the
ratios are computed against the right baseline.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from score_sde.config import config_dir
from tests.scripts import load_script

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
SMOKE = ["--device", "cpu", "--quick", "--sdes", "vp", "--num_samples", "400",
         "--sampler_seeds", "1", "--floor_seeds", "2", "--lik_images", "4", "--lik_batch", "4",
         "--solve_dim", "48", "--cost_evals", "1", "--train_steps", "1", "--train_warmup", "0",
         "--train_batch", "4"]


def bench(*args, cwd):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench.py"), *map(str, args)],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    out = bench(*SMOKE, "--output", folder / "bench.json", cwd=folder)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((folder / "bench.json").read_text()), out.stdout


def test_meta_and_tables(result):
    data, stdout = result
    assert data["meta"]["device"] == "cpu" and data["meta"]["torch"]
    assert set(data) == {"meta", "train", "likelihood", "samplers"}
    for heading in ("likelihood solves:", "samplers:", "smallest NFE < 1.5 x floor", "img/s"):
        assert heading in stdout


def test_sampler_rows(result):
    rows = result[0]["samplers"]["rows"]
    by_name = {}
    for r in rows:
        by_name.setdefault(r["sampler"], []).append(r)
        assert r["sde"] == "vp" and r["floor"] > 0
        assert math.isfinite(r["fd_over_floor"]) and r["fd_over_floor"] > 0
    # Quick mode: fixed-step samplers at 10 and 20 evaluations, Heun at 19, PC 100 steps with
    # one corrector step each (the last step denoises at no extra cost).
    for name, runs in by_name.items():
        nfe = sorted(r["nfe"] for r in runs)
        if name.startswith(("ddim", "dpm_solver")):
            assert nfe == [10, 20], name
        elif name.startswith("heun"):
            assert nfe == [19]
        elif name.startswith("pc"):
            assert nfe == [200]
        else:  # adaptive ODE solves
            assert nfe[0] > 20, name
    assert len(by_name) == 10
    forms = result[0]["samplers"]["solver_types"]
    assert len(forms["rows"]) == 8 and len(forms["best"]) == 8  # 2 methods x 2 orders x 2
    for r in forms["rows"]:
        assert r["nfe"] == 10 and 0 < r["dpmsolver"] < 1 and 0 < r["taylor"] < 1
    assert {r["default"] for r in forms["best"]} <= {"dpmsolver", "taylor"}
    ode = {r["sampler"]: r for r in rows if r["sampler"].startswith("ode")}
    assert ode["ode: sample_ode, rms norm"]["nfe"] <= ode["ode: sample_ode (dopri5, 1e-5)"]["nfe"]
    assert all("speedup_vs_paper_code" in r for n, r in ode.items() if "sample_ode" in n)


def test_likelihood_solves_agree_with_the_paper_code_style_solve(result):
    solves = result[0]["likelihood"]["solves"]
    for r in solves["rows"]:
        # Same ODE, same probes, rtol = atol = 1e-5: bits/dim agree far below 1e-3.
        assert r["max_abs_dbpd"] < 1e-3, r
        assert r["evaluations"] >= r["nfe_per_solve"] > 0
        assert r["images_per_s"] == pytest.approx(r["images"] / r["seconds"])
    paper = next(r for r in solves["rows"] if r["run"].startswith("paper-code"))
    assert paper["speedup_vs_paper_code"] == 1.0
    strict_max = solves["rows"][0]
    strict_rms = next(r for r in solves["rows"] if r["run"] == "strict fp32, rms norm")
    assert strict_rms["nfe_per_solve"] <= strict_max["nfe_per_solve"]


def test_evaluation_cost_rows(result):
    cost = result[0]["likelihood"]["evaluation_cost"]
    assert {r["batch"] for r in cost["rows"]} == {4, 64}
    paper = [r for r in cost["rows"] if r["run"].startswith("paper-code")]
    assert len(paper) == 1 and paper[0]["batch"] == 64
    for r in cost["rows"]:
        assert r["ms_per_eval"] > 0
        assert r["speedup_vs_paper_code"] == pytest.approx(
            r["image_evals_per_s"] / paper[0]["image_evals_per_s"])
    # The solver's own arithmetic, float64 and float32 states at each batch: the same linear
    # ODE and tolerance, so the same steps; dopri5 takes 6 evaluations per step plus 2 to start.
    solver = cost["solver_rows"]
    assert sorted((r["state"], r["batch"]) for r in solver) == [
        ("float32", 4), ("float32", 64), ("float64", 4), ("float64", 64)]
    for r in solver:
        assert r["ms_per_eval"] > 0 and (r["nfe"] - 2) % 6 == 0 and r["nfe"] > 8
    for batch in (4, 64):
        assert len({r["nfe"] for r in solver if r["batch"] == batch}) == 1


def test_train_rows(result):
    (row,) = result[0]["train"]
    assert row["model"] == "ddpmpp_tiny" and row["mode"] == "fp32" and row["peak_gib"] is None
    assert row["images_per_s"] > 0 and math.isfinite(row["final_loss"]) and row["params_m"] > 0


@pytest.mark.parametrize("args, message", [
    (["--sections", "speed"], "unknown section 'speed'; accepted: train, likelihood, samplers"),
    (["--sdes", "vp,edm"], "unknown sde 'edm'"),
    (["--train_modes", "fp8"], "unknown mode 'fp8'"),
    (["--num_samples", "0"], "--num_samples must be >= 1, got 0"),
    (["--device", "cuda"], "--device cuda but CUDA is not available"),
    (["--device", "xyz"], "--device must be auto, cpu, cuda or cuda:N, got 'xyz'"),
    (["--rtol", "nan"], "--rtol must be a finite number > 0, got nan"),
    (["--checkpoint", "{tmp}/none.pt"], "none.pt does not exist; give a file"),
    (["--output", "{tmp}"], "is a folder; give a file name"),
])
def test_bad_arguments_exit_2(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    out = bench(*args, cwd=tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def _train_speed_module():
    """benchmarks/train_speed.py as a module, loaded from its path (no sys.path edits)."""
    return load_script("benchmarks/train_speed.py")


def test_loss_parity_windows():
    train_speed = _train_speed_module()

    rng = np.random.default_rng(0)
    ref = 1.0 + 0.1 * rng.standard_normal(300)
    curves = {"fp32": ref, "same": ref.copy(), "off": ref * 1.01 + 0.001 * rng.standard_normal(300)}
    rows = {r["mode"]: r for r in train_speed.parity(curves, "fp32", 100)}
    assert set(rows) == {"same", "off"} and len(rows["off"]["windows"]) == 3
    assert rows["same"]["max_abs_rel_diff"] == 0 and rows["same"]["max_abs_z"] == 0
    # A 1% offset: the relative difference is 1%, and with shared noise it is many standard
    # errors away from zero.
    assert abs(rows["off"]["max_abs_rel_diff"] - 0.01) < 2e-3 and rows["off"]["max_abs_z"] > 10


def test_train_speed_parity_run(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"),
                          "--models", "ddpmpp_tiny", "--modes", "fp32,tf32", "--batch_size", "4",
                          "--warmup", "0", "--steps", "1", "--device", "cpu", "--parity_steps",
                          "6", "--parity_window", "3", "--output", str(tmp_path / "t.json")],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "t.json").read_text())
    (parity,) = [r for r in rows if "windows" in r]
    # On the CPU TF32 does not exist: the same arithmetic, the same curve.
    assert parity["mode"] == "tf32" and parity["max_abs_rel_diff"] == 0


# Kernel names from CUDA traces of these models' training steps, and CPU op names.
KERNEL_NAMES = [
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, "
     "false, true, (cudnnKernelDataType_t)0>", "layout"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native"
     "::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>", "layout"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warp"
     "group2x1x1_execute_segment_k_off_kernel__5x_cudnn", "convolution"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("void cudnn::detail::wgrad_alg0_engine<float, 128, 6, 7, 3, 3, 5, false, 512>",
     "convolution"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>",
     "normalisation"),
    ("void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<float>",
     "normalisation"),
    ("triton_red_fused_native_group_norm_3", "normalisation"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous "
     "namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMath"
     "Functor<float, 4, (at::native::ADAM_MODE)0, false>, float*, double>", "optimizer"),
    ("aten::_foreach_lerp_", "optimizer"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel(at::Tensor"
     "IteratorBase&)::{lambda()#1}>", "elementwise"),
    ("triton_poi_fused_add_convolution_silu_7", "elementwise"),
    ("aten::add_", "elementwise"),
    ("triton_red_fused_convolution_backward_2", "reduction"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "reduction"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>",
     "matmul_attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>",
     "matmul_attention"),
    ("aten::addmm", "matmul_attention"),
    ("Memcpy HtoD (Pinned -> Device)", "memcpy"),
    ("Memset (Device)", "memcpy"),
    ("cudaLaunchKernel", "other"),
]


@pytest.mark.parametrize("name, category", KERNEL_NAMES)
def test_kernel_categories(name, category):
    assert _train_speed_module().kernel_category(name) == category


def test_profile_summary_per_step_and_by_category():
    train_speed = _train_speed_module()
    kernels = {name: (100.0 * (i + 1), 2 * (i + 1)) for i, (name, _) in enumerate(KERNEL_NAMES)}
    p = train_speed.profile_summary(kernels, steps=2, wall_ms=5.0, device_type="cuda")
    total_us = sum(us for us, _ in kernels.values())
    assert p["device_ms_per_step"] == pytest.approx(total_us / 1e3 / 2)
    assert p["launches_per_step"] == sum(n for _, n in kernels.values()) / 2
    assert set(p["categories"]) == set(train_speed.KERNEL_CATEGORIES) | {"other"}
    for category, v in p["categories"].items():
        mine = sum(us for (name, c), (us, _) in zip(KERNEL_NAMES, kernels.values())
                   if c == category)
        assert v["ms_per_step"] == pytest.approx(mine / 1e3 / 2), category
    assert sum(v["percent"] for v in p["categories"].values()) == pytest.approx(100)
    assert len(p["top"]) == train_speed.PROFILE_TOP
    assert p["top"][0]["name"] == KERNEL_NAMES[-1][0] and p["top"][0]["category"] == "other"
    assert p["device_time"] == "CUDA kernel time" and p["wall_ms_per_step"] == 5.0


def test_train_speed_profile_run(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"),
                          "--models", "ddpmpp_tiny", "--modes", "fp32", "--batch_size", "4",
                          "--warmup", "1", "--steps", "1", "--device", "cpu", "--profile_steps",
                          "2", "--output", str(tmp_path / "t.json")],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads((tmp_path / "t.json").read_text())
    p = row["profile"]
    assert p["steps"] == 2 and p["wall_ms_per_step"] > 0 and p["launches_per_step"] > 100
    assert p["device_time"].startswith("self CPU time of the ops")
    # Every op falls in exactly one category: their times add up to the total.
    assert sum(v["ms_per_step"] for v in p["categories"].values()) == pytest.approx(
        p["device_ms_per_step"], rel=1e-9)
    assert sum(v["percent"] for v in p["categories"].values()) == pytest.approx(100)
    assert p["categories"]["convolution"]["ms_per_step"] > 0
    assert len(p["top"]) == 15 and all(k["ms_per_step"] > 0 for k in p["top"])
    assert p["trace"] == str(tmp_path / "trace_ddpmpp_tiny_fp32.json.gz")
    assert (tmp_path / "trace_ddpmpp_tiny_fp32.json.gz").stat().st_size > 1000
    assert "ddpmpp_tiny fp32:" in out.stdout and "convolution" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--profile_steps", "-1"], "--profile_steps must be >= 0, got -1"),
    (["--trace_dir", "x"], "--trace_dir needs --profile_steps"),
    (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
    (["--device", "xyz"], "--device must be cpu, cuda or cuda:N, got 'xyz'"),
    (["--parity_steps", "10", "--parity_window", "1"], "--parity_window must be >= 2, got 1"),
])
def test_train_speed_bad_profile_arguments(args, message):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_speed.py"), *args],
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_likelihood_solves_of_a_checkpoint(toy_run, tmp_path):
    out = bench("--device", "cpu", "--sections", "likelihood", "--checkpoint",
                toy_run / "checkpoint.pt", "--lik_images", 6, "--lik_batch", 6, "--cost_evals",
                1, "--rtol", 1e-3, "--atol", 1e-3, "--output", tmp_path / "b.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    solves = json.loads((tmp_path / "b.json").read_text())["likelihood"]["solves"]
    assert "test samples of toy_8gaussians" in solves["source"] and solves["dims"] == 2
    assert solves["bpd"].startswith("-log p")  # continuous data: no dequantization offset
    for r in solves["rows"]:
        assert r["images"] == 6 and r["max_abs_dbpd"] < 1e-2, r


@pytest.mark.parametrize("args, message", [
    (["--n_iters", "0"], "--n_iters must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--config", "{tmp}/none.py"], "none.py"),
    (["--sdes", "vp,edm"], "unknown SDE 'edm'"),
])
def test_contract_2d_bad_arguments_exit_2_before_writing(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "contract_2d.py"),
                          "--workdir", str(tmp_path / "w"), *args], env=ENV,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "w").exists()
    (tmp_path / "file").write_text("x")
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "contract_2d.py"),
                          "--workdir", str(tmp_path / "file")], env=ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "is a file; give a folder" in out.stderr, out.stderr


def test_contract_2d_makes_relative_paths_absolute(tmp_path, monkeypatch):
    """Training and evaluation run as subprocesses in the repository root, so a relative
    --workdir or --config (here: one that exists only in the caller's folder) would point
    elsewhere there."""
    contract = load_script("benchmarks/contract_2d.py")
    (tmp_path / "myconf.py").write_text((REPO / "configs" / "toy.py").read_text())
    monkeypatch.chdir(tmp_path)
    args = contract.parse(["--workdir", "rel/w", "--config", "myconf.py"])
    assert args.workdir == str(tmp_path / "rel" / "w")
    assert args.config == str(tmp_path / "myconf.py")
    assert contract.parse(["--workdir", "w", "--config", "toy"]).config == str(
        (config_dir() / "toy.py").resolve())  # a shipped config, by name


# --- edm_grid_convergence.py ---------------------------------------------------------------------

def test_edm_grid_convergence_share_zero_is_one_step_and_the_default_converges(tmp_path, capsys):
    script = load_script("benchmarks/edm_grid_convergence.py")
    out = tmp_path / "edm.json"
    assert script.main(["--sdes", "cosine", "--steps", "100,300", "--orders", "3",
                        "--shares", "0,0.25", "--dim", "8", "--num_samples", "20",
                        "--output", str(out)]) == 0
    rows = {r["grid"]: r["median_rel_error"] for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"edm, share 0", "edm, share 0.25", "logsnr"}
    one_step, default = rows["edm, share 0"], rows["edm, share 0.25"]
    assert default[1] < 0.2 * default[0]  # order 3: 3x the steps, about 27x less error
    assert one_step[1] > 0.5 * one_step[0]  # one step above 80 leaves a floor
    assert "| cosine | 3 | edm, share 0.25 |" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--sdes", "vp,edm"], "unknown SDE(s) ['edm']"),
    (["--steps", "10,x"], "--steps must be comma-separated numbers"),
    (["--steps", "0,10"], "--steps values must be finite and >= 1"),
    (["--orders", "4"], "--orders must be of 1, 2, 3"),
    (["--shares", "-1"], "--shares values must be finite and >= 0"),
    (["--shares", "inf"], "--shares values must be finite and >= 0"),
    (["--num_samples", "0"], "--num_samples must be >= 1"),
])
def test_edm_grid_convergence_bad_arguments_exit_2(args, message, capsys):
    script = load_script("benchmarks/edm_grid_convergence.py")
    with pytest.raises(SystemExit) as exit_info:
        script.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
