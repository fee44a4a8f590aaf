"""Gaussian diffusion paths, prediction targets and the denoiser that samplers call.

Every path is x_t = α(t)·x₀ + σ(t)·ε with t ∈ [0, 1]. A network predicts one *target*
(``eps``, ``x0`` or ``v``); because the path is linear in (x₀, ε), each target converts to
the others through α and σ, so any sampler works with any schedule and any target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from unfog.errors import ConfigError
from unfog.protocols import Cond, Denoised, NoiseSource, Schedule

PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "flow")


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
    if hasattr(schedule, "dalpha") and hasattr(schedule, "dsigma"):
        return schedule.dalpha(t), schedule.dsigma(t)
    tt = t.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        da = torch.autograd.grad(schedule.alpha(tt).sum(), tt)[0]
        ds = torch.autograd.grad(schedule.sigma(tt).sum(), tt)[0]
    return da.to(_float(t)), ds.to(_float(t))


def needs_derivatives(prediction: str) -> bool:
    """Whether ``prediction`` is defined through dα/dt and dσ/dt (the ``flow`` velocity)."""
    return prediction == "flow"


def training_target(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction: str,
                    d_alpha: Tensor | None = None, d_sigma: Tensor | None = None) -> Tensor:
    """The regression target for ``prediction`` at x_t = α·x₀ + σ·ε.

    ``v`` = α·ε − σ·x₀ is the velocity of Salimans & Ho (2022), Eq. (6) and appendix D;
    ``flow`` = dx_t/dt = α'·x₀ + σ'·ε is the conditional flow-matching velocity
    (Lipman et al. 2023, Eq. 9; ε − x₀ for rectified flow, Liu et al. 2023) and needs the
    derivatives ``d_alpha``, ``d_sigma``.
    """
    a, s = expand(alpha, x0), expand(sigma, x0)
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
                d_alpha: Tensor | None = None, d_sigma: Tensor | None = None) -> Denoised:
    """Convert a network output for ``prediction`` at x_t = ``x`` into (x₀, ε) estimates.

    Inverts x = α·x₀ + σ·ε together with the target's definition; for ``v`` the 2×2 system
    [x; v] = [[α, σ], [−σ, α]]·[x₀; ε] has determinant α² + σ², for ``flow``
    [x; u] = [[α, σ], [α', σ']]·[x₀; ε] has determinant α·σ' − σ·α'.
    """
    a, s = expand(alpha, x), expand(sigma, x)
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

    ``denoiser(x, t)`` returns :class:`Denoised` (x₀, ε) estimates. With ``guidance`` g ≠ 1
    the conditional and unconditional outputs come from one batched forward and are mixed
    as u + g·(c − u) (Ho & Salimans 2022, Eq. 6, with g = 1 + w). With ``clip`` set to a
    value range, x₀ is clipped to it and ε recomputed to match (Ho et al. 2020, Sec. 3.3).
    """

    def __init__(
        self,
        model: Model,
        schedule: Schedule,
        prediction: str = "eps",
        cond: Cond | None = None,
        uncond: Cond | None = None,
        guidance: float = 1.0,
        clip: tuple[float, float] | None = None,
    ) -> None:
        check_prediction(prediction)
        if guidance != 1.0 and (not cond or uncond is None):
            raise ConfigError(
                f"guidance={guidance} needs a conditional model and conditioning values; "
                "this model has no conditioner, so use guidance=1."
            )
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.cond: Cond = cond or {}
        self.uncond = uncond
        self.guidance = float(guidance)
        self.clip = clip
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor | float) -> Denoised:
        t = _as_batch_time(t, x)
        out = self._forward(x, t)
        self.nfe += 1
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        derivs = derivatives(self.schedule, t) if needs_derivatives(self.prediction) else (None, None)
        d = to_denoised(out, x, alpha, sigma, self.prediction, *derivs)
        if self.clip is None:
            return d
        x0 = d.x0.clamp(*self.clip)
        return Denoised(x0, (x - expand(alpha, x) * x0) / expand(sigma, x))

    def _forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self.guidance == 1.0:
            return self.model(x, t, self.cond)
        assert self.uncond is not None
        both = {k: torch.cat([v, self.uncond[k]]) for k, v in self.cond.items()}
        out_c, out_u = self.model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return out_u + self.guidance * (out_c - out_u)


def _as_batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.expand(x.shape[0]).contiguous() if t.ndim == 0 else t

