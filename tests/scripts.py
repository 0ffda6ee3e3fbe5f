"""The repository's scripts (tools/, benchmarks/) loaded as modules from their paths, so tests
call their main() and helpers in-process without editing sys.path."""
import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str) -> ModuleType:
    """The script at REPO/relative_path (e.g. "tools/likelihood.py"), executed as a module."""
    path = REPO / relative_path
    name = "script_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
