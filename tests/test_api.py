"""The import API: what the top level exports, and the names that moved to submodules."""
import importlib
import warnings

import pytest

import score_sde

MOVED = [(module, name) for module, names in score_sde._MOVED.items() for name in names]


def test_the_top_level_exports_exactly_its_list():
    public = {n for n in dir(score_sde) if not n.startswith("_")}
    # Besides __all__: the submodules Python binds on import and the two modules the
    # top level uses itself.
    submodules = {n for n in public if importlib.util.find_spec(f"score_sde.{n}") is not None}
    assert set(score_sde.__all__) <= public
    assert public - set(score_sde.__all__) - submodules <= {"importlib", "warnings"}
    assert len(score_sde.__all__) == len(set(score_sde.__all__))
    # No choice table (a dict or tuple of accepted names) at the top level.
    assert not [n for n in score_sde.__all__
                if isinstance(getattr(score_sde, n), (dict, tuple, list))]


def test_each_exported_name_is_its_modules_object():
    # The top level imports them on first use (`import score_sde` loads no torch).
    assert sorted(score_sde._EXPORTED_FROM) == sorted(score_sde.__all__)
    for name, module in score_sde._EXPORTED_FROM.items():
        sub = importlib.import_module(f"score_sde.{module}")
        assert getattr(score_sde, name) is getattr(sub, name), name
    namespace = {}
    exec("from score_sde import *", namespace)
    assert sorted(n for n in namespace if not n.startswith("__")) == sorted(score_sde.__all__)


def test_the_top_level_follows_a_reloaded_or_patched_submodule(monkeypatch):
    import score_sde.sde as sde_module

    assert score_sde.VPSDE is sde_module.VPSDE

    class Patched:
        pass

    monkeypatch.setattr(sde_module, "VPSDE", Patched)
    assert score_sde.VPSDE is Patched
    monkeypatch.undo()
    assert score_sde.VPSDE is sde_module.VPSDE
    assert score_sde.models is importlib.import_module("score_sde.models")  # a submodule


@pytest.mark.parametrize("module, name", MOVED)
def test_a_moved_name_lives_in_its_module_and_still_resolves_with_a_warning(module, name):
    sub = importlib.import_module(f"score_sde.{module}")
    assert name in sub.__all__ and name not in score_sde.__all__
    with pytest.warns(DeprecationWarning, match=f"import it from score_sde.{module}$"):
        assert getattr(score_sde, name) is getattr(sub, name)


def test_an_unknown_name_raises_attribute_error_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError, match="has no attribute 'sample_magic'"):
            score_sde.sample_magic  # noqa: B018
        assert not hasattr(score_sde, "sample_magic")
