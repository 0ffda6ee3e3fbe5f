"""score_sde: continuous-time score-based generative modelling in PyTorch.

The top level holds what most code imports: the SDEs, the score-function wrapper, the
samplers, the likelihood and the training loss. Choice tables (`PREDICTORS`, `TIME_GRIDS`,
...), networks, the other losses, classifiers, metrics and `CudaGraphed` live in their
submodules (`score_sde.sampling`, `score_sde.fast_sampling`, `score_sde.models`, ...), each
of which lists its public names in its own `__all__`. Names outside those lists may change.
"""
import importlib
import importlib.util
import warnings
from typing import TYPE_CHECKING as _TYPE_CHECKING

# Each exported name and the submodule defining it. They are imported on first use, so that
# `import score_sde` is quick and the command lines under it (`python -m score_sde.train`) can
# answer Ctrl-C with one line while torch loads.
_EXPORTS = {
    "controllable": ("classifier_free_score", "classifier_guided_score", "colorize", "inpaint",
                     "interpolate"),
    "fast_sampling": ("sample_ddim", "sample_dpm_solver", "sample_heun"),
    "likelihood": ("bits_per_dim", "log_likelihood"),
    "losses": ("ScoreMatchingLoss",),
    "ode": ("data_to_latent", "latent_to_data", "sample_ode"),
    "sampling": ("Corrector", "Predictor", "sample_pc"),
    "score": ("make_score_fn",),
    "sde": ("SDE", "CosineVPSDE", "ReverseSDE", "SubVPSDE", "VESDE", "VPSDE"),
}
_EXPORTED_FROM = {name: module for module, names in _EXPORTS.items() for name in names}

if _TYPE_CHECKING:  # what static analysers and editors read
    from .controllable import (classifier_free_score, classifier_guided_score, colorize,
                               inpaint, interpolate)
    from .fast_sampling import sample_ddim, sample_dpm_solver, sample_heun
    from .likelihood import bits_per_dim, log_likelihood
    from .losses import ScoreMatchingLoss
    from .ode import data_to_latent, latent_to_data, sample_ode
    from .sampling import Corrector, Predictor, sample_pc
    from .score import make_score_fn
    from .sde import SDE, CosineVPSDE, ReverseSDE, SubVPSDE, VESDE, VPSDE

__version__ = "0.1.0"

__all__ = [
    # SDEs
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "ReverseSDE",
    # score functions
    "make_score_fn",
    # samplers
    "sample_pc", "Predictor", "Corrector", "sample_ode", "data_to_latent", "latent_to_data",
    "sample_ddim", "sample_dpm_solver", "sample_heun",
    # controllable generation
    "inpaint", "colorize", "interpolate", "classifier_guided_score", "classifier_free_score",
    # likelihood
    "log_likelihood", "bits_per_dim",
    # training loss
    "ScoreMatchingLoss",
]

# Names the top level exported before they moved to their submodules: still importable from
# here, with a DeprecationWarning naming the module to import them from.
_MOVED = {
    "sampling": ("PREDICTORS", "CORRECTORS"),
    "ode": ("ADAPTIVE_METHODS", "ERROR_NORMS"),
    "fast_sampling": ("TIME_GRIDS", "DPM_METHODS", "DPM_PREDICTIONS", "DPM_SOLVER_TYPES",
                      "DPM_DEFAULT_SOLVER_TYPES"),
    "cuda_graphs": ("CudaGraphed",),
    "controllable": ("slerp",),
    "likelihood": ("DIVERGENCES",),
    "models": ("NCSNpp", "SmallUNet", "MLPScoreNet", "MODELS", "paper_config"),
    "losses": ("DDPMLoss", "SMLDLoss", "HybridLoss", "WEIGHTINGS", "REDUCTIONS"),
    "classifier": ("NoiseConditionalClassifier", "FeatureClassifier", "CLASSIFIERS",
                   "classifier_log_prob_fn", "noisy_classifier_loss", "save_classifier",
                   "load_classifier"),
    "metrics": ("feature_statistics", "frechet_distance", "frechet_distance_from_features"),
}
_MOVED_TO = {name: module for module, names in _MOVED.items() for name in names}


def __getattr__(name):
    module = _EXPORTED_FROM.get(name)
    if module is not None:
        # Looked up on every access (a dict lookup once imported), so that reloading or
        # patching the submodule is seen here too.
        return getattr(importlib.import_module(f".{module}", __name__), name)
    module = _MOVED_TO.get(name)
    if module is not None:
        warnings.warn(f"score_sde.{name} moved to score_sde.{module}.{name}; import it from "
                      f"score_sde.{module}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f".{module}", __name__), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule not imported yet
    raise AttributeError(f"module 'score_sde' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
