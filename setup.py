"""Installs score_sde: `pip install .` or `pip install -e .` (add `[test]` for the test
dependencies)."""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent


def read_version() -> str:
    """Reads `__version__` from score_sde/__init__.py without importing the package."""
    text = (HERE / "score_sde" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("__version__ not found in score_sde/__init__.py")
    return match.group(1)


setup(
    name="score_sde",
    version=read_version(),
    description="Continuous-time score-based generative modelling with SDEs in PyTorch",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    # The repository's configs/ ships as score_sde.configs, so that an installed package finds
    # its default configs (`--config NAME`) wherever it runs.
    packages=find_packages(exclude=["tests", "tests.*", "configs"]) + ["score_sde.configs"],
    package_dir={"score_sde.configs": "configs"},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchdiffeq>=0.2.3",
        "scipy",
        "numpy",
        "absl-py",
        "tensorboard",
        "tqdm",
        "pillow",
    ],
    # setuptools: tests/test_install.py builds and installs a wheel offline (no build isolation).
    extras_require={"test": ["pytest", "hypothesis", "setuptools>=70.1"]},
)
