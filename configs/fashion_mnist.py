"""Fashion-MNIST 28x28 with a compact DDPM-style U-Net (the default of score_sde.train)."""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig


def get_config() -> Config:
    return Config(
        sde=SDEConfig(name="vp"),
        data=DataConfig(dataset="fashion_mnist"),
        model=ModelConfig(name="small_unet",
                          kwargs=dict(nf=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                                      attn_resolutions=(7,), dropout=0.1),
                          prediction="noise", time_input="scaled_t"),
        training=TrainingConfig(n_iters=100_000, batch_size=128, lr=2e-4, warmup=1000,
                                ema_rate=0.9995, log_every=100, eval_every=2000,
                                sample_every=10_000, num_samples=64, checkpoint_every=1000,
                                snapshot_every=10_000),
    )
