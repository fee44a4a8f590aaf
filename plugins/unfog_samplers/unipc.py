"""UniPC multistep sampling: a unified predictor (UniP) and corrector (UniC)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from unfog import register
from unfog.errors import ConfigError
from unfog.protocols import DenoiserFn, DiffusersScheduler, NoiseSource
from unfog.timesteps import Spacing, check_steps, sampler_steps
from unfog_samplers._diffusers import spacing_config

LOWER_ORDER_FINAL_BELOW = 15  # as dpm_solver_pp


@register("sampler", "unipc")
class UniPCSampler:
    """Multistep UniPC in data-prediction form, Zhao et al. (2023), arXiv:2302.04867.

    The predictor UniP-p and corrector UniC-p of "UniPC: A Unified Predictor-Corrector
    Framework for Fast Sampling of Diffusion Models" (their Sec. 3, with x̂₀ as in
    DPM-Solver++). With λ = log(α/σ) and h = λ_s − λ_t, a step from t to s < t is

        x_s = (σ_s/σ_t)·x_t + α_s·(1 − e^{−h})·x̂₀ + α_s·B(h)·Σ_m a_m·D_m/r_m,

    with D_m = x̂₀(λ_t + r_m·h) − x̂₀ the differences to other model outputs. UniP-p uses the
    p − 1 previous outputs (r_m < 0) and has order p; UniC-p redoes the step with the output
    at the predicted x_s as well (r = 1), which raises the order to p + 1 at no extra model
    call: the next step reuses that output, evaluated at the uncorrected point. Matching the
    Taylor expansion of the exact solution gives the order conditions
    Σ_m a_m·r_m^{k−1} = h·k!·φ_{k+1}(−h)/B(h), k = 1..(number of points), with
    φ_{k+1}(z) = (φ_k(z) − 1/k!)/z and φ_0 = e^z; they only have to hold up to O(h^k)
    (their Theorem 3.1). A system of one equation takes its h → 0 limit a₁ = 1/2, where the
    choice of B matters: ``bh1`` is B(h) = h and ``bh2`` is B(h) = 1 − e^{−h} (the paper's
    B₁ and B₂ written for data prediction; with ``bh2`` UniP-2 is DPM-Solver++(2M)). Larger
    systems are solved exactly, and B cancels. e^{−h} is taken as σ_s·α_t/(α_s·σ_t), so a
    start where α = 0 (λ = −∞, e.g. rectified flow at t = 1) is a finite first-order step that
    is not corrected, and x̂₀ from there is not used for higher orders. The order builds up
    over the first steps; the last step, into t = 0 (λ = ∞), returns x̂₀, so the corrector is
    not applied after it and the sampler makes one denoiser call per step.

    Args:
        steps: number of steps (one denoiser call each).
        order: the predictor's order p, 1 to 3; with the corrector the order is p + 1.
        variant: the B(h) of the paper, ``bh1`` (h) or ``bh2`` (e^h − 1 in the paper's
            noise-prediction form); they differ only in the one-coefficient updates.
        spacing: the time grid (``unfog.timesteps``); the default ``logsnr`` (uniform in λ)
            works with every schedule.
        lower_order_final: with fewer than 15 steps, cap the order of the second-to-last step
            at 2 (the last one is always first order), which stabilises few-step sampling.
        corrector: apply UniC after every step but the last; ``False`` gives UniP alone.
    """

    def __init__(
        self,
        steps: int = 20,
        order: int = 2,
        variant: Literal["bh1", "bh2"] = "bh2",
        spacing: Spacing | None = "logsnr",
        lower_order_final: bool = True,
        corrector: bool = True,
    ) -> None:
        check_steps("unipc", steps)
        if order not in (1, 2, 3):
            raise ConfigError(f"unipc: order must be 1, 2 or 3; got {order}.")
        if variant not in ("bh1", "bh2"):
            raise ConfigError(f"unipc: variant must be 'bh1' or 'bh2'; got {variant!r}.")
        self.steps = steps
        self.order = order
        self.variant = variant
        self.spacing = spacing
        self.lower_order_final = lower_order_final
        self.corrector = corrector

    def sample(self, denoiser: DenoiserFn, noise: Tensor, rng: NoiseSource | None = None) -> Tensor:
        """Denoise ``noise`` (at the first time, near t = 1) to data (at t = 0)."""
        steps = sampler_steps(denoiser.schedule, self.steps, self.spacing)
        n = len(steps)
        x = noise
        history: list[tuple[float, Tensor]] = []  # (h of the step that followed, x̂₀), newest last
        last: tuple | None = None  # the previous step's arguments of _update, for the corrector
        for i, st in enumerate(steps):
            d = denoiser(x, st.t)
            if st.final:
                return d.x0
            if self.corrector and last is not None:
                x = self._update(*last, new=d.x0)  # UniC: redo the last step with x̂₀ at its end
            exp_neg_h = st.sigma_s * st.alpha_t / (st.alpha_s * st.sigma_t)  # e^{−h}, 0 where α_t = 0
            h = -math.log(exp_neg_h) if exp_neg_h > 0 else math.inf
            order = min(self.order, len(history) + 1) if math.isfinite(h) else 1
            if self.lower_order_final and n < LOWER_ORDER_FINAL_BELOW and i == n - 2:
                order = min(order, 2)
            older, back = [], 0.0  # (r, x̂₀) of the previous outputs, r = (λ_prev − λ_t)/h < 0
            for h_prev, m in reversed(history[len(history) - order + 1:]):
                back += h_prev
                older.append((-back / h, m))
            last = (x, d.x0, older, h, exp_neg_h, st.sigma_s / st.sigma_t, st.alpha_s)
            x = self._update(*last)
            if not math.isfinite(h):
                history, last = [], None
            else:
                history = [*history, (h, d.x0)][max(0, len(history) + 2 - self.order):]  # keep order − 1
        return x

    def _update(self, x: Tensor, x0: Tensor, older: list[tuple[float, Tensor]], h: float, exp_neg_h: float,
                ratio: float, alpha_s: float, new: Tensor | None = None) -> Tensor:
        """One UniP step from x at t with x̂₀ = ``x0``, or UniC with ``new`` = x̂₀ at s (r = 1)."""
        out = ratio * x + alpha_s * (1.0 - exp_neg_h) * x0
        points = [*older, (1.0, new)] if new is not None else older
        if not points:
            return out
        coefficients = self._coefficients([r for r, _ in points], h)
        for c, (r, m) in zip(coefficients, points, strict=True):
            out = out + (alpha_s * c / r) * (m - x0)
        return out

    def _coefficients(self, rs: list[float], h: float) -> list[float]:
        """B(h)·a_m solving Σ_m a_m·r_m^{k−1} = h·k!·φ_{k+1}(−h)/B(h), k = 1..len(rs)."""
        if len(rs) == 1:
            b = h if self.variant == "bh1" else -math.expm1(-h)
            return [0.5 * b]  # the h → 0 limit of a₁ for either B(h) ~ h
        g = [h * math.factorial(k) * _phi(k + 1, -h) for k in range(1, len(rs) + 1)]
        R = torch.tensor([[r ** (k - 1) for r in rs] for k in range(1, len(rs) + 1)], dtype=torch.float64)
        return torch.linalg.solve(R, torch.tensor(g, dtype=torch.float64)).tolist()

    def diffusers_scheduler(self, num_timesteps: int) -> DiffusersScheduler:
        """diffusers' ``UniPCMultistepScheduler`` (Zhao et al. 2023) with the same order, B(h) and
        corrector; the same method, not step for step this one."""
        config = spacing_config(self.spacing, "UniPCMultistepScheduler", flags=("use_karras_sigmas",))
        config |= {"solver_order": self.order, "solver_type": self.variant,
                   "lower_order_final": self.lower_order_final, "final_sigmas_type": "zero"}
        if not self.corrector:  # diffusers skips UniC after the steps listed here
            config["disable_corrector"] = list(range(self.steps))
        return DiffusersScheduler("UniPCMultistepScheduler", config, {"num_inference_steps": self.steps},
                                  exact=False)


def _phi(k: int, z: float) -> float:
    """φ_k(z) = Σ_{j≥0} z^j/(j + k)!, i.e. φ_0 = e^z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z."""
    if abs(z) < 1.0:  # the series: the recursion cancels badly for small z
        return sum(z**j / math.factorial(j + k) for j in range(25))
    phi = math.exp(z)
    for j in range(k):
        phi = (phi - 1.0 / math.factorial(j)) / z
    return phi
