"""Low-dimensional data (2-D toys, --dataset array): an MLP that trains in about a minute on
a CPU. The EMA rate is shortened to 0.999 because a 4000-step run cannot warm up 0.9999."""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig


def get_config() -> Config:
    return Config(
        sde=SDEConfig(name="vp"),
        data=DataConfig(dataset="toy_8gaussians"),
        model=ModelConfig(name="mlp", kwargs=dict(hidden=256, num_layers=3),
                          prediction="noise", time_input="scaled_t"),
        training=TrainingConfig(n_iters=4000, batch_size=512, lr=1e-3, warmup=100,
                                ema_rate=0.999, log_every=100, eval_every=500,
                                eval_batches=8, sample_every=2000, num_samples=2000,
                                checkpoint_every=500, snapshot_every=2000),
    )
