"""Meshes and the logical-axis rules table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jinfer.buckets import Buckets
from jinfer.engine import Engine
from jinfer.errors import MeshError, ShardingError
from jinfer.sharding import ShardingRules, make_mesh, parse_mesh_spec, tree_shardings


def test_make_mesh_shapes_and_all_devices():
    mesh = make_mesh("data=2,model=4")
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert dict(make_mesh("data=-1").shape) == {"data": 8}
    assert dict(make_mesh("data=2,model=-1").shape) == {"data": 2, "model": 4}
    assert parse_mesh_spec({"a": 1, "b": 8}) == {"a": 1, "b": 8}


@pytest.mark.parametrize(
    "spec,match",
    [
        ("data=3", "needs 3 devices but 8 are available"),
        ("data=3,model=-1", "not divisible"),
        ("data=-1,model=-1", "only one axis may be -1"),
        ("data=2,data=4", "appears twice"),
        ("data:2", "cannot parse"),
        ("data=0", "sizes are >= 1 or -1"),
        ("a=1,b=1,c=2,d=4", "at most 3"),
    ],
)
def test_make_mesh_errors_name_the_spec(spec, match):
    with pytest.raises(MeshError, match=match):
        make_mesh(spec)


def test_rules_reject_two_logical_axes_on_one_mesh_axis():
    rules = ShardingRules()
    assert rules.spec(("batch", "length", "embed")) == P("data", None, None)
    with pytest.raises(ShardingError, match="'mlp' and 'heads' both map to mesh axis 'model'"):
        rules.spec(("mlp", "heads"), name="w")
    with pytest.raises(ShardingError, match="listed more than once"):
        ShardingRules((("mlp", "model"), ("mlp", None)))


def test_rules_drop_axes_that_do_not_divide_or_are_absent():
    mesh = make_mesh("data=2,model=4")
    rules = ShardingRules()
    # 6 kv heads do not split 4 ways: replicated; 8 do.
    assert rules.spec(("embed", "kv_heads", "head_dim"), (64, 6, 16), mesh) == P(None, None, None)
    assert rules.spec(("embed", "kv_heads", "head_dim"), (64, 8, 16), mesh) == P(None, "model", None)
    only_data = make_mesh("data=-1")
    assert rules.spec(("embed", "mlp"), (64, 128), only_data) == P(None, None)
    assert rules.replace(mlp=None).spec(("embed", "mlp")) == P(None, None)
    assert rules.replace(embed=("data", "model")).spec(("embed",), (64,), mesh) == P(("data", "model"))


def test_path_rules_fallback_for_unannotated_params():
    params = {"dense": {"kernel": np.zeros((16, 32)), "bias": np.zeros((32,))}, "out": np.zeros((32, 8))}
    mesh = make_mesh("data=2,model=4")
    path_rules = [(r"dense/kernel$", ("embed", "mlp")), (r"^out$", ("mlp", "classes"))]
    shardings = tree_shardings(params, mesh, ShardingRules(), path_rules)
    assert shardings["dense"]["kernel"].spec == P(None, "model")
    assert shardings["dense"]["bias"].spec == P(None)  # unmatched: replicated
    assert shardings["out"].spec == P("model", None)


def test_engine_with_plain_callable_and_path_sharded_params():
    """An unannotated model (plain apply fn) sharded by path rules gives the unsharded result."""
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.normal(size=(8, 32)).astype(np.float32),
        "w2": rng.normal(size=(32, 3)).astype(np.float32),
    }

    def forward(p, x, mask):
        h = jnp.tanh(x @ p["w1"]) * mask[..., None]
        return h.sum(1) @ p["w2"]

    mesh = make_mesh("data=2,model=4")
    shardings = tree_shardings(
        params, mesh, ShardingRules(), [(r"w1", ("embed", "mlp")), (r"w2", ("mlp", None))]
    )
    buckets = Buckets(batch_sizes=(2, 4), seq_lens=(8,))
    kw = {"example_shape": (8,), "input_dtype": np.float32}
    sharded = Engine(forward, params, buckets=buckets, mesh=mesh, param_shardings=shardings, **kw)
    plain = Engine(forward, params, buckets=buckets, **kw)
    examples = [rng.normal(size=(n, 8)).astype(np.float32) for n in (3, 8, 5)]
    for a, b in zip(sharded.predict(examples), plain.predict(examples), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert sharded.params["w1"].addressable_shards[0].data.shape == (8, 8)
    assert jax.device_count() == 8


def test_replace_refuses_an_unknown_logical_axis_and_extend_adds_one():
    """A misspelt name in `replace` was added as a new, unused axis while the axis meant kept its
    mapping (the MLP stayed sharded); now it is a ShardingError naming it and the known axes."""
    rules = ShardingRules()
    with pytest.raises(ShardingError) as info:
        rules.replace(mpl=None)
    msg = str(info.value)
    assert "unknown logical axis 'mpl' (did you mean 'mlp'?)" in msg
    assert "known logical axes: batch, embed, mlp," in msg and "rules.extend(mpl=...)" in msg
    with pytest.raises(ShardingError, match=r"unknown logical axes 'mpl' \(did you mean 'mlp'\?\), 'zz';"):
        rules.replace(mpl=None, zz="model", heads=None)
    assert rules.spec(("embed", "mlp")) == P(None, "model")  # the table is unchanged
    extended = rules.extend(conv_out="model")
    assert extended.spec(("embed", "conv_out")) == P(None, "model")
    assert extended.replace(conv_out=None).spec(("conv_out",)) == P(None)
    with pytest.raises(ShardingError, match=r"logical axes \['mlp'\] are already in the table"):
        rules.extend(mlp=None)
