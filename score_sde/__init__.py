"""score_sde: continuous-time score-based generative modelling in PyTorch.

The public API is what `__all__` lists; everything else may change.
"""
from .likelihood import DIVERGENCES, bits_per_dim, log_likelihood
from .losses import REDUCTIONS, WEIGHTINGS, DDPMLoss, HybridLoss, ScoreMatchingLoss, SMLDLoss
from .ode import ADAPTIVE_METHODS, data_to_latent, latent_to_data, sample_ode
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
    "sample_ode", "data_to_latent", "latent_to_data", "ADAPTIVE_METHODS",
    # likelihood
    "log_likelihood", "bits_per_dim", "DIVERGENCES",
    # networks
    "NCSNpp", "SmallUNet", "MLPScoreNet", "MODELS", "paper_config",
    # training losses
    "ScoreMatchingLoss", "DDPMLoss", "SMLDLoss", "HybridLoss", "WEIGHTINGS", "REDUCTIONS",
]
