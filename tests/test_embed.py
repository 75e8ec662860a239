"""Embedder: converted BERT fixture against transformers' pooled embeddings; buckets; CLI."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jinfer.convert import convert
from jinfer.embed import Embedder
from jinfer.errors import ConfigError, EmptyInputError, EngineClosedError, InputError, InvalidTokenError
from jinfer.integrity import rehash_model_dir
from jinfer.testing import live_device_arrays

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "bert"


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bert") / "model"
    convert(FIXTURE, out, progress=False)
    # A word-level tokenizer with ids inside the fixture's 256-entry vocabulary, for text input.
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    vocab = {"[UNK]": 100, **{w: 200 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    rehash_model_dir(out)  # a file added on purpose is recorded, as `jinfer rehash` does
    return out


def cosine(a, b):
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def golden_rows():
    g = np.load(FIXTURE / "golden.npz")
    return [
        ids[mask.astype(bool)].tolist() for ids, mask in zip(g["input_ids"], g["attention_mask"], strict=True)
    ], g


@pytest.mark.parametrize("pooling,key", [("mean", "mean_pooled_normalized"), ("cls", "cls_embedding")])
def test_embeddings_match_transformers(bert_dir, pooling, key):
    rows, g = golden_rows()
    emb = Embedder(bert_dir, pooling=pooling, normalize=pooling == "mean")
    out = emb.embed(rows)
    assert out.shape == (2, 64) and out.dtype == np.float32
    for got, want in zip(out, g[key], strict=True):
        assert cosine(got, want) >= 0.9999
    if pooling == "mean":
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_many_inputs_use_buckets_and_keep_order(bert_dir):
    rows, _ = golden_rows()
    emb = Embedder(bert_dir)
    inputs = [rows[i % 2][: 1 + (i % len(rows[i % 2]))] for i in range(37)]
    batched = emb.embed(inputs)
    singles = np.stack([emb.embed([x])[0] for x in inputs[:5]])
    np.testing.assert_allclose(batched[:5], singles, atol=1e-5)
    assert emb.stats.compiles <= len(emb.engine.buckets.keys())


def test_bad_inputs(bert_dir, tmp_path):
    emb = Embedder(bert_dir)
    with pytest.raises(EmptyInputError, match="input 1"):
        emb.embed([[5, 6], []])
    with pytest.raises(
        InvalidTokenError, match=r"input 1 has token id 1000000 outside the vocabulary \[0, 256\)"
    ):
        emb.embed([[5, 6], [7, 10**6]])
    with pytest.raises(InputError, match="input 0 is list; expected a string or a list of token ids"):
        emb.embed([[5, 1.7]])
    with pytest.raises(InputError, match="texts is a bytes"):
        emb.embed(b"the cat")
    one = emb.embed("the cat sat")  # one string is one input, not a list of characters
    assert one.shape == (1, 64)
    np.testing.assert_array_equal(one, emb.embed(["the cat sat"]))
    assert emb.embed([]).shape == (0, 64)
    assert np.isfinite(emb.embed([[5, 6]])).all()  # still serving
    llm_like = tmp_path / "not_encoder"
    from jinfer.testing import make_tiny_llm_dir

    with pytest.raises(ConfigError, match="needs an encoder"):
        Embedder(make_tiny_llm_dir(llm_like))


def test_close_frees_the_weights_and_later_calls_raise_closed(bert_dir):
    """Embedder had no close() (LLM has): its weights stayed on the device until it was dropped.
    Now close() frees them, later calls raise EngineClosedError, and closing twice is fine."""
    rows, _ = golden_rows()
    before = live_device_arrays()
    emb = Embedder(bert_dir)
    want = emb.embed(rows)
    assert live_device_arrays()[1] > before[1]
    emb.close()
    assert live_device_arrays() == before and emb.engine.params is None
    with pytest.raises(EngineClosedError, match="the Embedder is closed; create a new Embedder"):
        emb.embed(rows)
    with pytest.raises(EngineClosedError, match="engine is closed"):
        emb.engine.submit(np.asarray(rows[0], np.int32))
    assert emb.encode("the cat") == [200, 201]  # tokenizing needs no device, as LLM.encode_prompt
    emb.close()
    with Embedder(bert_dir) as again:
        np.testing.assert_array_equal(again.embed(rows), want)
    with pytest.raises(EngineClosedError, match="the Embedder is closed"):
        again.embed(rows)
    del again
    assert live_device_arrays() == before


def test_cli_embed(bert_dir):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jinfer.cli",
            "--compilation-cache",
            "off",
            "embed",
            "--model",
            str(bert_dir),
            "the cat sat",
            "a dog ran",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["the cat sat", "a dog ran"]
    direct = Embedder(bert_dir).embed(["the cat sat", "a dog ran"])
    np.testing.assert_allclose([row["embedding"] for row in rows], direct, atol=1e-6)


def test_run_batch_embed_task_with_real_embedder(bert_dir, tmp_path):
    from jinfer.batch import run_batch

    lines = [
        {"custom_id": "a", "text": "the cat sat"},
        {"custom_id": "b", "input": "a dog ran on the mat"},
        {"custom_id": "c", "text": ""},
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    summary = run_batch(str(bert_dir), inp, tmp_path / "out.jsonl", task="embed", progress=False)
    rows = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    expected = Embedder(bert_dir).embed(["the cat sat", "a dog ran on the mat"])
    np.testing.assert_allclose(rows["a"]["embedding"], expected[0], atol=1e-6)
    np.testing.assert_allclose(rows["b"]["embedding"], expected[1], atol=1e-6)
    assert rows["c"]["error"]["code"] == "empty_prompt"
    assert summary.ok == 2 and summary.failed == 1


def test_a_bert_repo_with_only_vocab_txt_gets_a_wordpiece_tokenizer(tmp_path):
    """Older BERT / sentence-transformers repos ship vocab.txt and no tokenizer.json: conversion
    builds the BERT WordPiece tokenizer transformers builds from it (it converted ids-only)."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    words = ["the", "cat", "sat", "on", "mat", "##s", "caf", "##e"]
    (src / "vocab.txt").write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", *words]) + "\n")
    (src / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    emb = Embedder(convert(src, tmp_path / "out", progress=False))
    assert emb.tokenizer is not None
    w = {t: 5 + i for i, t in enumerate(words)}
    # [CLS] .. [SEP]; lowercased; accents stripped with lowercase (as BertTokenizer); ## pieces
    assert emb.encode("The CATS sat on  Café!") == [
        1,
        w["the"],
        w["cat"],
        w["##s"],
        w["sat"],
        w["on"],
        w["caf"],
        w["##e"],
        3,
        2,
    ]
    ids = emb.encode("the cat sat")
    np.testing.assert_allclose(emb.embed(["the cat sat"]), emb.embed([ids]), atol=1e-6)
