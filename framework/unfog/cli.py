"""The ``unfog`` command: train, sample, evaluate, train-classifier, export, config, list, plugins.

``train``, ``sample``, ``evaluate``, ``train-classifier``, ``export`` and ``config`` take Hydra
overrides (``sampler=ddim sampler.steps=20``, ``-m schedule=linear,cosine``, ``--cfg job``,
``hydra/launcher=...``); every registered component is a config-group option.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

USAGE = """usage: unfog COMMAND [OVERRIDES...]

commands:
  train  [overrides]   train a model (default: class-conditional digits on the CPU)
  sample [overrides]   draw samples from a checkpoint: unfog sample checkpoint=PATH sampler=ddpm
  evaluate [overrides] score samples from a checkpoint and record the protocol:
                       unfog evaluate checkpoint=PATH metric=fid,kid num_samples=10000 sampler=ddim
  train-classifier [overrides]
                       train a feature extractor for in-domain metrics: unfog train-classifier dataset=digits
  export [overrides]   write a checkpoint as safetensors or a diffusers pipeline:
                       unfog export checkpoint=PATH format=diffusers sampler=ddim output_dir=DIR
  config [overrides]   print the composed training config
  list   [KIND]        list registered components (kinds: {kinds})
  plugins              list plugin distributions, versions and what each provides

overrides are Hydra's: group=option, key=value, -m for sweeps, --help for the config help.
"""


def conf_dir() -> Path:
    """The folder of Hydra configs: inside the installed package, or ``conf/`` of a checkout."""
    import unfog

    here = Path(unfog.__file__).resolve().parent
    for candidate in (here / "conf", here.parents[1] / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"unfog's configs were not found next to {here}; reinstall unfog.")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unfog`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        from unfog.registry import KINDS

        print(USAGE.format(kinds=", ".join(KINDS)))
        return 0
    if args[0] == "--version":
        import unfog

        print(f"unfog {unfog.__version__}")
        return 0
    command, rest = args[0], args[1:]
    handlers: dict[str, Callable[[list[str]], int]] = {
        "train": lambda r: _hydra("train", _train_task, r),
        "sample": lambda r: _hydra("sample", _sample_task, _metric_lists(r)),
        "evaluate": lambda r: _hydra("evaluate", _evaluate_task, _metric_lists(r)),
        "train-classifier": lambda r: _hydra("train_classifier", _train_classifier_task, r),
        "export": lambda r: _hydra("export", _export_task, r),
        "config": _config,
        "list": _list,
        "plugins": _plugins,
    }
    if command not in handlers:
        import difflib

        close = difflib.get_close_matches(command, handlers, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"unfog: unknown command {command!r}.{hint} Commands: {', '.join(handlers)}.", file=sys.stderr)
        return 2
    return handlers[command](rest)


def _metric_lists(overrides: list[str]) -> list[str]:
    """``metric=fid,kid`` means both metrics (``metric=[fid,kid]``) unless ``-m`` asks for a sweep."""
    if "-m" in overrides or "--multirun" in overrides:
        return overrides
    return [f"metric=[{o[len('metric='):]}]" if o.startswith("metric=") and "," in o and "[" not in o else o
            for o in overrides]


def _hydra(name: str, task: Callable[[Any], Any], overrides: list[str]) -> int:
    import hydra

    from unfog.config import register_configs

    register_configs()
    saved = sys.argv
    _SCRIPT[0] = saved[0] if saved else "unfog"
    sys.argv = [f"unfog {name}", *overrides]
    try:
        hydra.main(config_path=str(conf_dir()), config_name=name, version_base="1.3")(task)()
    finally:
        sys.argv = saved
    return 0


_SCRIPT = ["unfog"]  # the path this process was started as, kept for relaunching DDP workers


def _prepare_worker_launch(command: str) -> None:
    """Make Lightning's DDP launcher start the other processes as *this job*.

    Lightning re-runs ``sys.argv`` with ``hydra.run.dir=<HydraConfig run.dir>``. Under
    ``-m`` that would start the whole sweep again in every worker (the known DDP + multirun
    hang) and point it at the wrong folder, so the arguments become this job's own
    overrides and the run folder this job's output folder.
    """
    import shutil

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    hydra_cfg = HydraConfig.get()
    script = _SCRIPT[0]
    if not Path(script).is_file():
        script = shutil.which("unfog") or script
    sys.argv = [script, command, *hydra_cfg.overrides.task]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


@contextlib.contextmanager
def _distributed_job() -> Iterator[None]:
    """Leave no distributed state behind a job, so the next job of a sweep starts its own
    processes: Lightning's launcher sets LOCAL_RANK & co. in this process (which would make the
    next job believe it is a worker and wait forever) and keeps the process group open."""
    import os

    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _fail(exc: Exception) -> None:
    print(f"unfog: error: {exc}", file=sys.stderr)
    raise SystemExit(1)


def _explain(exc: BaseException) -> str:
    """A composition error with the messages of its causes (which name field and component)."""
    parts = []
    while exc is not None:
        parts.append(str(exc).strip())
        exc = exc.__cause__
    return "\n".join(p for p in parts if p)


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _sweep_names() -> dict[str, str] | None:
    """Under ``-m``, the sweep (its folder name) and this job (number and overrides)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    from unfog.config import short_dirname

    group = "_".join(Path(hc.sweep.dir).parts[-2:])  # multirun/train/DATE/TIME -> DATE_TIME
    return {"group": group, "name": f"{hc.job.num}_{short_dirname(hc.job.override_dirname)}"}


def _train_task(cfg: Any) -> float | None:
    from unfog.run import train

    _prepare_worker_launch("train")
    with _distributed_job():
        result = _call(train, cfg, _output_dir(), _sweep_names())
    value = _call(result.objective, cfg.objective)
    if result.rank != 0:  # DDP workers: the launching process reports
        return value
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    print(
        f"unfog: trained {result.steps} steps in {result.seconds:.0f} s (final loss {loss}). "
        f"checkpoint: {result.checkpoint} | samples: {result.samples or 'none'} | logs: {result.run_dir}"
    )
    return value


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; an unfog error ends the command with its message and exit status 1."""
    from unfog.errors import UnfogError

    try:
        return fn(*args)
    except UnfogError as exc:
        _fail(exc)
        raise


def _out(cfg: Any) -> Path:
    return Path(cfg.output_dir) if cfg.get("output_dir") else _output_dir()


def _sample_task(cfg: Any) -> None:
    from unfog.run import sample

    result = _call(sample, cfg, _out(cfg))
    grid = f" and {result.grid}" if result.grid else ""
    print(f"unfog: wrote {len(result.samples)} samples to {result.npz}{grid}")
    if result.metrics:
        from unfog.evaluation import table

        print(table(result.metrics))


def _evaluate_task(cfg: Any) -> None:
    from unfog.evaluation import evaluate, table

    result = _call(evaluate, cfg, _out(cfg))
    print(table(result.results))
    print(f"unfog: scored {cfg.num_samples} samples; results and protocol in {result.path}")


def _train_classifier_task(cfg: Any) -> None:
    from unfog_metrics.classifier import train_classifier

    result = _call(train_classifier, cfg, _out(cfg))
    print(f"unfog: trained a classifier in {result['seconds']:.0f} s, held-out accuracy "
          f"{result['accuracy']:.4f}; use it with extractor=classifier extractor_weights={result['out_dir']}")


def _export_task(cfg: Any) -> None:
    from unfog.export import export

    folder = _call(export, cfg, _out(cfg))
    print(f"unfog: exported {cfg.checkpoint} as {cfg.format} to {folder}")


def _config(overrides: list[str]) -> int:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from unfog.config import register_configs
    from unfog.errors import UnfogError
    from unfog.run import validate

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        validate(cfg)
    except Exception as exc:
        _fail(exc if isinstance(exc, UnfogError) else RuntimeError(_explain(exc)))
    print(OmegaConf.to_yaml(cfg), end="")
    return 0


def _list(args: list[str]) -> int:
    import unfog
    from unfog.config import params_of

    if "--markdown" in args:
        print(_reference_markdown())
        return 0
    kinds = args[:1] or list(unfog.KINDS)
    for kind in kinds:
        try:
            names = unfog.available(kind, args[1] if len(args) > 1 else None)
        except unfog.registry.RegistryError as exc:
            _fail(exc)
        print(f"{kind}:")
        for name in names:
            entry = unfog.get(kind, name)
            fields = ", ".join(f"{p.name}={p.default!r}" for p in params_of(entry.obj))
            print(f"  {name:<16} {entry.summary}")
            if len(kinds) == 1 and fields:
                print(f"  {'':<16} {fields}")
    return 0


def _reference_markdown() -> str:
    """The component reference (docs/components.md), generated from the registry."""
    import unfog
    from unfog.config import params_of

    lines = ["# Component reference", "",
             "Generated by `unfog list --markdown` from the registry; every entry is a Hydra option",
             "(`KIND=NAME`) whose parameters are fields (`KIND.FIELD=VALUE`).", ""]
    for kind in unfog.KINDS:
        lines += [f"## {kind}", ""]
        for entry in (unfog.get(kind, n) for n in unfog.available(kind)):
            lines += [f"### `{kind}={entry.name}`", "", entry.summary, "",
                      f"Provided by `{entry.module}` ({entry.distribution or 'not installed'}).", ""]
            params = params_of(entry.obj)
            if params:
                lines += ["| field | default | choices |", "|---|---|---|"]
                for p in params:
                    default = "required" if str(p.default) == "???" else f"`{p.default!r}`"
                    choices = ", ".join(map(str, p.choices)) if p.choices else ""
                    lines.append(f"| `{p.name}` | {default} | {choices} |")
                lines.append("")
    return "\n".join(lines)


def _plugins(args: list[str]) -> int:
    import unfog

    for p in unfog.plugins():
        status = f"FAILED: {p.error}" if p.error else ", ".join(f"{k}/{n}" for k, n in p.provides) or "nothing"
        print(f"{p.distribution or '?'} {p.version or ''}  [{p.name} -> {p.module}]  {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
