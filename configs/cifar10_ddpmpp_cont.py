"""CIFAR-10, DDPM++ cont. (VP), 61.8M parameters (Song et al. 2021, Table 3 / App. H)."""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig
from score_sde.models import paper_config


def get_config() -> Config:
    return Config(
        sde=SDEConfig(name="vp"),
        data=DataConfig(dataset="cifar10"),
        model=ModelConfig(name="ncsnpp", kwargs=paper_config("ddpmpp_cont"),
                          prediction="noise", time_input="scaled_t"),
        training=TrainingConfig(n_iters=1_300_000, batch_size=128, lr=2e-4, warmup=5000,
                                grad_clip=1.0, ema_rate=0.9999, reduce_mean=True,
                                log_every=100, eval_every=5000, sample_every=50_000,
                                checkpoint_every=5000, snapshot_every=50_000),
    )
