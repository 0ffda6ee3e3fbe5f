"""Score networks: NCSN++ / DDPM++ (Song et al. 2021) and small networks for toy data."""
from .ncsnpp import NCSNpp, paper_config
from .small import MLPScoreNet, SmallUNet

# Network classes by name; each takes keyword arguments only.
MODELS = {"ncsnpp": NCSNpp, "mlp": MLPScoreNet, "small_unet": SmallUNet}

__all__ = ["NCSNpp", "MLPScoreNet", "SmallUNet", "MODELS", "paper_config"]
