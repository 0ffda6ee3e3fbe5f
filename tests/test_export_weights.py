"""score_sde.runs.export_weights and tools/export_weights.py: a run's EMA weights alone, in
float32 or float16, read back by load_trained and the tools.

The round trip is checked against the training checkpoint itself: the exported tensors equal
its EMA weights (float32) or those weights rounded to float16, the rebuilt network computes
what the checkpoint's network computes from the same weights, and the likelihood tool gives
the same numbers from either file.
"""
import json
from pathlib import Path

import pytest
import torch

from score_sde.checkpoint import read_checkpoint, save_checkpoint
from score_sde.runs import export_weights, load_trained
from tests.scripts import load_script


export_tool = load_script("tools/export_weights.py")
likelihood_tool = load_script("tools/likelihood.py")


def _outputs(run, x):
    t = torch.full((x.shape[0],), 0.3)
    with torch.no_grad():
        return run.score_fn()(x, t)


@pytest.mark.parametrize("half", [False, True])
def test_exported_weights_round_trip(toy_run, tmp_path, half):
    source = toy_run / "checkpoint.pt"
    summary = export_weights(source, tmp_path / "w.pt", half=half)
    state, exported = read_checkpoint(source), read_checkpoint(tmp_path / "w.pt")
    assert set(exported) == {"ema", "step", "config", "data_info", "weights_only"}
    assert summary["dtype"] == ("float16" if half else "float32")
    assert summary["step"] == state["step"] == 10 and summary["bytes"] > 0
    assert summary["parameters"] == sum(v.numel() for v in state["ema"].values())
    for key, value in state["ema"].items():
        want = value.half() if half else value.float()
        assert exported["ema"][key].dtype == want.dtype and torch.equal(exported["ema"][key], want)
    full, light = load_trained(source), load_trained(tmp_path / "w.pt")
    assert light.step == full.step and light.info == full.info and light.use_ema
    for p in light.model.parameters():
        assert p.dtype == torch.float32  # loaded back into float32
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    a, b = _outputs(full, x), _outputs(light, x)
    if half:  # the same network with weights rounded to float16 (relative error ~ 2^-11)
        assert float((a - b).norm() / a.norm()) < 5e-3
    else:
        assert torch.equal(a, b)


def test_half_precision_halves_the_file(toy_run, tmp_path):
    single = export_weights(toy_run / "checkpoint.pt", tmp_path / "f32.pt")
    half = export_weights(toy_run / "checkpoint.pt", tmp_path / "f16.pt", half=True)
    full = (toy_run / "checkpoint.pt").stat().st_size
    assert single["bytes"] < full and half["bytes"] < single["bytes"]


def test_likelihood_tool_reads_exported_weights(toy_run, tmp_path, capsys):
    export_weights(toy_run / "checkpoint.pt", tmp_path / "w.pt")
    common = ["--workdir", str(toy_run), "--num_samples", "8", "--batch_size", "8", "--rtol",
              "1e-3", "--atol", "1e-3", "--device", "cpu"]
    results = []
    for name, extra in (("full", []), ("light", ["--checkpoint", str(tmp_path / "w.pt")])):
        assert likelihood_tool.main(["likelihood.py", *common, *extra, "--output",
                                     str(tmp_path / f"{name}.json"), "--partial_dir",
                                     str(tmp_path / f"p_{name}")]) == 0
        results.append(json.loads((tmp_path / f"{name}.json").read_text()))
    assert results[0]["nll_nats"] == results[1]["nll_nats"]
    assert results[0]["nfe_total"] == results[1]["nfe_total"] and results[1]["step"] == 10
    capsys.readouterr()
    assert likelihood_tool.main(["likelihood.py", *common, "--checkpoint",
                                 str(tmp_path / "w.pt"), "--nouse_ema", "--partial_dir",
                                 str(tmp_path / "p3")]) == 2
    assert "hold the EMA weights only" in capsys.readouterr().err


def test_command_line_and_its_errors(toy_run, tmp_path, capsys):
    out = tmp_path / "w.pt"
    assert export_tool.main(["export_weights.py", "--workdir", str(toy_run), "--output", str(out),
                             "--fp16"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["dtype"] == "float16" and Path(line["output"]) == out.resolve()
    cases = [
        (["--workdir", str(toy_run), "--output", str(out)], "exists; pass --overwrite"),
        (["--workdir", str(toy_run), "--output", str(tmp_path), "--overwrite"],
         "is a folder; give a file name"),
        (["--workdir", str(toy_run), "--output", str(out / "x.pt")], "which is a file"),
        (["--output", str(tmp_path / "x.pt")], "pass --workdir RUN"),
        (["--workdir", str(tmp_path), "--output", str(tmp_path / "x.pt")], "does not exist"),
        (["--checkpoint", str(out), "--output", str(tmp_path / "y.pt")], None),
    ]
    for args, message in cases:
        code = export_tool.main(["export_weights.py", *args])
        err = capsys.readouterr().err
        if message is None:  # exported weights can be exported again
            assert code == 0
        else:
            assert code == 2 and message in err, err
    foreign = tmp_path / "foreign.pt"
    save_checkpoint({"weights": torch.zeros(2)}, foreign)
    assert export_tool.main(["export_weights.py", "--checkpoint", str(foreign), "--output",
                             str(tmp_path / "z.pt")]) == 2
    assert "is not a training checkpoint" in capsys.readouterr().err


def test_weights_beyond_float16_are_refused(toy_run, tmp_path):
    state = read_checkpoint(toy_run / "checkpoint.pt")
    key = next(iter(state["ema"]))
    state["ema"][key] = state["ema"][key].clone().fill_(1e6)  # float16 tops out at 65504
    save_checkpoint(state, tmp_path / "big.pt")
    with pytest.raises(ValueError, match=f"EMA weight {key} does not fit in float16"):
        export_weights(tmp_path / "big.pt", tmp_path / "w.pt", half=True)
    assert not (tmp_path / "w.pt").exists()


def test_exporting_over_the_checkpoint_itself_is_refused(toy_run, tmp_path):
    import shutil
    shutil.copy(toy_run / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="is the checkpoint itself"):
        export_weights(tmp_path / "checkpoint.pt", tmp_path / "." / "checkpoint.pt")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_half_precision_keeps_buffers_such_as_fourier_frequencies_in_float32(tmp_path):
    """NCSN++'s Fourier frequencies (std 16) enter the time embedding as a phase
    2 pi w log(sigma): rounding them to float16 shifted it by up to 0.4 rad."""
    from score_sde.convert import ReferenceConfig, convert_checkpoint, to_reference, write_run
    from score_sde.models.ncsnpp import NCSNpp

    torch.manual_seed(0)
    net = dict(image_size=8, in_channels=3, nf=8, ch_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), dropout=0.0, resblock_type="biggan", fir=True,
               fir_kernel=(1, 3, 3, 1), skip_rescale=True, init_scale=1.0,
               embedding_type="fourier", fourier_scale=16.0, conditional=True, centered=False,
               scale_by_sigma=True)
    model = NCSNpp(**net)
    weights, shadow = to_reference(model.state_dict(), model)
    write_run(convert_checkpoint({"model": weights, "ema": {"shadow_params": shadow}, "step": 5},
                                 ReferenceConfig(sde="ve", dataset="CIFAR10", network=net,
                                                 ema_rate=0.999)), tmp_path / "run")
    source = tmp_path / "run" / "checkpoint.pt"
    export_weights(source, tmp_path / "w16.pt", half=True)
    state, exported = read_checkpoint(source), read_checkpoint(tmp_path / "w16.pt")
    buffers = {name for name, _ in model.named_buffers()}
    assert "time_embed.freqs" in buffers
    for key, value in exported["ema"].items():
        if value.is_floating_point():
            assert value.dtype == (torch.float32 if key in buffers else torch.float16), key
    assert torch.equal(exported["ema"]["time_embed.freqs"], state["ema"]["time_embed.freqs"])
    full, light = load_trained(source), load_trained(tmp_path / "w16.pt")
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 1.0, 20.0, 50.0])  # the network's time input: the noise scale
    with torch.no_grad():
        a, b = full.model(x, sigma), light.model(x, sigma)
    err = (a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert float(err.max()) < 5e-3  # parameters rounded to float16 alone (about 1e-3)
