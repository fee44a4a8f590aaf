"""Captions embedded by a small transformer trained with the model; nothing to download."""

from __future__ import annotations

import re
import reprlib
import zlib
from typing import Any, Literal

import torch
from torch import Tensor, nn

from unfog import register
from unfog.errors import ConfigError, DataError

PAD, BEGIN, END = 0, 1, 2  # reserved token ids; text tokens start at RESERVED
RESERVED = 3
# Runs of letters, runs of digits, or one punctuation mark: "2 red-ish cats!" ->
# ["2", "red", "-", "ish", "cats", "!"].
WORD = re.compile(r"[^\W\d_]+|\d+|[^\w\s]|_")


def word_id(word: str, vocab_size: int, quotient_remainder: bool = False) -> int:
    """The id of ``word``: its CRC-32 modulo the non-reserved ids (the hashing trick of
    Weinberger et al. 2009), or with ``quotient_remainder`` modulo their square, an id that
    :class:`Text` splits into two table rows. Unlike ``hash()``, CRC-32 is the same in every
    process and on every machine, so a checkpoint's embeddings keep meaning the same words."""
    buckets = vocab_size - RESERVED
    return RESERVED + zlib.crc32(word.encode("utf-8")) % (buckets * buckets if quotient_remainder else buckets)


def as_texts(value: Any, drop: Tensor | None, field: str, name: str) -> list[str]:
    """The captions of a batch field, with rows where ``drop`` is true replaced by ``""``.

    ``value`` is a list or tuple of strings (what torch's default collate makes of a string
    field) or one string (a batch of one). ``name`` is the conditioner's, for errors.
    """
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        texts = list(value)
    else:
        raise DataError(
            f"{name}: field {field!r} must be a list of strings, one caption per row (or one string); "
            f"got {_describe(value)}. Use '' for a row without a caption."
        )
    if drop is not None:
        if tuple(drop.shape) != (len(texts),):
            raise DataError(
                f"{name}: field {field!r} has {len(texts)} captions but the drop mask has shape {tuple(drop.shape)}."
            )
        texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
    return texts


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        row, bad = next((i, v) for i, v in enumerate(value) if not isinstance(v, str))
        return f"a {type(value).__name__} whose row {row} is {reprlib.repr(bad)} ({type(bad).__name__})"
    return f"{reprlib.repr(value)} ({type(value).__name__})"


@register("conditioner", "text")
class Text(nn.Module):
    """Embeds a caption with a small transformer encoder trained along with the model.

    Tokens: ``"words"`` lower-cases the caption, splits it into words, numbers and
    punctuation and hashes each into ``vocab_size`` − 3 buckets (:func:`word_id`; the
    hashing trick of Weinberger et al. 2009, so there is no vocabulary file), ``"bytes"``
    uses the UTF-8 bytes (ByT5, Xue et al. 2022). With ``quotient_remainder`` (the
    default) a word's hash ranges over (``vocab_size`` − 3)² values and its embedding is the
    sum of two rows, one per table, picked by the remainder and the quotient of the hash
    (the compositional embedding of Shi et al. 2020): two words share an embedding only if
    both rows coincide, about 1 in 16.7 million at the default size instead of 1 in 4,093
    (plain hashing sent "blue" and "square" to one row). Each caption becomes a begin token, at
    most ``max_length`` − 2 tokens and an end token, padded to ``max_length``.

    Encoder: token plus learned position embeddings, ``layers`` pre-norm transformer
    blocks (Vaswani et al. 2017; pre-norm as in Xiong et al. 2020) that ignore padding,
    and a final LayerNorm. Route ``"tokens"`` gives every position, (B, ``max_length``,
    ``dim``), a fixed-length context for cross-attention like Stable Diffusion's CLIP
    context (Rombach et al. 2022); route ``"vector"`` gives the begin token's output,
    (B, ``dim``), as BERT's [CLS] (Devlin et al. 2019). Classifier-free guidance (Ho &
    Salimans 2022) drops captions with probability ``dropout``: a dropped row is encoded
    as the empty caption ``""``, which is therefore the null conditioning.

    Args:
        field: the batch field holding the captions (a list of strings).
        dim: embedding width.
        layers: number of transformer blocks.
        heads: attention heads per block; must divide ``dim``.
        max_length: tokens per caption, begin and end tokens included; longer captions are cut.
        vocab_size: number of token ids of the ``"words"`` tokenizer, 3 reserved ones
            included (``"bytes"`` always uses 256 + 3).
        tokenizer: ``"words"`` (hashed words) or ``"bytes"`` (UTF-8 bytes).
        quotient_remainder: two embedding tables indexed by the remainder and the quotient
            of each word's hash (``"words"`` only); false: one table, one hash bucket per word.
        route: ``"tokens"`` (every position) or ``"vector"`` (the begin token).
        dropout: probability of replacing a caption by ``""`` while training.
    """

    takes_text = True  # its values are strings: prompt=/prompts= of unfog sample go here

    def __init__(self, field: str = "caption", dim: int = 128, layers: int = 2, heads: int = 4,
                 max_length: int = 32, vocab_size: int = 4096, tokenizer: Literal["words", "bytes"] = "words",
                 route: Literal["tokens", "vector"] = "tokens", dropout: float = 0.1,
                 quotient_remainder: bool = True) -> None:
        super().__init__()
        if dim < 1 or heads < 1 or dim % heads:
            raise ConfigError(f"text: dim must be a positive multiple of heads; got dim={dim}, heads={heads}.")
        if layers < 0:
            raise ConfigError(f"text: layers must be at least 0; got {layers}.")
        if max_length < 2:
            raise ConfigError(f"text: max_length must be at least 2 (the begin and end tokens); got {max_length}.")
        if tokenizer == "words" and vocab_size <= RESERVED:
            raise ConfigError(
                f"text: vocab_size must exceed the {RESERVED} reserved ids (padding, begin, end); got {vocab_size}."
            )
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"text: dropout must lie in [0, 1); got {dropout}.")
        self.field, self.dim, self.dropout, self.route = field, dim, dropout, route
        self.max_length, self.tokenizer = max_length, tokenizer
        self.vocab_size = vocab_size if tokenizer == "words" else RESERVED + 256
        self.token_embedding = nn.Embedding(self.vocab_size, dim)
        self.quotient_remainder = quotient_remainder and tokenizer == "words"
        # The quotient's table; the reserved tokens take its zero padding row.
        self.quotient_embedding = (nn.Embedding(self.vocab_size, dim, padding_idx=PAD) if self.quotient_remainder
                                   else None)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # as GPT-2 and CLIP (Radford et al. 2019, 2021)
        if self.quotient_embedding is not None:
            nn.init.normal_(self.quotient_embedding.weight, std=0.02)
            with torch.no_grad():
                self.quotient_embedding.weight[PAD].zero_()
        nn.init.normal_(self.position_embedding, std=0.01)
        block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Token ids (B, ``max_length``) and a mask (B, ``max_length``), true on real tokens."""
        ids = torch.full((len(texts), self.max_length), PAD, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [BEGIN, *self._token_ids(text)[: self.max_length - 2], END]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, ids != PAD

    def _token_ids(self, text: str) -> list[int]:
        if self.tokenizer == "bytes":
            return [RESERVED + b for b in text.encode("utf-8")]
        return [word_id(w, self.vocab_size, self.quotient_remainder) for w in WORD.findall(text.lower())]

    def forward(self, value: Any, drop: Tensor | None = None) -> Tensor:
        """Embed captions (a list of B strings); rows where ``drop`` is true are encoded as ``""``."""
        ids, mask = self.tokenize(as_texts(value, drop, self.field, "text"))
        ids, mask = ids.to(self.position_embedding.device), mask.to(self.position_embedding.device)
        x = self.embed(ids) + self.position_embedding
        x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
        return x if self.route == "tokens" else x[:, 0]

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint from before the quotient table: a zero table reproduces its embeddings
        # exactly (the remainder of the wider hash is the old hash bucket).
        key = prefix + "quotient_embedding.weight"
        if self.quotient_embedding is not None and key not in state_dict:
            state_dict[key] = torch.zeros_like(self.quotient_embedding.weight)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def embed(self, ids: Tensor) -> Tensor:
        """Token embeddings (B, L, ``dim``) of ids from :meth:`tokenize`."""
        if self.quotient_embedding is None:
            return self.token_embedding(ids)
        buckets = self.vocab_size - RESERVED
        word = ids >= RESERVED
        hashed = (ids - RESERVED).clamp(min=0)
        remainder = torch.where(word, RESERVED + hashed % buckets, ids)
        quotient = torch.where(word, RESERVED + hashed // buckets, torch.full_like(ids, PAD))
        return self.token_embedding(remainder) + self.quotient_embedding(quotient)

    def null_value(self, n: int) -> list[str]:
        """``n`` empty captions."""
        return [""] * n
