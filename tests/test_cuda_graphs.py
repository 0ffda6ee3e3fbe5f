"""score_sde.cuda_graphs.CudaGraphed, the cuda_graph options of log_likelihood, and the rule
that an evaluation inside the library's samplers, solvers and losses never waits for the device.

CPU tests check the parts that run everywhere: the wrapper's pass-through and arguments, which
calls run with host-validated times, the device copies of schedule tables, and the
out-of-memory message. CUDA tests (marked gpu) check replays against eager calls of the same
deterministic function (bitwise-equal kernels, so the adaptive solvers take the same steps),
that a function which cannot be recorded is found or survived without degrading the process
(random draws, sampling, the likelihood and a training step still work afterwards), and that
the sampler and solver loops issue no per-evaluation host reads.
"""
import math
import warnings

import numpy as np
import pytest
import torch

from score_sde import (VESDE, VPSDE, ScoreMatchingLoss, data_to_latent, inpaint, latent_to_data,
                       log_likelihood, make_score_fn, sample_ddim, sample_dpm_solver,
                       sample_heun, sample_ode, sample_pc)
from score_sde._utils import cached_on, host_checked_times, value_checks_wanted
from score_sde.cuda_graphs import CudaGraphed, CudaGraphWarning
from score_sde.models import SmallUNet
from tests.problems import KERNELS, exact_score_fn, random_mixture, ring_mixture

cuda = pytest.mark.gpu


# --- the CPU -------------------------------------------------------------------------------------

def test_cpu_calls_run_the_function_and_are_counted():
    # On the CPU the wrapper must not change what fn computes: compared with the closed form
    # of fn, bit for bit, and every call is an eager call.
    calls = []

    def fn(x, t):
        calls.append(1)
        return x * t[:, None], x.sum(1)

    graphed = CudaGraphed(fn)
    x, t = torch.randn(3, 2), torch.rand(3)
    a, b = graphed(x, t)
    torch.testing.assert_close(a, x * t[:, None], rtol=0, atol=0)
    torch.testing.assert_close(b, x.sum(1), rtol=0, atol=0)
    assert len(calls) == 1
    assert graphed.stats() == dict(graphs=0, replays=0, eager_calls=1, failures=[])


@pytest.mark.parametrize("args, match", [
    (dict(fn=None), "fn must be callable"),
    (dict(fn=abs, max_graphs=0), "max_graphs must be an int >= 1"),
    (dict(fn=abs, max_graphs=True), "max_graphs must be an int >= 1"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        CudaGraphed(**args)


def test_likelihood_cuda_graph_option_on_the_cpu_changes_nothing():
    # No CUDA: the option must leave the result and the evaluation count as without it, and
    # report that nothing was recorded or replayed.
    mixture, sde = random_mixture(8, seed=2), VPSDE()
    score_fn = exact_score_fn(mixture, KERNELS["vp"])
    x, _ = mixture.sample(4, torch.Generator().manual_seed(0))
    for step_control in ("batch", "per_sample"):
        a = log_likelihood(sde, score_fn, x, step_control=step_control,
                           generator=torch.Generator().manual_seed(3))
        stats = {}
        b = log_likelihood(sde, score_fn, x, step_control=step_control, cuda_graph=True,
                           cuda_graph_stats=stats, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[2] == b[2] > 0
        assert stats["graphs"] == stats["replays"] == 0 and stats["eager_calls"] == a[2]


def test_cuda_graph_stats_must_be_a_dict():
    with pytest.raises(ValueError, match="cuda_graph_stats must be a dict"):
        log_likelihood(VPSDE(), lambda x, t: -x, torch.zeros(2, 2), cuda_graph=True,
                       cuda_graph_stats=[])


def _meta_time():
    return torch.empty(1, device="meta")


def test_value_checks_run_everywhere_outside_the_library_loops():
    assert value_checks_wanted(torch.zeros(1)) and value_checks_wanted(_meta_time())
    with host_checked_times():
        assert value_checks_wanted(torch.zeros(1))  # the CPU is always checked
        assert not value_checks_wanted(_meta_time())
    assert value_checks_wanted(_meta_time())


def _entry_points():
    """Every public loop that evaluates the score at times it validated on the host."""
    sde = VPSDE()
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    shape, g = (3, 2), torch.Generator().manual_seed(1)
    return {
        "sample_pc": lambda s: sample_pc(sde, s, shape, num_steps=30, generator=g),
        "sample_ode": lambda s: sample_ode(sde, s, shape, rtol=1e-3, atol=1e-3, generator=g),
        "data_to_latent": lambda s: data_to_latent(sde, s, x, rtol=1e-3, atol=1e-3),
        "latent_to_data": lambda s: latent_to_data(sde, s, x, rtol=1e-3, atol=1e-3),
        "log_likelihood": lambda s: log_likelihood(sde, s, x, rtol=1e-3, atol=1e-3,
                                                   generator=g),
        "sample_ddim": lambda s: sample_ddim(sde, s, shape, num_steps=5, generator=g),
        "sample_dpm_solver": lambda s: sample_dpm_solver(sde, s, shape, num_steps=6,
                                                         generator=g),
        "sample_heun": lambda s: sample_heun(sde, s, shape, num_steps=4, generator=g),
        "inpaint": lambda s: inpaint(sde, s, x, torch.ones(3, 2, dtype=torch.bool),
                                     num_steps=30, generator=g),
        "ScoreMatchingLoss": lambda s: ScoreMatchingLoss(sde)(s, x, generator=g),
    }


@pytest.mark.parametrize("name", sorted(_entry_points()))
def test_library_loops_run_their_score_with_host_validated_times(name):
    # Inside each loop, accelerator time tensors are not read back (the loop validated its
    # times on the host); the flag is seen by the user's score function itself.
    seen = []

    def score(x, t):
        seen.append(value_checks_wanted(_meta_time()))
        return -x

    _entry_points()[name](score)
    assert seen and not any(seen)
    assert value_checks_wanted(_meta_time())  # and the flag is off again afterwards


def test_tables_are_copied_once_per_device_and_dtype():
    class Owner:
        pass

    owner, table = Owner(), torch.arange(4, dtype=torch.float64)
    assert cached_on(owner, table, torch.device("cpu")) is table  # already there: no copy
    a = cached_on(owner, table, torch.device("cpu"), torch.float32)
    assert a.dtype == torch.float32 and torch.equal(a, table.float())
    assert cached_on(owner, table, torch.device("cpu"), torch.float32) is a
    replaced = table + 1  # a new tensor for the attribute: a new copy
    b = cached_on(owner, replaced, torch.device("cpu"), torch.float32)
    assert b is not a and torch.equal(b, replaced.float())


def test_rechained_sde_forgets_the_old_chains_device_tables():
    sde = VESDE(num_steps=10)
    cached_on(sde, sde.discrete_sigmas, torch.device("cpu"), torch.float32)
    assert sde.__dict__.get("_device_tables")
    assert not sde.with_num_steps(20).__dict__.get("_device_tables")


class _OutOfMemoryInBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        _OutOfMemoryInBackward.calls += 1
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_is_not_swallowed_and_names_the_batch():
    # Two probes take the batched vector-Jacobian product, whose failures otherwise fall back
    # to one product per probe; running out of memory must surface at once, with a hint.
    _OutOfMemoryInBackward.calls = 0

    def score(x, t):
        return -_OutOfMemoryInBackward.apply(x)

    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"batch of 3 .*--batch_size"):
        log_likelihood(VPSDE(), score, torch.zeros(3, 2), num_probes=2,
                       generator=torch.Generator().manual_seed(0))
    assert _OutOfMemoryInBackward.calls == 1


# --- CUDA ----------------------------------------------------------------------------------------

def _unet_score(device, attention=True):
    torch.manual_seed(0)
    net = SmallUNet(image_size=8, in_channels=1, nf=16, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,) if attention else (), dropout=0.0)
    with torch.no_grad():  # redraw the zero-initialised output so the score is not zero
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0.0, 0.05)
    net = net.to(device).eval().requires_grad_(False)
    return make_score_fn(net, VPSDE(), prediction="noise", time_input="t")


@pytest.fixture
def deterministic_cudnn():
    """cuDNN picks deterministic algorithms: an eager call then repeats itself bit for bit, so
    replays can be held to equality with it (a non-deterministic kernel differs between two
    eager calls as much as between an eager call and a replay)."""
    before = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = before


@cuda
def test_replays_equal_eager_calls_one_graph_per_signature():
    score = _unet_score("cuda")
    graphed = CudaGraphed(score, strict=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for batch in (4, 4, 6, 4):
        x = torch.randn(batch, 1, 8, 8, device="cuda", generator=g)
        t = torch.rand(batch, device="cuda", generator=g) * 0.9 + 0.05
        with torch.no_grad():
            torch.testing.assert_close(graphed(x, t), score(x, t), rtol=1e-5, atol=1e-5)
    assert graphed.num_graphs == 2 and graphed.replays == 4 and not graphed.failures


@cuda
@pytest.mark.parametrize("sampler, kw", [
    (sample_dpm_solver, dict(num_steps=10)),
    (sample_pc, dict(num_steps=50)),
    (sample_pc, dict(num_steps=20, predictor="euler_maruyama", corrector="none")),
    (sample_ddim, dict(num_steps=10)),
], ids=["dpm_solver", "pc", "euler_maruyama", "ddim"])
def test_fixed_step_samplers_with_a_graphed_score_match_eager(sampler, kw, deterministic_cudnn):
    score = _unet_score("cuda")
    graphed = CudaGraphed(score, strict=True)
    a, nfe_a = sampler(VPSDE(), score, (8, 1, 8, 8), device="cuda",
                       generator=torch.Generator(device="cuda").manual_seed(1), **kw)
    b, nfe_b = sampler(VPSDE(), graphed, (8, 1, 8, 8), device="cuda",
                       generator=torch.Generator(device="cuda").manual_seed(1), **kw)
    assert nfe_a == nfe_b and graphed.num_graphs == 1 and graphed.replays == nfe_b
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("step_control", ["batch", "per_sample"])
@pytest.mark.parametrize("divergence", ["rademacher", "exact"])
def test_graphed_likelihood_equals_eager(step_control, divergence, deterministic_cudnn):
    score = _unet_score("cuda", attention=False)
    # The exact divergence costs 64 vector-Jacobian products per evaluation: fewer samples
    # and a looser tolerance keep it quick; the Hutchinson case runs at the paper's 1e-5.
    batch, tol = (3, 1e-4) if divergence == "exact" else (6, 1e-5)
    x = torch.rand(batch, 1, 8, 8, device="cuda", generator=torch.Generator(device="cuda")
                   .manual_seed(2)) * 2 - 1
    kw = dict(step_control=step_control, divergence=divergence, rtol=tol, atol=tol)
    if divergence != "exact":
        kw["probes"] = torch.randn((1,) + tuple(x.shape), device="cuda",
                                   generator=torch.Generator(device="cuda").manual_seed(3))
    eager, _, nfe_eager = log_likelihood(VPSDE(), score, x, **kw)
    again, _, nfe_again = log_likelihood(VPSDE(), score, x, **kw)
    assert nfe_again == nfe_eager and torch.equal(again, eager)  # eager repeats itself
    stats = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", CudaGraphWarning)
        graphed, _, nfe_graphed = log_likelihood(VPSDE(), score, x, cuda_graph=True,
                                                 cuda_graph_stats=stats, **kw)
    assert stats["replays"] > 0 and stats["graphs"] >= 1 and not stats["failures"]
    assert nfe_graphed == nfe_eager
    bpd = 1 / (x[0].numel() * math.log(2))
    assert float((graphed - eager).abs().max()) * bpd < 1e-4


def _reads_the_host(x):
    return x * float(x.abs().max())  # waits for the device on every call


def _reads_the_host_while_recorded(x):
    # Eager calls (including the checked warm-up) are clean; only the recording reads the
    # host, which invalidates it: the failure happens inside the recording itself.
    if torch.cuda.is_current_stream_capturing():
        return x * float(x.abs().max())
    return x * 2


def _pageable_non_blocking_copy(x):
    # Copying pageable host memory to the device can run eagerly but cannot be recorded.
    return x + torch.ones(x.shape[-1]).to(x.device, non_blocking=True)


@cuda
@pytest.mark.parametrize("fn, stage", [
    (_reads_the_host, "fn waits for the device"),
    (_reads_the_host_while_recorded, "recording failed"),
    (_pageable_non_blocking_copy, None),
], ids=["host_read", "fails_while_recorded", "pageable_copy"])
def test_unrecordable_function_runs_eagerly_with_one_warning(fn, stage):
    graphed = CudaGraphed(fn)
    x = torch.randn(5, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = graphed(x), graphed(x)
    expected = fn(x) if fn is not _reads_the_host_while_recorded else x * 2
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert graphed.num_graphs == 0 and graphed.replays == 0 and len(graphed.failures) == 1
    if stage is not None:
        assert graphed.failures[0].startswith(stage), graphed.failures
    assert sum(issubclass(w.category, CudaGraphWarning) for w in caught) == 1
    with pytest.raises(RuntimeError, match="CUDA graph not recorded"):
        CudaGraphed(fn, strict=True)(x)
    _assert_process_still_works()


def _assert_process_still_works():
    """What a failed recording must not break: the current stream, the default generator
    (seeded draws repeat), sampling and the likelihood with it, and a training step."""
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.manual_seed(11)
    first = torch.randn(1000, device="cuda")
    torch.manual_seed(11)
    assert torch.equal(torch.randn(1000, device="cuda"), first)
    mixture = ring_mixture(num_modes=4, radius=2.0, std=0.5)
    exact = exact_score_fn(mixture, KERNELS["vp"])
    samples, _ = sample_pc(VPSDE(), exact, (2000, 2), num_steps=200, device="cuda")
    second = float((samples.double() ** 2).sum(1).mean())
    want = float((mixture.means ** 2).sum(1) @ mixture.weights) + 2 * 0.25
    assert abs(second / want - 1) < 0.1
    logp, _, nfe = log_likelihood(VPSDE(), exact, samples[:16], rtol=1e-3, atol=1e-3)
    assert torch.isfinite(logp).all() and nfe > 0
    from tests.test_cuda import _fashion_cfg  # a small U-Net on Fashion-MNIST-shaped data
    import tempfile
    from pathlib import Path
    from score_sde.trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(_fashion_cfg(Path(tmp), n_iters=2), str(Path(tmp) / "run"))
        losses = [float(trainer.train_step(_Silent())[0]) for _ in range(2)]
    assert all(math.isfinite(v) for v in losses)


class _Silent:
    def line(self, *_):
        pass

    def scalars(self, *_a, **_k):
        pass


@cuda
def test_direct_calls_check_times_on_cuda():
    # Outside the library's loops a CUDA time tensor is checked like a CPU one.
    x = torch.zeros(2, 3, device="cuda")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        VPSDE().marginal_prob(x, torch.tensor([0.5, 1.5], device="cuda"))
    score = _unet_score("cuda")
    with pytest.raises(ValueError, match=r"t must lie in \(0, 1\]"):
        score(torch.zeros(2, 1, 8, 8, device="cuda"), torch.tensor([0.0, 0.5], device="cuda"))
    with pytest.raises(ValueError, match="alpha underflows"):  # exp(-1000) is 0 in float64
        VPSDE(beta_max=4000.0, num_steps=5000).denoise(x, torch.ones(2, device="cuda"), x)


class _SyncCounter:
    """Counts synchronising CUDA operations (PyTorch's sync debug mode, "warn") in a block."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    @property
    def count(self):
        return sum("synchronizing" in str(w.message) for w in self.caught)


@cuda
@pytest.mark.parametrize("name, run", [
    ("sample_pc", lambda score, n: sample_pc(VPSDE(), score, (8, 2), num_steps=n,
                                             device="cuda")),
    ("sample_pc_ve", lambda score, n: sample_pc(VESDE(), score, (8, 2), num_steps=n,
                                                device="cuda", eps=1e-5)),
    ("sample_ddim", lambda score, n: sample_ddim(VPSDE(), score, (8, 2), num_steps=n,
                                                 device="cuda")),
    ("sample_dpm_solver", lambda score, n: sample_dpm_solver(VPSDE(), score, (8, 2),
                                                             num_steps=n, device="cuda")),
    ("sample_heun", lambda score, n: sample_heun(VPSDE(), score, (8, 2), num_steps=n,
                                                 device="cuda")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_fixed_step_samplers_do_not_wait_for_the_device_per_step(name, run):
    score = lambda x, t: -x  # noqa: E731 - a device-only score
    run(score, 30)  # first call: tables copied to the device
    counts = []
    for steps in (30, 60):
        with _SyncCounter() as counter:
            run(score, steps)
        counts.append(counter.count)
    # Host reads per call (a lazy first-time read can fall in either), none per step: 30
    # more steps would add at least 30.
    assert counts[1] <= counts[0] + 2, counts


@cuda
@pytest.mark.parametrize("divergence", ["rademacher", "exact"])
def test_likelihood_evaluations_do_not_wait_for_the_device(divergence):
    from score_sde.likelihood import augmented_rhs
    from score_sde.ode import _ODEFunc
    from score_sde.sde import ReverseSDE
    from score_sde.score import CountingScore
    score = _unet_score("cuda")
    x = torch.randn(4, 1, 8, 8, device="cuda")
    rsde = ReverseSDE(VPSDE(), CountingScore(score, 1e-5, 1.0), probability_flow=True)
    probes = None if divergence == "exact" else torch.ones((1,) + tuple(x.shape), device="cuda")
    func = _ODEFunc(augmented_rhs(rsde, x.dtype, probes), 4, 1e-5, 1.0)
    state = (x.double(), torch.zeros(4, dtype=torch.float64, device="cuda"))
    t = torch.tensor(0.3, dtype=torch.float64, device="cuda")
    with host_checked_times():
        func(t, state)  # first call: lazy set-up
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            drift, div = func(t, state)
        finally:
            torch.cuda.set_sync_debug_mode(before)
    assert drift.shape == x.shape and div.shape == (4,)


@cuda
def test_training_loss_does_not_wait_for_the_device():
    net = _unet_score("cuda")
    x = torch.randn(8, 1, 8, 8, device="cuda")
    for loss in (ScoreMatchingLoss(VPSDE()), ScoreMatchingLoss(VPSDE(), weighting="likelihood",
                                                               importance_sampling=True)):
        g = torch.Generator(device="cuda").manual_seed(0)
        loss(net, x, generator=g)
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            value = loss(net, x, generator=g)
        finally:
            torch.cuda.set_sync_debug_mode(before)
        assert np.isfinite(float(value))
