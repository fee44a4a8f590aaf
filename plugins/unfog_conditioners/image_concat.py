"""Image conditioning by channel concatenation: super-resolution and inpainting."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unfog import register
from unfog.errors import ConfigError, DataError

Task = Literal["super_resolution", "inpainting"]
OUTPAINT_FRACTION = 0.5  # share of random training masks that are outpainting (half-image) masks


@register("conditioner", "image_concat")
class ImageConcat(nn.Module):
    """Conditions on an image given to the backbone as extra input channels (``concat`` route).

    ``super_resolution`` (SR3, Saharia et al. 2022, "Image Super-Resolution via Iterative
    Refinement"): any image (B, C, h, w) is brought to the low resolution H/``factor`` ×
    W/``factor`` by area averaging, then back up to the model's H × W bilinearly
    (align_corners=False). SR3 upsamples bicubically; bilinear is used here because it never
    overshoots the input's range and keeps constants exact. Feeding the high-resolution
    original or its area-downsampled version gives the same conditioning, so training can
    read the clean image itself (field ``x``) and sampling a user's low-resolution image.
    Output (B, C, H, W).

    ``inpainting`` (the masked image + mask input of Palette, Saharia et al. 2022, and of
    Stable Diffusion's inpainting model, Rombach et al. 2022): output (B, C + 1, H, W) =
    [image·(1 − m), m], where m = 1 marks the pixels to fill in. The value is an image
    tensor, or ``{"image": ..., "mask": ...}``, or a tensor with C + 1 channels whose last
    channel is the mask (the conditioning itself, so the output round-trips); a caller with
    the whole batch may instead pass ``mask=batch[mask_field]``. Without a mask, training
    draws random masks from the global torch RNG (reseeded per batch by the framework):
    half rectangles with sides of 25–75 % of the image, half "outpainting" masks that keep
    a random left, right, top or bottom half. Masks are (B, 1, h, w) or (B, h, w) in {0, 1}
    and are resized to H × W by nearest neighbour; images of another size are resized
    bilinearly.

    Rows dropped for classifier-free guidance (Ho & Salimans 2022; probability ``dropout``)
    get the null conditioning: zeros for super-resolution, a zero image with an all-ones
    mask (everything unknown) for inpainting.

    Args:
        data_shape: one sample's shape (C, H, W); filled in by the framework.
        task: ``super_resolution`` or ``inpainting``.
        field: the batch field holding the image (``x``: the clean image while training).
        factor: super-resolution factor; the low resolution is H/factor × W/factor.
        mask_field: the batch field a caller may read the inpainting mask from.
        dropout: probability of replacing a row by the null conditioning while training.
    """

    route = "concat"

    def __init__(self, data_shape: tuple[int, ...], task: Task = "super_resolution", field: str = "x",
                 factor: int = 2, mask_field: str = "mask", dropout: float = 0.0) -> None:
        super().__init__()
        shape = tuple(int(s) for s in data_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ConfigError(
                f"image_concat: needs image data shaped (C, H, W); got data_shape {shape}. "
                "Pick an image dataset or another conditioner."
            )
        if task not in ("super_resolution", "inpainting"):
            raise ConfigError(f"image_concat: task must be 'super_resolution' or 'inpainting'; got {task!r}.")
        channels, height, width = shape
        if task == "super_resolution" and (factor < 1 or height % factor or width % factor):
            raise ConfigError(
                f"image_concat: factor must be at least 1 and divide the image size {height}×{width}; "
                f"got factor={factor}."
            )
        if task == "inpainting" and min(height, width) < 2:
            raise ConfigError(f"image_concat: inpainting needs images of at least 2×2; got {height}×{width}.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"image_concat: dropout must lie in [0, 1); got {dropout}.")
        self.data_shape = shape
        self.task: Task = task
        self.field, self.mask_field = field, mask_field
        self.factor, self.dropout = factor, dropout
        self.size = (height, width)
        self.low_size = (height // factor, width // factor)
        self.dim = channels + (1 if task == "inpainting" else 0)
        # No weights; an empty buffer only tracks the device so outputs follow `.to(device)`.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def forward(self, value: Any, drop: Tensor | None = None, mask: Any = None) -> Tensor:
        """Conditioning (B, dim, H, W) for ``value``; rows where ``drop`` is true get the null one."""
        if self.task == "super_resolution":
            out = self._upsample(self._low(self._image(value, allow_mask_channel=False)), "bilinear")
            return out if drop is None else out.masked_fill(self._rows(drop, out), 0.0)
        image, m = self._image_and_mask(value, mask)
        if drop is not None:
            m = m.masked_fill(self._rows(drop, m), 1.0)
        return torch.cat([image * (1.0 - m), m], dim=1)

    def null_value(self, n: int) -> Any:
        """``n`` values whose conditioning is the null one (see the class docstring)."""
        image = torch.zeros(n, *self.data_shape)
        if self.task == "super_resolution":
            return image
        return {"image": image, "mask": torch.ones(n, 1, *self.size)}

    def example_value(self, value: Any) -> Any:
        """The value to draw training grids from, given real images: for inpainting the images
        with fixed masks (the four half-image masks and the centred box, in turn), so the grid
        shows the same holes at every step; for super-resolution the images themselves."""
        if self.task == "super_resolution":
            return value
        image = torch.as_tensor(value)
        return {"image": image, "mask": grid_masks(image.shape[0], self.size)}

    def degrade(self, value: Any, mask: Any = None) -> Tensor:
        """What the model is conditioned on, as images (B, C, H, W) for display.

        Super-resolution: the low-resolution image, upsampled by nearest neighbour.
        Inpainting: the masked image, the hole drawn at 0 (mid-grey for data in [−1, 1]);
        pass the mask explicitly, since in training mode a missing mask is drawn at random.
        """
        if self.task == "super_resolution":
            return self._upsample(self._low(self._image(value, allow_mask_channel=False)), "nearest")
        image, m = self._image_and_mask(value, mask)
        return image * (1.0 - m)

    # -- helpers ---------------------------------------------------------------------------

    def _expected(self) -> str:
        c, h, w = self.data_shape
        extra = f", or {c + 1} channels with the mask last" if self.task == "inpainting" else ""
        return f"a float tensor (B, {c}, h, w){extra}; the model's images are {c}×{h}×{w}"

    def _image(self, value: Any, allow_mask_channel: bool) -> Tensor:
        """The value as a float32 (B, C', h, w) tensor on this module's device, checked."""
        try:
            x = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DataError(
                f"image_concat: field {self.field!r} must be {self._expected()}; got {type(value).__name__}."
            ) from exc
        channels = self.data_shape[0]
        ok_channels = (channels, channels + 1) if allow_mask_channel else (channels,)
        if x.ndim != 4 or not x.is_floating_point() or x.shape[1] not in ok_channels or 0 in x.shape[2:]:
            raise DataError(
                f"image_concat: field {self.field!r} must be {self._expected()}; "
                f"got dtype {x.dtype} and shape {tuple(x.shape)}."
            )
        return x.to(device=self._anchor.device, dtype=torch.float32)

    def _low(self, x: Tensor) -> Tensor:
        """Area-averaged to the low resolution (Saharia et al. 2022 condition on a downsampled image)."""
        return x if tuple(x.shape[-2:]) == self.low_size else F.interpolate(x, size=self.low_size, mode="area")

    def _upsample(self, x: Tensor, mode: str) -> Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        if mode == "bilinear":
            return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return F.interpolate(x, size=self.size, mode="nearest")

    def _rows(self, drop: Tensor, like: Tensor) -> Tensor:
        """``drop`` (B,) as a mask broadcasting over a (B, ·, H, W) tensor."""
        d = torch.as_tensor(drop, device=like.device)
        if d.shape != (like.shape[0],):
            raise DataError(
                f"image_concat: the drop mask must have shape ({like.shape[0]},) for field {self.field!r}; "
                f"got {tuple(d.shape)}."
            )
        return d.bool()[:, None, None, None]

    def _image_and_mask(self, value: Any, mask: Any) -> tuple[Tensor, Tensor]:
        """The image (B, C, H, W) and mask (B, 1, H, W) for inpainting."""
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"image", "mask"})
            if unknown or "image" not in value:
                raise DataError(
                    f"image_concat: field {self.field!r} as a dict needs the keys 'image' and optionally "
                    f"'mask'; got keys {sorted(value)}."
                )
            if mask is not None and value.get("mask") is not None:
                raise DataError(f"image_concat: field {self.field!r} got a mask twice (in the dict and as mask=).")
            value, mask = value["image"], value.get("mask", mask)
        x = self._image(value, allow_mask_channel=True)
        if x.shape[1] == self.data_shape[0] + 1:
            if mask is not None:
                raise DataError(
                    f"image_concat: field {self.field!r} has a mask channel and a mask was given too; pass one."
                )
            x, mask = x[:, :-1], x[:, -1:]
        x = self._upsample(x, "bilinear")
        if mask is not None:
            return x, self._mask(mask, x.shape[0])
        if not self.training:
            raise DataError(
                f"image_concat: inpainting needs a mask (1 = pixels to fill in) for field {self.field!r}; "
                f"pass {{'image': images, 'mask': masks}} as the field's value, or forward(value, mask=...) "
                f"with batch[{self.mask_field!r}]. Masks are (B, 1, H, W) or (B, H, W) in {{0, 1}}."
            )
        return x, random_masks(x.shape[0], self.size).to(x.device)

    def _mask(self, mask: Any, n: int) -> Tensor:
        """The mask as float32 (B, 1, H, W) in {0, 1}, resized by nearest neighbour."""
        m = torch.as_tensor(mask, device=self._anchor.device)
        if m.ndim == 3:
            m = m[:, None]
        if m.ndim != 4 or m.shape[:2] != (n, 1) or m.is_complex() or 0 in m.shape[2:]:
            raise DataError(
                f"image_concat: the inpainting mask for field {self.field!r} must be ({n}, 1, h, w) or ({n}, h, w) "
                f"in {{0, 1}}; got dtype {m.dtype} and shape {tuple(torch.as_tensor(mask).shape)}."
            )
        m = m.to(torch.float32)
        if not bool(((m == 0) | (m == 1)).all()):
            raise DataError(
                f"image_concat: the inpainting mask for field {self.field!r} must hold only 0 and 1 "
                "(1 = pixels to fill in)."
            )
        return self._upsample(m, "nearest")


def random_masks(n: int, size: tuple[int, int]) -> Tensor:
    """``n`` random inpainting masks (n, 1, H, W), 1 = unknown, from the global torch RNG.

    Each row is, with probability ``OUTPAINT_FRACTION``, an outpainting mask keeping a random
    left, right, top or bottom half (the unknown half is rounded down), else a rectangle whose
    sides are 25–75 % of the image's, placed uniformly: the box and uncropping masks of
    Palette (Saharia et al. 2022). The same numbers are drawn whatever the mix, on the CPU,
    so a seed gives the same masks on every device.
    """
    height, width = size
    outpaint = torch.rand(n) < OUTPAINT_FRACTION
    side = torch.randint(0, 4, (n,))  # keep 0: left, 1: right, 2: top, 3: bottom
    box_h = _sides(n, height)
    box_w = _sides(n, width)
    top = (torch.rand(n) * (height - box_h + 1)).long()
    left = (torch.rand(n) * (width - box_w + 1)).long()
    rows = torch.arange(height)[None, :, None]  # (1, H, 1)
    cols = torch.arange(width)[None, None, :]  # (1, 1, W)
    rect = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    halves = torch.cat([  # the unknown half, rounded down, for keep = left, right, top, bottom
        (cols >= width - width // 2).expand(1, height, width),
        (cols < width // 2).expand(1, height, width),
        (rows >= height - height // 2).expand(1, height, width),
        (rows < height // 2).expand(1, height, width),
    ])[side]
    return torch.where(outpaint[:, None, None], halves, rect)[:, None].float()


def grid_masks(n: int, size: tuple[int, int]) -> Tensor:
    """``n`` fixed masks (n, 1, H, W): the right, left, bottom and top halves unknown, then the
    centred half-size box, repeated."""
    height, width = size
    rows = torch.arange(height)[:, None].expand(height, width)
    cols = torch.arange(width)[None, :].expand(height, width)
    kinds = torch.stack([cols >= width - width // 2, cols < width // 2, rows >= height - height // 2,
                         rows < height // 2, box_mask(1, size)[0, 0].bool()])
    return kinds[torch.arange(n) % len(kinds)][:, None].float()


def _sides(n: int, length: int) -> Tensor:
    lo = max(1, math.ceil(0.25 * length))
    hi = max(lo, min(length - 1, math.floor(0.75 * length)))
    return torch.randint(lo, hi + 1, (n,))


def box_mask(n: int, size: int | tuple[int, int], box: tuple[int, int, int, int] | None = None) -> Tensor:
    """``n`` identical masks (n, 1, H, W) with 1 (unknown) inside ``box`` = (top, left, height, width).

    ``size`` is H×W or one int for a square; the default box is the centred half-size one.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if box is None:
        box = (height // 4, width // 4, height // 2, width // 2)
    top, left, box_h, box_w = box
    if top < 0 or left < 0 or box_h < 0 or box_w < 0 or top + box_h > height or left + box_w > width:
        raise ConfigError(f"box_mask: box (top, left, height, width) = {tuple(box)} must lie inside {height}×{width}.")
    m = torch.zeros(n, 1, height, width)
    m[:, :, top : top + box_h, left : left + box_w] = 1.0
    return m
