"""First-party samplers; importing this package registers them."""

from unfog_samplers import ddim, ddpm, dpm_solver_pp, euler, euler_ancestral, heun, unipc

__all__ = ["ddim", "ddpm", "dpm_solver_pp", "euler", "euler_ancestral", "heun", "unipc"]
