"""Predictor–corrector samplers (Song et al. 2021, Sec. 4.2, Algorithms 1–3 and Appendix G).

One loop (`sample_pc`) owns the time grid; each predictor implements a single step from t to
t_next < t and each corrector a few Langevin-type steps at fixed t. Predictors and correctors
are chosen by name from `PREDICTORS` / `CORRECTORS`, or passed as user subclasses of
`Predictor` / `Corrector`.
"""
import abc
from typing import Callable, Optional, Tuple, Type, Union

import torch
from tqdm.auto import tqdm

from ._utils import (append_dims, batch_norm2, check_choice, checks_times_on_host,
                     warn_caller)
from .checks import check_pc_inputs, sample_device, sample_dtype, state_dtype
from .score import CountingScore
from .sde import SDE, ScoreFn

__all__ = ["Predictor", "Corrector", "PREDICTORS", "CORRECTORS", "sample_pc"]

NoiseFn = Callable[[torch.Tensor], torch.Tensor]


class Predictor(abc.ABC):
    """A numerical step of the reverse-time SDE (or probability-flow ODE) from t to t_next.

    Subclasses implement `step`; they may check in `__init__` that the SDE has what they need
    and raise ValueError there.

    Args:
        sde: the forward SDE.
        score_fn: score function (x, t) -> score shaped like x.
        probability_flow: step the probability-flow ODE instead of the reverse SDE (no noise).
    """

    # True when steps follow the SDE's discrete chain (`discretize`, `langevin_scale`); sample_pc
    # then re-discretizes the SDE to its own number of steps.
    uses_chain = False
    # False for a predictor that leaves x where it is: with `denoise`, sample_pc then ends with
    # Tweedie's formula at eps instead of the last step's noise-free mean.
    advances = True

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.sde = sde
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.rsde = sde.reverse(score_fn, probability_flow=probability_flow)

    @abc.abstractmethod
    def step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
             noise: NoiseFn) -> Tuple[torch.Tensor, torch.Tensor]:
        """Moves x from time t to t_next (`sample_pc`'s last step ends at t_next = 0).

        Args:
            x: states [B, ...].
            t: current times [B], float64.
            t_next: the times to move to [B], float64, t_next < t.
            noise: draws standard normal noise shaped like its argument.

        Returns:
            (x_next, x_next_mean): the new state and its value without the last noise.
        """


class NonePredictor(Predictor):
    """No predictor: corrector-only sampling."""

    advances = False

    def step(self, x, t, t_next, noise):
        return x, x


class EulerMaruyamaPredictor(Predictor):
    """Euler–Maruyama step of the reverse SDE, x <- x + drift dt + g sqrt(|dt|) z (dt < 0)."""

    def step(self, x, t, t_next, noise):
        dt = append_dims((t_next - t).to(x.dtype), x.ndim)
        drift, diffusion = self.rsde.sde(x, t)
        x_mean = x + drift * dt
        if self.probability_flow:
            return x_mean, x_mean
        return x_mean + append_dims(diffusion, x.ndim) * torch.sqrt(-dt) * noise(x), x_mean


class ReverseDiffusionPredictor(Predictor):
    """Reverse diffusion (Song et al. 2021, Eq. 46): x_{i-1} = x_i - f_i + G_i^2 s + G_i z,
    built from the SDE's own discretization (DDPM for VP, SMLD for VE, Euler–Maruyama else).

    `sample_pc` re-discretizes the SDE (`SDE.with_num_steps`) to the sampler's step count.

    On the probability-flow ODE this is Eq. 46 with the noise dropped, a first-order step whose
    error constant is large: with 1000 steps and exact scores it inflates the variance of 1-D
    Gaussian data by 2-5% (VP and VE). It needs small chain steps: a step with beta near 1,
    as every chain of the cosine VP SDE has at T (about 0.99 whatever the step count),
    about doubles the variance there, and no step count mends it (warned). For deterministic
    sampling prefer `ancestral_sampling` with `probability_flow=True` (DDIM) or `sample_ode`.
    """

    uses_chain = True
    # Largest chain beta the probability-flow form is used with without a warning.
    PF_MAX_BETA = 0.5

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        super().__init__(sde, score_fn, probability_flow)
        betas = getattr(sde, "discrete_betas", None)
        if probability_flow and betas is not None and float(betas.max()) > self.PF_MAX_BETA:
            warn_caller(f"reverse_diffusion on the probability-flow ODE takes a chain step with "
                        f"beta = {float(betas.max()):.3g} on {type(sde).__name__} at "
                        f"{len(betas)} steps, where its deterministic step errs (the variance "
                        f"of the samples can double); use ancestral_sampling (DDIM) or "
                        f"sample_ode")

    def step(self, x, t, t_next, noise):
        rev_f, rev_G = self.rsde.discretize(x, t, dt=t - t_next)
        x_mean = x - rev_f
        if self.probability_flow:
            return x_mean, x_mean
        return x_mean + append_dims(rev_G, x.ndim) * noise(x), x_mean


class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling: draws x_{t_next} from the Gaussian posterior q(x_{t_next} | x_t, x_0)
    with x_0 replaced by its Tweedie estimate (Ho et al. 2020, Eq. 7; Song et al. 2021, Eq. 47
    for SMLD). For VE this is the SMLD ancestral step exactly; for VP it is DDPM with the
    posterior variance. On the probability-flow ODE it is the deterministic DDIM step
    x_{t_next} = alpha_next x_0 + sigma_next eps (Song, Meng & Ermon 2021, eta = 0).

    Needs an SDE with closed-form marginals (any linear SDE).
    """

    def __init__(self, sde, score_fn, probability_flow=False):
        if not sde.has_marginal:
            raise ValueError(f"the ancestral_sampling predictor needs closed-form marginals, "
                             f"which {type(sde).__name__} does not provide (marginal_coeffs)")
        super().__init__(sde, score_fn, probability_flow)

    def step(self, x, t, t_next, noise):
        score = self.score_fn(x, t)
        alpha_t, sigma_t = self.sde.marginal_coeffs(t)
        alpha_s, sigma_s = self.sde.marginal_coeffs(t_next)
        x0 = self.sde.denoise(x, t, score)
        if self.probability_flow:
            # DDIM: keep the predicted noise eps = -sigma_t score, rescale to t_next.
            c_x0 = append_dims(alpha_s.to(x.dtype), x.ndim)
            c_eps = append_dims((sigma_s * sigma_t).to(x.dtype), x.ndim)
            x_mean = c_x0 * x0 - c_eps * score
            return x_mean, x_mean
        # Transition t_next -> t is N(a x_s, v) with a = alpha_t / alpha_s, v = s_t^2 - a^2 s_s^2.
        a = alpha_t / alpha_s
        v = sigma_t ** 2 - a ** 2 * sigma_s ** 2
        c_x = a * sigma_s ** 2 / sigma_t ** 2
        c_x0 = alpha_s * v / sigma_t ** 2
        std = torch.sqrt((v * sigma_s ** 2 / sigma_t ** 2).clamp(min=0))
        x_mean = (append_dims(c_x.to(x.dtype), x.ndim) * x
                  + append_dims(c_x0.to(x.dtype), x.ndim) * x0)
        return x_mean + append_dims(std.to(x.dtype), x.ndim) * noise(x), x_mean


class Corrector(abc.ABC):
    """MCMC steps at a fixed time t that leave p_t invariant (Song et al. 2021, Algorithm 4–5).

    Args:
        sde: the forward SDE.
        score_fn: score function.
        snr: signal-to-noise ratio that sets the step size.
        num_steps: corrector steps per time point.
    """

    uses_chain = False  # as for Predictor

    def __init__(self, sde: SDE, score_fn: ScoreFn, snr: float, num_steps: int):
        self.sde = sde
        self.score_fn = score_fn
        self.snr = snr
        self.num_steps = num_steps

    @abc.abstractmethod
    def step(self, x: torch.Tensor, t: torch.Tensor,
             noise: NoiseFn) -> Tuple[torch.Tensor, torch.Tensor]:
        """Runs `num_steps` corrector steps at time t [B]; returns (x, x_mean)."""


class NoneCorrector(Corrector):
    """No corrector."""

    def step(self, x, t, noise):
        return x, x


class LangevinCorrector(Corrector):
    """Langevin MCMC with step 2 alpha (snr |z| / |score|)^2 (Song et al. 2021, Algorithm 5).

    |z| and |score| are per-sample norms averaged over the batch, so every sample takes the same
    step and the result depends on its batch-mates. Per-sample ratios are unusable in low
    dimensions: for an exact score |z|^2 / |score|^2 is F-distributed, with no finite mean for
    D <= 2, and single samples blow up. alpha is the SDE's `langevin_scale` (1 - beta_i for VP,
    1 otherwise).
    """

    uses_chain = True

    def step(self, x, t, noise):
        x_mean = x
        alpha = self.sde.langevin_scale(t)
        for _ in range(self.num_steps):
            score = self.score_fn(x, t)
            z = noise(x)
            # A zero score (e.g. a network whose output layer starts at zero) carries no
            # direction: no step then, rather than an infinite one.
            score_norm = batch_norm2(score).mean()
            ratio = torch.where(score_norm > 0, batch_norm2(z).mean() / score_norm,
                                torch.zeros_like(score_norm))
            step_size = append_dims((2 * alpha * (self.snr * ratio) ** 2).to(x.dtype), x.ndim)
            x_mean = x + step_size * score
            x = x_mean + torch.sqrt(2 * step_size) * z
        return x, x_mean


class AnnealedLangevinCorrector(Corrector):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Algorithm 1): step size
    2 alpha (snr sigma(t))^2 from the marginal noise level. Needs closed-form marginals."""

    uses_chain = True

    def __init__(self, sde, score_fn, snr, num_steps):
        if not sde.has_marginal:
            raise ValueError(f"the ald corrector needs the marginal std of "
                             f"{type(sde).__name__}, which provides no marginal_coeffs")
        super().__init__(sde, score_fn, snr, num_steps)

    def step(self, x, t, noise):
        x_mean = x
        _, sigma = self.sde.marginal_coeffs(t)
        step_size = 2 * self.sde.langevin_scale(t) * (self.snr * sigma) ** 2
        step_size = append_dims(step_size.to(x.dtype), x.ndim)
        for _ in range(self.num_steps):
            score = self.score_fn(x, t)
            x_mean = x + step_size * score
            x = x_mean + torch.sqrt(2 * step_size) * noise(x)
        return x, x_mean


PREDICTORS = {
    "euler_maruyama": EulerMaruyamaPredictor,
    "reverse_diffusion": ReverseDiffusionPredictor,
    "ancestral_sampling": AncestralSamplingPredictor,
    "none": NonePredictor,
}

CORRECTORS = {
    "langevin": LangevinCorrector,
    "ald": AnnealedLangevinCorrector,
    "none": NoneCorrector,
}


def _resolve(kind: str, value, table: dict, base: type):
    if isinstance(value, type) and issubclass(value, base):
        return value
    if isinstance(value, str):
        check_choice(kind, value, table)
        return table[value]
    raise ValueError(f"{kind} must be one of {', '.join(map(repr, table))} or a subclass of "
                     f"{base.__name__}, got {value!r}")


def pc_time_grid(T: float, eps: float, num_steps: int, device=None) -> torch.Tensor:
    """The times of a predictor-corrector loop, float64 [num_steps + 1].

    Step i runs from t_i to t_{i+1}: the N = num_steps step times are linspace(T, eps, N), as
    in the paper's code, so that `SDE.step_index` meets each of the N steps of a DDPM or SMLD
    chain exactly once, and the last step, taken at eps, ends at t_N = 0, where the chain ends
    in the data.
    """
    grid = torch.zeros(num_steps + 1, dtype=torch.float64, device=device)
    grid[:num_steps] = torch.linspace(T, eps, num_steps, dtype=torch.float64, device=device)
    return grid


def pc_components(sde: SDE, predictor, corrector, *, corrector_steps: int, num_steps: int,
                  eps: float) -> Tuple[SDE, Type[Predictor], Type[Corrector]]:
    """The set-up of a predictor-corrector loop on arguments that passed `check_pc_inputs`,
    shared by `sample_pc` and the controllable-generation samplers: (the SDE, re-discretized to
    `num_steps` when a component steps its discrete chain, the predictor class, the corrector
    class).

    Raises:
        ValueError: unknown components, or a chain that cannot take `num_steps` steps.
    """
    predictor_cls = _resolve("predictor", predictor, PREDICTORS, Predictor)
    corrector_cls = _resolve("corrector", corrector, CORRECTORS, Corrector)
    chain_users = [c.__name__ for c in (predictor_cls, corrector_cls)
                   if _reads_chain(c, sde) and (c is predictor_cls or corrector_steps > 0)]
    if num_steps != sde.num_steps and chain_users:
        # Steps of the SDE's discrete chain must follow the sampler's grid.
        try:
            sde = sde.with_num_steps(num_steps)
        except ValueError as err:
            raise ValueError(f"{' and '.join(chain_users)} use the SDE's discrete chain, which "
                             f"cannot have num_steps={num_steps}: {err}") from None
    if chain_users and sde.indexes_chain and num_steps > 1 and eps * (num_steps - 1) >= sde.T:
        warn_caller(f"eps={eps!r} >= T / (num_steps - 1) = {sde.T / (num_steps - 1):g}: the "
                    f"step times linspace(T, eps, {num_steps}) skip some steps of the SDE's "
                    f"discrete chain and use others twice ({' and '.join(chain_users)}); "
                    f"lower eps or num_steps")
    return sde, predictor_cls, corrector_cls


def _reads_chain(component: type, sde: SDE) -> bool:
    """Whether a predictor or corrector class steps `sde`'s discrete chain (`uses_chain`). The
    Langevin correctors read it only through alpha_i = `sde.langevin_scale`, which SDEs that
    keep the base class's (VE's 1) do not take from a chain."""
    if issubclass(component, (LangevinCorrector, AnnealedLangevinCorrector)):
        return type(sde).langevin_scale is not SDE.langevin_scale
    return component.uses_chain


def normal_noise(generator: Optional[torch.Generator]) -> NoiseFn:
    """The noise callable of a loop: standard normal draws shaped like its argument, all from
    `generator`, so one generator fixes the whole noise path."""

    def noise(like):
        return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)

    return noise


ProjectFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[dict], None]


def run_pc(sde: SDE, score_fn: ScoreFn, shape, *, predictor_cls: Type[Predictor],
           corrector_cls: Type[Corrector], snr: float, corrector_steps: int, num_steps: int,
           eps: float, denoise: bool, probability_flow: bool, device, dtype: torch.dtype,
           generator: Optional[torch.Generator], project: Optional[ProjectFn] = None,
           callback: Optional[StepCallback] = None, progress: bool = False
           ) -> Tuple[torch.Tensor, int]:
    """The predictor-corrector loop on validated arguments (`pc_components`), shared by
    `sample_pc` and the controllable-generation samplers; returns (x, nfe).

    From a prior draw at T, step i runs the corrector at t_i, then the predictor from t_i to
    t_{i+1} on the grid `pc_time_grid`. `project(x, t)`, if given, maps the state after the
    prior draw, after every single corrector step (the corrector is then called
    `corrector_steps` times with one step each) and after every predictor step, at the time
    the state has reached; inpainting uses it to impose the known region. `callback`, if given,
    sees each step's result (see `sample_pc`). With `denoise` the result is the last
    predictor step's noise-free mean, or Tweedie's formula at the last step time when the
    predictor does not move x (one more evaluation).
    """
    counting = CountingScore(score_fn, eps, sde.T, model_dtype=dtype)
    predictor_obj = predictor_cls(sde, counting, probability_flow)
    if project is None:
        corrector_obj = corrector_cls(sde, counting, snr, corrector_steps)
        corrector_calls = 1 if corrector_steps else 0
    else:
        # One corrector step per call, so that the projection follows each of them.
        corrector_obj = corrector_cls(sde, counting, snr, 1)
        corrector_calls = corrector_steps
    noise = normal_noise(generator)

    with torch.no_grad():
        x = sde.prior_sampling(shape, generator=generator, device=device,
                               dtype=state_dtype(dtype))
        ts = pc_time_grid(sde.T, eps, num_steps, device)
        ones = torch.ones(shape[0], dtype=torch.float64, device=device)
        if project is not None:
            x = project(x, ts[0] * ones)
        for i in tqdm(range(num_steps), disable=not progress, desc="sample_pc"):
            t, t_next = ts[i] * ones, ts[i + 1] * ones
            for _ in range(corrector_calls):
                x, _ = corrector_obj.step(x, t, noise)
                if project is not None:
                    x = project(x, t)
            x, x_mean = predictor_obj.step(x, t, t_next, noise)
            if project is not None:
                x = project(x, t_next)
            if callback is not None:
                callback({"i": i, "t": t, "t_next": t_next, "x": x, "x_mean": x_mean})
        if denoise and not predictor_cls.advances:
            t_last = ts[-2] * ones
            x = sde.denoise(x, t_last, counting(x, t_last))
        elif denoise:
            x = x_mean
    return x.to(dtype), counting.nfe


@checks_times_on_host
def sample_pc(sde: SDE, score_fn: ScoreFn, shape, *,
              predictor: Union[str, Type[Predictor]] = "reverse_diffusion",
              corrector: Union[str, Type[Corrector]] = "langevin",
              snr: float = 0.16, corrector_steps: int = 1, num_steps: Optional[int] = None,
              eps: float = 1e-3, denoise: bool = True, probability_flow: bool = False,
              device=None, dtype: Optional[torch.dtype] = None,
              generator: Optional[torch.Generator] = None,
              progress: bool = False,
              callback: Optional[StepCallback] = None) -> Tuple[torch.Tensor, int]:
    """Predictor–corrector sampling (Song et al. 2021, Algorithm 1).

    Starts from the prior at T and takes `num_steps` = N predictor steps at the times
    linspace(T, eps, N) (`pc_time_grid`), each preceded by `corrector_steps` corrector steps
    at the same time; step i moves x to the next time, and the last one, at eps, to the data at
    t = 0. As in the paper's code, the reverse-diffusion predictor and the Langevin corrector's
    alpha_i thereby use each of the N steps of a DDPM or SMLD chain once, noisiest first (see
    `SDE.step_index`; a warning says when eps >= T / (N - 1) breaks this). With `denoise`, the
    last step adds no noise: it returns its mean (the paper's noise removal; for ancestral
    sampling that is Tweedie's E[x_0 | x_eps]). With predictor "none", which does not move x,
    `denoise` applies Tweedie's formula at the last step time instead (eps, or T when N = 1;
    one more score evaluation).

    Args:
        sde: the forward SDE.
        score_fn: score function (x [B, ...], t [B]) -> score shaped like x.
        shape: sample shape [B, ...].
        predictor: a name in `PREDICTORS` or a `Predictor` subclass.
        corrector: a name in `CORRECTORS` or a `Corrector` subclass.
        snr: corrector signal-to-noise ratio (> 0).
        corrector_steps: corrector steps per time point (>= 0).
        num_steps: predictor steps; defaults to `sde.num_steps`.
        eps: time of the last step (> 0; 1e-3 suits VP/sub-VP, 1e-5 VE).
        denoise: take the last step without its noise (with predictor "none": Tweedie's
            formula at eps, which needs closed-form marginals).
        probability_flow: predictors step the probability-flow ODE (deterministic predictor).
        device: device of the samples; defaults to the generator's device, else CPU.
        dtype: dtype of the samples (default: torch's default dtype).
        generator: torch.Generator for all noise (prior and steps).
        progress: show a progress bar.
        callback: called after every predictor step i with a dict: "i" (the step index),
            "t" and "t_next" (float64 [B], the step's start time and the time x has reached),
            "x" (the state) and "x_mean" (the state without the step's noise). It must not
            modify the tensors; on an accelerator they are not synchronised with the host.

    Returns:
        (x, nfe): samples of `shape` and the number of score evaluations made.

    Raises:
        ValueError: invalid arguments or an SDE lacking what the predictor/corrector needs.
        RuntimeError: the samples became non-finite.
    """
    shape, num_steps = check_pc_inputs(sde, score_fn, shape, snr=snr,
                                       corrector_steps=corrector_steps, num_steps=num_steps,
                                       eps=eps)
    sde, predictor_cls, corrector_cls = pc_components(
        sde, predictor, corrector, corrector_steps=corrector_steps, num_steps=num_steps, eps=eps)
    if denoise and not predictor_cls.advances and not sde.has_marginal:
        raise ValueError(f"denoise=True with predictor {predictor!r} needs the marginal of "
                         f"{type(sde).__name__}, which has none; pass denoise=False")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, got {type(callback).__name__}")
    device = sample_device(device, generator)
    dtype = sample_dtype(dtype)

    x, nfe = run_pc(sde, score_fn, shape, predictor_cls=predictor_cls,
                    corrector_cls=corrector_cls, snr=snr, corrector_steps=corrector_steps,
                    num_steps=num_steps, eps=eps, denoise=denoise,
                    probability_flow=probability_flow, device=device, dtype=dtype,
                    generator=generator, callback=callback, progress=progress)
    if not torch.isfinite(x).all():
        raise RuntimeError("sample_pc produced non-finite samples; check that score_fn is finite "
                           "on [eps, T] and that snr / step sizes are not too large")
    return x, nfe
