"""Golden fixtures for the mixture-of-experts families (Mixtral, Qwen3-MoE), like make_golden.py.

Writes ``tests/fixtures/hf/{mixtral,qwen3_moe,qwen3_moe_bias}/`` (config.json, model.safetensors as
transformers saves it: one tensor per expert, golden.npz with the keys of make_golden.py's decoders) and adds
their entries to ``tests/fixtures/hf/MANIFEST.json``. Run it from the repository root in a venv
with torch==2.13.0 and transformers (never the test install)::

    python scripts/make_golden_moe.py [NAME ...]

Every parameter is perturbed (make_golden.build), including the router and the q/k norms. The
Qwen3-MoE fixture has 3 layers with decoder_sparse_step=1 and mlp_only_layers=[1], so it holds
both expert and dense-MLP layers and norm_topk_prob=False (Qwen3-MoE's default) is exercised;
Mixtral always renormalises the top-k weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_golden as G


def mixtral_config() -> MixtralConfig:
    """Tiny Mixtral: 4 experts, top-2, GQA, untied."""
    return MixtralConfig(
        vocab_size=G.VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=G.DECODER_INIT_STD,
        **G.NO_SPECIAL_TOKENS,
    )


def qwen3_moe_config() -> Qwen3MoeConfig:
    """Tiny Qwen3-MoE: 8 experts, top-2, explicit head_dim, q/k norms, a dense layer in the middle."""
    return Qwen3MoeConfig(
        vocab_size=G.VOCAB,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        initializer_range=G.DECODER_INIT_STD,
        **G.NO_SPECIAL_TOKENS,
    )


def qwen3_moe_bias_config() -> Qwen3MoeConfig:
    """qwen3_moe with `attention_bias: true` (q/k/v/o biases), two layers."""
    config = qwen3_moe_config()
    config.attention_bias = True
    config.num_hidden_layers = 2
    config.mlp_only_layers = []
    return config


def main(only: list[str]) -> None:
    """Regenerate the MoE fixtures (or only those named) and their MANIFEST entries."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    manifest_file = G.OUT_DIR / "MANIFEST.json"
    manifest = json.loads(manifest_file.read_text())
    for name, model_cls, config, seed in (
        ("mixtral", MixtralForCausalLM, mixtral_config(), G.SEED + 60),
        ("qwen3_moe", Qwen3MoeForCausalLM, qwen3_moe_config(), G.SEED + 70),
        ("qwen3_moe_bias", Qwen3MoeForCausalLM, qwen3_moe_bias_config(), G.SEED + 75),
    ):
        if only and name not in only:
            continue
        model = G.build(model_cls, config, seed)
        golden = G.decoder_golden(model, seed)
        G.check_reload(model_cls, G.save_fixture(name, model, golden), golden)
        manifest["fixtures"][name] = G.describe(model, golden, generator="scripts/make_golden_moe.py")
        print(f"{name}: params={manifest['fixtures'][name]['num_parameters']}")
    manifest_file.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
