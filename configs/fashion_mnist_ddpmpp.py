"""Fashion-MNIST 28x28, DDPM++ cont. (VP) scaled down to 7.0M parameters.

The paper's CIFAR-10 DDPM++ cont. (`paper_config("ddpmpp_cont")`: BigGAN residual blocks, no
FIR, sinusoidal embedding of 999 t, noise prediction, skip rescaling, zero-initialised output
layers, dropout 0.1; score_sde_pytorch configs/vp/cifar10_ddpmpp_continuous.py) with nf 64
instead of 128, three resolutions 28, 14, 7 (ch_mult (1, 2, 2)) instead of four (a fourth
would need a side divisible by 8, and 28 = 7 * 2^2 is not), 2 residual blocks per resolution
instead of 4 and self-attention at 14x14, as the paper's at 16x16 of 32x32 images. 2.66 GFLOP
per image and forward pass (the CIFAR-10 model: 21.7). Training follows the reference's VP
settings (Adam at 2e-4, batch 128, gradient clipping at 1, loss averaged over dimensions,
EMA rate 0.9999) except a warm-up of 1000 steps instead of 5000, because a run here lasts
minutes, not 1.3M steps. n_iters is a placeholder: benchmarks/fashion_mnist.py sets it.
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
                                grad_clip=1.0, ema_rate=0.9999, reduce_mean=True,
                                log_every=100, eval_every=2000, sample_every=10_000,
                                num_samples=64, checkpoint_every=1000, snapshot_every=5000),
    )
