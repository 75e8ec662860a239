"""Defaults from the model: `LLM(dir)` with no other argument, for short-context models too."""

import subprocess
import sys

import pytest

from jinfer import defaults
from jinfer.llm import LLM
from jinfer.models.llama import LlamaConfig
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

GREEDY = SamplingParams(temperature=0.0, max_tokens=5)


@pytest.mark.parametrize("positions", [256, 512])
def test_llm_with_no_arguments_uses_the_model_context(tmp_path, positions):
    path = make_tiny_llm_dir(tmp_path / f"m{positions}", max_position_embeddings=positions)
    llm = LLM(path)
    cfg = llm.engine.config
    assert cfg.max_len == positions
    assert cfg.prefill_buckets == tuple(b for b in (16, 32, 64, 128, 256, 512) if b <= positions)
    out = llm.generate("Hello there, how are you?", GREEDY)[0]
    assert len(out.token_ids) == 5
    if positions == 256:  # same tokens as explicit small settings: the defaults change shapes only
        explicit = LLM(path, max_len=64, buckets=(32,), max_batch=1)
        assert explicit.generate("Hello there, how are you?", GREEDY)[0].token_ids == out.token_ids
    # A prompt near the context length fits a default bucket.
    ids = [3 + i % 300 for i in range(positions - 8)]
    assert len(llm.generate([ids], GREEDY.replace(max_tokens=2))[0].token_ids) == 2


def test_cli_generate_with_default_max_len_on_a_256_position_model(tmp_path):
    path = make_tiny_llm_dir(tmp_path / "m", max_position_embeddings=256)
    cli = [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "off", "generate"]
    r = subprocess.run(
        [*cli, "--model", str(path), "--raw", "--max-tokens", "3", "--json", "Hello"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert '"completion_tokens": 3' in r.stdout


SMOLLM2 = LlamaConfig()  # SmolLM2-135M: 8,192 positions, 30 layers, 3 kv heads of 64


@pytest.mark.parametrize(
    "config,max_batch,itemsize,expected",
    [
        (SMOLLM2, 8, 4, 1024),  # KV budget: 512 MiB / (8 slots * 46,080 B) = 1,456 -> 1,024
        (SMOLLM2, 1, 4, 2048),  # the per-slot cap binds
        (SMOLLM2, 32, 2, 512),  # bf16 cache, 32 slots: 728 -> 512
        (LlamaConfig(max_position_embeddings=300), 8, 4, 300),  # context below every cap
        (LlamaConfig(num_layers=400, num_heads=32, num_kv_heads=32, head_dim=128), 64, 4, 256),  # floor
        (LlamaConfig(num_layers=400, num_heads=32, num_kv_heads=32, max_position_embeddings=100), 64, 4, 100),
    ],
)
def test_default_max_len_budget(config, max_batch, itemsize, expected):
    n = defaults.default_max_len(config, max_batch, itemsize)
    assert n == expected
    assert n <= config.max_position_embeddings
    buckets = defaults.default_prefill_buckets(n)
    assert buckets and max(buckets) <= n


def test_default_buckets_for_tiny_contexts():
    assert defaults.default_prefill_buckets(8) == (8,)
    assert defaults.default_prefill_buckets(100) == (16, 32, 64)
    assert defaults.default_prefill_buckets(4096) == (16, 32, 64, 128, 256, 512)
