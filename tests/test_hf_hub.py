"""Hugging Face model ids through huggingface_hub, from a pre-populated local hub cache (no network).

The cache is laid out as huggingface_hub writes it (models--org--name/{blobs,snapshots/<commit>,
refs/main}) from the tiny llama_gqa fixture plus a word-level tokenizer, and HF_HUB_OFFLINE is on.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jinfer import hf_hub
from jinfer.errors import ConfigError, JinferError

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "llama_gqa"
REPO = "tiny-org/tiny-llama"
SHARDED_REPO = "tiny-org/tiny-sharded"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{w: 10 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _write_hub_repo(hub_cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """models--org--name with content-addressed blobs, snapshot symlinks and refs/main."""
    repo_dir = hub_cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True)
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot


def _write_hub_cache(hub_cache: Path) -> None:
    files = {p.name: p.read_bytes() for p in FIXTURE.iterdir() if p.name != "golden.npz"}
    files["tokenizer.json"] = _tokenizer_json().encode()
    _write_hub_repo(hub_cache, REPO, files)
    # A sentence-transformers repo: the tiny BERT fixture with mean pooling and normalization.
    bert = FIXTURE.parent / "bert"
    st_files = {p.name: p.read_bytes() for p in bert.iterdir() if p.name != "golden.npz"}
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    st_files["modules.json"] = json.dumps(modules).encode()
    st_files["1_Pooling/config.json"] = json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}
    ).encode()
    st_files["sentence_bert_config.json"] = json.dumps({"max_seq_length": 48, "do_lower_case": True}).encode()
    st_files["tokenizer.json"] = _tokenizer_json().encode()  # case-sensitive word level
    _write_hub_repo(hub_cache, "tiny-org/tiny-st", st_files)
    # A sharded checkpoint (model.safetensors.index.json + 3 shards), every file a link to blobs/.
    sharded = FIXTURE.parent / "llama_sharded"
    _write_hub_repo(
        hub_cache, SHARDED_REPO, {p.name: p.read_bytes() for p in sharded.iterdir() if p.name != "golden.npz"}
    )


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A local HF cache and an empty JINFER_HOME; huggingface_hub offline (in this process too)."""
    import huggingface_hub.constants as hf_constants

    hf_home = tmp_path / "hf"
    _write_hub_cache(hf_home / "hub")
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "JINFER_HOME": str(tmp_path / "jinfer")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub reads its environment at import: point the loaded module at the same cache.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return env


def _count_conversions(monkeypatch) -> list:
    import jinfer.convert

    calls = []
    real = jinfer.convert.convert

    def counting(src, out, **kw):
        calls.append((Path(src), Path(out)))
        return real(src, out, **kw)

    monkeypatch.setattr(jinfer.convert, "convert", counting)
    return calls


def test_hub_id_converts_once_then_loads_from_jinfer_cache(offline_hub, monkeypatch):
    from jinfer.checkpoint import COMPLETE_MARKER
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    calls = _count_conversions(monkeypatch)
    golden = np.load(FIXTURE / "golden.npz")
    prompt = [int(t) for t in golden["input_ids_0"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=8)

    llm = LLM(REPO, max_batch=1, buckets=(16,))
    expected_dir = Path(offline_hub["JINFER_HOME"]) / "models" / "hf" / "tiny-org--tiny-llama"
    assert llm.path == expected_dir / f"{COMMIT}-float32"
    assert len(calls) == 1 and calls[0][0].name == COMMIT  # converted from the hub snapshot
    assert llm.engine.config.max_len == 128  # the model's context (defaults from the model)
    assert llm.generate([prompt], greedy)[0].token_ids == [int(t) for t in golden["generated_0"]]
    marker = llm.path / COMPLETE_MARKER
    stamp = marker.stat().st_mtime_ns

    again = LLM(REPO, max_batch=1, buckets=(16,))
    assert len(calls) == 1, "second load converted again"
    assert again.path == llm.path and marker.stat().st_mtime_ns == stamp
    # The same id at an explicit revision and dtype is its own cache entry.
    from jinfer.hub import resolve_model

    bf16 = resolve_model(f"{REPO}@main", dtype="bfloat16", progress=False)
    assert bf16 == expected_dir / f"{COMMIT}-bfloat16" and len(calls) == 2
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_convert_and_generate_with_a_hub_id(offline_hub, tmp_path):
    env = {**os.environ, **offline_hub, "PYTHONPATH": str(Path(__file__).parent.parent)}
    cli = [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "off"]
    out = tmp_path / "converted"
    run = dict(env=env, capture_output=True, text=True, timeout=300)
    r = subprocess.run([*cli, "convert", REPO, str(out)], **run)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["model_class"] == "Llama"
    assert (out / "tokenizer.json").is_file()

    gen = [*cli, "generate", "--model", REPO, "--raw", "--json", "--max-tokens", "3", "the cat sat"]
    r = subprocess.run(gen, **run)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.splitlines()[-1])
    assert row["usage"] == {"prompt_tokens": 3, "completion_tokens": 3}
    assert "converting" in r.stderr  # first use through the id: converted into jinfer's cache
    assert (Path(offline_hub["JINFER_HOME"]) / "models" / "hf" / "tiny-org--tiny-llama").is_dir()


def test_offline_and_not_cached_gives_a_clear_error(offline_hub, tmp_path):
    from jinfer.convert import convert
    from jinfer.llm import LLM

    missing = "tiny-org/not-cached"
    for attempt in (lambda: LLM(missing), lambda: convert(missing, tmp_path / "o")):
        with pytest.raises(hf_hub.HubDownloadError, match="HF_HUB_OFFLINE=1") as info:
            attempt()
        assert "'tiny-org/not-cached'" in str(info.value) and isinstance(info.value, JinferError)
    assert not (tmp_path / "o").exists()


def test_repo_id_shapes():
    assert hf_hub.is_repo_id("Qwen/Qwen3-0.6B") and hf_hub.is_repo_id("google/gemma-3-1b-it@main")
    assert hf_hub.split_revision("org/name@v1.0") == ("org/name", "v1.0")
    for not_an_id in ("./org/name", "/abs/path", "org/../x", "a/b/c", "smollm2-135m-instruct", "org/"):
        assert not hf_hub.is_repo_id(not_an_id), not_an_id


def test_embedder_with_a_sentence_transformers_hub_id(offline_hub):
    from jinfer.embed import Embedder

    golden = np.load(FIXTURE.parent / "bert" / "golden.npz")
    pairs = zip(golden["input_ids"], golden["attention_mask"], strict=True)
    rows = [ids[mask.astype(bool)].tolist() for ids, mask in pairs]
    emb = Embedder("tiny-org/tiny-st")
    assert (emb.pooling, emb.normalize, emb.max_seq_length) == ("mean", True, 48)
    assert emb.engine.buckets.max_seq_len == 48  # buckets follow max_seq_length
    got = emb.embed(rows)
    np.testing.assert_allclose(got, golden["mean_pooled_normalized"], atol=1e-5)
    # do_lower_case: text is lowercased before the (case-sensitive) tokenizer, as sentence-transformers does.
    upper, lower, ids = emb.embed(["THE Cat sat", "the cat sat", [10, 11, 12]])
    np.testing.assert_allclose(upper, ids, atol=1e-6)
    np.testing.assert_allclose(lower, ids, atol=1e-6)
    long = emb.embed([" ".join(["the cat"] * 40)])  # 80 words, truncated to max_seq_length = 48
    np.testing.assert_allclose(long[0], emb.embed([[10, 11] * 24])[0], atol=1e-6)


def test_sharded_hub_checkpoint_converts_and_dtype_objects_are_accepted(offline_hub):
    """A hub snapshot links every file (the shards named by model.safetensors.index.json too) to
    the cache's blobs/, outside the snapshot: the index's names are checked, not the links. A
    NumPy dtype object selects the same float32 conversion as "float32"."""
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    golden = np.load(FIXTURE.parent / "llama_sharded" / "golden.npz")
    prompts = [[int(t) for t in golden[f"input_ids_{i}"]] for i in (0, 1)]
    with LLM(SHARDED_REPO, dtype=np.float32, max_batch=2, max_len=32, buckets=(16,)) as llm:
        assert llm.path.name == f"{COMMIT}-float32"
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8))
    assert [o.token_ids for o in outs] == [[int(t) for t in golden[f"generated_{i}"]] for i in (0, 1)]
    assert hf_hub.conversion_dtype("float16") == "float32"  # restored from float32, cast at load
    assert hf_hub.conversion_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match="dtype 'bogus' is not a floating-point dtype; accepted: 'float32'"):
        hf_hub.conversion_dtype("bogus")
    # The index may still not name a file outside the snapshot.
    from jinfer.convert.hf import safetensors_files
    from jinfer.errors import ConversionError

    bad = Path(offline_hub["HF_HOME"]) / "bad"
    bad.mkdir()
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../secret.safetensors"}})
    )
    with pytest.raises(ConversionError, match="not a path inside"):
        safetensors_files(bad)


def test_cli_missing_hub_id_is_a_usage_error(offline_hub, tmp_path):
    env = {**os.environ, **offline_hub, "PYTHONPATH": str(Path(__file__).parent.parent)}
    r = subprocess.run(
        [sys.executable, "-m", "jinfer.cli", "convert", "tiny-org/not-cached", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr  # like a missing model path (README: exit codes)
    assert "'tiny-org/not-cached'" in r.stderr and "HF_HUB_OFFLINE=1" in r.stderr


def test_a_snapshot_completed_after_its_conversion_converts_again(offline_hub, monkeypatch):
    """A partial download (no tokenizer.json yet) used offline converts token-ids-only; once the
    download completes, the next load converts again instead of keeping the tokenizer-less copy."""
    from jinfer.llm import LLM

    snapshot = Path(offline_hub["HF_HOME"]) / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    link = snapshot / "tokenizer.json"
    target = os.readlink(link)
    link.unlink()
    calls = _count_conversions(monkeypatch)
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        LLM(REPO, max_batch=1, buckets=(16,)).generate("the cat")
    link.symlink_to(target)  # the download completes
    llm = LLM(REPO, max_batch=1, buckets=(16,))
    assert len(calls) == 2 and llm.tokenizer is not None
    assert llm.encode_prompt("the cat sat") == [10, 11, 12]
    LLM(REPO, max_batch=1, buckets=(16,))
    assert len(calls) == 2  # complete now: loaded from the cache


def test_a_snapshot_with_missing_blobs_says_download_again(offline_hub):
    """A pruned cache (a snapshot link whose blob is gone) or an interrupted download (an
    `.incomplete` blob, no weights linked) names the repo and how to fetch it again (was a raw
    FileNotFoundError, or "no *.safetensors weight files")."""
    from jinfer.llm import LLM

    snapshot = Path(offline_hub["HF_HOME"]) / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    weights = snapshot / "model.safetensors"
    blob = weights.resolve()
    data = blob.read_bytes()
    blob.unlink()
    with pytest.raises(hf_hub.HubDownloadError, match=r"data is missing \(model\.safetensors\).*hf download"):
        LLM(REPO, max_batch=1, buckets=(16,))
    weights.unlink()
    blob.with_name(blob.name + ".incomplete").write_bytes(data[:100])
    with pytest.raises(hf_hub.HubDownloadError, match=r"an unfinished download.*--force-download"):
        LLM(REPO, max_batch=1, buckets=(16,))
