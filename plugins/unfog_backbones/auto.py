"""``backbone=auto``: a U-Net or an MLP sized for the data's shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import nn

from unfog import register
from unfog.config import NAME_KEY, build
from unfog.errors import ConfigError

MLP_TOY: dict[str, Any] = {NAME_KEY: "mlp", "hidden": 256, "depth": 4, "time_dim": 128, "dropout": 0.0}
"""The ``mlp_toy`` preset (conf/backbone/mlp_toy.yaml), every field spelled out."""

MAX_IMAGE_LEVELS = 5
MAX_SOUND_LEVELS = 6
DEEPEST_IMAGE_SIDE = 8  # halve an image until the deepest level's smaller side is at most this
DEEPEST_SOUND_LENGTH = 256  # halve a clip until the deepest level is at most this long
ATTENTION_SIDE = 16  # self-attention at the levels (but the first) whose smaller side is at most this
HEAD_WIDTH = 32  # the least width of one attention head, where the layer is wide enough


@register("backbone", "auto")
class AutoBackbone:
    """A U-Net (sound, images, video) or an MLP (vectors) sized for the data's shape.

    A resolver: :meth:`resolve` turns a data shape into a concrete config node, and calling
    the class builds that node (a ``UNetBackbone`` or an ``MLPBackbone``, not an instance of this
    class). The kernel stores the concrete node, so a checkpoint rebuilds the same network
    if these rules change. The rules (parameter counts unconditional, for one data shape):

    * vectors (D,): the ``mlp_toy`` preset (hidden 256, depth 4, time_dim 128): 0.70 M for 2-D points.
    * images (C, H, W), with s the smaller side: halve until the deepest level's smaller side
      is ≤ 8 (2 to 5 levels); ``channels`` 16 for s ≤ 8, 32 for ≤ 16, 64 for ≤ 64, 128 above;
      ``channel_mult`` [1, 2, 2, ...] (DDPM's CIFAR-10 choice, Ho et al. 2020: the width doubles
      once and then stays, since the small deep levels cost little compute but their
      parameters grow with the width squared); one residual block per level for s ≤ 16, else
      two; self-attention at every level but the first whose smaller side is ≤ 16 (the
      deepest at least; the middle always has it), never at full size where it costs most;
      heads of width ≥ 32 where the layer is wide enough, else one head; GroupNorm groups 8
      below 64 channels, else 32; dropout 0 for s ≤ 16, else 0.1. For 1×8×8 this is exactly
      ``unet_digits`` (0.18 M), for 3×16×16 ``unet_shapes`` with 2 heads and no coordinates
      (0.70 M), for 3×32×32 DDPM's CIFAR-10 network at half width and 3 levels.
    * sound (C, L): the ``unet1d_tones`` network (16 channels, ``channel_mult`` [1, 2, 4, 4],
      kernel 5, scale-shift norm, 4 heads, attention at the deepest level; 0.72 M for
      L = 2048) with as many levels as make the deepest level ≤ 256 samples (2 to 6; the
      multiplier stays 4 past the third level).
    * video (C, T, H, W): the image rule on H × W; the U-Net halves T as well.

    Sizes that do not divide by 2**(levels − 1) are padded by the U-Net (:class:`UNetBackbone`).
    """

    data_ranks: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)
    routes: ClassVar[tuple[str, ...]] = ("vector", "tokens", "concat")

    def __new__(  # type: ignore[misc]  # builds the resolved backbone, not an instance of this class
        cls, data_shape: tuple[int, ...], cond_dim: int = 0, context_dim: int = 0, cond_channels: int = 0
    ) -> nn.Module:
        node = cls.resolve(data_shape)
        return build("backbone", node, data_shape=tuple(data_shape), cond_dim=cond_dim, context_dim=context_dim,
                     cond_channels=cond_channels)

    @staticmethod
    def resolve(data_shape: Sequence[int]) -> dict[str, Any]:
        """The concrete backbone config node (``_name_`` and every option) for ``data_shape``."""
        shape = tuple(int(n) for n in data_shape)
        if not shape or min(shape) < 1 or len(shape) not in AutoBackbone.data_ranks:
            raise ConfigError(
                f"auto: no rule for data_shape {shape}; it sizes backbones for vectors (D,), sound (C, L), "
                "images (C, H, W) and video (C, T, H, W) of positive sizes. Choose a backbone by name "
                "(`unfog list backbone`)."
            )
        if len(shape) == 1:
            return dict(MLP_TOY)
        if len(shape) == 2:
            return sound_unet(shape[1])
        return image_unet(min(shape[-2:]))


def image_unet(side: int) -> dict[str, Any]:
    """The U-Net node for images (or video frames) whose smaller side is ``side``."""
    levels = _levels(side, DEEPEST_IMAGE_SIDE, MAX_IMAGE_LEVELS)
    channels = 16 if side <= 8 else 32 if side <= 16 else 64 if side <= 64 else 128
    mult = [1] + [2] * (levels - 1)
    sides = _sides(side, levels)
    attention = [k for k in range(1, levels) if sides[k] <= ATTENTION_SIDE] or [levels - 1]
    widths = [channels * mult[k] for k in (*attention, levels - 1)]
    return _unet(channels, mult, num_res_blocks=1 if side <= 16 else 2, attention_levels=attention,
                 num_heads=_heads(widths), dropout=0.0 if side <= 16 else 0.1, groups=8 if channels < 64 else 32)


def sound_unet(length: int) -> dict[str, Any]:
    """The 1-D U-Net node for clips of ``length`` samples (``unet1d_tones`` for 2048)."""
    levels = _levels(length, DEEPEST_SOUND_LENGTH, MAX_SOUND_LEVELS)
    mult = [1, 2, 4, 4, 4, 4][:levels]
    return _unet(16, mult, num_res_blocks=1, attention_levels=[levels - 1], num_heads=4, dropout=0.0, groups=8,
                 use_scale_shift_norm=True, kernel_size=5)


def _unet(channels: int, channel_mult: list[int], num_res_blocks: int, attention_levels: list[int], num_heads: int,
          dropout: float, groups: int, use_scale_shift_norm: bool = False, kernel_size: int = 3) -> dict[str, Any]:
    """A ``unet`` node with every option spelled out, so that it means the same if defaults change."""
    return {NAME_KEY: "unet", "channels": channels, "channel_mult": channel_mult, "num_res_blocks": num_res_blocks,
            "attention_levels": attention_levels, "num_heads": num_heads, "dropout": dropout,
            "use_scale_shift_norm": use_scale_shift_norm, "resblock_updown": False, "groups": groups,
            "coord_channels": False, "kernel_size": kernel_size}


def _sides(size: int, levels: int) -> list[int]:
    """The size at each level once the U-Net has padded ``size`` to a multiple of 2**(levels − 1)."""
    padded = -(-size // 2 ** (levels - 1)) * 2 ** (levels - 1)
    return [padded // 2**k for k in range(levels)]


def _levels(size: int, deepest: int, most: int) -> int:
    """The fewest levels (at least 2, at most ``most``) whose deepest size is at most ``deepest``."""
    levels = 2
    while levels < most and _sides(size, levels)[-1] > deepest:
        levels += 1
    return levels


def _heads(widths: list[int]) -> int:
    """The most heads (a power of two) that divide every width with heads at least HEAD_WIDTH wide."""
    heads = 1
    while all(w % (2 * heads) == 0 and w // (2 * heads) >= HEAD_WIDTH for w in widths):
        heads *= 2
    return heads
