"""Defaults from the model: `LLM(dir)` with no other argument, for short-context models too."""

import subprocess
import sys

import numpy as np
import pytest

from jinfer import defaults, precision
from jinfer.cli import cli_max_batch
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
        [*cli, "--model", str(path), "--raw", "--max-tokens", "3", "--json", "--verbose", "Hello"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert '"completion_tokens": 3' in r.stdout
    # --verbose says what was chosen and why, one line per setting, on stderr.
    lines = dict(line.removeprefix("jinfer: ").split("=", 1) for line in r.stderr.splitlines() if "=" in line)
    assert lines["backend"] == "cpu"
    assert lines["max_batch"] == "1: jinfer generate's 1 prompt(s) need no more slots"
    assert lines["max_len"].startswith("256: the model's context within KV budget")
    # One slot: the output-major layout, with bfloat16 weights on a CPU with BF16 (they stay narrow).
    native = precision.cpu_has_bf16_matmul()
    assert lines["dtype"].startswith(
        "bfloat16 weights, float32 compute: CPU default" if native else "float32: CPU default"
    )
    assert lines["prefill_buckets"].startswith("16,32,64,128,256: CPU default")
    assert lines["layout"].startswith("out_major: auto: one-slot engine on CPU")
    assert "decode_buckets" in lines
    assert lines["mesh"] == "data=1,model=1: 1 device(s)"


SMOLLM2 = LlamaConfig()  # SmolLM2-135M: 8,192 positions, 30 layers, 3 kv heads of 64


@pytest.mark.parametrize(
    "config,max_batch,itemsize,expected",
    [
        (SMOLLM2, 8, 4, 2048),  # KV budget: 2 GiB / (8 slots * 46,080 B) = 5,825: the cap binds
        (SMOLLM2, 1, 4, 2048),  # the per-slot cap binds
        (SMOLLM2, 64, 4, 512),  # 64 slots: 728 -> 512
        (SMOLLM2, 64, 2, 1024),  # bf16 cache, 64 slots: 1,456 -> 1,024
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


GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize(
    "config,itemsize,budget,backend,slots,max_len",
    [
        # f32 on CPU: 2,048 positions are 90 MiB a slot, 22 fit (< 32): 1,024 positions, 45 fit -> 32.
        (SMOLLM2, 4, 2 * GiB, "cpu", 32, 1024),
        (SMOLLM2, 4, 1 * GiB, "cpu", 16, 1024),  # 22 fit at the 1,024 floor -> 16
        (SMOLLM2, 2, 50 * GiB, "gpu", 128, 4096),  # bf16 on a big accelerator: both caps bind
        (SMOLLM2, 2, 2 * GiB, "tpu", 32, 2048),  # 4,096 positions: 22 fit; 2,048: 45 -> 32
        (SMOLLM2, 4, 10 * MiB, "cpu", 1, 1024),  # not even one slot: one (the memory plan decides)
        (LlamaConfig(max_position_embeddings=512), 4, 2 * GiB, "cpu", 64, 512),  # short context: cap 64
    ],
)
def test_default_slots_and_length_from_the_kv_budget(config, itemsize, budget, backend, slots, max_len):
    batch, length = defaults.default_shape(config, itemsize, budget, backend)
    assert (batch.value, length.value) == (slots, max_len)
    per_slot = defaults.kv_bytes_per_token(config, itemsize) * max_len
    assert slots == 1 or slots * per_slot <= budget
    assert f"/ {per_slot / MiB:.1f} MiB per slot at max_len {max_len}" in batch.reason


def test_kv_budget_and_accelerator_defaults_by_backend():
    assert defaults.kv_budget("cpu", 100 * GiB)[0] == 2 * GiB
    assert defaults.kv_budget("cpu", None)[0] == 2 * GiB
    assert defaults.kv_budget("cpu", 4 * GiB) == (GiB, "a quarter of the host's 4.00 GiB available RAM")
    assert defaults.kv_budget("tpu", 16 * GiB, 4 * GiB)[0] == 6 * GiB  # half of what the params leave
    assert defaults.kv_budget("gpu", 16 * GiB, 4 * GiB)[0] == 6 * GiB
    for backend in ("tpu", "gpu", "cuda", "rocm"):
        assert defaults.default_dtype(backend, None)[0] == "bfloat16"
        assert defaults.default_dtype(backend, "float32") == ("float32", "given (dtype=)")
        assert defaults.default_prefill_buckets(8192, backend) == (128, 256, 512, 1024)
        assert defaults.default_prefill_buckets(300, backend) == (128, 256)
        assert defaults.default_prefill_buckets(100, backend) == (100,)
    assert defaults.default_dtype("cpu", None)[0] is None  # the checkpoint's dtype
    assert defaults.default_prefill_buckets(8192, "cpu") == (16, 32, 64, 128, 256, 512)
    # max_len given, max_batch not: slots for that length (SmolLM2 f32: 91 fit at 512, 22 at 2,048).
    assert defaults.default_max_batch(SMOLLM2, 512, 4, 2 * GiB)[0] == 64
    assert defaults.default_max_batch(SMOLLM2, 2048, 4, 2 * GiB)[0] == 16
    assert [cli_max_batch(n) for n in (1, 2, 3, 5, 8, 9, 100)] == [1, 2, 4, 8, 8, None, None]


def test_one_row_copy_is_in_the_memory_plan_and_dropped_when_it_does_not_fit(tmp_path, monkeypatch):
    import jax

    from jinfer import loading, memory
    from jinfer.sharding import single_device_mesh

    path = make_tiny_llm_dir(tmp_path / "m", max_position_embeddings=512)
    config = dict(dtype="float32", max_batch=8, max_len=128, buckets=(16, 32))
    with LLM(path, **config) as llm:
        assert llm.engine.one_row is not None
        model, gen, params = llm.model, llm.engine.config, llm.engine.params
        copy = loading.one_row_copy_bytes(model, params)
        assert f"(+{defaults._size(copy)};" in llm.engine_choices.layout.reason
    # only the transposed weights count (the embedding and norm scales are shared), and the plan's
    # estimate from the abstract params is the real copy's size
    assert 0 < copy < sum(x.nbytes for x in jax.tree.leaves(params))
    assert (
        loading.one_row_copy_bytes(model, loading.abstract_params(model, single_device_mesh(), None, None))
        == copy
    )
    need = memory.plan_llm_memory(model, gen, None).total * memory._MARGIN
    # room for the engine but not for the copy as well: the engine is built without the copy
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(need + copy / 2))
    with LLM(path, **config) as llm:
        assert llm.engine.one_row is None and llm.engine_choices.layout.value == "canonical"
    monkeypatch.setattr(memory, "host_available_bytes", lambda: int(need + copy * 2))
    with LLM(path, **config) as llm:
        assert llm.engine.one_row is not None


def test_llm_records_what_it_chose_and_why(tmp_path, monkeypatch):
    import jax

    from jinfer import memory, quant

    path = make_tiny_llm_dir(tmp_path / "m", max_position_embeddings=512)
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 64 * GiB)  # any host with >= 8 GiB free
    llm = LLM(path)  # tiny KV (512 B per token): the slot cap binds
    c = llm.engine_choices
    mixed = precision.cpu_has_bf16_matmul()  # bfloat16 weights under float32 compute by default
    assert (c.backend, c.dtype.value) == ("cpu", "bfloat16 weights, float32 compute" if mixed else "float32")
    assert c.dtype.reason.endswith("; KV cache float32") and c.dtype.reason.count("KV cache") == 1
    assert llm.engine.cache.k[0].dtype == np.float32
    if mixed:  # bfloat16 weights run output-major at every bucket: no second layout for one row
        assert c.layout.value == "out_major" and llm.engine.one_row is None
        assert c.layout.reason.startswith("auto: bfloat16 weights on CPU ([out, in] weights")
        assert not quant.has_narrow_weights(jax.tree.map(lambda x: x.astype("float32"), llm.engine.params))
        assert quant.has_narrow_weights(llm.engine.params)  # held narrow, not widened
    else:
        assert (
            c.layout.value == "canonical + out_major copy for decode bucket 1"
        )  # a tiny model: a copy is cheap
        assert "output-major copy of the weights (+" in c.layout.reason and llm.engine.one_row is not None
        assert c.layout.reason.startswith("auto: canonical on 64 slots")
    assert c.max_batch.value == llm.engine.config.max_batch == 64
    assert c.max_batch.reason.startswith("KV budget 2.00 GiB / 256.0 KiB per slot at max_len 512 = 8192")
    assert "capped at 64 (cpu maximum)" in c.max_batch.reason
    assert (c.max_len.value, c.max_len.reason) == (512, "the model's context (512)")
    assert c.prefill_buckets.value == llm.engine.config.prefill_buckets == (16, 32, 64, 128, 256, 512)
    assert llm.stats.summary()["engine"]["max_batch"] == {"value": 64, "reason": c.max_batch.reason}
    assert llm.stats.summary()["engine"]["prefill_buckets"]["value"] == [16, 32, 64, 128, 256, 512]
    # jinfer's CPU kernels: on for one CPU device wherever they build (AVX512_BF16 and a compiler)
    from jinfer import cpu_kernels

    kernels = cpu_kernels.unavailable_reason() is None and cpu_kernels.available()
    assert llm.engine.cpu_kernels == kernels and c.cpu_kernels.value == ("on" if kernels else "off")
    assert c.cpu_kernels.reason.startswith("one CPU device with AVX512_BF16" if kernels else "")
    assert llm.stats.summary()["engine"]["cpu_kernels"]["value"] == c.cpu_kernels.value
    llm.close()
    # Explicit arguments win and say so.
    llm = LLM(path, dtype="bfloat16", max_batch=2, max_len=64, buckets=(32, 16), layout="out_major")
    c = llm.engine_choices
    assert (c.dtype.value, c.max_batch.value, c.max_len.value, c.prefill_buckets.value) == (
        "bfloat16",
        2,
        64,
        (16, 32),
    )
    assert [
        c.dtype.reason,
        c.max_batch.reason,
        c.max_len.reason,
        c.prefill_buckets.reason,
        c.layout.reason,
    ] == [
        "given (dtype=); KV cache bfloat16",
        "given (max_batch=)",
        "given (max_len=)",
        "given (buckets=)",
        "given (layout='out_major')",
    ]
    llm.close()
    # Little host RAM: the budget shrinks to a quarter of it, and the default still fits the memory plan.
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 8 * MiB)
    llm = LLM(path)
    c = llm.engine_choices
    assert c.max_batch.value == 8  # 2 MiB / 256 KiB per slot at 512 positions
    assert "a quarter of the host's 8.0 MiB available RAM" in c.max_batch.reason
    assert len(llm.generate("Hello", GREEDY)[0].token_ids) == 5
    llm.close()
    with pytest.raises(memory.MemoryPlanError):  # explicit sizes that cannot fit are still refused
        LLM(path, max_batch=64, max_len=512)


def test_precision_restores_weight_matrices_and_the_rest_in_their_own_dtypes(tmp_path, monkeypatch):
    import jax

    from jinfer import loading
    from jinfer.modeling import FlaxModel
    from jinfer.precision import Precision

    path = make_tiny_llm_dir(tmp_path / "m", max_position_embeddings=512)
    mixed = Precision("float32", "bfloat16")
    assert (
        str(mixed) == "bfloat16 weights, float32 compute"
        and str(precision.as_precision("bfloat16")) == "bfloat16"
    )
    params = loading.load(path, dtype=mixed).params
    leaves = jax.tree.leaves(params)
    matrices = [x for x in leaves if x.ndim >= 2]
    assert {str(x.dtype) for x in matrices} == {"bfloat16"} and {
        str(x.dtype) for x in leaves if x.ndim < 2
    } == {"float32"}
    model = loading.load(path).model
    abstract = loading.abstract_params(model, loading.single_device_mesh(), None, mixed)
    assert [x.dtype for x in jax.tree.leaves(abstract)] == [x.dtype for x in leaves]  # what the plan sees
    assert defaults.params_bytes(model, mixed) == sum(x.nbytes for x in leaves)
    # The one-row copy holds every matrix widened to float32 on a CPU without bfloat16 matrix
    # instructions (the embedding too: it is not shared); on one with them the matrices stay narrow
    # and the embedding (already [vocab, d]) is shared.
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda native=native: native)
        copied = [x for x in matrices if not (native and x is params["embed"])]
        size = 2 if native else 4
        assert loading.one_row_copy_bytes(model, params) == sum(size * x.size for x in copied)
    # The CPU default: mixed only for a float causal LM on a CPU with bfloat16 matrix instructions.
    flax_model = FlaxModel.from_name("Llama", model.config)
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda native=native: native)
        assert defaults.default_dtype("cpu", None, flax_model)[0] == (mixed if native else None)
        assert defaults.default_dtype("cpu", None, flax_model, quantize="int8")[0] is None
        assert defaults.default_dtype("cpu", "float32", flax_model)[0] == "float32"  # given: one dtype
        assert defaults.default_dtype("gpu", None, flax_model)[0] == "bfloat16"
    assert defaults.default_dtype("cpu", "float32", flax_model, "bfloat16")[0] == mixed


def test_cpu_bf16_detection_reads_the_cpu_flags(tmp_path, monkeypatch):
    cases = {
        "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n": True,  # AMD Zen 4, Intel Cooper Lake
        "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n": True,  # Intel Sapphire Rapids
        "flags\t\t: fpu avx2 avx512f avx512bw\n": False,  # Skylake-SP: AVX-512 without BF16
        "Features\t: fp asimd sve bf16 i8mm\n": True,  # Arm Neoverse V1/V2
        "Features\t: fp asimd evtstrm aes\n": False,  # Arm Neoverse N1
    }
    try:
        for text, native in cases.items():
            (tmp_path / "cpuinfo").write_text(text * 2)
            monkeypatch.setattr(precision, "CPUINFO", tmp_path / "cpuinfo")
            precision.cpu_has_bf16_matmul.cache_clear()
            assert precision.cpu_has_bf16_matmul() is native, text
    finally:
        precision.cpu_has_bf16_matmul.cache_clear()
