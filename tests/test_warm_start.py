"""Warm start: the traced-program and executable caches (jinfer.compile.lower) next to the
compilation cache."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jinfer.errors import ConfigError
from jinfer.testing import make_tiny_llm_dir

SCRIPT = textwrap.dedent("""
    import json, sys
    from jax import export
    calls = {"export": 0, "deserialize": 0}
    def counting(name):
        original = getattr(export, name)
        def wrapper(*a, **k):
            calls[name] += 1
            return original(*a, **k)
        setattr(export, name, wrapper)
    counting("export")
    counting("deserialize")
    import threading
    from jinfer import compile as compile_lib
    from jinfer.compile import COMPILES
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams
    loads = []
    load = compile_lib._load_executable
    def counting_load(path):
        compiled = load(path)
        if compiled is not None:
            loads.append(str(path))
        return compiled
    compile_lib._load_executable = counting_load
    llm = LLM(sys.argv[1], max_batch=1, max_len=64, buckets=(16, 32))
    for thread in threading.enumerate():  # executables loaded ahead (jinfer.prefetch): let it finish
        if thread.name == "jinfer-prefetch":
            thread.join()
    llm.warmup()
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = llm.generate([[5, 9, 17, 3], [7, 1]], greedy)
    print("RESULT", json.dumps({"tokens": [o.outputs[0].token_ids for o in out], "exports": calls["export"],
                                "deserialized": calls["deserialize"], "hits": COMPILES.cache_hits,
                                "loads": len(loads), "distinct_loads": len(set(loads))}))
""")


def _run(model_dir: Path, cache: Path) -> dict:
    env = {**os.environ, "JINFER_COMPILATION_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(model_dir)], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])


def test_second_process_reuses_traced_programs_and_survives_corrupt_ones(tmp_path):
    model_dir = make_tiny_llm_dir(tmp_path / "model")
    cache = tmp_path / "cache"
    cold = _run(model_dir, cache)
    programs = sorted((cache / "jinfer-exports").glob("*.jaxexport"))
    executables = sorted((cache / "jinfer-executables").glob("*.jaxexe"))
    # prefill of a first and of a later chunk (a prompt may be longer than one block) x2 buckets,
    # first token, slot copy, decode, prefix-cache block save and load: each traced once
    n = 9
    assert cold["exports"] == len(programs) == len(executables) == n
    warm = _run(model_dir, cache)
    # nothing traced, no traced program even read: every executable was loaded as compiled
    assert warm["exports"] == warm["deserialized"] == 0
    assert warm["hits"] >= n
    assert warm["tokens"] == cold["tokens"]
    # first token, prefill x2 and decode were loaded during the restore and handed to the engine,
    # which loaded only the others: each executable read once
    assert cold["loads"] == 0 and warm["loads"] == warm["distinct_loads"] == n
    for path in executables:  # a corrupt executable: compiled again from the traced program
        path.write_bytes(path.read_bytes()[:100])
    again = _run(model_dir, cache)
    assert again["tokens"] == cold["tokens"] and again["exports"] == 0 and again["deserialized"] == n
    for path in programs:  # a corrupt (e.g. truncated) program is traced again, never trusted
        path.write_bytes(path.read_bytes()[:100])
    again = _run(model_dir, cache)
    assert again["tokens"] == cold["tokens"] and again["exports"] == n


def test_llm_returns_after_its_prefetch_stopped_and_loads_nothing_behind_requests(tmp_path, monkeypatch):
    # A prefetch that outlived the constructor loaded executables during the caller's first
    # generate(): CI counted one "compile" inside a zero-compile block. Loads here take 0.3 s each.
    import threading
    import time

    from jinfer import compile as compile_lib
    from jinfer import prefetch
    from jinfer.compile import count_compiles, enable_compilation_cache
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    model_dir = make_tiny_llm_dir(tmp_path / "model")
    enable_compilation_cache(tmp_path / "cache")  # conftest turns it off again after the test
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[5, 9, 17, 3], [7, 1]]
    with LLM(model_dir, max_batch=2, max_len=64, buckets=(16, 32)) as cold:
        cold.warmup()  # every program on disk
        expected = [o.outputs[0].token_ids for o in cold.generate(prompts, greedy)]
    assert sorted((tmp_path / "cache" / "jinfer-executables").glob("*.jaxexe"))

    load = compile_lib._load_executable
    prefetched = []

    def slow_load(path):
        if threading.current_thread().name == "jinfer-prefetch":
            time.sleep(0.3)
            prefetched.append(path)
        return load(path)

    monkeypatch.setattr(compile_lib, "_load_executable", slow_load)
    with LLM(model_dir, max_batch=2, max_len=64, buckets=(16, 32)) as warm:
        # it loaded what every first request needs (first token, largest prefill chunk, decode
        # bucket 1 on the one-row copy's key) before stopping; what is left loads on use
        assert len(prefetched) >= prefetch.FIRST_REQUEST_PROGRAMS  # (none loaded a bucket-1 key)
        assert not [t for t in threading.enumerate() if t.name == "jinfer-prefetch" and t.is_alive()]
        warm.warmup()
        with count_compiles() as c:
            tokens = [o.outputs[0].token_ids for o in warm.generate(prompts, greedy)]
        assert c.count == 0
        assert tokens == expected


def test_cache_stores_keep_under_their_size_limit_least_recently_used_first(tmp_path):
    import time

    from jinfer import compile as compile_lib
    from jinfer.llm import LLM
    from jinfer.sampling import SamplingParams

    store = tmp_path / "store"
    store.mkdir()
    now = time.time()
    for i, name in enumerate(("a", "b", "c")):  # a oldest, c newest; 100 bytes each
        (store / name).write_bytes(bytes(100))
        os.utime(store / name, (now - 100 + i, now - 100 + i))
    (store / "d.tmp123").write_bytes(bytes(100))  # being written by another process: kept
    assert compile_lib.trim_store(store, 250) == 100
    assert sorted(p.name for p in store.iterdir()) == ["b", "c", "d.tmp123"]
    compile_lib._touch(store / "b")  # a load makes it the most recent
    assert compile_lib.trim_store(store, 150) == 100
    assert sorted(p.name for p in store.iterdir()) == ["b", "d.tmp123"]
    assert compile_lib.trim_store(store, -1) == 0  # unbounded

    # End to end: the same engine's programs in an unbounded cache, then in one half that size.
    model_dir = make_tiny_llm_dir(tmp_path / "model")
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    sizes, tokens = {}, {}
    for name, limit in (("full", -1), ("half", None)):
        cache = tmp_path / name
        if limit is None:
            limit = sizes["full"] // 2
        compile_lib.enable_compilation_cache(cache, max_bytes=limit)  # conftest restores the setting
        with LLM(model_dir, max_batch=2, max_len=64, buckets=(16, 32)) as llm:
            llm.warmup()
            tokens[name] = llm.generate([[5, 9, 17, 3]], greedy)[0].outputs[0].token_ids
        sizes[name] = sum(p.stat().st_size for p in (cache / compile_lib.EXECUTABLES_SUBDIR).iterdir())
    assert sizes["full"] > 0 and 0 < sizes["half"] <= sizes["full"] // 2
    assert tokens["half"] == tokens["full"]
    # XLA's own entries (top-level files) are trimmed, oldest first, when a cache is turned on
    xla = [p for p in (tmp_path / "full").iterdir() if p.is_file()]
    xla_bytes = sum(p.stat().st_size for p in xla)
    assert xla and compile_lib.trim_store(tmp_path / "full", 0) == xla_bytes
    compile_lib.enable_compilation_cache(tmp_path / "half", max_bytes=0)
    assert not [p for p in (tmp_path / "half").iterdir() if p.is_file()]
    assert (tmp_path / "half" / compile_lib.EXECUTABLES_SUBDIR).is_dir()  # stores are folders: kept
    os.environ[compile_lib.MAX_BYTES_ENV_VAR] = "4GB"
    try:
        with pytest.raises(ConfigError, match="JINFER_COMPILATION_CACHE_MAX_BYTES='4GB'"):
            compile_lib.enable_compilation_cache(tmp_path / "bad")
    finally:
        del os.environ[compile_lib.MAX_BYTES_ENV_VAR]
