"""Each sampler's diffusers counterpart (``diffusers_scheduler``): the scheduler it names exists in
diffusers and takes the options it gives, the exactness flags hold, and spacings without a
counterpart are refused. The samplers themselves never import diffusers."""

from __future__ import annotations

import sys

import pytest
import torch

import unfog
from unfog.errors import ConfigError
from unfog.protocols import DiffusersCounterpart, DiffusersScheduler
from unfog.timesteps import SPACINGS, discrete_indices

diffusers = pytest.importorskip("diffusers")

# numpy 2 warns inside diffusers' schedulers when they build their sigmas
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

T = 1000
BETAS = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)

COUNTERPARTS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm_solver_pp": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
}
"""The first-party samplers and the diffusers scheduler each maps to."""

GRID_ONLY = ("ddim", "ddpm")  # their diffusers schedulers visit grid points of the discrete schedule only
SCALED_INPUT = ("euler", "heun", "euler_ancestral")

SETTINGS: dict[str, list[dict[str, object]]] = {
    "ddim": [{}, {"spacing": "trailing", "steps": 10}, {"spacing": "linspace", "eta": 0.5}],
    "ddpm": [{}, {"steps": 10, "variance": "large"}, {"steps": 7, "spacing": "trailing"}],
    "dpm_solver_pp": [{}, {"order": 3, "variant": "sde", "spacing": "karras"}, {"spacing": "trailing",
                                                                                  "lower_order_final": False}],
    "unipc": [{}, {"order": 3, "variant": "bh1", "spacing": "karras"}, {"corrector": False, "spacing": "leading"}],
    "euler": [{}, {"spacing": "karras"}, {"spacing": "logsnr"}],
    "heun": [{}, {"spacing": "karras"}, {"spacing": "uniform"}],
    "euler_ancestral": [{}, {"spacing": "karras", "eta": 0.5}, {"spacing": "trailing"}],
}
CASES = [(name, kwargs) for name, options in SETTINGS.items() for kwargs in options]
CASE_IDS = [f"{name}-{i}" for name, options in SETTINGS.items() for i in range(len(options))]


def _built(counterpart: DiffusersScheduler, num_timesteps: int = T):
    """The named diffusers scheduler on test betas with the counterpart's options."""
    cls = getattr(diffusers, counterpart.scheduler)
    return cls(num_train_timesteps=num_timesteps, trained_betas=BETAS[:num_timesteps].tolist(), **counterpart.config)


def _with_counterpart() -> list[str]:
    return [n for n in unfog.available("sampler") if callable(getattr(unfog.get("sampler", n).obj,
                                                                      "diffusers_scheduler", None))]


def test_the_first_party_samplers_name_their_counterparts() -> None:
    assert set(COUNTERPARTS) <= set(_with_counterpart())
    for name, scheduler in COUNTERPARTS.items():
        sampler = unfog.create("sampler", name)
        assert isinstance(sampler, DiffusersCounterpart)
        assert sampler.diffusers_scheduler(T).scheduler == scheduler, name


@pytest.mark.parametrize("name", _with_counterpart())
def test_a_claimed_counterpart_is_a_diffusers_scheduler(name: str) -> None:
    """Contract: every registered sampler (a plugin's too) that names a counterpart names a
    scheduler class diffusers has, with options it takes and a call with the step count."""
    counterpart = unfog.create("sampler", name).diffusers_scheduler(T)
    assert isinstance(counterpart, DiffusersScheduler)
    cls = getattr(diffusers, counterpart.scheduler, None)
    assert isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin), counterpart.scheduler
    assert isinstance(counterpart.config, dict) and isinstance(counterpart.call, dict)
    assert int(counterpart.call["num_inference_steps"]) >= 1
    assert not {"trained_betas", "num_train_timesteps", "prediction_type", "clip_sample"} & set(counterpart.config)
    _built(counterpart).set_timesteps(int(counterpart.call["num_inference_steps"]))


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=CASE_IDS)
def test_diffusers_takes_the_options(name: str, kwargs: dict[str, object]) -> None:
    sampler = unfog.create("sampler", name, **kwargs)
    counterpart = sampler.diffusers_scheduler(T)
    scheduler = _built(counterpart)  # an option the class lacks raises TypeError here
    for key, value in counterpart.config.items():
        assert scheduler.config[key] == value, (name, key)
    scheduler.set_timesteps(int(counterpart.call["num_inference_steps"]))
    assert counterpart.scaled_input == (name in SCALED_INPUT)
    if name not in GRID_ONLY:
        assert counterpart.exact is False


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize(("num_timesteps", "steps"), [(1000, 10), (1000, 7), (1000, 3), (100, 8), (999, 2)])
def test_ddim_is_exact_where_diffusers_steps_on_unfogs_grid(spacing: str, num_timesteps: int, steps: int) -> None:
    """DDIMScheduler steps from timestep τ to τ − T//S (its index τ is unfog's grid point τ + 1, and
    below 0 is the final x̂₀); ``exact`` must say whether that is unfog's own sequence of grid points."""
    counterpart = unfog.create("sampler", "ddim", steps=steps, spacing=spacing).diffusers_scheduler(num_timesteps)
    scheduler = _built(counterpart, num_timesteps)
    scheduler.set_timesteps(steps)
    visited = [int(t) + 1 for t in scheduler.timesteps]
    then = [max(int(t) - num_timesteps // steps + 1, 0) for t in scheduler.timesteps]
    ours = discrete_indices(num_timesteps, steps, spacing).tolist()
    assert counterpart.exact == (visited == ours and then == [*ours[1:], 0])


def test_ddpm_is_always_exact_and_takes_every_step_by_default() -> None:
    for spacing in ("leading", "trailing", "linspace", None):
        assert unfog.create("sampler", "ddpm", steps=7, spacing=spacing).diffusers_scheduler(T).exact
    counterpart = unfog.create("sampler", "ddpm").diffusers_scheduler(250)
    assert counterpart.call == {"num_inference_steps": 250}  # steps=None: every step of the schedule
    assert counterpart.config["variance_type"] == "fixed_small"
    assert unfog.create("sampler", "ddpm", variance="large").diffusers_scheduler(T).config["variance_type"] == \
        "fixed_large"


def test_ddim_options_and_call() -> None:
    counterpart = unfog.create("sampler", "ddim", steps=12, eta=0.25).diffusers_scheduler(T)
    assert counterpart.config == {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True}
    assert counterpart.call == {"num_inference_steps": 12, "eta": 0.25}  # clipping is the exporter's to add
    assert counterpart.exact and not counterpart.scaled_input


@pytest.mark.parametrize("name", GRID_ONLY)
@pytest.mark.parametrize("spacing", [s for s in SPACINGS if s not in ("leading", "trailing", "linspace")])
def test_a_continuous_spacing_has_no_grid_counterpart(name: str, spacing: str) -> None:
    sampler = unfog.create("sampler", name, steps=10, spacing=spacing)
    with pytest.raises(ConfigError, match=f"{COUNTERPARTS[name]} visits grid points .*spacing={spacing} has no "
                                          "counterpart.*spacing=leading, trailing or linspace"):
        sampler.diffusers_scheduler(T)


@pytest.mark.parametrize(("name", "spacing", "expected"), [
    ("dpm_solver_pp", None, {"use_lu_lambdas": True}),  # its default spacing is logsnr
    ("dpm_solver_pp", "karras", {"use_karras_sigmas": True}),
    ("dpm_solver_pp", "uniform", {"timestep_spacing": "linspace"}),
    ("unipc", "karras", {"use_karras_sigmas": True}),
    ("unipc", "logsnr", {"timestep_spacing": "linspace"}),  # UniPC has no use_lu_lambdas
    ("euler", None, {"timestep_spacing": "leading"}),
    ("euler", "karras", {"use_karras_sigmas": True}),
    ("heun", "trailing", {"timestep_spacing": "trailing"}),
    ("euler_ancestral", "karras", {"timestep_spacing": "linspace"}),  # no use_karras_sigmas either
])
def test_spacing_maps_to_the_schedulers_own_option(name: str, spacing: str | None,
                                                   expected: dict[str, object]) -> None:
    kwargs = {} if spacing is None else {"spacing": spacing}
    config = unfog.create("sampler", name, **kwargs).diffusers_scheduler(T).config
    assert expected.items() <= config.items() and config["steps_offset"] == 0


def test_multistep_solvers_carry_order_variant_and_corrector() -> None:
    dpm = unfog.create("sampler", "dpm_solver_pp", order=3, variant="sde", lower_order_final=False)
    assert {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "lower_order_final": False,
            "final_sigmas_type": "zero"}.items() <= dpm.diffusers_scheduler(T).config.items()
    assert unfog.create("sampler", "dpm_solver_pp").diffusers_scheduler(T).config["algorithm_type"] == "dpmsolver++"
    unipc = unfog.create("sampler", "unipc", steps=6, order=1, variant="bh1", corrector=False)
    config = unipc.diffusers_scheduler(T).config
    assert {"solver_order": 1, "solver_type": "bh1", "disable_corrector": [0, 1, 2, 3, 4, 5]}.items() <= config.items()
    assert "disable_corrector" not in unfog.create("sampler", "unipc").diffusers_scheduler(T).config


def test_euler_is_not_mistaken_for_the_ddim_it_extends() -> None:
    counterpart = unfog.create("sampler", "euler", steps=10).diffusers_scheduler(T)
    assert counterpart.scheduler == "EulerDiscreteScheduler" and "eta" not in counterpart.call
    assert not counterpart.exact and counterpart.scaled_input


def test_the_samplers_do_not_need_diffusers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    for name in COUNTERPARTS:
        assert unfog.create("sampler", name).diffusers_scheduler(T).scheduler == COUNTERPARTS[name]
