"""Score networks: NCSN++ / DDPM++ (Song et al. 2021) and small networks for toy data."""
from .layers import AttnBlockpp, ResnetBlockDDPMpp
from .ncsnpp import NCSNpp, paper_config
from .small import MLPScoreNet, SmallUNet

# Network classes by name; each takes keyword arguments only.
MODELS = {"ncsnpp": NCSNpp, "mlp": MLPScoreNet, "small_unet": SmallUNet}
# The U-Nets' repeated submodules (ResnetBlockBigGANpp included, a subclass): what
# compile_scope "blocks" compiles one by one (`score_sde.build.compile_model`).
REPEATED_BLOCKS = (ResnetBlockDDPMpp, AttnBlockpp)

__all__ = ["NCSNpp", "MLPScoreNet", "SmallUNet", "MODELS", "REPEATED_BLOCKS", "paper_config"]
