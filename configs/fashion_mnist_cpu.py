"""Fashion-MNIST quick start for a CPU: a 1.1M-parameter U-Net sized for about half an hour of
training on two cores.

The default `fashion_mnist.py` (6.3M parameters, batch 128) trains at about 20-30 images/s on a
2-core CPU, so its 100,000 steps would take days. This one halves the base width (nf 32), keeps
one residual block per resolution and no dropout (about 120 images/s there), and trains 3000
steps of batch 64 with a larger learning rate (1e-3 after a 200-step warm-up, cosine decay to
zero) and an EMA of rate 0.999 with warm-up, because a short run cannot average over 0.9999's
horizon. Sample grids use Euler-Maruyama with 100 steps: after so short a run the
probability-flow ODE (DPM-Solver, at 20 or 50 evaluations, or dopri5) turned about 12 of 64
prior draws into noise-like textures where the stochastic sampler gave none (BENCHMARKS.md,
"CPU quick start"); a grid costs about 20 s on two cores.
"""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig


def get_config() -> Config:
    return Config(
        sde=SDEConfig(name="vp"),
        data=DataConfig(dataset="fashion_mnist"),
        model=ModelConfig(name="small_unet",
                          kwargs=dict(nf=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                                      attn_resolutions=(7,), dropout=0.0),
                          prediction="noise", time_input="scaled_t"),
        training=TrainingConfig(n_iters=3000, batch_size=64, lr=1e-3, warmup=200,
                                lr_decay="cosine", grad_clip=1.0, ema_rate=0.999,
                                log_every=50, eval_every=500, sample_every=1000,
                                sampler="pc", sample_steps=100,
                                num_samples=64, checkpoint_every=250, snapshot_every=1000),
    )
