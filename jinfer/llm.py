"""`jinfer.LLM`: the user-facing text generation API (generate, stream, score)."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh

from jinfer.errors import ConfigError, InputError
from jinfer.generate import GenerationConfig, GenerationEngine, Request
from jinfer.modeling import FlaxModel
from jinfer.sampling import SamplingParams
from jinfer.sharding import ShardingRules, make_mesh
from jinfer.tokenizer import IncrementalDecoder, Tokenizer

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclasses.dataclass
class CompletionOutput:
    """One generated sample."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass
class RequestOutput:
    """All samples of one prompt, plus token usage. `text`/`token_ids` are the first sample's."""

    prompt: Any
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": len(self.prompt_token_ids),
            "completion_tokens": sum(len(o.token_ids) for o in self.outputs),
        }


@dataclasses.dataclass
class ScoreOutput:
    """Log-probabilities of a continuation's tokens given the prompt."""

    token_ids: list[int]
    logprobs: list[float]

    @property
    def total(self) -> float:
        return float(np.sum(np.asarray(self.logprobs, np.float64)))


class LLM:
    """A decoder language model ready to generate.

    Args:
      model: a jinfer model directory, a known model name (see `jinfer.hub`), or a Hugging Face
        model id ("org/name[@revision]"), fetched with huggingface_hub and converted once.
      mesh: a Mesh, a spec such as "data=2,model=4", or None (one device).
      dtype: parameter dtype on restore ("float32", "bfloat16"); None keeps the saved dtype.
      max_batch: decode slots. max_len: tokens per slot (prompt + generation); None: the
        model's context length within a KV-cache budget (see `jinfer.defaults`).
      buckets: prompt-length buckets compiled for prefill (default: 16, 32, ... up to
        min(max_len, 512)).
      decode_steps: decode steps per host round trip.
      quantize: "int8" quantizes a float checkpoint's weights at load time (weight-only,
        per-channel; see `jinfer.quant`). Checkpoints converted with `--quantize int8` load as is.
      layout: in-memory weight layout: "canonical" (as saved), "out_major" (weights transposed to
        [out, in] at load time: XLA:CPU's matrix-vector products read them 1.5-3x faster, batched
        matmuls slower), or "auto" (out_major for one-slot engines on CPU, canonical otherwise).
    """

    def __init__(
        self,
        model: str | Path,
        mesh: Mesh | str | None = None,
        dtype: str | None = None,
        max_batch: int = 8,
        max_len: int | None = None,
        buckets: Sequence[int] | None = None,
        decode_steps: int = 8,
        rules: ShardingRules | None = None,
        quantize: str | None = None,
        layout: str = "auto",
        **engine_options: Any,
    ):
        from jinfer import defaults, loading
        from jinfer.memory import plan_llm_memory

        mesh = make_mesh(mesh) if isinstance(mesh, str) else mesh
        gen_config = None

        def plan(flax_model: FlaxModel) -> None:  # after the config is read, before any array is
            nonlocal gen_config, max_len
            if max_len is None:  # the model's context length within a KV-cache budget
                itemsize = defaults.cache_itemsize(
                    flax_model.abstract_params(), engine_options.get("cache_dtype") or dtype
                )
                max_len = defaults.default_max_len(flax_model.config, max_batch, itemsize)
            gen_config = _generation_config(max_batch, max_len, buckets, decode_steps, engine_options)
            plan_llm_memory(flax_model, gen_config, mesh, dtype)

        loaded = loading.load(model, mesh=mesh, rules=rules, dtype=dtype, quantize=quantize, plan=plan)
        path, flax_model, params = loaded.path, loaded.model, loaded.params
        tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
        gen_defaults = _read_json(path / "generation_config.json")
        del model
        self._setup(flax_model, params, tokenizer, gen_config, mesh, rules, gen_defaults, layout, owned=True)
        self.path = path

    @classmethod
    def from_params(
        cls,
        model: FlaxModel,
        params: Any,
        tokenizer: Tokenizer | None = None,
        config: GenerationConfig | None = None,
        mesh: Mesh | None = None,
        rules: ShardingRules | None = None,
        generation_defaults: dict[str, Any] | None = None,
        layout: str = "auto",
    ) -> LLM:
        """Builds an LLM from a model and params already in hand (e.g. for research code).

        The caller's arrays are never donated: with layout "out_major" (or "auto" on a one-slot
        CPU engine) the engine holds a transposed copy of the weights.
        """
        self = cls.__new__(cls)
        config = config or GenerationConfig()
        self._setup(model, params, tokenizer, config, mesh, rules, generation_defaults or {}, layout)
        self.path = None
        return self

    def _setup(self, model, params, tokenizer, config, mesh, rules, gen_defaults, layout, owned=False):
        from jinfer import loading

        model, params = loading.runtime_layout(model, params, layout, config.max_batch, mesh, rules, owned)
        self.model = model
        self.tokenizer = tokenizer
        self.engine = GenerationEngine(model, params, config, mesh=mesh, rules=rules)
        self.generation_defaults = gen_defaults
        eos = gen_defaults.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        if not eos and tokenizer is not None:
            eos = list(tokenizer.eos_token_ids)
        self.eos_token_ids = tuple(int(e) for e in eos)

    # -- public API ------------------------------------------------------------------------------
    @property
    def stats(self):
        """Compile counts/seconds per executable, prefill padding efficiency, token counts."""
        return self.engine.stats

    def default_params(self) -> SamplingParams:
        """SamplingParams from the model's generation_config.json (greedy when it has none)."""
        d = self.generation_defaults
        kw: dict[str, Any] = {"temperature": 0.0 if not d.get("do_sample", False) else 1.0}
        for key in ("temperature", "top_k", "top_p", "min_p"):
            if key in d and d.get("do_sample", True):
                kw[key] = d[key]
        if "max_new_tokens" in d:
            kw["max_tokens"] = int(d["max_new_tokens"])
        return SamplingParams(**kw)

    def warmup(self) -> dict[tuple, float]:
        """Compiles prefill (every bucket), first-token, copy and decode executables up front."""
        return self.engine.warmup()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for each prompt; outputs are in input order.

        A prompt is a string, a list of token ids, or a list of chat messages. `params` is one
        SamplingParams for all prompts or one per prompt. Invalid input raises an InputError
        subclass before any device work.

        With more prompts than decode slots, requests are admitted longest `max_tokens` first
        (each output is independent of its companions, so only the schedule changes): the long
        ones no longer run alone at the end while the other slots sit idle.
        """
        prompts = _as_prompt_list(prompts)
        params_list = self._params_list(params, len(prompts))
        self._requests(prompts, params_list)  # validate everything before any device work
        results: list[RequestOutput | None] = [None] * len(prompts)
        order = range(len(prompts))
        if len(prompts) > self.engine.config.max_batch:
            order = sorted(order, key=lambda i: -params_list[i].max_tokens)
        for index, out in self.generate_iter((i, prompts[i], params_list[i]) for i in order):
            if isinstance(out, Exception):  # pragma: no cover - validated above
                raise out
            results[index] = out
        return results

    def generate_iter(
        self, items: Iterator[tuple[Any, Prompt, SamplingParams]]
    ) -> Iterator[tuple[Any, RequestOutput | InputError]]:
        """Continuous batching over an unbounded stream of (key, prompt, params).

        Yields (key, RequestOutput) in completion order as requests finish, pulling the next
        item only when a decode slot frees up. An invalid item yields (key, the InputError) and
        the stream goes on.
        """
        keys: list[Any] = []
        state: dict[int, dict] = {}
        rejected: deque[tuple[Any, InputError]] = deque()

        def accepted() -> Iterator[Request]:
            for key, prompt, params in items:
                try:
                    (req,), (ids,) = self._requests([prompt], [params])
                except InputError as e:
                    rejected.append((key, e))
                    continue
                state[len(keys)] = {"prompt": prompt, "ids": ids, "params": params, "done": {}}
                keys.append(key)
                yield req

        decoders: dict[tuple[int, int], IncrementalDecoder] = {}
        for result, new, finished in self.engine.run_stream(accepted()):
            while rejected:
                yield rejected.popleft()
            st = state[result.request]
            self._apply_stop_strings(result, new, finished, decoders, st["params"])
            if finished or result.finish_reason is not None:
                st["done"][result.sample] = result
                if len(st["done"]) == st["params"].n:
                    del state[result.request]
                    yield keys[result.request], self._request_output(st, result.request, decoders)
        yield from rejected

    def _request_output(self, st: dict, index: int, decoders) -> RequestOutput:
        samples = []
        params = st["params"]
        for k in range(params.n):
            r = st["done"][k]
            dec = decoders.pop((index, k), None)
            samples.append(
                CompletionOutput(
                    k,
                    dec.text if dec else "",
                    r.token_ids,
                    r.finish_reason or "length",
                    r.logprobs if params.logprobs is not None else None,
                )
            )
        return RequestOutput(st["prompt"], st["ids"], samples)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text increments (always valid UTF-8) as tokens are generated; n must be 1."""
        params = params or self.default_params()
        if params.n != 1:
            raise InputError(f"stream() generates one sample; got n={params.n}")
        requests, _ = self._requests([prompt], [params])
        decoders: dict[tuple[int, int], IncrementalDecoder] = {}
        emitted = 0
        for result, new, finished in self.engine.run(requests):
            self._apply_stop_strings(result, new, finished, decoders, params)
            text = decoders[(0, 0)].text if decoders else ""
            done = finished or result.finish_reason is not None
            # Hold back a tail that could still become a stop string, so streamed text never
            # includes characters that generate() would cut.
            end = len(text) if done else len(text) - _stop_prefix_len(text, params.stop or ())
            if end > emitted:
                yield text[emitted:end]
                emitted = end

    def score(
        self, prompts: Sequence[Prompt], continuations: Sequence[str | Sequence[int]]
    ) -> list[ScoreOutput]:
        """Per-token log-probabilities of each continuation given its prompt, and their sum."""
        if len(prompts) != len(continuations):
            raise InputError(f"score got {len(prompts)} prompts but {len(continuations)} continuations")
        out = []
        for i, (p, c) in enumerate(zip(prompts, continuations, strict=True)):
            p_ids = self._encode(p, i)
            c_ids = (
                self.tokenizer.encode(c, add_special_tokens=False)
                if isinstance(c, str)
                else [int(t) for t in c]
            )
            lp = self.engine.score(p_ids + c_ids, len(p_ids))
            out.append(ScoreOutput(c_ids, [float(x) for x in lp]))
        return out

    # -- helpers ---------------------------------------------------------------------------------
    def _params_list(self, params, n: int) -> list[SamplingParams]:
        if params is None:
            params = self.default_params()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise InputError(f"got {n} prompts but {len(params)} SamplingParams; give one or one per prompt")
        return params

    def _encode(self, prompt: Prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer("string prompts")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
            self._need_tokenizer("chat messages")
            return self.tokenizer.encode_chat(prompt)
        try:
            if any(isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) for t in prompt):
                raise TypeError("token ids must be integers")  # 1.5 or True would pass int()
            return [int(t) for t in prompt]
        except (TypeError, ValueError) as e:
            raise InputError(
                f"prompt {index} is {type(prompt).__name__}; expected a string, a list of token ids, "
                "or a list of chat messages"
            ) from e

    def _need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise ConfigError(f"{what} need a tokenizer, and this model directory has no tokenizer.json")

    def _requests(self, prompts, params_list) -> tuple[list[Request], list[list[int]]]:
        requests, ids_list = [], []
        for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
            ids = self._encode(prompt, i)
            self.engine.check_request(ids, params, i)
            stop_ids = tuple(params.stop_token_ids or ()) + (() if params.ignore_eos else self.eos_token_ids)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            requests.append(Request(ids, params, seed, tuple(dict.fromkeys(stop_ids))))
            ids_list.append(ids)
        return requests, ids_list

    def _apply_stop_strings(self, result, new, finished, decoders, params) -> None:
        """Detokenizes new tokens and ends the sample at a stop string."""
        key = (result.request, result.sample)
        if self.tokenizer is None:
            return
        dec = decoders.setdefault(key, IncrementalDecoder(self.tokenizer))
        before = len(dec.text)
        dec.push(new)
        if finished:
            tail = self.tokenizer.decode(dec.ids[dec.prefix_offset :])
            prefix = self.tokenizer.decode(dec.ids[dec.prefix_offset : dec.read_offset])
            if len(tail) > len(prefix):
                dec.text += tail[len(prefix) :]
                dec.prefix_offset = dec.read_offset = len(dec.ids)
        for stop in params.stop or ():
            # Search only where a new match can start, so text before `before` is never re-cut.
            at = dec.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                dec.text = dec.text[:at]
                if not finished:
                    self.engine.finish(result, "stop")
                result.finish_reason = "stop"
                break


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], dict):
        return [prompts]  # one chat conversation
    if isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], (int, np.integer)):
        return [prompts]  # one list of token ids
    if not isinstance(prompts, Sequence):
        raise InputError(
            f"prompts is a {type(prompts).__name__}; expected a string, a list of token ids, chat messages, "
            "or a list of those"
        )
    return list(prompts)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _generation_config(max_batch, max_len, buckets, decode_steps, options) -> GenerationConfig:
    from jinfer import defaults

    kw = dict(max_batch=max_batch, max_len=max_len, decode_steps=decode_steps, **options)
    if buckets is not None:
        kw["prefill_buckets"] = tuple(buckets)
    else:
        kw["prefill_buckets"] = defaults.default_prefill_buckets(max_len)
    return GenerationConfig(**kw)
