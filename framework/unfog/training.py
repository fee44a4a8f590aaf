"""The Lightning module that trains any backbone on any schedule and prediction target."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from unfog.data import random_hflip, step_seed
from unfog.diffusion import (
    check_prediction,
    check_weighting,
    derivatives,
    expand,
    loss_weight,
    needs_derivatives,
    network_inputs,
    sigma_data_of,
    training_target,
)
from unfog.errors import NonFiniteLossError
from unfog.latents import LatentSpace
from unfog.model import DiffusionModel
from unfog.protocols import Schedule

# The EMA copy stays in eval mode on purpose; Lightning warns about any eval-mode module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# unfog's ResumableSampler continues the data order from the restored batch count, so a
# mid-epoch checkpoint resumes exactly; Lightning cannot see that and would warn on every resume.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
# A resumed run writes into its own run folder; Lightning notes that the old folder is not reused.
warnings.filterwarnings("ignore", message=r"The dirpath has changed from")
# Lightning counts batches per epoch for this warning; unfog logs by global step across epochs.
warnings.filterwarnings("ignore",
                        message=r"The number of training batches \(\d+\) is smaller than the logging interval")
# Lightning's own use of a deprecated torch API, reported at import.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
# DDP notes that the gradient of a 1×1 convolution came back in channels-last strides; harmless
# ("not an error"), and the copy it costs is for those small weights only.
warnings.filterwarnings("ignore", message=r"Grad strides do not match bucket view strides")


def count_in_state_dict(module: nn.Module, name: str) -> None:
    """Keep a counter as the Python int ``module._<name>`` while training (reading a GPU
    buffer every step would make the host wait for the device) and as the buffer ``name``
    in the state dict: written when the state dict is taken, read back when one is loaded."""
    module.register_buffer(name, torch.zeros((), dtype=torch.long))
    setattr(module, f"_{name}", 0)
    module.register_state_dict_pre_hook(lambda m, prefix, keep_vars: getattr(m, name).fill_(getattr(m, f"_{name}")))
    module.register_load_state_dict_post_hook(lambda m, keys: setattr(m, f"_{name}", int(getattr(m, name))))


class EMA(nn.Module):
    """An exponential moving average of a model's parameters (copied buffers).

    With ``warmup`` the decay at update n is min(decay, (1 + n)/(10 + n)), so early averages
    are not dominated by the random initialization (as in Tarvainen & Valpola 2017's ramp).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        count_in_state_dict(self, "updates")

    def train(self, mode: bool = True) -> EMA:
        """The averaged copy always stays in eval mode."""
        super().train(mode)
        self.module.eval()
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current parameters."""
        n = self._updates
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        ema_p = [_local(p) for p in self.module.parameters()]
        src_p = [_local(p.detach()) for p in model.parameters()]
        torch._foreach_lerp_(ema_p, src_p, 1.0 - decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)
        self._updates += 1


def _local(t: Tensor) -> Tensor:
    """This process's shard of a sharded (DTensor) parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class DiffusionModule(L.LightningModule):
    """Trains a :class:`DiffusionModel` by denoising score matching (Ho et al. 2020, Eq. 14)
    with a chosen prediction target and loss weighting, and keeps EMA weights for sampling.

    ``offset_noise`` adds, to each sample's training noise, one extra Gaussian value per
    channel shared by all positions, scaled by this factor (Guttenberg 2023, "Diffusion with
    offset noise"), so the model learns to change an image's mean brightness.

    ``latent`` (a :class:`unfog.latents.LatentSpace`) makes it a latent diffusion model
    (Rombach et al. 2022): batches hold cached posteriors (or pixels, encoded on the fly) and
    the model learns to denoise latents drawn from them. ``hflip`` mirrors each item
    left-right with probability 1/2 (of the pixels, or of the cached latents).

    Randomness is a function of the run's ``seed``, the number of batches trained so far and
    the process rank: the global RNG is reseeded before every batch (:func:`step_seed`), and
    the count is a buffer saved in checkpoints, so a resumed run draws the same t, ε, dropout
    and conditioning drops as an uninterrupted one. Every part is injected; nothing here
    knows a concrete component.
    """

    def __init__(
        self,
        model: DiffusionModel,
        schedule: Schedule,
        prediction: str = "eps",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_steps: int = 0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        loss_weighting: str = "uniform",
        min_snr_gamma: float = 5.0,
        offset_noise: float = 0.0,
        sigma_data: float | None = None,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
        latent: LatentSpace | None = None,
        hflip: bool = False,
    ) -> None:
        super().__init__()
        check_prediction(prediction)
        check_weighting(loss_weighting)
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be positive; got {min_snr_gamma} (Hang et al. use 5).")
        if offset_noise < 0:
            raise ValueError(f"offset_noise must be at least 0; got {offset_noise} (0.1 is usual).")
        self.model = model
        self.ema = EMA(model, ema_decay, ema_warmup)
        self.schedule = schedule
        self.prediction = prediction
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps = warmup_steps
        self.loss_weighting, self.min_snr_gamma, self.offset_noise = loss_weighting, min_snr_gamma, offset_noise
        self.sigma_data = sigma_data_of(schedule, sigma_data)
        self.seed = seed
        count_in_state_dict(self, "batches_seen")
        self.meta = meta or {}
        self.latent = latent  # a latent model's first stage (frozen; saved with the model), else None
        self.hflip = hflip  # mirror half of each batch left-right (data augmentation)

    def loss(self, batch: dict[str, Any]) -> Tensor:
        """The (weighted) mean squared error of the prediction target at random t and ε. A latent
        model trains on a fresh draw from each item's posterior, which is also what its
        conditioners see as ``x``."""
        if self.latent is not None:
            batch = {**batch, "x": self.latent.draw(batch, self.hflip)}
        elif self.hflip:
            batch = {**batch, "x": random_hflip(batch["x"])}
        x0 = batch["x"]
        n = x0.shape[0]
        t = self.schedule.sample_t(n, device=x0.device)
        eps = self.noise_like(x0)
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        x_t = expand(alpha, x0) * x0 + expand(sigma, x0) * eps
        cond = self.model.encode(batch, n, "random")
        out = self.model(*network_inputs(x_t, t, alpha, sigma, self.prediction, self.sigma_data), cond)
        derivs = derivatives(self.schedule, t) if needs_derivatives(self.prediction) else (None, None)
        target = training_target(x0, eps, alpha, sigma, self.prediction, *derivs, sigma_data=self.sigma_data)
        weight = loss_weight(self.loss_weighting, self.prediction, alpha, sigma, gamma=self.min_snr_gamma,
                             d_alpha=derivs[0], d_sigma=derivs[1], sigma_data=self.sigma_data)
        if weight is None:
            return torch.nn.functional.mse_loss(out.float(), target.float())
        per_sample = (out.float() - target.float()).square().reshape(n, -1).mean(dim=1)
        return (weight.to(per_sample.device) * per_sample).mean()

    def noise_like(self, x0: Tensor) -> Tensor:
        """Training noise ε, with offset noise on every channel when ``offset_noise`` > 0."""
        eps = torch.randn_like(x0)
        if self.offset_noise > 0:
            if x0.ndim < 3:
                raise ValueError(
                    f"offset_noise needs data with channels and positions (B, C, ...); got shape {tuple(x0.shape)}."
                )
            eps = eps + self.offset_noise * torch.randn(*x0.shape[:2], *([1] * (x0.ndim - 2)),
                                                        device=x0.device, dtype=x0.dtype)
        return eps

    @property
    def batches_trained(self) -> int:
        """Batches trained so far on this process (restored with a checkpoint)."""
        return self._batches_seen

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.seed, self.batches_trained, self.global_rank))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self._batches_seen += 1
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"The training loss became {loss.item()} at step {self.global_step}. Nothing was saved "
                "after the last good checkpoint. Lower optim.lr, keep trainer.gradient_clip_val set, "
                "or check the data for NaNs; resume with ckpt_path=<run>/checkpoints/last.ckpt."
            )
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_model(self) -> None:
        """Under ``trainer.strategy=fsdp2`` shard the model and its EMA copy the same way
        (FSDP2 ``fully_shard`` over the data-parallel mesh), so each process keeps and
        averages only its own shard of both."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        mesh = getattr(strategy, "device_mesh", None)
        if mesh is None or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard

        for model in (self.model, self.ema.module):
            # one unit per part that is called on its own (conditioners run before the backbone)
            for part in (*model.conditioners.values(), model.backbone):
                fully_shard(part, mesh=mesh["data_parallel"])
        self._sharded = True

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer's step, then the EMA's: the average moves inside the step, before any
        callback sees it, so a checkpoint written at step n holds n updates of both (an update
        done later, in ``on_train_batch_end``, was lost by every resume from such a checkpoint)."""
        super().optimizer_step(*args, **kwargs)
        self.ema.update(self.model)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(
            self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, foreach=True
        )
        warmup = max(self.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        logged = trainer.callback_metrics if trainer is not None else {}
        scalars = {k: float(v) for k, v in logged.items() if getattr(v, "numel", lambda: 1)() == 1}
        checkpoint["unfog"] = {**self.meta, "metrics": scalars}


def train_loader(dataset: Any, batch_size: int, num_workers: int, seed: int, module: DiffusionModule) -> Any:
    """A DataLoader whose order depends only on the seed and the batches ``module`` has
    trained on (restored with its checkpoint), sharded across processes."""
    from torch.utils.data import DataLoader

    from unfog.data import ResumableSampler

    def position() -> tuple[int, int, int]:
        trainer = module._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return module.batches_trained, rank, world

    sampler = ResumableSampler(len(dataset), batch_size, seed, position)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      persistent_workers=num_workers > 0)
