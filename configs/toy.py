"""Low-dimensional data (2-D toys, --dataset array): an MLP that trains in about a minute on
a CPU.

Measured choices for 4000-step runs (8-mode ring, NLL against the exact entropy,
benchmarks/contract_2d.py): a cosine learning-rate decay and the EMA warm-up (each roughly
halves the gap), the noise level as the network's time input through Fourier features of its
log (four times fewer ODE steps than 999 t at the same NLL), and the MLP's time-dependent
linear skip. The noise level is EDM's sigma / alpha ("noise_level"), which keeps resolving
time where a VP-type schedule's std saturates at 1 (cosine VP's gap fell from 0.060 to 0.040
nats with it), and the input is scaled by 1 / sqrt(alpha^2 + sigma^2) (the identity for VP
and cosine VP; for VE it keeps the network's input near the data's scale instead of sigma,
up to 50: VE's gap fell from 0.096 to 0.021 nats). The EMA rate is 0.999 because a
4000-step run cannot average over 0.9999's horizon.
"""
from score_sde.config import Config, DataConfig, ModelConfig, SDEConfig, TrainingConfig


def get_config() -> Config:
    return Config(
        sde=SDEConfig(name="vp"),
        data=DataConfig(dataset="toy_8gaussians"),
        model=ModelConfig(name="mlp",
                          kwargs=dict(hidden=256, num_layers=3, embedding_type="fourier",
                                      fourier_scale=1.0),
                          prediction="noise", time_input="noise_level", input_scaling=True),
        training=TrainingConfig(n_iters=4000, batch_size=512, lr=1e-3, warmup=100,
                                lr_decay="cosine", ema_rate=0.999, log_every=100,
                                eval_every=500, eval_batches=8, sample_every=2000,
                                num_samples=2000, checkpoint_every=500, snapshot_every=2000),
    )
