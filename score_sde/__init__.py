"""score_sde: continuous-time score-based generative modelling in PyTorch.

The public API is what `__all__` lists; everything else may change.
"""
from .classifier import (CLASSIFIERS, FeatureClassifier, NoiseConditionalClassifier,
                         classifier_log_prob_fn, load_classifier, noisy_classifier_loss,
                         save_classifier)
from .cuda_graphs import CudaGraphed
from .controllable import (classifier_free_score, classifier_guided_score, colorize, inpaint,
                           interpolate, slerp)
from .fast_sampling import (DPM_DEFAULT_SOLVER_TYPES, DPM_METHODS, DPM_PREDICTIONS,
                            DPM_SOLVER_TYPES, TIME_GRIDS, sample_ddim, sample_dpm_solver,
                            sample_heun)
from .likelihood import DIVERGENCES, bits_per_dim, log_likelihood
from .losses import REDUCTIONS, WEIGHTINGS, DDPMLoss, HybridLoss, ScoreMatchingLoss, SMLDLoss
from .metrics import feature_statistics, frechet_distance, frechet_distance_from_features
from .ode import ADAPTIVE_METHODS, ERROR_NORMS, data_to_latent, latent_to_data, sample_ode
from .models import MODELS, MLPScoreNet, NCSNpp, SmallUNet, paper_config
from .sampling import CORRECTORS, PREDICTORS, Corrector, Predictor, sample_pc
from .score import make_score_fn
from .sde import SDE, CosineVPSDE, ReverseSDE, SubVPSDE, VESDE, VPSDE

__version__ = "0.1.0"

__all__ = [
    # SDEs
    "SDE", "VPSDE", "SubVPSDE", "VESDE", "CosineVPSDE", "ReverseSDE",
    # score functions
    "make_score_fn",
    # samplers
    "sample_pc", "Predictor", "Corrector", "PREDICTORS", "CORRECTORS",
    "sample_ode", "data_to_latent", "latent_to_data", "ADAPTIVE_METHODS", "ERROR_NORMS",
    "CudaGraphed",
    # fast samplers
    "sample_ddim", "sample_dpm_solver", "sample_heun", "TIME_GRIDS", "DPM_METHODS",
    "DPM_PREDICTIONS", "DPM_SOLVER_TYPES", "DPM_DEFAULT_SOLVER_TYPES",
    # controllable generation
    "inpaint", "colorize", "classifier_guided_score", "classifier_free_score", "slerp",
    "interpolate",
    # likelihood
    "log_likelihood", "bits_per_dim", "DIVERGENCES",
    # networks
    "NCSNpp", "SmallUNet", "MLPScoreNet", "MODELS", "paper_config",
    # training losses
    "ScoreMatchingLoss", "DDPMLoss", "SMLDLoss", "HybridLoss", "WEIGHTINGS", "REDUCTIONS",
    # classifiers (guidance, metrics)
    "NoiseConditionalClassifier", "FeatureClassifier", "CLASSIFIERS", "classifier_log_prob_fn",
    "noisy_classifier_loss", "save_classifier", "load_classifier",
    # sample-quality metrics
    "feature_statistics", "frechet_distance", "frechet_distance_from_features",
]
