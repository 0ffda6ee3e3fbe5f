"""Low-dimensional data (2-D toys, --dataset array): an MLP that trains in about a minute on
a CPU.

Measured choices for 4000-step runs (8-mode ring, NLL against the exact entropy): a cosine
learning-rate decay and the EMA warm-up (each roughly halves the gap), the noise level as
the network's time input through Fourier features of log sigma (four times fewer ODE steps
than 999 t at the same NLL), and the MLP's time-dependent linear skip. The EMA rate is 0.999
because a 4000-step run cannot average over 0.9999's horizon.
"""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig


def get_config() -> Config:
    return Config(
        sde=SDEConfig(name="vp"),
        data=DataConfig(dataset="toy_8gaussians"),
        model=ModelConfig(name="mlp",
                          kwargs=dict(hidden=256, num_layers=3, embedding_type="fourier",
                                      fourier_scale=1.0),
                          prediction="noise", time_input="std"),
        training=TrainingConfig(n_iters=4000, batch_size=512, lr=1e-3, warmup=100,
                                lr_decay="cosine", ema_rate=0.999, log_every=100,
                                eval_every=500, eval_batches=8, sample_every=2000,
                                num_samples=2000, checkpoint_every=500, snapshot_every=2000),
    )
