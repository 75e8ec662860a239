"""Fuzz: randomly mutated run-batch lines and random SamplingParams/prompts through LLM.generate.

No crash, no hang, every failure a documented error (an error row with a documented code, or an
InputError / ConfigError), and the engine's reference request gives the same tokens afterwards.
"""

import json
import random

import pytest

from jinfer.batch import run_batch
from jinfer.errors import ConfigError, InputError
from jinfer.llm import LLM
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir

N = 500
REFERENCE = ("The quick brown fox", SamplingParams(max_tokens=6, temperature=0.0))
# The error codes documented for run-batch rows (README "Errors and exit codes").
DOCUMENTED_CODES = {
    "invalid_json",
    "invalid_request",
    "invalid_custom_id",
    "empty_prompt",
    "prompt_too_long",
    "invalid_sampling_params",
    "invalid_token",
    "line_too_long",
}
WEIRD = [
    None,
    True,
    False,
    0,
    -1,
    1,
    3,
    2**31,
    2**63,
    10**30,
    -(10**30),
    0.5,
    -0.5,
    1e308,
    float("inf"),
    float("nan"),
    "",
    "x",
    "\u0000",
    "é" * 50,
    [],
    [1, 2],
    [[1]],
    [-5],
    [10**12],
    {},
    {"a": 1},
    [{"role": "user"}],
]
FIELDS = ["prompt", "messages", "max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "stop"]
FIELDS += [
    "stop_token_ids",
    "n",
    "logprobs",
    "top_logprobs",
    "ignore_eos",
    "max_completion_tokens",
    "custom_id",
]


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_llm_dir(tmp_path_factory.mktemp("model") / "tiny")
    return LLM(path, max_batch=4, max_len=64, buckets=(16, 32), max_logprobs=2)


def _valid_line(rng, i):
    line = {"custom_id": f"f{i}", "max_tokens": rng.randint(1, 3), "temperature": rng.choice([0.0, 0.7])}
    if rng.random() < 0.3:
        line["messages"] = [{"role": "user", "content": "Hi there " * rng.randint(0, 3)}]
    else:
        line["prompt"] = rng.choice(
            ["The quick brown fox", "Café naïve", [5, 6, 7], "x " * rng.randint(1, 40)]
        )
    return line


def _mutate(rng, line, i) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:  # a field takes a weird value of another type or range
        line[rng.choice(FIELDS)] = rng.choice(WEIRD)
        if isinstance(line.get("custom_id"), (int, str)) and line["custom_id"] not in ("", 0, 1, 3, -1):
            line["custom_id"] = f"f{i}"  # keep ids unique: duplicates stop the run by design
    elif kind == 1:  # nesting
        depth = rng.choice([2, 50, 70, 500, 5000])
        line["metadata"] = json.loads("[" * min(depth, 60) + "]" * min(depth, 60))
        raw = json.dumps(line)
        return raw[:-1].encode() + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == 2:  # truncated text
        raw = json.dumps(line).encode()
        return raw[: rng.randrange(len(raw))]
    elif kind == 3:  # random bytes inserted
        raw = bytearray(json.dumps(line).encode())
        for _ in range(rng.randint(1, 4)):
            raw.insert(rng.randrange(len(raw)), rng.randrange(256))
        return bytes(raw).replace(b"\n", b" ").replace(b"\r", b" ")
    elif kind == 4:  # other encodings
        raw = json.dumps(line, ensure_ascii=False)
        return rng.choice(
            [raw.encode("utf-16"), b"\xef\xbb\xbf" + raw.encode(), raw.encode("latin-1", "replace")]
        )
    elif kind == 5:  # not an object
        return rng.choice([b"[]", b"null", b"42", b'"text"', b"true", json.dumps([line]).encode()])
    elif kind == 6:  # OpenAI batch body with weird values
        body = {"prompt": line.get("prompt", "hi"), rng.choice(FIELDS[2:]): rng.choice(WEIRD)}
        return json.dumps(
            {"custom_id": f"f{i}", "method": "POST", "url": "/v1/completions", "body": body}
        ).encode()
    return json.dumps(line).encode()  # kind 7: valid


def test_fuzz_run_batch_lines(llm, tmp_path):
    rng = random.Random(1234)
    reference = llm.generate(*REFERENCE)[0].token_ids
    lines = [_mutate(rng, _valid_line(rng, i), i) for i in range(N)]
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\n".join(x.replace(b"\n", b" ") for x in lines) + b"\n")
    out = tmp_path / "out.jsonl"
    defaults = SamplingParams(max_tokens=2, temperature=0.0)
    summary = run_batch(llm, inp, out, defaults, progress=False, window=64)
    rows = [json.loads(x) for x in out.read_bytes().splitlines()]
    nonblank = sum(1 for x in lines if x.replace(b"\n", b" ").strip())
    assert summary.complete and len(rows) == summary.ok + summary.failed == nonblank
    codes = {r["error"]["code"] for r in rows if r["error"]}
    assert codes <= DOCUMENTED_CODES, codes - DOCUMENTED_CODES
    assert summary.ok >= 50 and summary.failed >= 100  # both kinds exercised
    assert all(1 <= r["usage"]["completion_tokens"] <= 3 * 4 for r in rows if not r["error"])
    assert llm.generate(*REFERENCE)[0].token_ids == reference
    before = out.read_bytes()
    again = run_batch(llm, inp, out, defaults, progress=False, window=64)
    assert again.skipped == nonblank and out.read_bytes() == before


def _random_params(rng):
    kw = {}
    for name in ("max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "n", "logprobs", "stop"):
        if rng.random() < 0.08:
            kw[name] = rng.choice(WEIRD)
    kw.setdefault("max_tokens", rng.randint(1, 3))
    if rng.random() < 0.2:
        kw["stop_token_ids"] = rng.choice([[1], [10**12], [-1], ["a"], 5, [True], list(range(20))])
    return kw


def _random_prompt(rng):
    return rng.choice(
        [
            "The quick brown fox",
            "",
            "é\u0000\ud7ff" * rng.randint(0, 5),
            "word " * rng.randint(1, 80),
            [1, 2, 3],
            [],
            [10**12],
            [-1, 2],
            [1.5],
            [[{"role": "user", "content": "hi"}]],
            [{"role": "user", "content": "hi"}],
            [{"role": "user"}],
            [{"role": 5, "content": None}],
            None,
            5,
            {"prompt": "x"},
        ]
    )


def test_fuzz_llm_generate(llm):
    rng = random.Random(99)
    reference = llm.generate(*REFERENCE)[0].token_ids
    outcomes = {"ok": 0, "invalid params": 0, "invalid input": 0}
    for _ in range(N):
        try:
            params = SamplingParams(**_random_params(rng))
        except InputError:
            outcomes["invalid params"] += 1
            continue
        try:
            outs = llm.generate(_random_prompt(rng), params)
        except (InputError, ConfigError):
            outcomes["invalid input"] += 1
            continue
        assert all(len(o.token_ids) <= params.max_tokens for out in outs for o in out.outputs)
        outcomes["ok"] += 1
    assert all(v >= 20 for v in outcomes.values()), outcomes
    assert llm.generate(*REFERENCE)[0].token_ids == reference
