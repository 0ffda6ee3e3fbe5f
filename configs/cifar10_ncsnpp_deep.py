"""CIFAR-10, NCSN++ cont. deep (VE), 107.6M parameters; input already centred, so the
paper's noise levels for data in [0, 1] (0.01 to 50) are doubled: 0.02 to 100."""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig
from score_sde.models import paper_config


def get_config() -> Config:
    return Config(
        sde=SDEConfig(name="ve", sigma_min=0.02, sigma_max=100.0),
        data=DataConfig(dataset="cifar10"),
        model=ModelConfig(name="ncsnpp", kwargs=dict(paper_config("ncsnpp_deep"), centered=True),
                          prediction="noise", time_input="std"),
        training=TrainingConfig(n_iters=950_000, batch_size=128, lr=2e-4, warmup=5000,
                                grad_clip=1.0, ema_rate=0.999, reduce_mean=False,
                                log_every=100, eval_every=5000, sample_every=50_000,
                                checkpoint_every=5000, snapshot_every=50_000),
    )
