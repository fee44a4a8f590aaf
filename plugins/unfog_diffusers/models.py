"""Backbones from diffusers: its U-Nets and DiT trained inside unfog, and any diffusers model
folder on disk (``save_pretrained`` output) used as a backbone.

diffusers is imported only when one of these backbones is built, so importing unfog costs
nothing extra; without it, building one says ``pip install 'unfog[diffusers]'``.

Time. unfog gives t ∈ [0, 1]; the wrapped model gets the timestep diffusers' schedulers would
pass for the same noise level. A discrete schedule of T steps puts grid point i = 1..T at
t = i/T with ᾱ_i = ∏_{j≤i}(1 − β_j) (``unfog.diffusion.DiscreteSchedule``), while diffusers
indexes the same ᾱ as ``alphas_cumprod[i − 1]`` and passes the timestep i − 1. So the model
sees ``t·T − 1`` (T = ``num_train_timesteps``; see :func:`diffusers_timestep`), which makes a model
trained here, saved with ``save_pretrained`` and driven by a diffusers scheduler with the same
betas compute exactly what it computed in unfog (``unfog export format=diffusers``). Keep
``num_train_timesteps`` equal to the schedule's ``num_timesteps`` (export checks it). With a
continuous schedule the same map is only a fixed affine rescaling of t (t = 0 ↔ −1,
t = 1 ↔ T − 1), as good a time input as 1000·t.

Conditioning. ``"concat"`` channels widen the model's ``in_channels``. ``"tokens"`` make
``diffusers_unet`` a ``UNet2DConditionModel`` with ``cross_attention_dim`` = the tokens'
width. ``"vector"`` conditioning is summed into the time embedding, diffusers' own place for
class conditioning: a ``UNet2DConditionModel`` takes it through its ``class_embed_type=
"simple_projection"`` (a Linear inside the model, so a saved folder keeps it); a
``UNet2DModel`` has no projection of its own, so it gets ``class_embed_type="identity"`` and
the wrapper projects the vector to the time-embedding width (``vector_proj``) and passes it
as ``class_labels``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from unfog import register
from unfog.errors import ConfigError
from unfog_backbones.embeddings import concat_condition, token_condition, vector_condition

INSTALL = "pip install 'unfog[diffusers]'"
FOLDER_CLASSES: tuple[str, ...] = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel")


def import_diffusers(component: str) -> Any:
    """The ``diffusers`` module, or a ConfigError saying how to install it."""
    try:
        import diffusers
    except ImportError as exc:
        raise ConfigError(f"{component} needs diffusers, which is not installed: {INSTALL}") from exc
    return diffusers


def diffusers_timestep(t: Tensor, num_train_timesteps: int) -> Tensor:
    """The diffusers timestep for unfog's time ``t``: t·T − 1, so that the grid point t = i/T of a
    discrete schedule becomes diffusers' integer index i − 1 of the same ᾱ.

    t arrives in float32, which holds i/T only to a relative 6e-8, so t·T is snapped to the
    nearest integer when it lies within 1e-6·T of it (a shift of at most 1e-6 in t): grid
    points give exactly the integer diffusers passes, other times are left as they are.
    """
    u = t.to(torch.float64) * num_train_timesteps
    nearest = u.round()
    u = torch.where((u - nearest).abs() <= 1e-6 * num_train_timesteps, nearest, u)
    return (u - 1).to(torch.float32)


def _check_image(component: str, data_shape: tuple[int, ...], cond_dim: int, num_train_timesteps: int) -> None:
    if len(data_shape) != 3 or min(data_shape) < 1:
        raise ConfigError(
            f"{component}: data_shape must be an image shape (C, H, W) of positive sizes; got {data_shape}. "
            "For vectors or 2-D points use the 'mlp' backbone."
        )
    if cond_dim < 0:
        raise ConfigError(f"{component}: cond_dim must be 0 (unconditional) or positive; got {cond_dim}.")
    if num_train_timesteps < 1:
        raise ConfigError(f"{component}: num_train_timesteps must be at least 1; got {num_train_timesteps}.")


class _VectorLabels(nn.Module):
    """Stands in for DiT's ``LabelEmbedding``: embeds the ``class_labels`` it is given, here
    unfog's vector conditioning (B, cond_dim), by a Linear to the block's width."""

    def __init__(self, cond_dim: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(cond_dim, width)

    def forward(self, labels: Tensor, force_drop_ids: Any = None) -> Tensor:
        return self.proj(labels.to(self.proj.weight.dtype))


class DiffusersBackbone(nn.Module):
    """What the diffusers wrappers share: wired conditioning, unfog's t mapped to diffusers'
    timestep, and the wrapped model in ``diffusers_model`` (what export saves)."""

    data_ranks: ClassVar[tuple[int, ...]] = (3,)
    routes: ClassVar[tuple[str, ...]] = ("vector", "tokens", "concat")
    key: ClassVar[str] = ""

    def _wire(self, model: nn.Module, data_shape: tuple[int, ...], cond_dim: int, context_dim: int,
              cond_channels: int, num_train_timesteps: int, vector_proj: nn.Module | None = None,
              null_label: int | None = None, null_vector: int | None = None) -> None:
        """Keep the model and the wiring. A model that needs ``class_labels`` when unfog gives
        no vector gets ``null_label`` (a label id) or a zero vector of width ``null_vector``."""
        self.diffusers_model = model
        self.data_shape = tuple(data_shape)
        self.cond_dim, self.context_dim, self.cond_channels = cond_dim, context_dim, cond_channels
        self.num_train_timesteps = num_train_timesteps
        self.vector_proj = vector_proj
        self.null_label = null_label
        self.null_vector = null_vector

    @property
    def diffusers_class(self) -> str:
        """The wrapped diffusers class, e.g. ``"UNet2DModel"``."""
        return type(self.diffusers_model).__name__

    @property
    def diffusers_config(self) -> dict[str, Any]:
        """The wrapped model's diffusers config (what ``save_pretrained`` writes to config.json)."""
        return dict(self.diffusers_model.config)

    def forward(self, x: Tensor, t: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """Output shaped like ``x`` (B, C, H, W) for times ``t`` (B,) in [0, 1]."""
        vec = vector_condition(cond, self.cond_dim, self.key)
        tokens = token_condition(cond, self.context_dim, self.key)
        extra = concat_condition(cond, x, self.cond_channels, self.key)
        inp = x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=1)
        kwargs: dict[str, Any] = {}
        if tokens is not None:
            kwargs["encoder_hidden_states"] = tokens.to(x.dtype)
        if self.vector_proj is not None and vec is not None:
            kwargs["class_labels"] = self.vector_proj(vec.to(x.dtype))
        elif vec is not None:
            kwargs["class_labels"] = vec.to(x.dtype)
        elif self.null_label is not None:
            kwargs["class_labels"] = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
        elif self.null_vector is not None:
            kwargs["class_labels"] = x.new_zeros(x.shape[0], self.null_vector)
        timestep = diffusers_timestep(torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0]),
                                      self.num_train_timesteps)
        return self.diffusers_model(inp, timestep, **kwargs).sample


def _unet_block_types(n: int, tokens: bool, down: tuple[str, ...] | None,
                      up: tuple[str, ...] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down/up block types: the given ones, or plain blocks with attention (cross-attention when
    there are tokens) at the lowest resolution only."""
    attn = "CrossAttn" if tokens else "Attn"
    down = tuple(down) if down else ("DownBlock2D",) * (n - 1) + (f"{attn}DownBlock2D",)
    up = tuple(up) if up else (f"{attn}UpBlock2D",) + ("UpBlock2D",) * (n - 1)
    if len(down) != n or len(up) != n:
        raise ConfigError(
            f"diffusers_unet: block_out_channels has {n} entries, so down_block_types and up_block_types need "
            f"{n} each; got {len(down)} and {len(up)}. Leave them unset for the defaults."
        )
    return down, up


def _sample_size(data_shape: tuple[int, ...]) -> int | tuple[int, int]:
    _, h, w = data_shape
    return h if h == w else (h, w)


@register("backbone", "diffusers_unet")
class DiffusersUNet(DiffusersBackbone):
    """diffusers' ``UNet2DModel`` (``UNet2DConditionModel`` with token conditioning), trained in unfog.

    Without ``"tokens"`` conditioning this is a ``UNet2DModel``, the DDPM network as diffusers
    builds it (Ho et al. 2020); with tokens a ``UNet2DConditionModel`` whose cross-attention
    (Rombach et al. 2022) attends to them, ``cross_attention_dim`` = their width. Vector
    conditioning enters the time embedding and concat channels widen the input (see the
    module docstring). ``unfog export format=diffusers`` writes an unconditional one as a
    ``DDIMPipeline``/``DDPMPipeline`` folder.

    Args:
        block_out_channels: width of each resolution level, from the input resolution down.
        layers_per_block: residual layers per level (one more on the way up).
        down_block_types: diffusers block class names per level; unset: plain blocks with
            (cross-)attention at the lowest resolution.
        up_block_types: the same for the way up; unset: mirror of the default.
        attention_head_dim: diffusers' ``attention_head_dim``: the width of a head in a
            ``UNet2DModel``, the number of heads in a ``UNet2DConditionModel`` (diffusers'
            historical naming).
        norm_num_groups: GroupNorm groups; every width must be divisible by it.
        num_train_timesteps: T of the discrete schedule; the model sees timestep t·T − 1.
    """

    key = "diffusers_unet"

    def __init__(
        self,
        data_shape: tuple[int, ...],
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_channels: int = 0,
        block_out_channels: tuple[int, ...] = (32, 64),
        layers_per_block: int = 1,
        down_block_types: tuple[str, ...] | None = None,
        up_block_types: tuple[str, ...] | None = None,
        attention_head_dim: int = 8,
        norm_num_groups: int = 8,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        data_shape, block_out_channels = tuple(data_shape), tuple(block_out_channels)
        _check_image(self.key, data_shape, cond_dim, num_train_timesteps)
        self._check_sizes(data_shape, block_out_channels, layers_per_block, attention_head_dim, norm_num_groups)
        diffusers = import_diffusers(self.key)
        tokens = context_dim > 0
        down, up = _unet_block_types(len(block_out_channels), tokens, down_block_types, up_block_types)
        common = dict(
            sample_size=_sample_size(data_shape), in_channels=data_shape[0] + cond_channels,
            out_channels=data_shape[0], block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            down_block_types=down, up_block_types=up, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
        )
        vector_proj = None
        try:
            if tokens:
                model = diffusers.UNet2DConditionModel(
                    **common, cross_attention_dim=context_dim,
                    class_embed_type="simple_projection" if cond_dim else None,
                    projection_class_embeddings_input_dim=cond_dim or None,
                )
            else:
                model = diffusers.UNet2DModel(**common, class_embed_type="identity" if cond_dim else None)
                if cond_dim:
                    vector_proj = nn.Linear(cond_dim, 4 * block_out_channels[0])
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{self.key}: diffusers refused this architecture: {exc}") from exc
        self._wire(model, data_shape, cond_dim, context_dim, cond_channels, num_train_timesteps, vector_proj)

    def _check_sizes(self, data_shape: tuple[int, ...], widths: tuple[int, ...], layers: int,
                     head_dim: int, groups: int) -> None:
        if not widths or min(widths) < 1 or layers < 1 or head_dim < 1 or groups < 1:
            raise ConfigError(
                f"{self.key}: block_out_channels must be a non-empty list of positive widths and layers_per_block, "
                f"attention_head_dim, norm_num_groups at least 1; got {list(widths)}, {layers}, {head_dim}, {groups}."
            )
        factor = 2 ** (len(widths) - 1)
        if data_shape[1] % factor or data_shape[2] % factor:
            raise ConfigError(
                f"{self.key}: the image size {data_shape[1]}x{data_shape[2]} must be divisible by {factor}, since "
                f"{len(widths)} levels halve it {len(widths) - 1} times; use fewer block_out_channels."
            )
        bad = [w for w in widths if w % groups]
        if bad:
            raise ConfigError(
                f"{self.key}: every width in block_out_channels must be divisible by norm_num_groups={groups}; "
                f"{bad} are not."
            )


@register("backbone", "diffusers_transformer")
class DiffusersTransformer(DiffusersBackbone):
    """diffusers' ``DiTTransformer2DModel`` (Peebles & Xie 2023), trained in unfog.

    Patches of ``patch_size``² pixels are tokens for ``num_layers`` adaLN-Zero transformer
    blocks. diffusers' DiT is class-conditional through its own label table
    (``num_embeds_ada_norm``), which unfog's conditioners cannot feed: they give vectors. So
    with vector conditioning each block's label embedding is replaced by a Linear from the
    vector to the block's width (summed with the timestep embedding, DiT's place for the
    class); unconditional, the table has one label, always passed, with diffusers' random
    label dropout off (unfog's conditioners drop for guidance). Concat channels widen the
    input; DiT has no cross-attention, so no token route. Square images only (DiT's
    ``sample_size`` is one side). ``unfog export format=safetensors`` exports it.

    Args:
        patch_size: side of a patch; must divide the image side.
        num_layers: transformer blocks.
        num_attention_heads: attention heads per block.
        attention_head_dim: width of a head (the model width is heads × head width).
        num_train_timesteps: T of the discrete schedule; the model sees timestep t·T − 1.
    """

    routes: ClassVar[tuple[str, ...]] = ("vector", "concat")
    key = "diffusers_transformer"

    def __init__(
        self,
        data_shape: tuple[int, ...],
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_channels: int = 0,
        patch_size: int = 2,
        num_layers: int = 2,
        num_attention_heads: int = 2,
        attention_head_dim: int = 16,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        data_shape = tuple(data_shape)
        _check_image(self.key, data_shape, cond_dim, num_train_timesteps)
        if context_dim:
            raise ConfigError(
                f"{self.key}: DiT has no cross-attention, so it cannot take token conditioning "
                f"(context_dim={context_dim}); use backbone=diffusers_unet or route the conditioner to vector."
            )
        _, h, w = data_shape
        if patch_size < 1 or h != w or h % patch_size:
            raise ConfigError(
                f"{self.key}: DiT needs square images whose side is divisible by patch_size; got "
                f"data_shape {data_shape} and patch_size={patch_size}."
            )
        for name, value in {"num_layers": num_layers, "num_attention_heads": num_attention_heads,
                            "attention_head_dim": attention_head_dim}.items():
            if value < 1:
                raise ConfigError(f"{self.key}: {name} must be at least 1; got {value}.")
        diffusers = import_diffusers(self.key)
        model = diffusers.DiTTransformer2DModel(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=data_shape[0] + cond_channels, out_channels=data_shape[0], num_layers=num_layers,
            sample_size=h, patch_size=patch_size, num_embeds_ada_norm=1,
        )
        width = num_attention_heads * attention_head_dim
        for block in model.transformer_blocks:
            emb = block.norm1.emb
            if cond_dim:
                emb.class_embedder = _VectorLabels(cond_dim, width)
            else:
                emb.class_embedder.dropout_prob = 0.0
        self._wire(model, data_shape, cond_dim, 0, cond_channels, num_train_timesteps,
                   null_label=None if cond_dim else 0)


@register("backbone", "diffusers_folder")
class DiffusersFolder(DiffusersBackbone):
    """A diffusers model folder on disk (``config.json`` + safetensors weights) as the backbone.

    Reads the folder's ``_class_name`` and loads a ``UNet2DModel``, ``UNet2DConditionModel``
    or ``DiTTransformer2DModel`` from it (safetensors only: weights are untrusted input), then
    trains and samples like ``diffusers_unet``. Its sample size and channels must match the
    data (plus concat channels). Vector conditioning needs a model built to take it
    (``class_embed_type="identity"``, or ``"simple_projection"``/``"projection"`` of the
    conditioners' width), and without vector conditioning such a model is given a zero vector;
    tokens need a ``UNet2DConditionModel`` of their width; a DiT folder runs unconditionally,
    with its null (guidance) label.

    Args:
        path: the folder, e.g. one written by ``UNet2DModel.save_pretrained``.
        num_train_timesteps: T of the discrete schedule; the model sees timestep t·T − 1.
    """

    key = "diffusers_folder"

    def __init__(
        self,
        data_shape: tuple[int, ...],
        path: str,
        cond_dim: int = 0,
        context_dim: int = 0,
        cond_channels: int = 0,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        data_shape = tuple(data_shape)
        _check_image(self.key, data_shape, cond_dim, num_train_timesteps)
        folder = Path(path).expanduser()
        config = _folder_config(folder)
        name = config.get("_class_name")
        if name not in FOLDER_CLASSES:
            raise ConfigError(
                f"{self.key}: {folder} holds a {name!r}; this backbone loads {', '.join(FOLDER_CLASSES)}."
            )
        _check_folder_shape(folder, config, data_shape, cond_channels)
        diffusers = import_diffusers(self.key)
        try:
            model = getattr(diffusers, name).from_pretrained(str(folder), use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"{self.key}: could not load {name} from {folder} ({exc}); it needs config.json and "
                "diffusion_pytorch_model.safetensors (save_pretrained(..., safe_serialization=True))."
            ) from exc
        vector_proj, null_label, null_vector = _folder_conditioning(self.key, folder, model, cond_dim, context_dim)
        self._wire(model, data_shape, cond_dim, context_dim, cond_channels, num_train_timesteps,
                   vector_proj, null_label, null_vector)


def _folder_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ConfigError(
            f"diffusers_folder: path={folder} does not exist; give a diffusers model folder (config.json + "
            "safetensors weights), e.g. one written by UNet2DModel.save_pretrained or the unet/ of a pipeline."
        )
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"diffusers_folder: {folder} has no config.json, so it is not a diffusers model folder; for a "
            "pipeline folder give its model subfolder (e.g. PATH/unet)."
        )
    return json.loads((folder / "config.json").read_text())


def _check_folder_shape(folder: Path, config: Mapping[str, Any], data_shape: tuple[int, ...],
                        cond_channels: int) -> None:
    """Refuse a folder whose model takes other channels or another image size than the data."""
    c, h, w = data_shape
    cin = config.get("in_channels")
    cout = config.get("out_channels") or cin
    size = config.get("sample_size")
    sides = None if size is None else (size, size) if isinstance(size, int) else tuple(size)
    if cin != c + cond_channels or cout != c or (sides is not None and sides != (h, w)):
        extra = f" + {cond_channels} concat channels" if cond_channels else ""
        raise ConfigError(
            f"diffusers_folder: the model in {folder} takes {cin} input and {cout} output channels at sample_size "
            f"{size}, but the data has shape {data_shape}{extra} (so {c + cond_channels} in, {c} out, {h}x{w}). "
            "Pick a folder made for this data or another dataset."
        )


def _folder_conditioning(component: str, folder: Path, model: nn.Module, cond_dim: int,
                         context_dim: int) -> tuple[nn.Module | None, int | None, int | None]:
    """How a loaded model takes unfog's conditioning: (the vector's projection, the label id to pass
    without conditioning, the width of the zero vector to pass without conditioning), each or None.

    Without vector conditioning a model that adds a vector to its time embedding gets a zero
    vector (nothing added for ``identity``, the projection's bias otherwise)."""
    cfg = model.config
    name = type(model).__name__
    cross = cfg.get("cross_attention_dim") if name == "UNet2DConditionModel" else None
    if name == "UNet2DConditionModel" and context_dim != cross:
        raise ConfigError(
            f"{component}: {folder} holds a UNet2DConditionModel attending to tokens of width {cross}, so it needs "
            f"a token conditioner of that width; the model's token width is {context_dim or 'none'}."
        )
    if name != "UNet2DConditionModel" and context_dim:
        raise ConfigError(
            f"{component}: {folder} holds a {name}, which has no cross-attention for token conditioning "
            f"(context_dim={context_dim}); route the conditioner to vector or use a UNet2DConditionModel."
        )
    if name == "DiTTransformer2DModel":
        if cond_dim:
            raise ConfigError(
                f"{component}: {folder} holds a DiT whose classes are its own label table, which unfog's vector "
                "conditioners cannot feed; train it unconditionally (~conditioner) or use "
                "backbone=diffusers_transformer."
            )
        table = model.transformer_blocks[0].norm1.emb.class_embedder
        for block in model.transformer_blocks:
            block.norm1.emb.class_embedder.dropout_prob = 0.0
        has_null = table.embedding_table.num_embeddings > table.num_classes
        return None, table.num_classes if has_null else 0, None
    kind = cfg.get("class_embed_type")
    takes = cfg.get("projection_class_embeddings_input_dim")
    width = model.time_embedding.linear_2.out_features
    if cond_dim == 0:
        if kind == "identity":
            return None, None, width
        if kind in ("simple_projection", "projection"):
            return None, None, takes
        if kind is not None or cfg.get("num_class_embeds") is not None:
            raise ConfigError(
                f"{component}: the {name} in {folder} embeds class ids itself (class_embed_type={kind}, "
                f"num_class_embeds={cfg.get('num_class_embeds')}), which unfog's conditioners cannot feed (they "
                "give vectors); pick a model with class_embed_type identity/projection or none."
            )
        return None, None, None
    if kind == "identity":
        return nn.Linear(cond_dim, width), None, None
    if kind in ("simple_projection", "projection") and takes == cond_dim:
        return None, None, None
    raise ConfigError(
        f"{component}: vector conditioning of width {cond_dim} needs a model that adds a vector to its time "
        f"embedding (class_embed_type identity, or simple_projection/projection of input width {cond_dim}); the "
        f"{name} in {folder} has class_embed_type={kind}, projection_class_embeddings_input_dim={takes}."
    )
