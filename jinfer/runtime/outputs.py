"""What a generation request returns: RequestOutput (all samples of one prompt), CompletionOutput
(one sample) and ScoreOutput."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


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
