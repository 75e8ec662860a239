"""Build tiny random-weight Hugging Face models and their reference ("golden") outputs.

jinfer's default test suite has no torch; it proves parity against the small fixtures this script
writes under ``tests/fixtures/hf/<name>/``:

- ``config.json`` + ``model.safetensors`` (HF ``save_pretrained(..., safe_serialization=True)``),
- ``golden.npz``: float32 logits / hidden states and int32 token ids computed by transformers.

Run it from the repository root in the separate torch venv (never the jinfer venv)::

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0
    /work/venv-torch/bin/pip install transformers gguf accelerate safetensors numpy sentencepiece tokenizers
    /work/venv-torch/bin/python scripts/make_golden.py

No hub access: every model is ``XConfig(...)`` then ``XModel(config)`` under a fixed torch seed. HF
initialises biases to 0 and norm weights to 1, so every parameter is then perturbed with noise; a
converter that drops a bias or a norm weight therefore changes the logits.

Fixtures (decoders get two unpadded prompts of 7 and 12 tokens):

- ``llama_gqa``      Llama, 4 heads / 2 kv heads, rope_theta 1e4, untied lm_head, config in the
                     transformers-5 layout (``rope_parameters``).
- ``llama_sharded``  the same weights as ``llama_gqa``, split into several safetensors shards with
                     ``model.safetensors.index.json`` (its golden.npz is identical to ``llama_gqa``'s).
- ``llama_bf16``     the ``llama_gqa`` weights rounded to bfloat16 and stored as bf16; its golden is
                     computed in float32 from the bf16-rounded weights.
- ``llama3_tied``    Llama with tied embeddings and llama3 rope scaling; config.json is rewritten to
                     the legacy hub layout (top-level ``rope_theta`` + ``rope_scaling``) that most
                     published checkpoints use, and reloaded by transformers to check it is equivalent.
- ``qwen2``          Qwen2 (q/k/v biases), GQA, untied.
- ``gpt2``           GPT-2 (tied, learned positions, gelu_new).
- ``bert``           BertModel with pooler (gelu, absolute positions, token types).
- ``qwen3``          Qwen3 (per-head q/k RMSNorm, explicit head_dim 16 != hidden/heads, tied).
- ``gemma``          Gemma (1): (1 + w) norms, GeGLU, sqrt(d) embedding scale, head_dim 16 != hidden/heads.
- ``gemma2``         Gemma 2: local (window 4) / global layers, query_pre_attn_scalar 24, attention
                     and final logit soft-capping at small caps (1.5 / 3.0) so that they bind.
- ``gemma3``         Gemma 3 text, 6 layers (5 local : 1 global), q/k norms, local RoPE base 100,
                     global base 1e4 with linear scaling x4, window 4.
- ``phi3``           Phi-3 (fused qkv / gate_up), LongRoPE (original context 16 of 64), partial
                     rotary 0.75 (Phi-4-mini), sliding window 8; a third prompt of 20 tokens starts
                     past the original context (long factors throughout), prompt 1 crosses it while
                     generating. There `generate` re-encodes the whole sequence with the long
                     factors, while a cached forward keeps the short-rotated keys (jinfer's
                     semantics): ``stepwise_generated_{i}`` int32[8] holds the greedy tokens of
                     transformers' own cached forward, one token per call.
- ``llama_bias``     Llama with ``attention_bias: true`` (q/k/v/o biases).
- ``gpt2_scaled``    GPT-2 with ``scale_attn_weights: false``, ``scale_attn_by_inverse_layer_idx:
                     true`` and an untied lm_head.
- ``gemma2_untied``  ``gemma2`` with ``tie_word_embeddings: false``.

New-family decoders also store ``score_logprobs_{i}`` float32[8]: log-softmax of one full forward of
prompt + generated tokens at the generated tokens (what ``LLM.score`` returns). Prompts are longer
than the sliding windows. ``python scripts/make_golden.py qwen3 gemma2`` regenerates only the named
fixtures (their MANIFEST entries are replaced, the others kept).

golden.npz keys, decoders: ``input_ids_{i}`` int32[t], ``logits_{i}`` float32[t, vocab] (one full
forward of the unpadded prompt), ``generated_{i}`` int32[8] (greedy new tokens, eos disabled) and
``gen_margin_{i}`` float32[8] (top-1 minus top-2 logit at each greedy step, to size tolerances).
BERT: ``input_ids``/``attention_mask``/``token_type_ids`` int32[2, 9] (row 1 right-padded),
``last_hidden_state`` float32[2, 9, d], ``pooler_output``, ``cls_embedding``, ``mean_pooled_normalized``
float32[2, d], ``last_hidden_state_row1_unpadded`` float32[5, d] (row 1 run alone, no padding) and
``segment_token_type_ids``/``segment_last_hidden_state`` (same ids with a second segment of type 1).
A summary of every fixture (configs, versions, shapes) is written to ``tests/fixtures/hf/MANIFEST.json``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

OUT_DIR = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hf"
SEED = 20240611
VOCAB = 256
NEW_TOKENS = 8
PROMPT_LENGTHS = (7, 12)
# Initializer std for the decoders: larger than HF's 0.02 so that logits are spread out and greedy
# choices have margins well above float32 (and bf16) noise.
DECODER_INIT_STD = 0.1
# Noise added to every parameter after init (norm weights become ~1 +- 0.1, biases ~0 +- 0.1).
PERTURB_STD = 0.1
# No special tokens: eos is disabled so greedy generation always yields NEW_TOKENS tokens.
NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def llama_gqa_config(**overrides) -> LlamaConfig:
    """Tiny Llama with grouped-query attention (4 query heads share 2 kv heads)."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=DECODER_INIT_STD,
        **NO_SPECIAL_TOKENS,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def llama3_tied_config() -> LlamaConfig:
    """Tiny Llama with tied embeddings and llama3 rope scaling (all three frequency bands are hit:
    with head_dim 16 and original context 32, wavelengths 6.3 / 19.9 / >= 62.8 fall below, inside
    and above the [8, 32] smoothing band)."""
    return llama_gqa_config(tie_word_embeddings=True, rope_scaling=dict(LLAMA3_ROPE))


def qwen2_config() -> Qwen2Config:
    """Tiny Qwen2 (q/k/v projections carry biases), GQA, untied lm_head."""
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        use_sliding_window=False,
        initializer_range=DECODER_INIT_STD,
        **NO_SPECIAL_TOKENS,
    )


def gpt2_config() -> GPT2Config:
    """Tiny GPT-2 (learned absolute positions, tied lm_head, gelu_new)."""
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        initializer_range=DECODER_INIT_STD,
        **NO_SPECIAL_TOKENS,
    )


def bert_config() -> BertConfig:
    """Tiny BERT encoder (pad id 0)."""
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        type_vocab_size=2,
        pad_token_id=0,
    )


# Small decoders of the newer families: hidden 32 (64 for Phi-3's LongRoPE factors), 4 heads / 2 kv heads.
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=DECODER_INIT_STD,
    **NO_SPECIAL_TOKENS,
)


def qwen3_config() -> Qwen3Config:
    """Tiny Qwen3: q/k norms, head_dim 16 (not hidden/heads = 8), tied embeddings."""
    return Qwen3Config(
        **SMALL, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True
    )


def gemma_config() -> GemmaConfig:
    """Tiny Gemma (1): head_dim 16 (not hidden/heads = 8), no post-norms, all layers global."""
    return GemmaConfig(**SMALL, head_dim=16, rope_theta=10000.0)


def gemma2_config() -> Gemma2Config:
    """Tiny Gemma 2: layer 0 local (window 4), layer 1 global; caps small enough to bind."""
    return Gemma2Config(
        **SMALL,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=4,
        attn_logit_softcapping=1.5,
        final_logit_softcapping=3.0,
        rope_theta=10000.0,
    )


def gemma3_config() -> Gemma3TextConfig:
    """Tiny Gemma 3 text: 6 layers = 5 local + 1 global, distinct local/global RoPE, linear x4 global."""
    fields = {**SMALL, "num_hidden_layers": 6}
    return Gemma3TextConfig(
        **fields,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        rope_theta=10000.0,
        rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )


def phi3_config() -> Phi3Config:
    """Tiny Phi-3 with LongRoPE (original context 16 of 64), partial rotary 0.75, window 8, GQA."""
    rotary_half = 6  # head_dim 16 * 0.75 / 2
    rng = np.random.RandomState(SEED + 77)
    return Phi3Config(
        **{**SMALL, "hidden_size": 64, "max_position_embeddings": 64},
        original_max_position_embeddings=16,
        partial_rotary_factor=0.75,
        sliding_window=8,
        rope_theta=10000.0,
        rope_scaling={
            "type": "longrope",
            "long_factor": [float(x) for x in np.round(1.0 + 3.0 * rng.rand(rotary_half), 3)],
            "short_factor": [float(x) for x in np.round(1.0 + 0.2 * rng.rand(rotary_half), 3)],
        },
    )


def llama_bias_config() -> LlamaConfig:
    """Tiny Llama with `attention_bias: true`: q, k, v and o projections all carry biases."""
    return llama_gqa_config(attention_bias=True)


def gpt2_scaled_config() -> GPT2Config:
    """Tiny GPT-2 with the optional attention scalings (`scale_attn_weights: false`,
    `scale_attn_by_inverse_layer_idx: true`, as the stanford-crfm GPT-2s) and an untied lm_head."""
    config = gpt2_config()
    config.scale_attn_weights = False
    config.scale_attn_by_inverse_layer_idx = True
    config.tie_word_embeddings = False
    return config


def gemma2_untied_config() -> Gemma2Config:
    """gemma2 with a separate lm_head (`tie_word_embeddings: false`)."""
    config = gemma2_config()
    config.tie_word_embeddings = False
    return config


def build(model_cls, config, seed: int) -> torch.nn.Module:
    """Construct `model_cls(config)` with a fixed seed, perturb every parameter, and set eval mode."""
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # named_parameters() yields a tied tensor once, so tied weights stay tied.
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator) * PERTURB_STD
            param.add_(noise.to(param.dtype))
    return model


def prompts(seed: int, lengths: tuple[int, ...] = PROMPT_LENGTHS) -> list[np.ndarray]:
    """Fixed prompts of `lengths` tokens, avoiding ids 0-2 (often special)."""
    rng = np.random.RandomState(seed)
    return [rng.randint(3, VOCAB, size=n).astype(np.int32) for n in lengths]


@torch.no_grad()
def forward_logits(model, ids: np.ndarray) -> np.ndarray:
    """float32[t, vocab] logits of one unpadded sequence."""
    return model(torch.from_numpy(ids)[None].long()).logits[0].float().numpy()


@torch.no_grad()
def greedy(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HF greedy generation of NEW_TOKENS tokens; returns (new ids, top1-top2 margin per step)."""
    input_ids = torch.from_numpy(ids)[None].long()
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    new = out.sequences[0, len(ids) :].numpy().astype(np.int32)
    assert new.shape == (NEW_TOKENS,), new.shape
    top2 = torch.stack([s[0].float().topk(2).values for s in out.scores])
    return new, (top2[:, 0] - top2[:, 1]).numpy().astype(np.float32)


def check_greedy_consistent(model, ids: np.ndarray, new: np.ndarray) -> None:
    """A full forward over prompt + generated tokens must argmax to the generated tokens."""
    logits = forward_logits(model, np.concatenate([ids, new]))
    predicted = logits[len(ids) - 1 : -1].argmax(-1)
    assert np.array_equal(predicted, new), (predicted, new)


@torch.no_grad()
def stepwise_greedy(model, ids: np.ndarray) -> np.ndarray:
    """Greedy NEW_TOKENS tokens from the model's cached forward, one token per call (no `generate`)."""
    out = model(torch.from_numpy(ids)[None].long(), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for step in range(NEW_TOKENS - 1):
        position = torch.tensor([[len(ids) + step]])
        out = model(
            torch.tensor([[tokens[-1]]]), cache=out.past_key_values, position_ids=position, use_cache=True
        )
        tokens.append(int(out.logits[0, -1].argmax()))
    return np.asarray(tokens, np.int32)


def decoder_golden(
    model, seed: int, lengths: tuple[int, ...] = PROMPT_LENGTHS, score: bool = False, stepwise: bool = False
) -> dict[str, np.ndarray]:
    """Golden arrays for a causal LM: per-prompt logits, greedy tokens and their margins; with
    `score`, the log-probabilities of the greedy tokens from one full forward of prompt + tokens;
    with `stepwise`, the greedy tokens of the cached forward (`stepwise_greedy`). A prompt that
    crosses a LongRoPE original context while generating (`stepwise`, and the two token lists
    differ) has no full-forward check: its early tokens were chosen with the short factors."""
    golden = {}
    for i, ids in enumerate(prompts(seed, lengths)):
        new, margin = greedy(model, ids)
        if stepwise:
            golden[f"stepwise_generated_{i}"] = stepwise_greedy(model, ids)
        if not stepwise or np.array_equal(golden[f"stepwise_generated_{i}"], new):
            check_greedy_consistent(model, ids, new)
        golden[f"input_ids_{i}"] = ids
        golden[f"logits_{i}"] = forward_logits(model, ids)
        golden[f"generated_{i}"] = new
        golden[f"gen_margin_{i}"] = margin
        if score:
            full = torch.from_numpy(forward_logits(model, np.concatenate([ids, new])))
            logp = torch.log_softmax(full.double(), dim=-1)[len(ids) - 1 : -1]
            golden[f"score_logprobs_{i}"] = logp.gather(1, torch.from_numpy(new).long()[:, None])[
                :, 0
            ].numpy()
    return golden


def bert_inputs(seed: int) -> dict[str, np.ndarray]:
    """Two sequences [CLS=1] ... [SEP=2]; row 1 has 5 real tokens and is right-padded with 0."""
    rng = np.random.RandomState(seed)
    ids = np.zeros((2, 9), np.int32)
    mask = np.zeros((2, 9), np.int32)
    for row, length in enumerate((9, 5)):
        ids[row, :length] = np.concatenate([[1], rng.randint(3, VOCAB, size=length - 2), [2]])
        mask[row, :length] = 1
    segments = np.zeros_like(ids)
    segments[0, 5:] = 1
    segments[1, 3:5] = 1
    return {"input_ids": ids, "attention_mask": mask, "segment_token_type_ids": segments}


@torch.no_grad()
def bert_golden(model, seed: int) -> dict[str, np.ndarray]:
    """Golden arrays for BertModel: hidden states, pooler output, CLS and mean-pooled embeddings."""
    inputs = bert_inputs(seed)
    ids, mask = (torch.from_numpy(inputs[k]).long() for k in ("input_ids", "attention_mask"))
    token_types = torch.zeros_like(ids)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    hidden = out.last_hidden_state
    weights = mask[..., None].float()
    mean = (hidden * weights).sum(1) / weights.sum(1)
    seg = model(
        input_ids=ids,
        attention_mask=mask,
        token_type_ids=torch.from_numpy(inputs["segment_token_type_ids"]).long(),
    )
    alone = model(input_ids=ids[1:, :5], attention_mask=mask[1:, :5], token_type_ids=token_types[1:, :5])
    golden = {
        **inputs,
        "token_type_ids": token_types.numpy().astype(np.int32),
        "last_hidden_state": hidden.numpy(),
        "pooler_output": out.pooler_output.numpy(),
        "cls_embedding": hidden[:, 0].numpy(),
        "mean_pooled_normalized": torch.nn.functional.normalize(mean, dim=-1).numpy(),
        "last_hidden_state_row1_unpadded": alone.last_hidden_state[0].numpy(),
        "segment_last_hidden_state": seg.last_hidden_state.numpy(),
    }
    padded_row = golden["last_hidden_state"][1, :5]
    assert np.allclose(padded_row, golden["last_hidden_state_row1_unpadded"], atol=1e-5)
    return golden


def save_fixture(name: str, model, golden: dict[str, np.ndarray] | None, **save_kwargs) -> Path:
    """Write `model` (safetensors) and `golden` under OUT_DIR/name, replacing what was there."""
    path = OUT_DIR / name
    shutil.rmtree(path, ignore_errors=True)
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    if golden is not None:
        arrays = {k: v.astype(np.int32 if v.dtype.kind in "iu" else np.float32) for k, v in golden.items()}
        np.savez(path / "golden.npz", **arrays)
    return path


def check_reload(model_cls, path: Path, golden: dict[str, np.ndarray]) -> None:
    """Reloading the saved directory with transformers (f32) must reproduce the golden logits."""
    reloaded = model_cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    for i in range(sum(k.startswith("input_ids_") for k in golden)):
        logits = forward_logits(reloaded, golden[f"input_ids_{i}"])
        np.testing.assert_allclose(logits, golden[f"logits_{i}"], rtol=0, atol=1e-6, err_msg=str(path))


def to_legacy_rope_config(path: Path) -> None:
    """Rewrite config.json from transformers-5 `rope_parameters` to hub-style `rope_theta`/`rope_scaling`."""
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_llamas(manifest: dict) -> None:
    """llama_gqa, llama_sharded, llama_bf16 and llama3_tied."""
    model = build(LlamaForCausalLM, llama_gqa_config(), SEED)
    golden = decoder_golden(model, SEED)
    check_reload(LlamaForCausalLM, save_fixture("llama_gqa", model, golden), golden)
    manifest["llama_gqa"] = describe(model, golden)

    sharded = save_fixture("llama_sharded", model, golden, max_shard_size="200KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").exists(), shards
    check_reload(LlamaForCausalLM, sharded, golden)
    manifest["llama_sharded"] = describe(model, golden, shards=shards, same_weights_as="llama_gqa")

    bf16_path = save_fixture("llama_bf16", copy.deepcopy(model).to(torch.bfloat16), None)
    rounded = LlamaForCausalLM.from_pretrained(bf16_path, dtype=torch.float32, attn_implementation="eager")
    bf16_golden = decoder_golden(rounded.eval(), SEED)
    save_fixture("llama_bf16", copy.deepcopy(model).to(torch.bfloat16), bf16_golden)
    manifest["llama_bf16"] = describe(rounded, bf16_golden, stored_dtype="bfloat16", golden_dtype="float32")

    tied = build(LlamaForCausalLM, llama3_tied_config(), SEED + 10)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    tied_golden = decoder_golden(tied, SEED + 10)
    tied_path = save_fixture("llama3_tied", tied, tied_golden)
    to_legacy_rope_config(tied_path)
    check_reload(LlamaForCausalLM, tied_path, tied_golden)
    manifest["llama3_tied"] = describe(tied, tied_golden, config_layout="legacy rope_theta + rope_scaling")


def make_others(manifest: dict) -> None:
    """qwen2, gpt2 and bert."""
    for name, model_cls, config, seed in (
        ("qwen2", Qwen2ForCausalLM, qwen2_config(), SEED + 20),
        ("gpt2", GPT2LMHeadModel, gpt2_config(), SEED + 30),
    ):
        model = build(model_cls, config, seed)
        golden = decoder_golden(model, seed)
        check_reload(model_cls, save_fixture(name, model, golden), golden)
        manifest[name] = describe(model, golden)

    bert = build(BertModel, bert_config(), SEED + 40)
    golden = bert_golden(bert, SEED + 40)
    save_fixture("bert", bert, golden)
    reloaded = BertModel.from_pretrained(OUT_DIR / "bert", attn_implementation="eager").eval()
    assert np.allclose(bert_golden(reloaded, SEED + 40)["last_hidden_state"], golden["last_hidden_state"])
    manifest["bert"] = describe(bert, golden)


def make_new_families(manifest: dict, names: set[str]) -> None:
    """qwen3, gemma, gemma2, gemma3, phi3 and the config variants (those in `names`)."""
    families = (
        ("qwen3", Qwen3ForCausalLM, qwen3_config, SEED + 50, PROMPT_LENGTHS),
        ("gemma", GemmaForCausalLM, gemma_config, SEED + 90, PROMPT_LENGTHS),
        ("gemma2", Gemma2ForCausalLM, gemma2_config, SEED + 60, PROMPT_LENGTHS),
        ("gemma3", Gemma3ForCausalLM, gemma3_config, SEED + 70, PROMPT_LENGTHS),
        ("phi3", Phi3ForCausalLM, phi3_config, SEED + 80, (7, 12, 20)),
        ("llama_bias", LlamaForCausalLM, llama_bias_config, SEED + 100, PROMPT_LENGTHS),
        ("gpt2_scaled", GPT2LMHeadModel, gpt2_scaled_config, SEED + 110, PROMPT_LENGTHS),
        ("gemma2_untied", Gemma2ForCausalLM, gemma2_untied_config, SEED + 120, PROMPT_LENGTHS),
    )
    for name, model_cls, make_config, seed, lengths in families:
        if name not in names:
            continue
        model = build(model_cls, make_config(), seed)
        golden = decoder_golden(model, seed, lengths, score=True, stepwise=name == "phi3")
        check_reload(model_cls, save_fixture(name, model, golden), golden)
        manifest[name] = describe(model, golden)


def describe(model, golden: dict[str, np.ndarray], **extra) -> dict:
    """Manifest entry: HF config, parameter count, golden shapes and the smallest greedy margin."""
    margins = [float(v.min()) for k, v in golden.items() if k.startswith("gen_margin_")]
    entry = {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "golden": {k: [str(v.dtype), list(v.shape)] for k, v in sorted(golden.items())},
        "config": json.loads(model.config.to_json_string(use_diff=False)),
        **extra,
    }
    if margins:
        entry["min_greedy_margin"] = min(margins)
    return entry


NEW_FAMILIES = ("qwen3", "gemma", "gemma2", "gemma3", "phi3", "llama_bias", "gpt2_scaled", "gemma2_untied")


def main(only: list[str]) -> None:
    """Regenerate every fixture under tests/fixtures/hf (or only those named) and MANIFEST.json."""
    torch.set_num_threads(1)  # the machine is shared; tiny models gain nothing from more
    torch.use_deterministic_algorithms(True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    if only:
        unknown = sorted(set(only) - set(NEW_FAMILIES))
        assert not unknown, f"only {NEW_FAMILIES} can be regenerated alone; got {unknown}"
        manifest = json.loads((OUT_DIR / "MANIFEST.json").read_text())
        make_new_families(manifest["fixtures"], set(only))
        manifest["new_families_generated_with"] = {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        (OUT_DIR / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return
    manifest: dict = {
        "generator": "scripts/make_golden.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "seed": SEED,
        "new_tokens": NEW_TOKENS,
        "attn_implementation": "eager",
        "fixtures": {},
    }
    make_llamas(manifest["fixtures"])
    make_others(manifest["fixtures"])
    make_new_families(manifest["fixtures"], set(NEW_FAMILIES))
    (OUT_DIR / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in OUT_DIR.rglob("*") if p.is_file())
    for name, entry in manifest["fixtures"].items():
        print(f"{name:14s} params={entry['num_parameters']:7d} margin={entry.get('min_greedy_margin')}")
    print(f"wrote {OUT_DIR} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
