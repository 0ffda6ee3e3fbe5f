"""A regular (non-editable) install runs the README's commands that name no file.

The package is built and installed from a copy of the sources (so the checkout gets no build/
folder) into a temporary folder with pip, offline: --no-index, --no-deps (the dependencies
are this environment's) and --no-build-isolation (setuptools from this environment, a test
dependency). The commands then run from another folder with only that install importable.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("setup.py", "README.md", "score_sde", "configs")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    site = root / "site"
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                          "--no-build-isolation", "--target", str(site), str(src)],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return site, elsewhere, env


def _run(installed, *args, timeout=300):
    site, elsewhere, env = installed
    return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_the_install_ships_the_configs_and_is_the_one_imported(installed):
    site, _, _ = installed
    shipped = {p.name for p in (site / "score_sde" / "configs").glob("*.py")}
    assert {p.name for p in (REPO / "configs").glob("*.py")} == shipped
    out = _run(installed, "-c", "import score_sde, score_sde.config as c; "
               "print(score_sde.__file__); print(c.config_dir())")
    assert out.returncode == 0, out.stderr
    module, configs = out.stdout.split()
    assert Path(module).parent == site / "score_sde"
    assert Path(configs) == site / "score_sde" / "configs"


@pytest.mark.parametrize("args, model", [
    (["--sde", "vp"], "small_unet"),  # the README's first training command, as a dry run
    (["--config", "cifar10_ddpmpp_cont"], "ncsnpp"),  # a shipped config by name
])
def test_default_and_named_configs_resolve_anywhere(installed, args, model):
    out = _run(installed, "-m", "score_sde.train", *args, "--dry_run")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["model"]["name"] == model


def test_the_readme_toy_command_trains_from_another_folder(installed):
    _, elsewhere, _ = installed
    readme = (REPO / "README.md").read_text()
    command = "python -m score_sde.train --sde vp --dataset toy_8gaussians --n_iters 4000"
    assert command in readme
    args = command.split()[3:]
    args[args.index("--n_iters") + 1] = "20"  # the same command, shorter
    out = _run(installed, "-m", "score_sde.train", *args, "--sample_every", "10")
    assert out.returncode == 0, out.stderr
    run = elsewhere / "runs" / "vp_toy_8gaussians"
    assert json.loads(out.stdout)["workdir"] == os.path.join("runs", "vp_toy_8gaussians")
    assert {"checkpoint.pt", "log.txt", "config.json"} <= {p.name for p in run.iterdir()}
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "samples_00000010.png", "samples_00000020.png"]
