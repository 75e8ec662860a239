"""LLM API on a complete tiny model directory: text and chat prompts, stop strings, streaming,
UTF-8 safety, generation_config defaults, CLI `generate` and `inspect`."""

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from jinfer import errors
from jinfer.llm import LLM
from jinfer.sampling import SamplingParams
from jinfer.testing import make_tiny_llm_dir
from jinfer.tokenizer import IncrementalDecoder, Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, max_batch=4, max_len=128, buckets=(16, 32, 64))


def test_string_chat_and_id_prompts(llm):
    chat = [{"role": "user", "content": "Paris is"}]
    rendered = llm.tokenizer.render_chat(chat)
    assert rendered == "<|im_start|>user\nParis is<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenizer.encode_chat(chat)
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    by_chat, by_ids, by_text = llm.generate([chat, ids, rendered], p)
    assert by_chat.token_ids == by_ids.token_ids
    assert by_chat.prompt_token_ids == ids
    assert by_text.prompt_token_ids == llm.tokenizer.encode(rendered)
    assert by_chat.text == llm.tokenizer.decode(by_chat.token_ids)


def test_a_list_of_named_chat_templates_uses_the_default_one(model_dir):
    """tokenizer_config.json may hold [{"name", "template"}, ...] (Hermes, Command-R), as
    transformers accepts: the "default" one renders (it failed with "Can't compile non template
    nodes")."""
    tok = Tokenizer.from_dir(model_dir)
    named = [
        {"name": "tool_use", "template": "TOOLS {{ messages[0]['content'] }}"},
        {"name": "default", "template": "<{{ messages[0]['content'] }}>"},
    ]
    chat = [{"role": "user", "content": "hi"}]
    assert Tokenizer(tok.backend, {**tok.config, "chat_template": named}).render_chat(chat) == "<hi>"
    first_only = [{"name": "tool_use", "template": "T{{ messages[0]['content'] }}"}]
    assert Tokenizer(tok.backend, {**tok.config, "chat_template": first_only}).render_chat(chat) == "Thi"


def test_generation_config_defaults_and_eos(llm, model_dir):
    defaults = llm.default_params()
    assert defaults.temperature == 0.0 and defaults.max_tokens == 16
    eos = json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    assert llm.eos_token_ids == (eos,)
    out = llm.generate("Paris", SamplingParams(max_tokens=40, temperature=1.0, seed=3))[0]
    if eos in out.token_ids:
        assert out.token_ids[-1] == eos and out.finish_reason == "stop"
    ignored = llm.generate("Paris", SamplingParams(max_tokens=40, temperature=1.0, seed=3, ignore_eos=True))[
        0
    ]
    assert len(ignored.token_ids) == 40 and ignored.finish_reason == "length"


def test_stop_string_cuts_text_and_frees_slot(llm):
    p = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    full = llm.generate("The quick", p)[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = llm.generate("The quick", p.replace(stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text
    assert len(cut.token_ids) < len(full.token_ids)


def test_earliest_stop_string_wins_and_tokens_end_there(llm):
    """Of several stop strings the one found first in the text ends it, whatever their order in
    the list; token_ids, logprobs and usage end at the token that completed it (not at the end of
    the decode round, `decode_steps` tokens), in generate and in stream alike."""
    p = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
    full = llm.generate("The quick", p)[0]
    text = full.text
    subs = {text[i : i + 2] for i in range(len(text) - 1)} | {text[i : i + 3] for i in range(len(text) - 2)}
    subs = sorted((text.find(x), x) for x in subs if "\ufffd" not in x and text.find(x) > 0)
    (at, early), (_, late) = next(
        (a, b) for a in subs for b in subs if b[0] > a[0] and a[1] not in b[1] and b[1] not in a[1]
    )
    for stops in ((late, early), (early, late)):
        cut = llm.generate("The quick", p.replace(stop=stops))[0]
        assert cut.finish_reason == "stop" and cut.text == text[:at]
        assert "".join(llm.stream("The quick", p.replace(stop=stops))) == text[:at]
        k = len(cut.token_ids)
        assert cut.token_ids == full.token_ids[:k]
        assert early in llm.tokenizer.decode(cut.token_ids) and early not in llm.tokenizer.decode(
            cut.token_ids[:-1]
        )
        assert len(cut.logprobs) == k and cut.usage["completion_tokens"] == k


def test_stop_token_ends_token_ids_and_its_text_is_left_out(llm):
    """A stop_token_ids token is the last generated token; its text is not in the output (as
    vLLM), in generate and in stream."""
    p = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    full = llm.generate("The quick", p)[0]
    k = next(i for i, t in enumerate(full.token_ids) if i >= 3 and llm.tokenizer.decode([t]).strip())
    stop = full.token_ids[k]
    k = full.token_ids.index(stop)  # its first occurrence ends the request
    cut = llm.generate("The quick", p.replace(stop_token_ids=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.token_ids == full.token_ids[: k + 1]
    assert cut.text == llm.tokenizer.decode(full.token_ids[:k])
    assert "".join(llm.stream("The quick", p.replace(stop_token_ids=(stop,)))) == cut.text


def test_request_checks_name_what_is_wrong(llm):
    """Mistakes a caller makes get an InputError saying what is accepted; the engine goes on."""
    with pytest.raises(errors.InputError, match="params is a dict; expected a SamplingParams"):
        llm.generate("Hello", {"max_tokens": 4})
    with pytest.raises(errors.InputError, match="prompts is bytes; decode it to a string first"):
        llm.generate(b"Hello")
    eos = llm.eos_token_ids
    try:  # a model with 9 end-of-sequence ids: 8 more ids no longer fit a decode row's 16
        llm.eos_token_ids = tuple(range(100, 109))
        with pytest.raises(
            errors.InvalidSamplingParamsError, match=r"stops at 17 token ids .* at most at 16"
        ):
            llm.generate("Hi", SamplingParams(max_tokens=2, stop_token_ids=list(range(10, 18))))
    finally:
        llm.eos_token_ids = eos
    with pytest.raises(errors.SequenceTooLongError, match=r"max_tokens=500, but max_len is 128.*at most 126"):
        llm.generate([1, 2], SamplingParams(max_tokens=500))
    eight = llm.generate(
        "Hi", SamplingParams(max_tokens=3, temperature=0.0, stop_token_ids=list(range(10, 18)))
    )
    assert eight[0].finish_reason in ("length", "stop")  # 8 ids + EOS fit the decode rows
    vocab = llm.engine.vocab_size  # a stop id no token can be: refused, as run-batch refuses it
    with pytest.raises(errors.InvalidTokenError, match=rf"request 1 has stop token id {vocab} outside"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(stop_token_ids=[5, vocab])])
    with pytest.raises(errors.InvalidSamplingParamsError, match=r"LLM\(model, max_logprobs=9\)"):
        llm.generate("Hi", SamplingParams(logprobs=9))
    ok = [(i, o.text) for i, o in llm.generate_iter(iter([(0, "Hi", None)]))]
    assert ok == [(0, llm.generate("Hi")[0].text)]  # params None: the model's defaults
    one = llm.score("The capital is", " Paris")
    assert len(one) == 1 and one[0].token_ids == llm.tokenizer.encode(" Paris", add_special_tokens=False)
    with pytest.raises(errors.InputError, match="one string each"):
        llm.score("The capital is", [" Paris"])
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Paris "}, {"type": "text", "text": "is"}]}
    ]
    plain = [{"role": "user", "content": "Paris is"}]
    assert llm.tokenizer.encode_chat(parts) == llm.tokenizer.encode_chat(plain)
    with pytest.raises(
        errors.InputError, match=r"chat message 0 content is list; expected a string or a list"
    ):
        llm.generate([[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]])
    assert len(llm.generate("ok", SamplingParams(max_tokens=2, temperature=0.0))[0].token_ids) == 2


def test_bad_engine_options_say_what_is_accepted(model_dir):
    with pytest.raises(
        errors.ConfigError, match=r"unknown option\(s\) \['prefix_cach'\]; accepted.*'prefix_cache'"
    ):
        LLM(model_dir, prefix_cach=False)
    with pytest.raises(
        errors.ConfigError, match=r"dtype 'float8' is not a floating-point dtype; accepted: 'float32'"
    ):
        LLM(model_dir, dtype="float8")
    # weight_dtype="int8" used to build an engine that generated garbage
    for bad, hint in (("int8", "for int8 weights use quantize='int8'"), ("banana", "or None")):
        with pytest.raises(errors.ConfigError, match=rf"weight_dtype '{bad}' is not a floating.*{hint}"):
            LLM(model_dir, weight_dtype=bad)


def test_stream_raises_when_the_llm_is_closed_under_it(tmp_path):
    """close() while a stream runs: the stream gives the text so far, then raises
    EngineClosedError (not a silent, truncated end); generate's outputs say "abort". The stream
    asks for 4,000 tokens (hundreds of ms), closed within a millisecond of its first piece."""
    model_dir = make_tiny_llm_dir(tmp_path / "long", max_position_embeddings=4096)
    llm = LLM(model_dir, max_batch=2, max_len=4096, buckets=(16, 32))
    long = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)
    stream = llm.stream("The quick", long)
    pieces = [next(stream)]
    handle = llm.submit("Paris is", long)
    llm.close()
    with pytest.raises(errors.EngineClosedError, match="closed while this stream ran"):
        pieces.extend(stream)
    assert handle.result().finish_reason == "abort" and len(handle.result().token_ids) < 4000


def test_stream_concatenation_equals_generate(llm):
    for seed in range(4):
        p = SamplingParams(max_tokens=20, temperature=1.0, seed=seed, stop=("e ",))
        pieces = list(llm.stream("Café 日本語 🙂", p))
        assert "".join(pieces) == llm.generate("Café 日本語 🙂", p)[0].text
        for piece in pieces:
            piece.encode("utf-8")  # every piece is a valid str (no lone surrogates)


def test_incremental_decoder_never_splits_multibyte_characters(model_dir):
    tok = Tokenizer.from_dir(model_dir)
    text = "日本語のテキスト 🙂🚀 naïve €"
    ids = tok.encode(text, add_special_tokens=False)
    # Byte-level BPE: several characters take more than one token (bytes); feed one at a time.
    assert len(ids) > len(text.split())
    dec = IncrementalDecoder(tok)
    pieces = [dec.push([t]) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_bad_chat_messages_and_engine_keeps_serving(llm):
    with pytest.raises(errors.InputError, match="message 0"):
        llm.generate([[{"content": "no role"}]], SamplingParams(max_tokens=2))
    with pytest.raises(errors.InputError, match="empty"):
        llm.generate([""], SamplingParams(max_tokens=2))
    assert len(llm.generate("ok", SamplingParams(max_tokens=2, temperature=0.0))[0].token_ids) == 2


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "off", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_reader_going_away_is_not_an_error(model_dir):
    """`jinfer generate ... | head -c 1`: the pipe closes while tokens still stream; the command
    ends quietly with status 0 (not "BrokenPipeError", status 3)."""
    flags = ["--max-tokens", "200", "--ignore-eos", "--max-len", "256", "Paris is"]
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jinfer.cli",
            "--compilation-cache",
            "off",
            "generate",
            "--model",
            str(model_dir),
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert len(p.stdout.read(1)) == 1
    p.stdout.close()  # as `head -c 1` exits
    assert (p.wait(timeout=300), p.stderr.read().decode()) == (0, "")


def test_interrupt_while_loading_exits_at_once():
    """The command line's Ctrl-C while a model loads ends the process at once with status 130,
    printing nothing (a restore's threads would otherwise turn it into a damaged-checkpoint
    error or an abort); outside the guard, and for a library caller, KeyboardInterrupt stays."""
    code = """if True:
        import os, signal, sys, time
        from jinfer import loading
        try:
            with loading.interrupt_exits():  # not enabled: a library caller
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        except KeyboardInterrupt:
            print("library: KeyboardInterrupt", flush=True)
        loading.exit_on_interrupt(130)
        with loading.interrupt_exits():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        print("not reached", flush=True)
    """
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 130 and r.stdout == "library: KeyboardInterrupt\n" and r.stderr == ""
    assert time.perf_counter() - t < 25


def test_cli_default_max_tokens_fits_a_small_max_len(model_dir):
    """Without --max-tokens, the default length (the model's max_new_tokens, 16) is lowered to
    what fits after each prompt: with `--max-len 40` a 26-token prompt gets 14 tokens instead of
    an error; an explicit --max-tokens that does not fit is still refused."""
    flags = ["--temperature", "0", "--json", "--max-len", "40", "--ignore-eos"]
    r = _cli("generate", "--model", str(model_dir), *flags, "Paris is", "A longer one")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.strip().splitlines()]
    usage = [(row["usage"]["prompt_tokens"], row["usage"]["completion_tokens"]) for row in rows]
    assert [c for _, c in usage] == [min(16, 40 - p) for p, _ in usage] and usage[1][0] + 16 > 40
    assert all(row["finish_reason"] == "length" for row in rows)
    r = _cli("generate", "--model", str(model_dir), *flags, "--max-tokens", "39", "Paris is")
    assert r.returncode == 2 and "lower max_tokens or raise max_len" in r.stderr


def test_cli_generate_json_and_inspect(model_dir, llm):
    r = _cli(
        "generate",
        "--model",
        str(model_dir),
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--json",
        "--max-len",
        "128",
        "Paris is",
    )
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    expected = llm.generate(
        [[{"role": "user", "content": "Paris is"}]], SamplingParams(max_tokens=5, temperature=0.0)
    )[0]
    assert row["token_ids"] == expected.token_ids
    assert row["text"] == expected.text
    assert row["usage"] == expected.usage

    # --ignore-eos: exactly --max-tokens tokens, as SamplingParams(ignore_eos=True) gives in-process
    flags = ["--max-tokens", "60", "--temperature", "0", "--json", "--max-len", "128"]
    r = _cli("generate", "--model", str(model_dir), *flags, "--ignore-eos", "Paris is")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout.strip().splitlines()[-1])
    expected = llm.generate(
        [[{"role": "user", "content": "Paris is"}]],
        SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True),
    )[0]
    assert row["token_ids"] == expected.token_ids and len(row["token_ids"]) == 60
    assert row["finish_reason"] == "length"

    r = _cli("inspect", str(model_dir), "--mesh", "data=2,model=4")
    assert r.returncode == 0, r.stderr
    assert "layers/0/mlp/up" in r.stdout and "per device" in r.stdout.lower()

    r = _cli("generate", "--model", str(model_dir / "missing"), "hi")
    assert r.returncode == 2 and "error" in r.stderr


# -- a request's resources are released on every exit path (each followed by the reference) ---------
REFERENCE = ("Paris is", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
LONG = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(llm):
    return llm.generate(*REFERENCE)[0]


def _released_then_reference(llm, reference):
    deadline = time.monotonic() + 60
    while True:
        s = llm.stats.summary()
        if s["running"] == 0 and s["queue_depth"] == 0 and s["slots_free"] == llm.engine.config.max_batch:
            break
        assert time.monotonic() < deadline, f"resources not released: {s}"
        time.sleep(0.01)
    again = llm.generate(*REFERENCE)[0]
    assert again.token_ids == reference.token_ids and again.text == reference.text


def test_released_when_finished(llm, reference):
    assert len(llm.generate(["a b", "c d e"], LONG.replace(max_tokens=5))) == 2
    _released_then_reference(llm, reference)


def test_released_when_cancelled(llm, reference):
    handle = llm.submit("The quick", LONG)
    first = next(iter(handle))
    assert first.token_ids and first.finish_reason is None
    handle.cancel()
    assert handle.result().finish_reason == "abort"
    _released_then_reference(llm, reference)


def test_released_when_stream_closed_half_way(llm, reference):
    stream = llm.stream("The quick", LONG)
    assert next(stream)
    stream.close()
    _released_then_reference(llm, reference)


def test_released_when_stream_garbage_collected_half_way(llm, reference):
    stream = llm.stream("The quick", LONG)
    assert next(stream)
    del stream
    gc.collect()
    _released_then_reference(llm, reference)


def test_released_when_handle_dropped(llm, reference):
    llm.submit("The quick", LONG)  # nobody keeps the handle: nobody can read the request
    gc.collect()
    _released_then_reference(llm, reference)


def test_released_after_an_engine_exception(llm, reference, monkeypatch):
    real = llm.engine.first_token
    calls = []

    def first_token(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected first-token failure")
        return real(*args)

    monkeypatch.setattr(llm.engine, "first_token", first_token)
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(["a", "b", "c"], LONG)
    monkeypatch.undo()
    _released_then_reference(llm, reference)


def test_released_after_keyboard_interrupt_in_generate(llm, reference):
    def interrupt_once_decoding():
        deadline = time.monotonic() + 60
        while llm.stats.summary()["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_decoding)
    thread.start()
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["one", "two", "three", "four"], LONG)
    thread.join()
    _released_then_reference(llm, reference)


def test_a_handle_keeps_its_llm_alive(model_dir):
    """`LLM(path).submit(...).result()` (nothing else holds the LLM): the request ran to its end;
    it used to be aborted (finish "abort", no tokens) when the LLM was collected under it."""
    import gc

    handle = LLM(model_dir, max_batch=2, max_len=64, buckets=(16,)).submit(
        [1, 2, 3], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    )
    gc.collect()
    out = handle.result(timeout=120)
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 6


def test_handle_collection_and_callbacks_never_stop_the_engine(llm):
    """A collected handle's abort takes no lock (the collector may run on a thread that holds the
    loop's lock: taking it deadlocked the engine); a done-callback raising even SystemExit leaves
    the engine thread running, and the other callbacks still run."""
    import threading
    import time

    loop = llm._loop
    aborted = llm.stats.summary()["requests_aborted"]
    handle = llm.submit([5, 6, 7], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))
    done = threading.Event()
    with loop._cv:  # as a caller inside submit() holds it
        worker = threading.Thread(target=lambda: (handle._finalizer(), done.set()))
        worker.start()
        assert done.wait(10), "the finalizer blocked on the loop's lock"
    deadline = time.monotonic() + 60  # the loop aborts the forgotten request at its next step
    while llm.stats.summary()["requests_aborted"] == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert llm.stats.summary()["requests_aborted"] == aborted + 1
    ran = threading.Event()
    h = llm.submit([5, 6], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    h.add_done_callback(lambda _: (_ for _ in ()).throw(SystemExit(0)))
    h.add_done_callback(lambda _: ran.set())
    h.result(timeout=60)
    assert ran.wait(10) and loop._thread.is_alive() and not loop.closed
    assert len(llm.generate([1, 2], SamplingParams(max_tokens=3, temperature=0.0))[0].token_ids) == 3


def test_generate_iter_keeps_finished_work_when_its_input_breaks(llm):
    """An input iterator that raises on its 3rd item: the 2 requests already submitted still
    yield their outputs, then the error is raised; an item that is not a triple is an error row."""
    p = SamplingParams(max_tokens=3, temperature=0.0)

    def items():
        yield "a", [1, 2, 3], p
        yield "b", [4, 5, 6], p
        yield ("bad",)
        raise OSError("the input file went away")

    got = []
    with pytest.raises(OSError, match="went away"):
        for key, out in llm.generate_iter(items()):
            got.append((key, out))
    assert sorted(k for k, o in got if not isinstance(o, Exception)) == ["a", "b"]
    errors_ = [(k, o) for k, o in got if isinstance(o, Exception)]
    assert (
        len(errors_) == 1
        and errors_[0][0] is None
        and "is not a (key, prompt, params) triple" in str(errors_[0][1])
    )
    assert {k: o.outputs[0].token_ids for k, o in got if k} == {
        "a": llm.generate([[1, 2, 3]], p)[0].token_ids,
        "b": llm.generate([[4, 5, 6]], p)[0].token_ids,
    }
