"""BERT encoder: word + position + token-type embeddings, post-LayerNorm blocks, exact (erf) GELU.

Call contract (encoders):
  `Bert(config, rngs=...)(tokens[b, t] int32, mask[b, t] bool, token_type_ids[b, t] | None = None)
     -> hidden[b, t, d]` — the last hidden state (no pooler). Positions are 0..t-1 (right padding,
  as in HF); `mask` marks real tokens: padded keys are never attended, so real tokens' outputs do
  not depend on the padding.

Einsum letters: b batch, t sequence, s key length, d model dim, n heads, h head dim, f mlp.

Parameters. HF names are those of `BertModel` ("bert." prefixed in BertFor* task models; old
checkpoints name LayerNorm params gamma/beta instead of weight/bias). "transpose" = torch Linear
weight [out, in] -> [in, out], then reshape (layers.apply_hf_transform). In the table
E = `embeddings.`, X = `encoder.layer.{i}.`.

| jinfer path                      | shape       | HF tensor                                  | transform |
|----------------------------------|-------------|--------------------------------------------|-----------|
| embed                            | [v, d]      | E word_embeddings.weight                   | none      |
| pos_embed                        | [P, d]      | E position_embeddings.weight               | none      |
| type_embed                       | [T, d]      | E token_type_embeddings.weight             | none      |
| embed_norm/scale, bias           | [d]         | E LayerNorm.weight, .bias                  | none      |
| layers/{i}/attn/q, k, v          | [d, n, h]   | X attention.self.{query,key,value}.weight  | transpose |
| layers/{i}/attn/q_bias, ...      | [n, h]      | X attention.self.{query,key,value}.bias    | reshape   |
| layers/{i}/attn/o                | [n, h, d]   | X attention.output.dense.weight            | transpose |
| layers/{i}/attn/o_bias           | [d]         | X attention.output.dense.bias              | none      |
| layers/{i}/attn_norm/scale, bias | [d]         | X attention.output.LayerNorm.weight, .bias | none      |
| layers/{i}/mlp/up, up_bias       | [d, f], [f] | X intermediate.dense.weight, .bias         | T / none  |
| layers/{i}/mlp/down, down_bias   | [f, d], [d] | X output.dense.weight, .bias               | T / none  |
| layers/{i}/mlp_norm/scale, bias  | [d]         | X output.LayerNorm.weight, .bias           | none      |

The same table as data: `hf_param_map(config)`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jinfer.errors import ConfigError, UnsupportedArchitectureError
from jinfer.models import layers as L
from jinfer.models.registry import ModelSpec, register

_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # name -> tanh approx?


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyperparameters of a BERT encoder (defaults: bert-base-uncased)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    gelu_approximate: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"BertConfig: hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> BertConfig:
        """Maps a Hugging Face BERT config.json."""
        if hf.get("model_type", "bert") != "bert":
            raise UnsupportedArchitectureError(f"BertConfig: model_type {hf.get('model_type')!r} is not bert")
        act = hf.get("hidden_act", "gelu")
        pos_type = hf.get("position_embedding_type", "absolute")
        if act not in _ACTIVATIONS or pos_type != "absolute":
            raise UnsupportedArchitectureError(
                f"BertConfig: hidden_act={act!r}, position_embedding_type={pos_type!r}; supported: "
                f"{sorted(_ACTIVATIONS)} with absolute positions"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            gelu_approximate=_ACTIVATIONS[act],
        )


class BertBlock(nnx.Module):
    """Post-LN block: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = config
        dims = L.AttentionDims(c.hidden_size, c.num_heads, c.num_heads, c.head_dim, True, True)
        self.attn = L.Attention(dims, rngs=rngs)
        self.attn_norm = L.LayerNorm(c.hidden_size, c.layer_norm_eps, rngs=rngs)
        self.mlp = L.GeluMLP(c.hidden_size, c.intermediate_size, c.gelu_approximate, rngs=rngs)
        self.mlp_norm = L.LayerNorm(c.hidden_size, c.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
        """x [b, t, d], attn_mask [b, t, s] bool -> [b, t, d]."""
        q, k, v = self.attn.project(x)
        x = self.attn_norm(x + self.attn.output(L.dot_attention(q, k, v, attn_mask)))
        return self.mlp_norm(x + self.mlp(x))


class Bert(nnx.Module):
    """BERT encoder (see the module docstring for the contract and parameter names)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = config
        self.embed = L.make_param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        self.pos_embed = L.make_param(rngs, (c.max_position_embeddings, c.hidden_size), (None, "embed"))
        self.type_embed = L.make_param(rngs, (c.type_vocab_size, c.hidden_size), (None, "embed"))
        self.embed_norm = L.LayerNorm(c.hidden_size, c.layer_norm_eps, rngs=rngs)
        self.layers = nnx.List([BertBlock(c, rngs=rngs) for _ in range(c.num_layers)])

    def __call__(
        self, tokens: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        """tokens [b, t] int32, mask [b, t] (true = real token), token_type_ids [b, t] -> hidden [b, t, d]."""
        b, t = tokens.shape
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        x = (
            L.embed_lookup(self.embed.get_value(), tokens)
            + L.dense(self.pos_embed.get_value())[:t][None]
            + L.embed_lookup(self.type_embed.get_value(), token_type_ids)
        )
        x = self.embed_norm(x)
        attn_mask = jnp.broadcast_to(mask.astype(bool)[:, None, :], (b, t, t))
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


def hf_param_map(config: BertConfig) -> L.HFParamMap:
    """{jinfer param path: (HF tensor name, transform)} for `BertModel` checkpoints (no prefix)."""
    e = "embeddings."
    out: L.HFParamMap = {
        "embed": (e + "word_embeddings.weight", "reshape"),
        "pos_embed": (e + "position_embeddings.weight", "reshape"),
        "type_embed": (e + "token_type_embeddings.weight", "reshape"),
        "embed_norm/scale": (e + "LayerNorm.weight", "reshape"),
        "embed_norm/bias": (e + "LayerNorm.bias", "reshape"),
    }
    for i in range(config.num_layers):
        hf, jp = f"encoder.layer.{i}.", f"layers/{i}/"
        for name, hf_name in (("q", "query"), ("k", "key"), ("v", "value")):
            out[f"{jp}attn/{name}"] = (f"{hf}attention.self.{hf_name}.weight", "transpose")
            out[f"{jp}attn/{name}_bias"] = (f"{hf}attention.self.{hf_name}.bias", "reshape")
        out[jp + "attn/o"] = (hf + "attention.output.dense.weight", "transpose")
        out[jp + "attn/o_bias"] = (hf + "attention.output.dense.bias", "reshape")
        out[jp + "mlp/up"] = (hf + "intermediate.dense.weight", "transpose")
        out[jp + "mlp/up_bias"] = (hf + "intermediate.dense.bias", "reshape")
        out[jp + "mlp/down"] = (hf + "output.dense.weight", "transpose")
        out[jp + "mlp/down_bias"] = (hf + "output.dense.bias", "reshape")
        for norm, hf_norm in (("attn_norm", "attention.output.LayerNorm"), ("mlp_norm", "output.LayerNorm")):
            out[f"{jp}{norm}/scale"] = (f"{hf}{hf_norm}.weight", "reshape")
            out[f"{jp}{norm}/bias"] = (f"{hf}{hf_norm}.bias", "reshape")
    return out


register(ModelSpec(name="Bert", config_cls=BertConfig, module_cls=Bert, task="encoder", typed_weights=True))
