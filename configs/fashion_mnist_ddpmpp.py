"""Fashion-MNIST 28x28, DDPM++ cont. (VP) scaled down: 6.6M parameters (see below).

The paper's CIFAR-10 DDPM++ cont. (`paper_config("ddpmpp_cont")`: BigGAN residual blocks, no
FIR, sinusoidal embedding of 999 t, noise prediction, skip rescaling, zero-initialised output
layers) with nf 64 instead of 128, three resolutions 28, 14, 7 (ch_mult (1, 2, 2)) instead of
four (28 = 7 * 2^2: a fourth level would need a side divisible by 8), 2 residual blocks per
level instead of 4 and self-attention at 14x14, as the paper's at 16x16 on 32x32 images. The
training schedule is the paper's for VP models except a shorter warm-up and a faster EMA,
because a run here lasts minutes, not 1.3M steps.
"""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig
from score_sde.models import paper_config


def get_config() -> Config:
    model = dict(paper_config("ddpmpp_cont"), image_size=28, in_channels=1, nf=64,
                 ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(14,))
    return Config(
        sde=SDEConfig(name="vp"),
        data=DataConfig(dataset="fashion_mnist"),
        model=ModelConfig(name="ncsnpp", kwargs=model, prediction="noise",
                          time_input="scaled_t"),
        training=TrainingConfig(n_iters=20_000, batch_size=128, lr=2e-4, warmup=1000,
                                grad_clip=1.0, ema_rate=0.9995, reduce_mean=False,
                                log_every=100, eval_every=2000, sample_every=10_000,
                                num_samples=64, checkpoint_every=1000, snapshot_every=5000),
    )
