"""Gaussian diffusion paths, prediction targets, loss weightings and the denoiser that
samplers call.

Every path is x_t = α(t)·x₀ + σ(t)·ε with t ∈ [0, 1]. A network predicts one *target*
(``eps``, ``x0``, ``v``, ``flow`` or EDM's preconditioned ``edm``); because the path is linear
in (x₀, ε), each target converts to the others through α and σ, so any sampler works with
any schedule and any target.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from unfog.errors import ConfigError
from unfog.protocols import Cond, Denoised, ExactDerivatives, NoiseSource, Schedule, SigmaData

PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "flow", "edm")
WEIGHTINGS: tuple[str, ...] = ("uniform", "min_snr", "edm")
SIGMA_DATA = 0.5
"""σ_data when neither the config nor the schedule gives one (Karras et al. 2022, Table 1)."""
EDM_LOG_SIGMA_MAX = 10.0
"""|ln(σ/α)| is clipped to this for EDM's c_noise, so α = 0 (rectified flow or zero terminal
SNR at t = 1) gives a finite network input at the edge of the levels seen in training."""


def expand(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample vector ``v`` (B,) to broadcast against ``x`` (B, ...)."""
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def check_prediction(prediction: str) -> None:
    """Refuse an unknown prediction target, listing the known ones."""
    if prediction not in PREDICTIONS:
        raise ConfigError(
            f"Unknown prediction target {prediction!r}; choose one of {', '.join(PREDICTIONS)}."
        )


def derivatives(schedule: Schedule, t: Tensor) -> tuple[Tensor, Tensor]:
    """dα/dt and dσ/dt at ``t``: the schedule's own ``dalpha``/``dsigma`` if it has them,
    otherwise by automatic differentiation of ``alpha`` and ``sigma`` (in float64)."""
    if isinstance(schedule, ExactDerivatives):
        return schedule.dalpha(t), schedule.dsigma(t)
    tt = t.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        da = torch.autograd.grad(schedule.alpha(tt).sum(), tt)[0]
        ds = torch.autograd.grad(schedule.sigma(tt).sum(), tt)[0]
    return da.to(_float(t)), ds.to(_float(t))


def needs_derivatives(prediction: str) -> bool:
    """Whether ``prediction`` is defined through dα/dt and dσ/dt (the ``flow`` velocity)."""
    return prediction == "flow"


def sigma_data_of(schedule: Any, sigma_data: float | None = None) -> float:
    """σ_data for ``edm`` prediction and weighting: ``sigma_data`` if given, else the
    schedule's own (the ``edm`` schedule has one), else 0.5."""
    if sigma_data is not None:
        if not sigma_data > 0:
            raise ConfigError(f"sigma_data must be positive; got {sigma_data} (0.5 for data in [-1, 1]).")
        return float(sigma_data)
    return float(schedule.sigma_data) if isinstance(schedule, SigmaData) else SIGMA_DATA


def edm_coefficients(alpha: Tensor, sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's preconditioning (c_skip, c_out, c_in, c_noise) on any path x = α·x₀ + σ·ε.

    Karras et al. (2022), Table 1 and Eq. (7) with scaling s = α: the network sees
    x̃ = x/α at noise level σ̃ = σ/α, and D(x̃) = c_skip·x̃ + c_out·F(c_in·x̃, c_noise). Folding
    1/α into the coefficients keeps them finite at α = 0: with q = √(σ² + α²σ_d²),
    c_skip = α·σ_d²/q², c_out = σ·σ_d/q, c_in = 1/q (all applied to x, not x̃) and
    c_noise = ¼·ln(σ/α), with ln(σ/α) clipped to ±``EDM_LOG_SIGMA_MAX``.
    For α = 1 these are the paper's σ_d²/(σ² + σ_d²), σ·σ_d/√(σ² + σ_d²), 1/√(σ² + σ_d²), ¼·ln σ.
    """
    q2 = sigma * sigma + alpha * alpha * sigma_data**2
    q = torch.sqrt(q2)
    tiny = torch.finfo(torch.float64).tiny
    log_ratio = torch.log(sigma.to(torch.float64).clamp_min(tiny)) - torch.log(alpha.to(torch.float64).clamp_min(tiny))
    c_noise = log_ratio.clamp(-EDM_LOG_SIGMA_MAX, EDM_LOG_SIGMA_MAX).to(sigma.dtype) / 4
    return alpha * sigma_data**2 / q2, sigma * sigma_data / q, 1 / q, c_noise


def network_inputs(x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor, prediction: str,
                   sigma_data: float = SIGMA_DATA) -> tuple[Tensor, Tensor]:
    """What the backbone is called with for x_t = ``x`` at time ``t``: (x, t) itself, or for
    ``edm`` the preconditioned (c_in·x, c_noise) of Karras et al. (2022)."""
    if prediction != "edm":
        return x, t
    _, _, c_in, c_noise = edm_coefficients(alpha, sigma, sigma_data)
    return expand(c_in, x) * x, c_noise.to(t.dtype if t.is_floating_point() else torch.float32)


def training_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction: str,
                    d_alpha: Tensor | None = None, d_sigma: Tensor | None = None,
                    sigma_data: float = SIGMA_DATA) -> Tensor:
    """The regression target for ``prediction`` at x_t = α·x₀ + σ·ε.

    ``v`` = α·ε − σ·x₀ is the velocity of Salimans & Ho (2022), Eq. (6) and appendix D;
    ``flow`` = dx_t/dt = α'·x₀ + σ'·ε is the conditional flow-matching velocity
    (Lipman et al. 2023, Eq. 9; ε − x₀ for rectified flow, Liu et al. 2023) and needs the
    derivatives ``d_alpha``, ``d_sigma``; ``edm`` is F's target (x₀ − c_skip·x_t)/c_out
    (Karras et al. 2022, Eq. 8), whose plain mean squared error is EDM's λ(σ)-weighted loss.
    """
    a, s = expand(alpha, x0), expand(sigma, x0)
    if prediction == "edm":
        c_skip, c_out, _, _ = edm_coefficients(alpha, sigma, sigma_data)
        return (x0 - expand(c_skip, x0) * (a * x0 + s * eps)) / expand(c_out, x0)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "flow":
        da, ds = _require(d_alpha, d_sigma, x0)
        return da * x0 + ds * eps
    check_prediction(prediction)
    raise AssertionError("unreachable")


def to_denoised(out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor, prediction: str,
                d_alpha: Tensor | None = None, d_sigma: Tensor | None = None,
                sigma_data: float = SIGMA_DATA) -> Denoised:
    """Convert a network output for ``prediction`` at x_t = ``x`` into (x₀, ε) estimates.

    Inverts x = α·x₀ + σ·ε together with the target's definition; for ``v`` the 2×2 system
    [x; v] = [[α, σ], [−σ, α]]·[x₀; ε] has determinant α² + σ², for ``flow``
    [x; u] = [[α, σ], [α', σ']]·[x₀; ε] has determinant α·σ' − σ·α'; for ``edm``
    x̂₀ = c_skip·x + c_out·F.
    """
    a, s = expand(alpha, x), expand(sigma, x)
    if prediction == "edm":
        c_skip, c_out, _, _ = edm_coefficients(alpha, sigma, sigma_data)
        x0 = expand(c_skip, x) * x + expand(c_out, x) * out
        return Denoised(x0, (x - a * x0) / s)
    if prediction == "eps":
        return Denoised((x - s * out) / a, out)
    if prediction == "x0":
        return Denoised(out, (x - a * out) / s)
    if prediction == "v":
        norm = a * a + s * s
        return Denoised((a * x - s * out) / norm, (s * x + a * out) / norm)
    if prediction == "flow":
        da, ds = _require(d_alpha, d_sigma, x)
        det = a * ds - s * da
        return Denoised((ds * x - s * out) / det, (a * out - da * x) / det)
    check_prediction(prediction)
    raise AssertionError("unreachable")


def check_weighting(weighting: str) -> None:
    """Refuse an unknown loss weighting, listing the known ones."""
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"Unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}.")


def x0_weight(prediction: str, alpha: Tensor, sigma: Tensor, d_alpha: Tensor | None = None,
              d_sigma: Tensor | None = None, sigma_data: float = SIGMA_DATA) -> Tensor:
    """The weight w(t) with which a plain MSE on ``prediction`` weights the error of x̂₀:
    ‖target − out‖² = w·‖x₀ − x̂₀‖² at fixed x_t (read off :func:`to_denoised`).

    eps: α²/σ² (the SNR); x0: 1; v: ((α² + σ²)/σ)²; flow: ((α·σ' − σ·α')/σ)²;
    edm: 1/c_out² = (σ² + α²σ_d²)/(σ·σ_d)², which is EDM's λ(σ/α).
    """
    if prediction == "eps":
        return (alpha / sigma) ** 2
    if prediction == "x0":
        return torch.ones_like(alpha)
    if prediction == "v":
        return ((alpha * alpha + sigma * sigma) / sigma) ** 2
    if prediction == "flow":
        da, ds = _require(d_alpha, d_sigma, alpha)
        return ((alpha * ds - sigma * da) / sigma) ** 2
    if prediction == "edm":
        return (sigma * sigma + alpha * alpha * sigma_data**2) / (sigma * sigma_data) ** 2
    check_prediction(prediction)
    raise AssertionError("unreachable")


def loss_weight(weighting: str, prediction: str, alpha: Tensor, sigma: Tensor, *, gamma: float = 5.0,
                d_alpha: Tensor | None = None, d_sigma: Tensor | None = None,
                sigma_data: float = SIGMA_DATA) -> Tensor | None:
    """Per-sample weights of the MSE on ``prediction`` that give ``weighting`` in x₀ terms.

    ``uniform`` is the plain MSE on the target (None: no weights). ``min_snr`` weights the x₀
    error by min(SNR, γ), Hang et al. (2023), "Efficient Diffusion Training via Min-SNR
    Weighting Strategy", Eq. (9) (min(SNR, γ)/SNR for eps, min(SNR, γ)/(SNR + 1) for v on
    variance-preserving paths). ``edm`` weights it by λ(σ̃) = (σ̃² + σ_d²)/(σ̃·σ_d)² with
    σ̃ = σ/α, Karras et al. (2022), Table 1. Each is divided by :func:`x0_weight` of the target,
    so the same weighting means the same thing whatever the network predicts.
    """
    check_weighting(weighting)
    if weighting == "uniform":
        return None
    a, s = alpha.to(torch.float64), sigma.to(torch.float64)
    da = d_alpha.to(torch.float64) if d_alpha is not None else None
    ds = d_sigma.to(torch.float64) if d_sigma is not None else None
    if weighting == "min_snr":
        wanted = ((a / s) ** 2).clamp(max=gamma)
    else:
        wanted = x0_weight("edm", a, s, sigma_data=sigma_data)
    implied = x0_weight(prediction, a, s, da, ds, sigma_data)
    return (wanted / implied.clamp_min(torch.finfo(torch.float64).tiny)).to(torch.float32)


def _require(d_alpha: Tensor | None, d_sigma: Tensor | None, x: Tensor) -> tuple[Tensor, Tensor]:
    if d_alpha is None or d_sigma is None:
        raise ValueError("the flow target needs dα/dt and dσ/dt; pass d_alpha and d_sigma")
    return expand(d_alpha, x), expand(d_sigma, x)


class DiscreteSchedule:
    """A schedule defined by T betas (Ho et al. 2020): ᾱ_i = ∏_{j≤i} (1 − β_j), i = 1..T.

    Grid point i sits at t = i/T with α = √ᾱ_i and σ = √(1 − ᾱ_i); between grid points
    log ᾱ is interpolated linearly in t, with ᾱ = 1 at t = 0. Training draws i uniformly.
    Subclasses provide the betas; this class holds only the shared arithmetic.
    """

    def __init__(self, betas: Tensor) -> None:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or len(betas) < 1:
            raise ConfigError("A discrete schedule needs a 1-D tensor of at least one beta.")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ConfigError("Every beta of a discrete schedule must lie in (0, 1].")
        self.num_timesteps: int | None = len(betas)
        self.betas = betas
        log_abar = torch.cumsum(torch.log1p(-betas.clamp(max=1 - 1e-12)), 0)
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), log_abar])

    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_i for i = 1..T, as in the DDPM paper (float64)."""
        return self._log_abar[1:].exp()

    @property
    def grid(self) -> Tensor:
        """The training times t = i/T, i = 1..T (float64)."""
        T = self.num_timesteps
        assert T is not None
        return torch.arange(1, T + 1, dtype=torch.float64) / T

    def log_alpha_bar(self, t: Tensor) -> Tensor:
        """log ᾱ(t), exact on the grid and linear in t between grid points."""
        T = self.num_timesteps
        assert T is not None
        table = self._log_abar.to(t.device)
        u = t.to(torch.float64).clamp(0, 1) * T
        i0 = u.floor().clamp(max=T - 1).long()
        w = u - i0
        return (1 - w) * table[i0] + w * table[i0 + 1]

    def alpha(self, t: Tensor) -> Tensor:
        """Signal scale α(t) = √ᾱ(t)."""
        return (0.5 * self.log_alpha_bar(t)).exp().to(_float(t))

    def sigma(self, t: Tensor) -> Tensor:
        """Noise scale σ(t) = √(1 − ᾱ(t)), computed stably near t = 0."""
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t))).to(_float(t))

    def sample_t(self, n: int, *, generator: torch.Generator | None = None, device: Any = None) -> Tensor:
        """Training times: grid indices i ~ U{1..T}, returned as t = i/T."""
        T = self.num_timesteps
        assert T is not None
        i = torch.randint(1, T + 1, (n,), generator=generator, device="cpu")
        return (i.to(torch.float32) / T).to(device)


def _float(t: Tensor) -> torch.dtype:
    return t.dtype if t.is_floating_point() else torch.float32


def alpha_sigma(schedule: Schedule, t: float) -> tuple[float, float]:
    """α(t) and σ(t) as Python floats, computed in float64 (for samplers' step rules)."""
    tt = torch.tensor([t], dtype=torch.float64)
    return float(schedule.alpha(tt)[0]), float(schedule.sigma(tt)[0])


def fresh_noise(rng: NoiseSource | None, x: Tensor) -> Tensor:
    """Gaussian noise shaped like ``x``, from the per-sample streams of ``rng`` when given."""
    return rng.randn_like(x) if rng is not None else torch.randn_like(x)


class SeededNoise:
    """Gaussian noise with one generator per sample, so a sample's noise does not depend on
    the batch it is drawn in, the batch size, or the number of devices.

    Sample k of a run with seed s uses the stream seeded by ``s * 1_000_003 + k``.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    @classmethod
    def for_indices(cls, seed: int, indices: Sequence[int]) -> SeededNoise:
        """Streams for the global sample ``indices`` of a run seeded with ``seed``."""
        return cls([seed * 1_000_003 + int(i) for i in indices])

    def randn_like(self, x: Tensor) -> Tensor:
        """Noise shaped like ``x``; row k comes from the k-th sample's stream."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"SeededNoise has {len(self.generators)} streams, batch has {x.shape[0]}.")
        rows = [torch.randn(x.shape[1:], generator=g) for g in self.generators]
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)


Model = Callable[[Tensor, Tensor, Cond], Tensor]


class Denoiser:
    """Backbone + prediction conversion + classifier-free guidance, in the form samplers use.

    ``denoiser(x, t)`` returns :class:`Denoised` (x₀, ε) estimates.

    Guidance (Ho & Salimans 2022, Eq. 6, with g = 1 + w). With one ``uncond`` and a scale g
    the output is u + g·(c − u). For several conditioners guided with their own scales,
    ``uncond`` is a list of *levels* from least to most conditioned (the last level is
    ``cond``) and ``guidance`` one scale per step between levels:
    out = o₀ + Σₖ gₖ·(oₖ − oₖ₋₁), the nested form InstructPix2Pix uses for an image and a text
    (Brooks et al. 2023, Eq. 3); with equal scales it is plain guidance between the first and
    last level. Every level is evaluated in one batched forward.

    ``rescale`` φ > 0 rescales the guided output to the standard deviation of the
    conditional one and mixes: φ·out·std(c)/std(out) + (1 − φ)·out (Lin et al. 2024,
    Sec. 3.4, Eqs. 15–16), applied like theirs to the network's output. ``interval``
    (σ_lo, σ_hi) guides only where the noise level σ/α lies in (σ_lo, σ_hi] and uses the
    conditional output elsewhere, skipping the other levels' forwards when no row needs
    them (Kynkäänniemi et al. 2024). With ``clip`` set to a value range, x₀ is clipped to it
    and ε recomputed to match (Ho et al. 2020, Sec. 3.3).
    """

    def __init__(
        self,
        model: Model,
        schedule: Schedule,
        prediction: str = "eps",
        cond: Cond | None = None,
        uncond: Cond | Sequence[Cond] | None = None,
        guidance: float | Sequence[float] = 1.0,
        clip: tuple[float, float] | None = None,
        sigma_data: float | None = None,
        rescale: float = 0.0,
        interval: tuple[float, float] | None = None,
    ) -> None:
        check_prediction(prediction)
        lower = [] if uncond is None else [uncond] if isinstance(uncond, Mapping) else list(uncond)
        scales = [float(guidance)] if isinstance(guidance, (int, float)) else [float(g) for g in guidance]
        if all(g == 1.0 for g in scales):
            lower, scales = [], []
        elif not cond or not lower:
            raise ConfigError(
                f"guidance={guidance} needs a conditional model and conditioning values; "
                "this model has no conditioner, so use guidance=1."
            )
        elif len(scales) != len(lower):
            raise ValueError(f"Denoiser: {len(scales)} guidance scales for {len(lower)} unconditional levels.")
        if not 0.0 <= rescale <= 1.0:
            raise ConfigError(f"guidance_rescale must lie in [0, 1]; got {rescale} (Lin et al. use 0.7).")
        if interval is not None:
            if len(interval) != 2 or not 0.0 <= float(interval[0]) < float(interval[1]):
                raise ConfigError(
                    f"guidance_interval must be [σ_lo, σ_hi] with 0 ≤ σ_lo < σ_hi (noise levels σ/α); got {interval}."
                )
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.cond: Cond = cond or {}
        self.levels: list[Cond] = [*lower, self.cond]
        self.scales = scales
        self.uncond = lower[0] if lower else None
        self.guidance = scales[0] if len(set(scales)) == 1 else scales
        self.rescale = float(rescale)
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.clip = clip
        self.sigma_data = sigma_data_of(schedule, sigma_data)
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Denoised:
        t = _as_batch_time(t, x)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        net_x, net_t = network_inputs(x, t, alpha, sigma, self.prediction, self.sigma_data)
        out = self._forward(net_x, net_t, self._guided_rows(alpha, sigma))
        self.nfe += 1
        derivs = derivatives(self.schedule, t) if needs_derivatives(self.prediction) else (None, None)
        d = to_denoised(out, x, alpha, sigma, self.prediction, *derivs, sigma_data=self.sigma_data)
        if self.clip is None:
            return d
        x0 = d.x0.clamp(*self.clip)
        return Denoised(x0, (x - expand(alpha, x) * x0) / expand(sigma, x))

    def _guided_rows(self, alpha: Tensor, sigma: Tensor) -> Tensor | None:
        """Which rows are guided (None: all of them)."""
        if self.interval is None or not self.scales:
            return None
        level = sigma / alpha.clamp_min(1e-20)
        return (level > self.interval[0]) & (level <= self.interval[1])

    def _forward(self, x: Tensor, t: Tensor, rows: Tensor | None) -> Tensor:
        if not self.scales or (rows is not None and not bool(rows.any())):
            return self.model(x, t, self.cond)
        k = len(self.levels)
        stacked = {key: torch.cat([lv[key] for lv in self.levels]) for key in self.cond}
        outs = self.model(torch.cat([x] * k), torch.cat([t] * k), stacked).chunk(k)
        out = outs[0]
        for g, prev, cur in zip(self.scales, outs[:-1], outs[1:]):
            out = out + g * (cur - prev)
        if self.rescale > 0:
            dims = tuple(range(1, out.ndim))
            ratio = outs[-1].std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True).clamp_min(1e-12)
            out = out * (self.rescale * ratio + (1.0 - self.rescale))
        if rows is not None:
            out = torch.where(rows.reshape(-1, *([1] * (out.ndim - 1))), out, outs[-1])
        return out


def _as_batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]).contiguous() if t.ndim == 0 else t

