"""Forward throughput of every backbone preset, with unfog's speed switches.

For each preset in conf/backbone/ (built exactly as `unfog train backbone=NAME` builds it,
on the data shape it is meant for) the script times the no-grad forward pass at a fixed
batch size under each switch:

- ``fp32``: the default;
- ``channels_last``: `trainer.channels_last=true` (NHWC weights and inputs; images only);
- ``bf16``: bf16 autocast, what `trainer.precision=bf16-mixed` runs the forward in;
- ``compile``: `trainer.compile=true` (torch.compile, default inductor backend; off unless
  ``--compile``, since compiling every preset takes minutes on a CPU);
- ``unfused_attention``: DiT with timm's explicit softmax attention instead of
  `scaled_dot_product_attention` (the fused/flash kernels), to show what SDPA buys.

Samples per second are the median of ``--repeats`` timed runs after warm-up.

    python benchmarks/backbones.py                       # CPU, every preset that fits
    python benchmarks/backbones.py --device cuda --compile --batch 64
    python benchmarks/backbones.py --only dit_s2 --batch 4 --switches fp32 compile --merge

``--merge`` adds the measured rows to the existing JSON instead of replacing it (each row
keeps its own batch and command), so a slow preset can be measured on its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from samplers import machine  # noqa: E402

# preset -> the data shape it is meant for (C, H, W), (C, L) or (D,)
PRESETS: dict[str, tuple[int, ...]] = {
    "mlp_toy": (2,),
    "unet_tiny": (1, 8, 8),
    "unet_digits": (1, 8, 8),
    "unet_tiny16": (3, 16, 16),
    "unet_shapes": (3, 16, 16),
    "unet_cifar10": (3, 32, 32),
    "unet1d_tones": (1, 2048),
    "dit_tiny": (3, 16, 16),
    "dit_s2": (4, 32, 32),
    "dit_b2": (4, 32, 32),
    "dit_l2": (4, 32, 32),
    "dit_xl2": (4, 32, 32),
}
BIG = {"dit_s2", "dit_b2", "dit_l2", "dit_xl2", "unet_cifar10"}  # on the CPU only with --all or --only


def build(name: str, data_shape: tuple[int, ...], **extra: Any) -> torch.nn.Module:
    from hydra import compose, initialize_config_dir

    from unfog.commands import conf_dir
    from unfog.config import build as build_component
    from unfog.config import register_configs

    register_configs()
    overrides = [f"backbone={name}"] + [f"backbone.{k}={v}" for k, v in extra.items()]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return build_component("backbone", cfg["backbone"], data_shape=data_shape, cond_dim=0)


def throughput(fn: Callable[[], Any], batch: int, repeats: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def measure(name: str, data_shape: tuple[int, ...], batch: int, repeats: int, device: torch.device,
            switches: Sequence[str]) -> dict[str, Any]:
    torch.manual_seed(0)
    net = build(name, data_shape).to(device).eval()
    x = torch.randn(batch, *data_shape, device=device)
    t = torch.rand(batch, device=device)
    row: dict[str, Any] = {"data_shape": list(data_shape), "batch": batch, "repeats": repeats,
                           "parameters": sum(p.numel() for p in net.parameters())}

    def run(model: torch.nn.Module, inp: torch.Tensor, autocast: bool = False) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                return model(inp, t, {})
        return fn

    row["fp32"] = throughput(run(net, x), batch, repeats, device)  # always: the ratios' reference
    image = len(data_shape) == 3
    if "channels_last" in switches and image:
        cl = build(name, data_shape).to(device).eval().to(memory_format=torch.channels_last)
        cl.load_state_dict(net.state_dict())
        row["channels_last"] = throughput(run(cl, x.contiguous(memory_format=torch.channels_last)), batch, repeats,
                                          device)
    if "bf16" in switches:
        row["bf16"] = throughput(run(net, x, autocast=True), batch, repeats, device)
    if "unfused_attention" in switches and name.startswith("dit"):
        slow = build(name, data_shape, fused_attention=False).to(device).eval()
        slow.load_state_dict(net.state_dict())
        row["unfused_attention"] = throughput(run(slow, x), batch, repeats, device)
    if "compile" in switches:
        compiled = build(name, data_shape).to(device).eval()
        compiled.load_state_dict(net.state_dict())
        compiled.compile()
        row["compile"] = throughput(run(compiled, x), batch, repeats, device)
    return row


SWITCHES = ["fp32", "channels_last", "bf16", "unfused_attention", "compile"]


def rate(value: float) -> str:
    """Samples per second to about three significant figures (the big presets do < 1/s on a CPU)."""
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def markdown(report: dict[str, Any]) -> str:
    cols = [c for c in SWITCHES if any(c in r for r in report["presets"].values())]
    batches = {r.get("batch", report["batch"]) for r in report["presets"].values()}
    per_row = len(batches) > 1
    head = "batch varies per row" if per_row else f"batch {batches.pop()}"
    lines = [f"Forward throughput (samples/s, {head}, {report['device']}); ratios to fp32 in brackets.", "",
             "| preset | data | parameters | " + ("batch | " if per_row else "") + " | ".join(cols) + " |",
             "|---|---|---|" + ("---|" if per_row else "") + "---|" * len(cols)]
    for name, r in report["presets"].items():
        cells = []
        for c in cols:
            if c not in r:
                cells.append("–")
            elif c == "fp32":
                cells.append(rate(r[c]))
            else:
                cells.append(f"{rate(r[c])} ({r[c] / r['fp32']:.2f}×)")
        shape = "×".join(map(str, r["data_shape"]))
        batch = f"{r.get('batch', report['batch'])} | " if per_row else ""
        lines.append(f"| `{name}` | {shape} | {r['parameters'] / 1e6:.2f} M | {batch}" + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", nargs="+", choices=list(PRESETS), default=None)
    p.add_argument("--all", action="store_true", help="include the large presets on the CPU")
    p.add_argument("--compile", action="store_true", help="also time torch.compile")
    p.add_argument("--switches", nargs="+", choices=SWITCHES, default=None,
                   help="time only these (default: all but compile, plus compile with --compile)")
    p.add_argument("--merge", action="store_true", help="add the rows to the existing JSON instead of replacing it")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/backbones-DEVICE.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = args.only or [n for n in PRESETS if args.all or device.type == "cuda" or n not in BIG]
    switches = args.switches or ["channels_last", "bf16", "unfused_attention"] + (["compile"] if args.compile else [])
    command = "python benchmarks/backbones.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = args.json or ROOT / f"backbones-{device.type}.json"
    report: dict[str, Any] = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                              "batch": args.batch, "repeats": args.repeats, "machine": machine(),
                              "commands": [command], "presets": {}}
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        if old["device"] != report["device"]:
            raise SystemExit(f"--merge: {path} was measured on {old['device']!r}, not {report['device']!r}; "
                             "pass --json to write elsewhere")
        commands = old.get("commands") or [old["command"]]
        for row in old["presets"].values():  # rows written before rows kept their own batch
            row.setdefault("batch", old["batch"])
            row.setdefault("repeats", old["repeats"])
        report.update(batch=old["batch"], repeats=old["repeats"], commands=commands + [command],
                      presets=old["presets"])
    for name in names:
        measured = measure(name, PRESETS[name], args.batch, args.repeats, device, switches)
        before = report["presets"].get(name, {})
        same = before.get("batch") == measured["batch"]  # switches timed at another batch are not kept beside it
        measured["commands"] = (before.get("commands", []) if same else []) + [command]
        report["presets"][name] = {**before, **measured} if same else measured
        print(name, {k: round(v, 1) if isinstance(v, float) else v for k, v in report["presets"][name].items()},
              flush=True)
        path.write_text(json.dumps(report, indent=2) + "\n")  # after each preset: a long run keeps what it measured
    print(markdown(report))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
