"""restore_checkpoint + Engine.from_flax on checkpoints written by real training loops (optax, Orbax).

The Linen and NNX models below are written the way research code is: BatchNorm + Dropout, a train
flag, optax adam, a CheckpointManager saving every step.
"""

import dataclasses
import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import jinfer
from jinfer.errors import CheckpointKeyError, CheckpointNotFoundError, ConfigError
from jinfer.sharding import make_mesh
from jinfer.training_checkpoint import checkpoint_steps, restore_checkpoint

IMAGE = (16, 16, 3)
HIDDEN = 256  # a 256x256 Dense: enough bytes that reading the optimizer state would show


# -- Linen: ResNet-style CNN with BatchNorm and Dropout -------------------------------------------
class ResBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool):
        y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
        y = nn.BatchNorm(use_running_average=not train)(y)
        return nn.relu(x + y)


class ResNet(nn.Module):
    num_classes: int = 10
    width: int = 8

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.Conv(self.width, (3, 3))(x))
        x = ResBlock(self.width)(x, train)
        x = nn.Dense(HIDDEN)(x.mean(axis=(1, 2)))
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        x = nn.Dense(HIDDEN)(x)
        return nn.Dense(self.num_classes)(nn.relu(x))


class TrainState(train_state.TrainState):
    batch_stats: dict


def _batches(seed=0, n=3, batch=8):
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(size=(batch, *IMAGE)).astype(np.float32), rng.integers(0, 10, size=batch))
        for _ in range(n)
    ]


@jax.jit
def _linen_step(state, images, labels, key):
    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"])


@pytest.fixture(scope="module")
def linen_run(tmp_path_factory):
    """Trains 3 steps, saving every step; returns (checkpoint dir, final state)."""
    model = ResNet()
    variables = model.init(jax.random.key(0), jnp.zeros((1, *IMAGE)), train=False)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.adam(1e-2),
        batch_stats=variables["batch_stats"],
    )
    ckpt = tmp_path_factory.mktemp("linen") / "ckpt"
    with ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(max_to_keep=5)) as mngr:
        for step, (images, labels) in enumerate(_batches()):
            state = _linen_step(state, images, labels, jax.random.key(step))
            mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    return ckpt, state


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_linen_restore_latest_reads_only_selected(linen_run):
    ckpt, state = linen_run
    assert checkpoint_steps(ckpt) == [0, 1, 2]
    everything = restore_checkpoint(ckpt, select=("params", "batch_stats", "opt_state", "step"))  # warms up
    start = _rchar()
    variables = restore_checkpoint(ckpt, select=("params", "batch_stats"))
    partial_read = _rchar() - start
    start = _rchar()
    restore_checkpoint(ckpt, select=("params", "batch_stats", "opt_state", "step"))
    full_read = _rchar() - start
    assert set(variables) == {"params", "batch_stats"}
    for got, want in zip(
        jax.tree.leaves(variables), jax.tree.leaves((state.batch_stats, state.params)), strict=True
    ):
        assert np.array_equal(np.asarray(got), np.asarray(want))  # latest step = the final state
    params_bytes = _nbytes(variables)
    opt_bytes = _nbytes(everything["opt_state"])
    assert opt_bytes >= 2 * _nbytes(variables["params"])  # adam: mu and nu
    # Bytes read through read(2) (/proc/self/io rchar): the selected arrays plus metadata, not the
    # optimizer state; the full restore reads both.
    # (Orbax compresses the data, so the full read is below the in-memory total.)
    assert partial_read < params_bytes + opt_bytes // 4, (partial_read, params_bytes, opt_bytes)
    assert full_read - partial_read > opt_bytes // 4, (full_read, partial_read, opt_bytes)


@pytest.mark.parametrize("mesh_spec", [None, "data=2,model=4"])
def test_linen_engine_equals_apply_in_eval_mode(linen_run, mesh_spec):
    ckpt, _ = linen_run
    mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    variables = restore_checkpoint(ckpt, select=("params", "batch_stats"), mesh=mesh)
    model = ResNet()
    images = _batches(seed=5, n=1, batch=7)[0][0]
    want = np.asarray(model.apply(variables, images, train=False))
    engine = jinfer.Engine.from_flax(
        model, variables, example=images[0], mesh=mesh, apply_kwargs={"train": False}
    )
    got = np.stack(engine.predict(list(images)))
    assert got.shape == (7, 10) and got.dtype == np.float32
    # Padding rows and batch sizes change only the summation order (sharded: also the layout).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if mesh is not None:
        inputs, _ = engine._abstract_inputs((8, None))
        assert inputs.sharding.spec[0] == ("data", "model")  # data-parallel default: all devices
        leaf = jax.tree.leaves(engine.params)[0]
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_linen_bf16_restore_equals_cast_and_rules_shard_on_restore(linen_run):
    ckpt, _ = linen_run
    f32 = restore_checkpoint(ckpt, select="params")
    mesh = make_mesh("data=2,model=4")
    bf16 = restore_checkpoint(
        ckpt, select="params", dtype=jnp.bfloat16, mesh=mesh, rules=[(r"Dense_0/kernel$", ("embed", "mlp"))]
    )
    for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16), strict=True):
        assert b.dtype == jnp.bfloat16
        assert np.array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))
    kernel = bf16["params"]["Dense_0"]["kernel"]  # [8, 256]: "mlp" -> mesh axis "model"
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(8, HIDDEN // 4)}  # each device: its slice
    bias = bf16["params"]["Dense_0"]["bias"]
    assert bias.sharding.is_fully_replicated and len(bias.sharding.device_set) == 8


def test_training_mode_error_names_the_flag(linen_run):
    ckpt, _ = linen_run
    variables = restore_checkpoint(ckpt)
    with pytest.raises(ConfigError, match=r"apply_kwargs=\{'train': False\}"):
        jinfer.Engine.from_flax(ResNet(), variables, example=np.zeros(IMAGE, np.float32))
    with pytest.raises(ConfigError, match=r"apply_kwargs=\{'train': False\}"):  # variable sizes too
        jinfer.Engine.from_flax(
            ResNet(),
            variables,
            example=np.zeros(IMAGE, np.float32),
            variable_axes={0: "height", 1: "width"},
            dim_buckets={"height": (8, 16), "width": (8, 16)},
        )


def test_half_written_latest_step_is_skipped_with_a_warning(linen_run, tmp_path):
    ckpt, _ = linen_run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt, copy)
    # What interrupted saves leave behind: Orbax's temporary directory, and a step directory whose
    # finalisation never happened (no step metadata, no item metadata).
    shutil.copytree(copy / "2", copy / "3.orbax-checkpoint-tmp-1733212345")
    shutil.copytree(copy / "2", copy / "4")
    (copy / "4" / "_CHECKPOINT_METADATA").unlink()
    (copy / "4" / "commit_success.txt").unlink(missing_ok=True)
    (copy / "4" / "default" / "_METADATA").unlink()
    with pytest.warns(UserWarning, match=r"skipping half-written step\(s\) 3 .*4 .*restoring step 2"):
        variables = restore_checkpoint(copy)
    want = restore_checkpoint(ckpt, step=2)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(want), strict=True)
    )
    assert checkpoint_steps(copy) == [0, 1, 2]
    with pytest.raises(
        CheckpointNotFoundError, match=r"no complete step 4 \(step 4 is half-written.*\[0, 1, 2\]"
    ):
        restore_checkpoint(copy, step=4)


def test_missing_key_and_step_list_what_exists(linen_run):
    ckpt, _ = linen_run
    with pytest.raises(CheckpointKeyError, match=r"'batch_stat'.*batch_stats, opt_state, params, step"):
        restore_checkpoint(ckpt, select=("params", "batch_stat"))
    with pytest.raises(CheckpointKeyError, match="keys at params: Conv_0, Dense_0"):
        restore_checkpoint(ckpt, select="params/conv")
    with pytest.raises(CheckpointNotFoundError, match=r"available steps: \[0, 1, 2\]"):
        restore_checkpoint(ckpt, step=9)
    one_step = restore_checkpoint(ckpt / "1", select="params")  # a step directory directly
    assert set(one_step) == {"params"}


# -- NNX: the same with nnx.BatchNorm + nnx.Dropout and an nnx.Optimizer ------------------------
class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, num_classes: int = 10, width: int = 8):
        self.conv = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(width, rngs=rngs)
        self.hidden = nnx.Linear(width, HIDDEN, rngs=rngs)
        self.dropout = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = self.dropout(nnx.relu(self.hidden(x.mean(axis=(1, 2)))))
        return self.out(x)


@nnx.jit
def _nnx_step(model, optimizer, images, labels):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    ckpt = tmp_path_factory.mktemp("nnx") / "ckpt"
    with ocp.CheckpointManager(ckpt) as mngr:
        for step, (images, labels) in enumerate(_batches(seed=1)):
            model.train()
            _nnx_step(model, optimizer, images, labels)
            state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
            mngr.save(step, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    model.eval()
    return ckpt, model


@pytest.mark.parametrize("mesh_spec", [None, "data=2,model=4"])
def test_nnx_restore_and_engine_equal_eval_mode(nnx_run, mesh_spec):
    ckpt, trained = nnx_run
    mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    start = _rchar()
    everything = restore_checkpoint(ckpt, select=("model", "optimizer"), mesh=mesh)
    full_read, start = _rchar() - start, _rchar()
    restored = restore_checkpoint(ckpt, select="model", mesh=mesh)
    # The optimizer's mu/nu are not read.
    assert full_read - (_rchar() - start) > _nbytes(everything["optimizer"]) // 4
    assert set(restored) == {"model"} and "bn" in restored["model"]
    abstract = nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0)))  # no init cost: weights come from disk
    images = _batches(seed=6, n=1, batch=5)[0][0]
    engine = jinfer.Engine.from_flax(abstract, restored["model"], example=images[0], mesh=mesh)
    got = np.stack(engine.predict(list(images)))
    want = np.asarray(trained(images))  # the trained model in eval mode
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    bf16 = restore_checkpoint(ckpt, select="model/bn", dtype="bfloat16")["model"]["bn"]
    assert np.array_equal(
        np.asarray(bf16["mean"]["value"]), np.asarray(trained.bn.mean[...].astype(jnp.bfloat16))
    )


def test_nnx_variables_for_the_wrong_subtree_list_the_modules_keys(nnx_run):
    ckpt, _ = nnx_run
    restored = restore_checkpoint(ckpt, select="model")
    with pytest.raises(ConfigError, match=r"top-level keys are \['bn', 'conv', 'dropout', 'hidden', 'out'\]"):
        jinfer.Engine.from_flax(NNXNet(nnx.Rngs(0)), restored, example=np.zeros(IMAGE, np.float32))


def test_freeze_an_nnx_model_with_dropout_rngs_serves(nnx_run, tmp_path):
    """An NNX module with Dropout(rngs=...) saved as nnx.state(model) holds PRNG keys, which no
    file format stores as such: freeze leaves them out (named in the meta; inference draws
    nothing) and the frozen variables serve as the trained model in eval mode."""
    from jinfer.training_checkpoint import freeze_checkpoint

    ckpt, trained = nnx_run
    out = freeze_checkpoint(ckpt, tmp_path / "frozen", select="model")
    meta = json.loads((out / "config.json").read_text())
    assert meta["dropped_prng_keys"] and all("dropout" in k for k in meta["dropped_prng_keys"])
    variables = jinfer.load_variables(out)
    abstract = nnx.eval_shape(lambda: NNXNet(nnx.Rngs(0)))
    images = _batches(seed=6, n=1, batch=3)[0][0]
    engine = jinfer.Engine.from_flax(abstract, variables["model"], example=images[0])
    np.testing.assert_allclose(np.stack(engine.predict(list(images))), np.asarray(trained(images)), atol=1e-5)


def test_freeze_cli_writes_a_model_dir_that_serves(linen_run, tmp_path):
    ckpt, _ = linen_run
    out = tmp_path / "frozen"
    cmd = [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "off", "freeze", str(ckpt), str(out)]
    result = subprocess.run(
        [*cmd, "--select", "params,batch_stats", "--dtype", "bfloat16"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (out / "integrity.json").is_file() and (out / ".jinfer_complete").is_file()
    variables = jinfer.load_variables(out)
    want = restore_checkpoint(ckpt, dtype="bfloat16")
    assert jax.tree.structure(variables) == jax.tree.structure(want)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(want), strict=True)
    )
    result = subprocess.run([*cmd, "--select", "opt_stat"], capture_output=True, text=True)
    assert result.returncode == 2 and "opt_state" in result.stderr
    # A variables directory is not a model directory: inspecting (or loading) it says what it is.
    inspect = [sys.executable, "-m", "jinfer.cli", "inspect", str(out)]
    result = subprocess.run(inspect, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "holds frozen Flax variables" in result.stderr and "jinfer.load_variables" in result.stderr


def test_freeze_with_a_registered_model_class_is_a_model_dir(tmp_path):
    from jinfer.checkpoint import load_model_dir
    from jinfer.modeling import FlaxModel
    from jinfer.models.classifiers import TextClassifierConfig
    from jinfer.training_checkpoint import freeze_checkpoint

    config = TextClassifierConfig(vocab_size=32, embed_dim=8, hidden_dim=16, num_layers=1, num_classes=3)
    params = FlaxModel.from_name("TextClassifier", config).init_params(seed=1)
    state = {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": 7}
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(7, args=ocp.args.StandardSave(state))
        mngr.wait_until_finished()
    out = freeze_checkpoint(
        tmp_path / "ckpt", tmp_path / "model", model_class="TextClassifier", config=config
    )
    model, restored, meta = load_model_dir(out)
    assert meta["model_class"] == "TextClassifier" and model.config == config
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True)
    )
    with pytest.raises(ConfigError, match="select='params' only"):
        freeze_checkpoint(
            tmp_path / "ckpt",
            tmp_path / "m2",
            ("params", "step"),
            model_class="TextClassifier",
            config=config,
        )
    # params of another shape of model: refused before anything is written (it could never load)
    other = dataclasses.replace(config, num_layers=2)
    with pytest.raises(ConfigError, match=r"as TextClassifier: the parameters do not match.*missing"):
        freeze_checkpoint(tmp_path / "ckpt", tmp_path / "m3", model_class="TextClassifier", config=other)
    assert not (tmp_path / "m3").exists()
    (tmp_path / "bad.json").write_text("{")
    cmd = [sys.executable, "-m", "jinfer.cli", "--compilation-cache", "off", "freeze", str(tmp_path / "ckpt")]
    cmd += [str(tmp_path / "m4"), "--model-class", "TextClassifier", "--config", str(tmp_path / "bad.json")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 2 and "bad.json is not valid JSON" in result.stderr, result.stderr


def test_composite_items_and_a_plain_orbax_checkpoint(tmp_path):
    rng = np.random.default_rng(4)
    state = {
        "params": {"w": rng.normal(size=(4, 4)).astype(np.float32)},
        "opt_state": {"mu": np.ones((4, 4))},
    }
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "extra")) as mngr:
        mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave({})))
        mngr.wait_until_finished()
    found = restore_checkpoint(tmp_path / "ckpt", select="params")["params"]["w"]  # found in item "state"
    assert np.array_equal(found, state["params"]["w"])
    by_item = restore_checkpoint(tmp_path / "ckpt", select="state/params")["state"]["params"]["w"]
    assert np.array_equal(by_item, state["params"]["w"])
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "plain", state)
        ckptr.wait_until_finished()
    plain = restore_checkpoint(tmp_path / "plain", select="params", dtype="bfloat16")["params"]["w"]
    assert plain.dtype == jnp.bfloat16 and np.array_equal(plain, state["params"]["w"].astype(jnp.bfloat16))
