"""The first stage of latent diffusion: the autoencoder, its normalised latent space, and the
cache of encoded data that training reads instead of pixels.

Stable Diffusion's design (Rombach et al. 2022): the diffusion model is trained and sampled
in the latent space of a pretrained autoencoder, and its samples are decoded back to pixels.
Here that is :class:`LatentSpace` — an ``autoencoder`` component with a per-channel affine
map that makes its latents roughly unit-variance — held by the training module and by every
:class:`unfog.pipeline.DiffusionPipeline` of a latent model, so sampling decodes without
being told. The ``identity`` autoencoder (``lossless``) is pixel space: no first stage at all.

Encoding a dataset on every step wastes most of a run, so training reads a cache
(:func:`latent_cache`): the posterior's mean and standard deviation of every item, as EDM2
(Karras et al. 2024) caches them, so each step still draws a fresh latent. A cache is keyed
by the SHA-256 of the autoencoder's weights and the dataset's config, written to a temporary
folder and renamed into place (a killed build leaves nothing half-written), memory-mapped, and
built by one process while the others (of a DDP run, or other runs) wait on a file lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unfog import registry
from unfog.config import NAME_KEY, build, plain
from unfog.data import random_hflip
from unfog.errors import ConfigError, DataError
from unfog.protocols import Autoencoder, FixedLatentScale, Posterior
from unfog.util import version_of

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
NORMALIZE = ("auto", "channels", "fixed", "none")


def state_sha256(module: nn.Module) -> str:
    """The SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order): what
    identifies an autoencoder's weights wherever they came from."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def build_autoencoder(node: Mapping[str, Any] | None, data_shape: tuple[int, ...]) -> Any:
    """The autoencoder a config node names (None: ``identity``), built for ``data_shape``."""
    if node is None:
        node = {NAME_KEY: "identity"}
    ae = build("autoencoder", node, data_shape=tuple(data_shape))
    if not isinstance(ae, Autoencoder):
        raise ConfigError(f"autoencoder {dict(plain(node))[NAME_KEY]!r} does not have encode, decode, latent_shape "
                          "and settings (the Autoencoder protocol in unfog.protocols).")
    return ae


class LatentSpace(nn.Module):
    """An autoencoder and the affine map that normalises its latents: z = (z_ae − shift) · scale,
    per channel, and back before decoding.

    The autoencoder's weights are frozen and saved with the model (keys ``autoencoder.*``), so a
    checkpoint decodes on its own; ``shift`` and ``scale`` are buffers. ``name`` and
    ``settings`` (the registry name and what rebuilds the network without files) and ``source``
    (the config node it was built from, e.g. a weights folder) are recorded by :meth:`describe`.
    """

    def __init__(self, autoencoder: nn.Module, name: str, data_shape: tuple[int, ...], shift: Tensor | None = None,
                 scale: Tensor | None = None, source: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.name = name
        self.data_shape = tuple(int(s) for s in data_shape)
        self.latent_shape = tuple(int(s) for s in autoencoder.latent_shape(self.data_shape))
        channels = self.latent_shape[0]
        self.register_buffer("shift", torch.zeros(channels) if shift is None else shift.float().reshape(channels))
        self.register_buffer("scale", torch.ones(channels) if scale is None else scale.float().reshape(channels))
        self.source = dict(plain(source)) if source is not None else None
        self._sha: str | None = None

    def train(self, mode: bool = True) -> LatentSpace:
        """The autoencoder always stays in eval mode (it is not trained here)."""
        super().train(mode)
        self.autoencoder.eval()
        return self

    def _affine(self, like: Tensor) -> tuple[Tensor, Tensor]:
        view = (1, -1) + (1,) * (like.ndim - 2)
        return self.shift.to(like).view(view), self.scale.to(like).view(view)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Posterior:
        """The normalised posterior of data ``x``."""
        post = self.autoencoder.encode(x)
        shift, scale = self._affine(post.mean)
        return Posterior((post.mean - shift) * scale, post.std * scale)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Data from normalised latents ``z``."""
        shift, scale = self._affine(z)
        return self.autoencoder.decode(z / scale + shift)

    def draw(self, batch: Mapping[str, Any], flip: bool = False) -> Tensor:
        """A fresh latent per item of a training batch: from the cached posterior (fields ``x``
        and ``x_std``, already normalised) or by encoding the pixels in ``x``; ε from the global
        RNG, which the training module reseeds per batch. ``flip`` mirrors half the items
        left-right: the pixels before encoding them; with a cache, the posterior of the mirrored
        image that the cache holds beside the original (``x_mirror``, ``x_std_mirror``), or the
        cached latent itself where the encoder is ``flip_equivariant`` (the two then commute)."""
        if "x_std" not in batch:
            x = random_hflip(batch["x"]) if flip else batch["x"]
            mean, std = self.encode(x)
            return mean + std * torch.randn_like(mean)
        mean, std = batch["x"], batch["x_std"]
        if flip and "x_mirror" in batch:
            pick = (torch.rand(mean.shape[0]) < 0.5).to(mean.device).view(-1, *([1] * (mean.ndim - 1)))
            mean = torch.where(pick, batch["x_mirror"], mean)
            std = torch.where(pick, batch["x_std_mirror"], std)
            return mean + std * torch.randn_like(mean)
        z = mean + std * torch.randn_like(mean)
        return random_hflip(z) if flip else z

    @property
    def sha256(self) -> str:
        """The SHA-256 of the autoencoder's weights (:func:`state_sha256`)."""
        if self._sha is None:
            self._sha = state_sha256(self.autoencoder)
        return self._sha

    def config(self) -> dict[str, Any]:
        """The node that rebuilds the autoencoder with no file: name and :meth:`settings`."""
        return {NAME_KEY: self.name, **plain(self.autoencoder.settings())}

    def describe(self) -> dict[str, Any]:
        """What a checkpoint records: the rebuild node, the weights' hash, the normalisation,
        the data and latent shapes and the node it was built from."""
        return {"config": self.config(), "sha256": self.sha256, "shift": self.shift.tolist(),
                "scale": self.scale.tolist(), "data_shape": list(self.data_shape),
                "latent_shape": list(self.latent_shape), "source": self.source}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], state: Mapping[str, Tensor] | None) -> LatentSpace:
        """Rebuild what :meth:`describe` recorded, with the weights in ``state`` (keys
        ``autoencoder.*``, ``shift``, ``scale``), checking them against the recorded hash."""
        node = dict(record["config"])
        ae = build("autoencoder", node, data_shape=tuple(record["data_shape"]))
        space = cls(ae, node[NAME_KEY], tuple(record["data_shape"]), torch.tensor(record["shift"]),
                    torch.tensor(record["scale"]), record.get("source"))
        if state is not None:
            space.load_state_dict(dict(state))
            space._sha = None
            if record.get("sha256") and space.sha256 != record["sha256"]:
                raise ConfigError(
                    f"the autoencoder weights stored with this model (sha256 {space.sha256[:12]}…) are not the ones "
                    f"it was trained with (sha256 {record['sha256'][:12]}…); the file was changed. Use the "
                    "checkpoint as training wrote it."
                )
        return space

    def values_to_latent(self, values: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Conditioning values for a latent model: images shaped like the data (a super-
        resolution or inpainting input given in pixels) become their normalised latent means;
        an inpainting ``{"image", "mask"}`` gets its image encoded and keeps its mask (the
        conditioner resizes it). Everything else passes through."""
        if values is None:
            return None
        out: dict[str, Any] = {}
        for key, value in values.items():
            if isinstance(value, Tensor) and tuple(value.shape[1:]) == self.data_shape:
                value = self._encode_chunks(value)
            elif isinstance(value, Mapping) and isinstance(value.get("image"), Tensor) \
                    and tuple(value["image"].shape[1:]) == self.data_shape:
                value = {**value, "image": self._encode_chunks(value["image"])}
            out[key] = value
        return out

    def _encode_chunks(self, x: Tensor, batch: int = 64) -> Tensor:
        device = self.shift.device
        return torch.cat([self.encode(x[i:i + batch].to(device)).mean for i in range(0, len(x), batch)])


def latent_space(node: Mapping[str, Any] | None, data_shape: tuple[int, ...]) -> LatentSpace | None:
    """The latent space of the autoencoder ``node`` names, unnormalised yet; None for a
    ``lossless`` one (``identity``: pixel space)."""
    ae = build_autoencoder(node, data_shape)
    if getattr(ae, "lossless", False):
        return None
    name = dict(plain(node))[NAME_KEY]
    return LatentSpace(ae, registry.get("autoencoder", name).name, data_shape, source=node)


# ------------------------------------------------------------------------------- the cache


def cache_root(setting: str | None) -> Path:
    """Where latent caches live: ``latents.cache_dir``, else ``$UNFOG_CACHE_DIR/latents``, else
    ``~/.cache/unfog/latents``."""
    if setting:
        return Path(setting).expanduser()
    env = os.environ.get("UNFOG_CACHE_DIR")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "unfog") / "latents"


def cache_key(space: LatentSpace, dataset_node: Mapping[str, Any], mirrored: bool = False) -> str:
    """The name of the cache of ``dataset_node`` encoded by ``space``'s autoencoder (with the
    mirrored images too, if ``mirrored``)."""
    record = {"format": CACHE_FORMAT, "autoencoder": space.config(), "sha256": space.sha256,
              "dataset": plain(dataset_node), **({"mirrored": True} if mirrored else {})}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:24]


class LatentDataset:
    """A dataset of cached posteriors: items ``{"x": mean, "x_std": std, <other fields>}``,
    normalised by ``shift`` and ``scale`` (see :class:`LatentSpace`), read from memory-mapped
    arrays. Its ``data_shape`` is the latent shape, so everything that sizes a model from the
    data (``backbone=auto``, the contract checks) sees latents."""

    data_range = None

    def __init__(self, folder: Path, pixels: Any) -> None:
        self.folder = folder
        manifest = json.loads((folder / MANIFEST).read_text())
        self.manifest = manifest
        try:
            self.mean = np.load(folder / "mean.npy", mmap_mode="r")
            self.std = np.load(folder / "std.npy", mmap_mode="r")
            self.mirrored = bool(manifest.get("mirrored"))
            if self.mirrored:
                self.mean_mirror = np.load(folder / "mean_mirror.npy", mmap_mode="r")
                self.std_mirror = np.load(folder / "std_mirror.npy", mmap_mode="r")
            self.extra = {name: (np.load(folder / f"{name}.npy", mmap_mode="r") if spec == "array"
                                 else json.loads((folder / f"{name}.json").read_text()))
                          for name, spec in manifest["fields"].items()}
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"the latent cache {folder} is damaged ({exc}); delete that folder and run again to "
                            "rebuild it.") from None
        if self.mean.shape != (manifest["count"], *manifest["latent_shape"]) or self.std.shape != self.mean.shape:
            raise DataError(f"the latent cache {folder} holds arrays of shape {self.mean.shape}, not the "
                            f"{manifest['count']} × {manifest['latent_shape']} its manifest says; delete that folder "
                            "and run again to rebuild it.")
        self.data_shape = tuple(manifest["latent_shape"])
        self.fields = tuple(pixels.fields)
        self.num_classes = pixels.num_classes
        self.shift = torch.zeros(self.data_shape[0])
        self.scale = torch.ones(self.data_shape[0])

    def normalize(self, shift: Tensor, scale: Tensor) -> None:
        self.shift, self.scale = shift.float(), scale.float()

    def __len__(self) -> int:
        return int(self.manifest["count"])

    def _posterior(self, means: np.ndarray, stds: np.ndarray, index: int) -> tuple[Tensor, Tensor]:
        view = (-1,) + (1,) * (len(self.data_shape) - 1)
        mean = (torch.from_numpy(np.array(means[index], dtype=np.float32)) - self.shift.view(view)) \
            * self.scale.view(view)
        return mean, torch.from_numpy(np.array(stds[index], dtype=np.float32)) * self.scale.view(view)

    def __getitem__(self, index: int) -> dict[str, Any]:
        mean, std = self._posterior(self.mean, self.std, index)
        item: dict[str, Any] = {"x": mean, "x_std": std}
        if self.mirrored:
            item["x_mirror"], item["x_std_mirror"] = self._posterior(self.mean_mirror, self.std_mirror, index)
        for name, values in self.extra.items():
            value = values[index]
            item[name] = torch.from_numpy(np.array(value)) if isinstance(values, np.ndarray) else value
        return item

    def statistics(self) -> tuple[Tensor, Tensor]:
        """Per-channel mean and standard deviation of the latents training draws (the mixture of
        the posteriors): mean of the means; variance of the means plus mean posterior variance."""
        axes = (0, *range(2, self.mean.ndim))
        count = 0
        total = np.zeros(self.data_shape[0])
        squares = np.zeros(self.data_shape[0])
        variance = np.zeros(self.data_shape[0])
        for start in range(0, len(self), 1024):
            m = np.asarray(self.mean[start:start + 1024], dtype=np.float64)
            s = np.asarray(self.std[start:start + 1024], dtype=np.float64)
            n = m.size // self.data_shape[0]
            total += m.sum(axis=axes)
            squares += np.square(m).sum(axis=axes)
            variance += np.square(s).sum(axis=axes)
            count += n
        mu = total / count
        var = squares / count - mu**2 + variance / count
        return torch.from_numpy(mu).float(), torch.from_numpy(np.sqrt(np.maximum(var, 1e-12))).float()


def latent_cache(space: LatentSpace, pixels: Any, dataset_node: Mapping[str, Any], root: Path, *,
                 batch_size: int = 64, device: Any = "cpu", mirrored: bool = False, log: Any = print) -> LatentDataset:
    """The cached posteriors of ``pixels`` under ``space``'s autoencoder, built first if no
    process has built them; with ``mirrored``, of every image mirrored left-right too (for
    horizontal flips through an encoder with which a flip does not commute). ``root`` holds
    one folder per key (:func:`cache_key`); a ``root`` that is itself a cache (it holds a
    manifest) is used as it is, after checking that it was built by these weights from this
    dataset."""
    if (root / MANIFEST).is_file():
        folder = root
        _check_manifest(folder, space, dataset_node, len(pixels), mirrored)
        return LatentDataset(folder, pixels)
    key = cache_key(space, dataset_node, mirrored)
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds; the others wait, then read
        if not (folder / MANIFEST).is_file():
            _build(folder, space, pixels, dataset_node, batch_size, device, mirrored, log)
        else:
            log(f"unfog: latents of {len(pixels)} items read from the cache {folder}")
    _check_manifest(folder, space, dataset_node, len(pixels), mirrored)
    return LatentDataset(folder, pixels)


def _check_manifest(folder: Path, space: LatentSpace, dataset_node: Mapping[str, Any], count: int,
                    mirrored: bool = False) -> None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        built_by, built_from = manifest["autoencoder"]["sha256"], manifest["dataset"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"the latent cache {folder} has an unreadable {MANIFEST} ({exc}); delete that folder and "
                        "run again to rebuild it.") from None
    if built_by != space.sha256:
        raise ConfigError(
            f"the latent cache {folder} was encoded by autoencoder weights with sha256 {built_by[:12]}…, but this "
            f"run's autoencoder ({space.name}) has {space.sha256[:12]}…; its latents would not decode. Point "
            "latents.cache_dir at a folder of caches (not at one cache), or use the autoencoder that built it."
        )
    if plain(built_from) != plain(dataset_node) or manifest.get("count") != count:
        raise ConfigError(
            f"the latent cache {folder} was built from another dataset ({built_from}, {manifest.get('count')} items) "
            f"than this run's ({plain(dataset_node)}, {count} items). Point latents.cache_dir at a folder of caches."
        )
    if mirrored and not manifest.get("mirrored"):
        raise ConfigError(f"the latent cache {folder} holds no mirrored images, which data.hflip=true needs with "
                          f"autoencoder {space.name}. Point latents.cache_dir at a folder of caches.")


class EncodedOnTheFly:
    """The pixel dataset of a latent model trained without a cache (``latents.cache=false``):
    items are the pixels, which the training module encodes every batch; ``data_shape`` is the
    latent shape the model is built for."""

    def __init__(self, pixels: Any, latent_shape: tuple[int, ...]) -> None:
        self.pixels = pixels
        self.data_shape = tuple(latent_shape)
        self.data_range = None
        self.fields = tuple(pixels.fields)
        self.num_classes = pixels.num_classes

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.pixels[index]


def _build(folder: Path, space: LatentSpace, pixels: Any, dataset_node: Mapping[str, Any], batch_size: int,
           device: Any, mirrored: bool, log: Any) -> None:
    from torch.utils.data import DataLoader

    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = len(pixels)
    shape = (n, *space.latent_shape)
    mean = np.lib.format.open_memmap(tmp / "mean.npy", mode="w+", dtype=np.float32, shape=shape)
    std = np.lib.format.open_memmap(tmp / "std.npy", mode="w+", dtype=np.float32, shape=shape)
    arrays = [mean, std]
    if mirrored:
        arrays += [np.lib.format.open_memmap(tmp / f"{name}_mirror.npy", mode="w+", dtype=np.float32, shape=shape)
                   for name in ("mean", "std")]
    extra: dict[str, list[Any]] = {}
    start = time.perf_counter()
    log(f"unfog: encoding {n} items{' and their mirror images' if mirrored else ''} with autoencoder {space.name} "
        f"into the latent cache {folder} (once; later runs read it)")
    was = space.shift.device
    space.to(device)
    done = 0
    try:
        for batch in DataLoader(pixels, batch_size=batch_size, shuffle=False):
            x = batch["x"].to(device)
            k = x.shape[0]
            posteriors = [_encode(space, x)] + ([_encode(space, x.flip(-1))] if mirrored else [])
            for i, post in enumerate(posteriors):
                arrays[2 * i][done:done + k] = post.mean.float().cpu().numpy()
                arrays[2 * i + 1][done:done + k] = post.std.float().cpu().numpy()
            for name, value in batch.items():
                if name != "x":
                    extra.setdefault(name, []).extend(_rows(value))
            done += k
    finally:
        space.to(was)
    for array in arrays:
        array.flush()
    del mean, std, arrays
    fields: dict[str, str] = {}
    for name, rows in extra.items():
        if rows and all(isinstance(r, (np.ndarray, np.generic)) for r in rows):
            np.save(tmp / f"{name}.npy", np.stack(rows))
            fields[name] = "array"
        else:
            (tmp / f"{name}.json").write_text(json.dumps(rows))
            fields[name] = "json"
    seconds = time.perf_counter() - start
    manifest = {"format": CACHE_FORMAT, "autoencoder": {"config": space.config(), "sha256": space.sha256},
                "dataset": plain(dataset_node), "count": n, "data_shape": list(space.data_shape),
                "latent_shape": list(space.latent_shape), "fields": fields, "mirrored": mirrored,
                "seconds": round(seconds, 2),
                "unfog": version_of("unfog"), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder)  # atomic: the folder appears complete or not at all
    log(f"unfog: encoded {n} items in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} items/s)")


@torch.no_grad()
def _encode(space: LatentSpace, x: Tensor) -> Posterior:
    return space.autoencoder.encode(x)


def _rows(value: Any) -> list[Any]:
    if isinstance(value, Tensor):
        return list(value.cpu().numpy())
    if isinstance(value, (list, tuple)):
        return [v.cpu().numpy() if isinstance(v, Tensor) else v for v in value]
    raise DataError(f"a batch field of type {type(value).__name__} cannot be cached with the latents; "
                    "set latents.cache=false to encode every batch instead.")


def normalization(space: LatentSpace, mode: str, statistics: Any) -> tuple[Tensor, Tensor, str]:
    """(shift, scale, how) for ``latents.normalize``: ``fixed`` takes the autoencoder's own
    numbers (:class:`FixedLatentScale`, Stable Diffusion's 0.18215), ``channels`` the per-channel
    mean and 1/std of the data's latents (``statistics()`` is called only then), ``none`` leaves
    them; ``auto`` is ``fixed`` when the autoencoder has numbers, else ``channels``."""
    if mode not in NORMALIZE:
        raise ConfigError(f"latents.normalize={mode!r}; choose one of {', '.join(NORMALIZE)}.")
    c = space.latent_shape[0]
    fixed = isinstance(space.autoencoder, FixedLatentScale)
    if mode == "auto":
        mode = "fixed" if fixed else "channels"
    if mode == "fixed":
        if not fixed:
            raise ConfigError(f"latents.normalize=fixed, but autoencoder {space.name} has no fixed scale_factor; use "
                              "latents.normalize=channels (statistics of the cached latents).")
        ae = space.autoencoder
        return (torch.full((c,), float(ae.shift_factor)), torch.full((c,), float(ae.scale_factor)),
                f"fixed: (z − {ae.shift_factor}) × {ae.scale_factor}")
    if mode == "none":
        return torch.zeros(c), torch.ones(c), "none"
    mu, sd = statistics()
    return mu, 1.0 / sd, "per channel: mean " + ", ".join(f"{v:.3f}" for v in mu.tolist()) + \
        "; std " + ", ".join(f"{v:.3f}" for v in sd.tolist())


def on_the_fly_statistics(space: LatentSpace, pixels: Any, items: int = 512, batch_size: int = 64,
                          device: Any = "cpu") -> tuple[Tensor, Tensor]:
    """Per-channel latent statistics from the first ``items`` items, for a run without a cache."""
    from torch.utils.data import DataLoader, Subset

    means, variances = [], []
    subset = Subset(pixels, range(min(items, len(pixels))))
    space.to(device)
    for batch in DataLoader(subset, batch_size=batch_size):
        post = _encode(space, batch["x"].to(device))
        means.append(post.mean.float().cpu())
        variances.append(post.std.float().cpu().square())
    m, v = torch.cat(means), torch.cat(variances)
    dims = (0, *range(2, m.ndim))
    mu = m.mean(dims)
    return mu, (m.var(dims, unbiased=False) + v.mean(dims)).clamp_min(1e-12).sqrt()


