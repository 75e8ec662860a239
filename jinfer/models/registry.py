"""Registry of model classes that a model directory's `config.json` may name.

A model family registers one `ModelSpec`: its frozen config dataclass and its Flax module (NNX or
Linen). Nothing else in jinfer needs to know about the family.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable
from typing import Any

from jinfer.errors import ConfigError, UnknownModelError

TASKS = ("causal_lm", "encoder", "classifier")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one registered model class.

    Attributes:
      name: the class name stored in `config.json` ("model_class").
      config_cls: frozen dataclass with the hyperparameters.
      module_cls: NNX: `module_cls(config, rngs=nnx.Rngs)`; Linen: `module_cls(config)`.
      task: one of TASKS; tells the high-level APIs what the forward returns.
      framework: "nnx" or "linen".
      example_inputs: Linen only: `(config) -> tuple of arrays` used to trace `init`.
      path_rules: optional regex -> logical axes fallback for unannotated parameters.
      typed_weights: the module reads its weights as the types of `jinfer.models.weights`
        (QuantArray, OutMajor; through `jinfer.models.layers`). Otherwise int8 weights reach it
        dequantized to plain arrays, and it cannot hold the output-major layout.
    """

    name: str
    config_cls: type
    module_cls: Any
    task: str
    framework: str = "nnx"
    example_inputs: Callable[[Any], tuple] | None = None
    path_rules: tuple[tuple[str, tuple[str | None, ...]], ...] = ()
    typed_weights: bool = False

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"ModelSpec {self.name!r}: task {self.task!r} is not one of {TASKS}")
        if self.framework not in ("nnx", "linen"):
            raise ConfigError(f"ModelSpec {self.name!r}: framework must be 'nnx' or 'linen'")
        if self.framework == "linen" and self.example_inputs is None:
            raise ConfigError(f"ModelSpec {self.name!r}: Linen models need example_inputs")


_REGISTRY: dict[str, ModelSpec] = {}

# Modules that register the built-in families when imported.
_BUILTIN_MODULES = (
    "jinfer.models.classifiers",
    "jinfer.models.llama",
    "jinfer.models.moe",
    "jinfer.models.gemma",
    "jinfer.models.gpt2",
    "jinfer.models.bert",
)


def register(spec: ModelSpec) -> ModelSpec:
    """Registers a model class (re-registering the same name replaces it)."""
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name`; UnknownModelError lists the known ones otherwise."""
    if name not in _REGISTRY:
        _load_builtins()
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"unknown model class {name!r}; registered classes: {sorted(_REGISTRY)} "
            "(register your own with jinfer.models.registry.register)"
        )
    return _REGISTRY[name]


def registered_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples become lists)."""
    return dataclasses.asdict(config)


def config_from_dict(config_cls: type, data: dict[str, Any]) -> Any:
    """Rebuilds a frozen config dataclass, turning JSON lists back into tuples.

    Unknown keys are an error naming them, so a typo in config.json is not silently ignored.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    extra = sorted(set(data) - set(fields))
    if extra:
        raise ConfigError(
            f"{config_cls.__name__}: unknown config keys {extra}; accepted keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(config_cls)
    kwargs = {k: _from_json(hints.get(k), v) for k, v in data.items()}
    try:
        return config_cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{config_cls.__name__}: {e}") from e


def _from_json(hint: Any, value: Any) -> Any:
    if isinstance(value, list):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType) and args:
            origin = typing.get_origin(args[0])
        if origin is tuple or hint is tuple:
            return tuple(tuple(x) if isinstance(x, list) else x for x in value)
    return value
