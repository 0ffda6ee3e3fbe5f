"""score_sde/build.py: torch.compile of the whole network or of its repeated blocks.

Compiling block by block must not change the arithmetic: outputs and parameter gradients of
tiny DDPM++ and NCSN++ (the paper configurations at toy sizes) match the eager network's to
float32 round-off. Those tests need torch.compile's CPU backend (a C++ compiler) and are
skipped without it.
"""
import pytest
import torch

from score_sde.build import compile_model
from score_sde.models import REPEATED_BLOCKS, MLPScoreNet, NCSNpp, paper_config

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch.compile itself calls the deprecated torch.jit.script_method.
              pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")]

# Toy sizes with both resolutions' blocks, attention, and up / down blocks.
TINY = dict(image_size=8, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
            dropout=0.0)
# float32 round-off of a few dozen layers, compiled kernels summing in another order.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def cpu_compiler():
    """Skips when torch.compile cannot build CPU kernels here."""
    try:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.ones(3))
    except Exception as err:  # noqa: BLE001 - any backend failure means: not available here
        pytest.skip(f"torch.compile's CPU backend is unavailable: {type(err).__name__}: {err}")


def _pair(name, seed=0):
    """Two copies of a tiny paper network with the same perturbed weights (zero-initialised
    layers would otherwise hide the rest)."""
    torch.manual_seed(seed)
    eager = NCSNpp(**dict(paper_config(name), **TINY))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    other = NCSNpp(**dict(paper_config(name), **TINY))
    other.load_state_dict(eager.state_dict())
    return eager, other


@pytest.mark.parametrize("name", ["ddpmpp_cont", "ncsnpp_cont"])
def test_blocks_compile_matches_eager(name, cpu_compiler):
    eager, compiled = _pair(name)
    keys = list(compiled.state_dict())
    forward = compile_model(compiled, mode="default", scope="blocks")
    assert forward is compiled and list(compiled.state_dict()) == keys
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    t = torch.rand(3, generator=gen) * 0.9 + 0.1  # a noise scale / time, either model's input
    outputs = []
    for net in (eager, forward):
        out = net(x, t)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=RTOL, atol=ATOL)
    for (pname, p), q in zip(eager.named_parameters(), compiled.parameters()):
        scale = p.grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(q.grad / scale, p.grad / scale, rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"gradient of {pname}: {m}")


def test_model_scope_wraps_the_whole_network():
    net = MLPScoreNet(dim=2)
    wrapped = compile_model(net, mode="default", scope="model")  # compiles lazily: no call
    assert wrapped is not net and wrapped._orig_mod is net


def test_blocks_scope_needs_repeated_blocks():
    names = ", ".join(c.__name__ for c in REPEATED_BLOCKS)
    with pytest.raises(ValueError, match=f"needs a network with repeated blocks \\({names}\\); "
                                         f"MLPScoreNet has none"):
        compile_model(MLPScoreNet(dim=2), mode="default", scope="blocks")


def test_unknown_scope():
    with pytest.raises(ValueError, match="unknown compile_scope 'layers'; accepted: 'model', "
                                         "'blocks'"):
        compile_model(MLPScoreNet(dim=2), mode="default", scope="layers")
