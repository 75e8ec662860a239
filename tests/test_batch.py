"""jinfer.batch in one process: row formats, bad lines, resume, manifest, memory of the pre-pass."""

import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest

from jinfer.batch import DuplicateIdError, ManifestMismatchError, run_batch
from jinfer.batch.files import scan_input, scan_output
from jinfer.llm import LLM
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

ENGINE = dict(max_len=128, buckets=(16, 32, 64), max_batch=4)
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_llm_dir(tmp_path_factory.mktemp("model") / "tiny")
    return LLM(path, **ENGINE)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_rows(path):
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def by_id(path):
    rows = read_rows(path)
    ids = [r["custom_id"] if r["custom_id"] is not None else ("line", r["error"]["line"]) for r in rows]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    return dict(zip(ids, rows, strict=True))


def line_set(path):
    return sorted(path.read_bytes().splitlines(keepends=True))


def basic_lines(n=6):
    return [{"custom_id": f"r{i}", "prompt": "The quick brown fox " * (1 + i % 4)} for i in range(n)]


def test_rows_bad_lines_and_resume_skips_everything(llm, tmp_path):
    rows = [
        *basic_lines(3),
        {"custom_id": "meta", "prompt": "Paris is", "max_tokens": 3, "tag": "x", "metadata": {"k": 1}},
        {"custom_id": "chat", "messages": [{"role": "user", "content": "Hi"}], "n": 2, "temperature": 1.0},
        {
            "custom_id": "oa",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "m", "prompt": "JAX compiles", "max_tokens": 2, "user": "u"},
        },
        "{not json",
        {"custom_id": "empty", "prompt": ""},
        {"custom_id": "long", "prompt": "word " * 100},
        {"custom_id": "badtemp", "prompt": "hi", "temperature": -1},
        {"custom_id": "badtype", "prompt": "hi", "top_p": "high"},
        {"prompt": "no id"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = run_batch(llm, inp, out, GREEDY, logprobs=None, return_token_ids=True, progress=False)
    got = by_id(out)
    assert summary.ok == 6 and summary.failed == 6 and summary.lines == 12 and summary.complete
    assert got["meta"]["metadata"] == {"k": 1, "tag": "x"} and got["meta"]["usage"]["completion_tokens"] <= 3
    assert got["r0"]["error"] is None and got["r0"]["text"] == llm.tokenizer.decode(got["r0"]["token_ids"])
    assert got["r0"]["token_ids"] == llm.generate("The quick brown fox ", GREEDY)[0].token_ids
    assert len(got["chat"]["choices"]) == 2 and got["chat"]["usage"]["completion_tokens"] <= 10
    assert got["oa"]["usage"]["completion_tokens"] <= 2 and got["oa"]["metadata"] == {"user": "u"}
    codes = {k: r["error"]["code"] for k, r in got.items() if r["error"]}
    assert codes == {
        ("line", 7): "invalid_json",
        "empty": "empty_prompt",
        "long": "prompt_too_long",
        "badtemp": "invalid_sampling_params",
        "badtype": "invalid_sampling_params",
        ("line", 12): "invalid_custom_id",
    }
    assert "temperature=-1" in got["badtemp"]["error"]["message"]
    summary_file = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary_file["ok"] == 6 and summary_file["padding_efficiency"] is not None
    before = out.read_bytes()
    again = run_batch(llm, inp, out, GREEDY, return_token_ids=True, progress=False)
    assert again.skipped == 12 and again.ok == again.failed == 0 and out.read_bytes() == before
    # the rerun found nothing to do: the summary file still describes the run that did the work
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text()) == summary_file


def test_duplicates_rejected_up_front_with_line_numbers(llm, tmp_path):
    rows = [
        *basic_lines(3),
        {"custom_id": "r1", "prompt": "x"},
        {"custom_id": "r2", "prompt": "y"},
        {"custom_id": "r1", "prompt": "z"},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(DuplicateIdError, match=r"\"r1\" on lines 2, 4, 6; \"r2\" on lines 3, 5"):
        run_batch(llm, inp, tmp_path / "out.jsonl", GREEDY, progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_torn_line_resume_matches_uninterrupted_run_with_sampling(llm, tmp_path):
    sampled = SamplingParams(max_tokens=6, temperature=1.0)
    rows = [{"custom_id": f"s{i}", "prompt": "Café naïve " * (1 + i % 3)} for i in range(8)]
    rows[2]["seed"] = 123
    rows[3]["temperature"] = 0.0
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    ref = tmp_path / "ref.jsonl"
    run_batch(llm, inp, ref, sampled, seed=7, window=3, progress=False)
    texts = {r["custom_id"]: r["text"] for r in read_rows(ref)}
    assert len(set(texts.values())) > 2  # sampling with per-line seeds: not all the same
    out = tmp_path / "out.jsonl"
    lines = ref.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # a torn fourth line
    shutil.copy(tmp_path / "ref.jsonl.manifest.json", tmp_path / "out.jsonl.manifest.json")
    summary = run_batch(llm, inp, out, sampled, seed=7, window=5, progress=False)
    assert summary.skipped == 3 and summary.ok == 5
    assert line_set(out) == line_set(ref)
    # Input order does not matter either: seeds come from (run seed, custom_id).
    shuffled = write_jsonl(tmp_path / "shuffled.jsonl", rows[::-1])
    run_batch(llm, shuffled, tmp_path / "shuf.jsonl", sampled, seed=7, progress=False)
    assert line_set(tmp_path / "shuf.jsonl") == line_set(ref)


def test_manifest_mismatch_refused_unless_forced(llm, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", basic_lines(2))
    out = tmp_path / "out.jsonl"
    run_batch(llm, inp, out, GREEDY, progress=False)
    with pytest.raises(ManifestMismatchError, match=r"sampling_defaults.temperature: 0.0 before, 0.5 now"):
        run_batch(llm, inp, out, GREEDY.replace(temperature=0.5), progress=False)
    with pytest.raises(ManifestMismatchError, match="run_seed"):
        run_batch(llm, inp, out, GREEDY, seed=3, progress=False)
    forced = run_batch(llm, inp, out, GREEDY.replace(temperature=0.5), force=True, progress=False)
    assert forced.skipped == 2
    assert json.loads((tmp_path / "out.jsonl.manifest.json").read_text())["previous"]["run_seed"] == 0
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("{}\n")
    with pytest.raises(ManifestMismatchError, match="not started by run-batch"):
        run_batch(llm, inp, foreign, GREEDY, progress=False)


def test_resume_under_another_precision_is_refused(tmp_path):
    """The manifest records the precision that runs (bfloat16 weight matrices under float32
    compute is not "float32"), so a resume that would mix precisions is refused."""
    path = make_tiny_llm_dir(tmp_path / "tiny")
    inp = write_jsonl(tmp_path / "in.jsonl", basic_lines(2))
    out = tmp_path / "out.jsonl"
    with LLM(path, dtype="float32", **ENGINE) as f32:
        run_batch(f32, inp, out, GREEDY, progress=False)
    manifest = json.loads((tmp_path / "out.jsonl.manifest.json").read_text())
    assert manifest["engine"]["param_dtype"] == "float32"
    with LLM(path, weight_dtype="bfloat16", **ENGINE) as mixed:
        expected = "param_dtype: 'float32' before, 'bfloat16 weights, float32 compute' now"
        with pytest.raises(ManifestMismatchError, match=expected):
            run_batch(mixed, inp, out, GREEDY, progress=False)


def test_max_errors_stops_cleanly(llm, tmp_path):
    rows = [
        {"custom_id": "a", "prompt": ""},
        {"custom_id": "b", "prompt": ""},
        {"custom_id": "c", "prompt": ""},
        *basic_lines(2),
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = run_batch(llm, inp, out, GREEDY, max_errors=1, window=10, progress=False)
    assert summary.stopped and "max-errors=1" in summary.stopped and not summary.complete
    assert summary.failed == 2 and len(read_rows(out)) == 2
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["stopped"] == summary.stopped
    rest = run_batch(llm, inp, out, GREEDY, progress=False)  # no limit: finishes the rest
    assert rest.skipped == 2 and rest.failed == 1 and rest.ok == 2 and len(by_id(out)) == 5


def test_openai_format_rows(llm, tmp_path):
    rows = [
        {
            "custom_id": "c",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3,
                "logprobs": True,
                "top_logprobs": 2,
            },
        },
        {"custom_id": "p", "prompt": "JAX"},
        {"custom_id": "pl", "prompt": "JAX", "logprobs": 2},
        {"custom_id": "e", "prompt": ""},
        # OpenAI content parts and null content, as `jinfer serve` takes them
        {"custom_id": "parts", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]},
        {
            "custom_id": "none",
            "messages": [{"role": "system", "content": None}, {"role": "user", "content": "Hi"}],
        },
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    run_batch(llm, inp, out, GREEDY, format="openai", progress=False)
    got = by_id(out)
    chat = got["c"]["response"]["body"]
    assert got["c"]["response"]["status_code"] == 200 and got["c"]["error"] is None
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    # logprobs in OpenAI's shapes, with token texts (as jinfer serve writes them)
    ids = llm.generate([[{"role": "user", "content": "Hi"}]], GREEDY.replace(max_tokens=3))[0].token_ids
    first = chat["choices"][0]["logprobs"]["content"][0]
    assert first["token"] == llm.tokenizer.decode([ids[0]], skip_special_tokens=False)
    assert first["bytes"] == list(first["token"].encode()) and len(first["top_logprobs"]) == 2
    assert first["top_logprobs"][0]["logprob"] >= first["top_logprobs"][1]["logprob"]
    comp = got["pl"]["response"]["body"]["choices"][0]["logprobs"]
    assert set(comp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert "".join(comp["tokens"]) == llm.tokenizer.decode(
        llm.generate("JAX", GREEDY)[0].token_ids, skip_special_tokens=False
    )
    assert len(comp["top_logprobs"]) == len(comp["tokens"]) and all(len(t) <= 2 for t in comp["top_logprobs"])
    text = got["c"]["response"]["body"]["choices"][0]["message"]["content"]
    assert got["parts"]["response"]["body"]["choices"][0]["message"]["content"].startswith(text)
    assert got["none"]["error"] is None
    assert (
        chat["usage"]["total_tokens"] == chat["usage"]["prompt_tokens"] + chat["usage"]["completion_tokens"]
    )
    assert got["p"]["response"]["body"]["object"] == "text_completion"
    assert got["e"]["response"] is None and got["e"]["error"]["code"] == "empty_prompt"


def test_score_task(tmp_path):
    """`--task score` on an 8-slot engine (pairs share calls, up to 4 per call): every good line's
    log-probabilities equal `LLM.score` of that pair alone (2e-5), and each bad line, among them and
    across two windows, is its own error row."""
    llm = LLM(make_tiny_llm_dir(tmp_path / "tiny"), **{**ENGINE, "max_batch": 8})
    assert llm.engine.score_rows(16) == 4
    good = {f"s{i}": ("Paris is the capital of " * (1 + i % 4), " France" * (1 + i % 2)) for i in range(9)}
    rows = [{"custom_id": k, "prompt": p, "continuation": c} for k, (p, c) in good.items()]
    rows[3:3] = [
        {"custom_id": "missing", "prompt": "x"},
        {"custom_id": "bad_id", "prompt": "x", "continuation": [10**6]},
        {"custom_id": "empty", "prompt": "x", "continuation": ""},
        {"custom_id": "ids", "prompt": "x y", "continuation": [5, 6]},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    summary = run_batch(llm, inp, out, task="score", progress=False, window=7)
    got = by_id(out)
    assert summary.failed == 3 and len(got) == len(rows)
    for key, (prompt, cont) in [*good.items(), ("ids", ("x y", [5, 6]))]:
        ids = llm.tokenizer.encode(prompt)
        (ref,) = llm.score([ids], [cont])
        np.testing.assert_allclose(got[key]["logprobs"], ref.logprobs, atol=2e-5)
        assert got[key]["total"] == pytest.approx(ref.total, abs=1e-4)
    assert got["missing"]["error"]["code"] == "invalid_request"
    assert "outside the vocabulary" in got["bad_id"]["error"]["message"]
    assert "needs a non-empty 'continuation'" in got["empty"]["error"]["message"]
    assert any(k[0] == "score" and len(k) == 3 for k in llm.stats.compile_seconds)  # a 4-row call ran
    llm.close()


def test_error_rows_number_lines_alike_in_generate_and_score(llm, tmp_path):
    """run-batch names a bad line by its 1-based line number in the file (blank lines count), in
    the message and the "line" field, whatever the task. Score mode also said "score pair 4"
    (the line number as if it were LLM.score's 0-based position) and generate "prompt 0" (for
    every line); now neither numbers anything else. LLM.score keeps its 0-based positions, like
    generate; the keyed streams say "the prompt" / "the score pair". Good lines still run."""
    long = [5] * 130  # longer than max_len 128
    rows = {
        "generate": [{"custom_id": "ok", "prompt": [1, 2]}, "", {"custom_id": "long", "prompt": long}],
        "score": [
            {"custom_id": "ok", "prompt": [1, 2], "continuation": [3]},
            "",
            {"custom_id": "long", "prompt": long, "continuation": [4]},
        ],
    }
    errors = {}
    for task, lines in rows.items():
        out = tmp_path / f"{task}.out.jsonl"
        run_batch(llm, write_jsonl(tmp_path / f"{task}.jsonl", lines), out, GREEDY, task=task, progress=False)
        got = by_id(out)
        assert got["ok"]["error"] is None
        errors[task] = got["long"]["error"]
    assert errors["generate"] == {
        "code": "prompt_too_long",
        "message": "line 3: the prompt has 130 tokens; max_len is 128, so a prompt may have at most 127 "
        "(raise max_len or shorten the prompt)",
        "line": 3,
    }
    assert errors["score"] == {
        "code": "prompt_too_long",
        "message": "line 3: the score pair: prompt + continuation has 131 tokens but max_len is 128 "
        "(raise max_len to >= 131 or shorten them)",
        "line": 3,
    }
    with pytest.raises(ValueError, match=r"^score pair 1: prompt \+ continuation has 131 tokens"):
        llm.score([[1, 2], long], [[3], [4]])
    with pytest.raises(ValueError, match=r"^prompt 1 has 130 tokens"):
        llm.generate([[1, 2], long], GREEDY)
    scored = dict(llm.score_iter([("a", [1], [2]), ("b", long, [3])]))
    assert str(scored["b"]).startswith("the score pair: prompt + continuation has 131 tokens")
    generated = dict(llm.generate_iter([("a", [1], GREEDY), ("b", long, GREEDY)]))
    assert str(generated["b"]).startswith("the prompt has 130 tokens")
    assert llm.score([[1, 2]], [[3]])[0].token_ids == [3]  # still serving


def test_prepass_and_resume_scan_memory_is_bounded(tmp_path):
    n = 100_000
    inp = tmp_path / "big.jsonl"
    with open(inp, "w") as f:
        for i in range(n):
            f.write(f'{{"custom_id": "request-{i:07d}", "prompt": "hello {i}"}}\n')
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        for i in range(0, n, 2):
            f.write(f'{{"custom_id":"request-{i:07d}","text":"x","error":null}}\n')
    tracemalloc.start()
    try:
        scan = scan_input(inp)
        done = scan_output(out, repair=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert scan.lines == n and len(done) == n // 2
    # 8-byte hashes: ~0.8 MB per copy for 100k lines; the file itself is 4 MB and never loaded.
    assert peak < 4_000_000, f"pre-pass + resume scan peaked at {peak / 1e6:.1f} MB"


def test_two_runs_on_one_output_are_refused(llm, tmp_path):
    """A second run-batch on an output another run is writing stops with a ConfigError naming
    the holder, before it loads anything; once the first ends, the output can be resumed."""
    from jinfer.batch import files
    from jinfer.errors import ConfigError

    inp = write_jsonl(tmp_path / "in.jsonl", [{"custom_id": "a", "prompt": "hi"}])
    out = tmp_path / "out.jsonl"
    held = files.lock_output(out)  # as a run in progress holds it
    try:
        with pytest.raises(
            ConfigError, match=rf"out.jsonl is being written by another run-batch \(pid {os.getpid()}\)"
        ):
            run_batch(llm, inp, out, GREEDY, progress=False)
        assert not out.exists()
    finally:
        held.close()
    assert run_batch(llm, inp, out, GREEDY, progress=False).ok == 1
    assert run_batch(llm, inp, out, GREEDY, progress=False).skipped == 1  # the lock was released
