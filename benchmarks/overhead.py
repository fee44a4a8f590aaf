"""How much does unfog cost on top of plain PyTorch?

1. Training: steps/s of ``DiffusionModule`` under ``lightning.Trainer`` against a hand-written
   loop doing the same work (same backbone, batches, AdamW, gradient clipping, EMA update).
2. Sampling: wall time of ``unfog.pipeline.DiffusionPipeline.generate`` with a sampler of S steps against
   S × one backbone forward on the same batch (the floor for any S-step sampler).

Ratios near 1.0 mean the framework adds nothing measurable.

    python benchmarks/overhead.py                      # unet_digits preset on digits, CPU
    python benchmarks/overhead.py --steps 100 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from unfog.building import build_model
from unfog.commands import conf_dir
from unfog.config import build, register_configs
from unfog.diffusion import expand, training_target
from unfog.pipeline import DiffusionPipeline
from unfog.schemas import SamplingSettings
from unfog.training import DiffusionModule


def _setup(preset: str, batch: int, device: str):
    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"backbone={preset}", "conditioner=class_label"])
    torch.manual_seed(0)
    dataset = build("dataset", cfg.dataset)
    x = torch.stack([dataset[i]["x"] for i in range(batch)]).to(device)
    y = torch.stack([dataset[i]["label"] for i in range(batch)]).to(device)
    model = build_model(cfg, tuple(dataset.data_shape), dataset.num_classes)
    return cfg, model, build("schedule", cfg.schedule), {"x": x, "label": y}


class _Timer(L.Callback):
    """Records the wall time at the end of every training batch."""

    def __init__(self, device: str) -> None:
        self.device, self.times = device, []

    def on_train_batch_end(self, *args: object) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())


def time_lightning(model, schedule, batch, steps: int, warmup: int, device: str) -> float:
    """Seconds per step of DiffusionModule under lightning.Trainer (after warm-up)."""
    module = DiffusionModule(copy.deepcopy(model), schedule, "eps", lr=1e-4, ema_decay=0.999)
    data = [batch] * (steps + warmup)
    timer = _Timer(device)
    trainer = L.Trainer(accelerator="cuda" if device == "cuda" else "cpu", devices=1, max_steps=steps + warmup,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[timer])
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(module, loader)
    return (timer.times[-1] - timer.times[warmup - 1]) / steps


def time_plain(model, schedule, batch, steps: int, warmup: int, device: str) -> float:
    """Seconds per step of the same work written as a plain PyTorch loop."""
    model = copy.deepcopy(model).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)  # as DiffusionModule
    start = 0.0
    for i in range(steps + warmup):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        x0 = batch["x"]
        n = x0.shape[0]
        t = schedule.sample_t(n, device=x0.device)
        eps = torch.randn_like(x0)
        a, s = schedule.alpha(t), schedule.sigma(t)
        cond = model.encode(batch, n, "random")
        out = model(expand(a, x0) * x0 + expand(s, x0) * eps, t, cond)
        loss = torch.nn.functional.mse_loss(out, training_target(x0, eps, a, s, "eps"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 0.001)
    _sync(device)
    return (time.perf_counter() - start) / steps


def time_sampling(model, schedule, batch, sampler_steps: int, device: str, guidance: float) -> tuple[float, float]:
    """(generate seconds, sampler_steps × forward seconds) for one batch."""
    model = model.to(device).eval()
    sampler = __import__("unfog").create("sampler", "ddim", steps=sampler_steps)
    n = batch["x"].shape[0]
    values = {"label": batch["label"].cpu()}
    shape = tuple(batch["x"].shape[1:])
    pipeline = DiffusionPipeline(model, schedule, "eps", data_shape=shape)
    settings = SamplingSettings(guidance=guidance, clip=False)
    pipeline.generate(sampler, n, values, settings, device=device)
    _sync(device)
    start = time.perf_counter()
    pipeline.generate(sampler, n, values, settings, device=device)
    _sync(device)
    full = time.perf_counter() - start
    den = model.denoiser(schedule, "eps", values, n, guidance)
    x = torch.randn_like(batch["x"])
    xx = torch.cat([x, x]) if guidance != 1 else x
    tt = torch.rand(len(xx), device=device)
    cond = {k: torch.cat([v, den.uncond[k]]) for k, v in den.cond.items()} if guidance != 1 else den.cond
    with torch.no_grad():
        model(xx, tt, cond)
        _sync(device)
        start = time.perf_counter()
        for _ in range(sampler_steps):
            model(xx, tt, cond)
        _sync(device)
    return full, time.perf_counter() - start


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="unet_digits")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampler-steps", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args()
    cfg, model, schedule, batch = _setup(args.preset, args.batch, args.device)
    model.to(args.device)
    lightning_s, plain_s = [], []
    for _ in range(args.repeats):  # interleave so drift in machine load hits both alike
        plain_s.append(time_plain(model, schedule, batch, args.steps, args.warmup, args.device))
        lightning_s.append(time_lightning(model, schedule, batch, args.steps, args.warmup, args.device))
    # The minimum over repeats is the least disturbed by other load on the machine.
    lt, pt = min(lightning_s), min(plain_s)
    rows = {"train_step_ms": {"unfog": lt * 1e3, "plain": pt * 1e3, "ratio": lt / pt}}
    for g in (1.0, 2.0):
        runs = [time_sampling(model, schedule, batch, args.sampler_steps, args.device, g) for _ in range(args.repeats)]
        full = min(r[0] for r in runs)
        floor = min(r[1] for r in runs)
        rows[f"sampling_s_guidance_{g:g}"] = {"unfog": full, "nfe_x_forward": floor, "ratio": full / floor}
    info = {"preset": args.preset, "batch": args.batch, "device": args.device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "steps": args.steps, "sampler_steps": args.sampler_steps}
    print(json.dumps({"setup": info, "results": rows}, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"setup": info, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
