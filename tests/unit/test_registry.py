"""The registry: listing, building, naming errors, duplicates and broken plugins."""

from __future__ import annotations

import importlib.metadata as metadata
import warnings
from pathlib import Path

import pytest

import unfog
from unfog import registry
from unfog.errors import RegistryError


def test_available_lists_first_party_components_and_filters_by_glob() -> None:
    assert {"ddim", "ddpm"} <= set(unfog.available("sampler"))
    assert unfog.available("sampler", "dd*m") == ["ddim", "ddpm"]
    assert unfog.available("sampler", "nothing*") == []


def test_create_builds_with_keyword_arguments() -> None:
    sampler = unfog.create("sampler", "ddim", steps=7, eta=0.5)
    assert (sampler.steps, sampler.eta) == (7, 0.5)


def test_unknown_name_lists_close_matches_and_everything_available() -> None:
    with pytest.raises(RegistryError) as err:
        unfog.create("sampler", "dimm")
    msg = str(err.value)
    assert "'ddim'" in msg and "Available samplers: ddim, ddpm" in msg


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(RegistryError, match="kinds are: backbone"):
        unfog.available("samplers")


def test_duplicate_name_names_both_providers() -> None:
    with registry.isolated(), pytest.raises(RegistryError) as err:

        @unfog.register("sampler", "ddim")
        class Impostor2:
            """Not DDIM either."""

    msg = str(err.value)
    assert "unfog_samplers.ddim.DDIMSampler" in msg and "Impostor2" in msg


def test_registering_the_same_object_twice_is_harmless() -> None:
    entry = unfog.get("sampler", "ddim")
    with registry.isolated():
        unfog.register("sampler", "ddim")(entry.obj)
        assert unfog.get("sampler", "ddim").obj is entry.obj


def test_isolated_undoes_registrations() -> None:
    with registry.isolated():

        @unfog.register("metric", "temporary_metric")
        class Temporary:
            """Temporary."""

        assert "temporary_metric" in unfog.available("metric")
    assert "temporary_metric" not in unfog.available("metric")


def test_broken_plugin_is_reported_and_the_rest_keeps_working(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = metadata.EntryPoint(name="broken", value="unfog_no_such_module_xyz", group=registry.ENTRY_POINT_GROUP)
    real = registry._entry_points
    monkeypatch.setattr(registry, "_entry_points", lambda: [*real(), broken])
    with registry.isolated():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plugins = registry.discover(refresh=True)
        failed = [p for p in plugins if p.name == "broken"]
        assert failed and "ModuleNotFoundError" in (failed[0].error or "")
        assert any("broken" in str(w.message) and "failed to import" in str(w.message) for w in caught)
        assert "ddim" in unfog.available("sampler")
        with pytest.raises(RegistryError, match="Plugins that failed to load: broken"):
            unfog.get("sampler", "nope")


def test_plugins_report_distribution_version_and_components() -> None:
    samplers = next(p for p in unfog.plugins() if p.module == "unfog_samplers")
    assert samplers.distribution == "unfog" and samplers.version == unfog.__version__
    assert ("sampler", "ddim") in samplers.provides
    assert unfog.get("sampler", "ddim").distribution == "unfog"


def test_import_unfog_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, unfog; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


LOOKS_UP_AT_IMPORT = '''
import unfog

Base = unfog.get("sampler", "ddim").obj          # another plugin's sampler, looked up at import
Tail = unfog.get("schedule", "zz_tail").obj       # and one from a plugin whose entry point comes later


@unfog.register("sampler", "aa_subclass")
class Subclass(Base):
    """DDIM subclassed by a plugin whose entry point loads before unfog's samplers."""
'''

REGISTERS_LATE = '''
import unfog
from unfog_schedules.cosine import CosineSchedule


@unfog.register("schedule", "zz_tail")
class Tail(CosineSchedule):
    """A schedule of a plugin whose entry point sorts last."""
'''

DISCOVER = '''
import importlib.metadata as metadata
import sys
from unfog import registry

real = registry._entry_points
extra = [metadata.EntryPoint(name=n, value=m, group=registry.ENTRY_POINT_GROUP)
         for n, m in (("aa_first", "plugin_aa"), ("zz_last", "plugin_zz"))]
registry._entry_points = lambda: sorted([*real(), *extra], key=lambda ep: ep.name)
import unfog
print(unfog.get("sampler", "aa_subclass").obj.__mro__[1].__name__)
print(sorted(p.name for p in unfog.plugins() if p.error))
'''


def test_a_plugin_may_look_up_another_plugins_component_while_it_is_imported(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "plugin_aa.py").write_text(LOOKS_UP_AT_IMPORT)
    (tmp_path / "plugin_zz.py").write_text(REGISTERS_LATE)
    out = subprocess.run([sys.executable, "-c", DISCOVER], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["DDIMSampler", "[]"], out.stdout + out.stderr


def test_a_former_name_finds_the_component_that_replaced_it() -> None:
    with registry.isolated():
        @unfog.register("sampler", "new_name", replaces=("old_name",))
        class Renamed:
            """Renamed."""

        assert unfog.get("sampler", "old_name").name == "new_name"
        assert "old_name" not in unfog.available("sampler")
        with pytest.raises(RegistryError, match="Duplicate sampler name 'old_name'"):
            @unfog.register("sampler", "old_name")
            class Squatter:
                """Takes a name that now means another component."""
