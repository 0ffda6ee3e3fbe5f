"""The shared argument checks (score_sde/checks.py) at every public entry point that uses them.

Each sampler, ODE solve and the likelihood validates its common arguments through one module,
so the same mistake gets the same one-line message everywhere, before any score evaluation.
"""
import re

import pytest
import torch

import score_sde
from score_sde import (colorize, data_to_latent, inpaint, latent_to_data, log_likelihood,
                       sample_ddim, sample_dpm_solver, sample_heun, sample_ode, sample_pc)
from tests.test_sde import OrnsteinUhlenbeck

pytestmark = pytest.mark.usefixtures("one_thread")


class Counter:
    """The score -x of N(0, I) data under VP, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        return -x


def data(shape=(2, 3)):
    return torch.zeros(shape, dtype=torch.float64)


# name -> call(sde, score_fn, **kwargs) with valid defaults for everything else.
ENTRY_POINTS = {
    "sample_pc": lambda sde, score_fn, **kw: sample_pc(sde, score_fn, (2, 3), num_steps=25, **kw),
    "inpaint": lambda sde, score_fn, **kw: inpaint(sde, score_fn, data(), torch.tensor([1, 0, 1]),
                                                   num_steps=25, **kw),
    "colorize": lambda sde, score_fn, **kw: colorize(sde, score_fn, data((2, 1, 2, 2)),
                                                     num_steps=25, **kw),
    "sample_ode": lambda sde, score_fn, **kw: sample_ode(sde, score_fn, (2, 3), **kw),
    "data_to_latent": lambda sde, score_fn, **kw: data_to_latent(sde, score_fn, data(), **kw),
    "latent_to_data": lambda sde, score_fn, **kw: latent_to_data(sde, score_fn, data(), **kw),
    "log_likelihood": lambda sde, score_fn, **kw: log_likelihood(sde, score_fn, data(), **kw),
    "sample_ddim": lambda sde, score_fn, **kw: sample_ddim(sde, score_fn, (2, 3), **kw),
    "sample_dpm_solver": lambda sde, score_fn, **kw: sample_dpm_solver(sde, score_fn, (2, 3),
                                                                       **kw),
    "sample_heun": lambda sde, score_fn, **kw: sample_heun(sde, score_fn, (2, 3), **kw),
}
# Entry points that need closed-form marginals, and the start of what they say without them.
NEED_MARGINALS = {
    "inpaint": "conditional sampling draws the known region from the forward marginal, which "
               "OrnsteinUhlenbeck does not provide",
    "colorize": "conditional sampling draws the known region from the forward marginal, which "
                "OrnsteinUhlenbeck does not provide",
    "sample_ddim": "the fast samplers need closed-form marginals (marginal_coeffs), which "
                   "OrnsteinUhlenbeck does not provide",
    "sample_dpm_solver": "the fast samplers need closed-form marginals (marginal_coeffs), "
                         "which OrnsteinUhlenbeck does not provide",
    "sample_heun": "the fast samplers need closed-form marginals (marginal_coeffs), which "
                   "OrnsteinUhlenbeck does not provide",
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case, match", [
    ("sde", r"^sde must be an instance of score_sde\.SDE, got str$"),
    ("score_fn", r"^score_fn must be callable, got NoneType$"),
    ("eps_zero", r"^eps must be a finite number > 0, got 0\.0$"),
    ("eps_at_T", r"^eps must lie in \(0, T=1\.0\), got 1\.0$"),
])
def test_common_arguments_get_one_message_everywhere(entry, case, match):
    counter = Counter()
    sde, score_fn, kwargs = score_sde.VPSDE(), counter, {}
    if case == "sde":
        sde = "vp"
    elif case == "score_fn":
        score_fn = None
    else:
        kwargs["eps"] = 0.0 if case == "eps_zero" else 1.0
    with pytest.raises(ValueError, match=match):
        ENTRY_POINTS[entry](sde, score_fn, **kwargs)
    assert counter.calls == 0  # refused before sampling


@pytest.mark.parametrize("entry", NEED_MARGINALS)
def test_samplers_that_need_marginals_say_so(entry):
    counter = Counter()
    with pytest.raises(ValueError, match="^" + re.escape(NEED_MARGINALS[entry])):
        ENTRY_POINTS[entry](OrnsteinUhlenbeck(), counter)
    assert counter.calls == 0


# --- the tools' command-line frame (score_sde.cli.run_tool) ---------------------------------

def _run_tool(argv, body, capsys):
    from score_sde.cli import run_tool

    def define(fv):
        from absl import flags
        flags.DEFINE_string("output", None, "an output file", flag_values=fv)

    status = run_tool(["tool"] + argv, "A tool.", define, body)
    return status, capsys.readouterr().err.strip().splitlines()


def test_tools_refuse_an_empty_string_flag(capsys):
    calls = []
    status, err = _run_tool(["--output", ""], lambda fv: calls.append(fv.output), capsys)
    assert (status, err, calls) == (2, ["error: --output is empty; give a value or leave the "
                                        "flag out for its default"], [])
    assert _run_tool(["--output", "x.json"], lambda fv: calls.append(fv.output),
                     capsys)[0] == 0 and calls == ["x.json"]


def test_tools_report_an_unreadable_file_in_one_line(capsys):
    def body(fv):
        raise PermissionError(13, "Permission denied", "/data/train.bin")

    status, err = _run_tool([], body, capsys)
    assert (status, err) == (4, ["error: [Errno 13] Permission denied: '/data/train.bin'"])
