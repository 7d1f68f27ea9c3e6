"""Data parallelism: a train step on an 8-device ('data',) mesh computes the same
numbers as on one device (global-batch loss and BatchNorm statistics).

The 8 CPU devices need XLA_FLAGS before JAX starts, so the steps run in a
subprocess that prints its results as JSON; the assertions are made here.

The images are 8x8 (ResNet-20 takes any size) and the learning rate small: the
two runs differ by float32 summation order (~1e-7), and a ReLU input that close
to 0 can flip sign, which changes a gradient by O(1e-3) - legitimately, but more
than a 1e-5 tolerance allows. Fewer activations make such a flip unlikely and a
small learning rate keeps its effect on the parameters small; per-device
(instead of global-batch) BatchNorm statistics would still change the loss by
O(0.1).
"""
import textwrap

import numpy as np
import pytest


SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from configs import default
    from jaxcompress.data import shard_batch
    from jaxcompress.models import create_model
    from jaxcompress.train import create_train_state, jit_data_parallel, make_mesh, make_optimizer, make_train_step
    from jaxcompress.train.steps import batch_sharded

    assert jax.device_count() == 8, jax.devices()
    model = create_model("resnet20", 10, width_multiplier=0.25)
    cfg = default.get_config().train
    cfg.learning_rate, cfg.schedule = 0.01, "constant"         # SGD, Nesterov 0.9, wd 5e-4
    tx = make_optimizer(cfg, 10)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                "label": rng.integers(0, 10, 16).astype(np.int32)} for _ in range(2)]
    mean, std = np.array([0.5, 0.45, 0.4], np.float32), np.array([0.25, 0.3, 0.2], np.float32)
    step_fn = make_train_step(mean, std)
    # Initial variables drawn with NumPy from the shapes (compiling ResNet-20's init is slow on CPU).
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
    init_rng = np.random.default_rng(1)
    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "'masks'" in name or name.endswith("['scale']") or name.endswith("['var']"):
            return jnp.ones(s.shape, s.dtype)
        if name.endswith("['kernel']"):
            return jnp.asarray(init_rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
        return jnp.zeros(s.shape, s.dtype)  # biases, BatchNorm running means
    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    init = create_train_state(model, tx, (8, 8, 3), seed=0, variables=variables)
    init_host = jax.device_get({"params": init.params, "batch_stats": init.batch_stats})

    def run(mesh):
        # Fresh copy of the same initial state: the jitted step donates its input.
        state = jax.tree.map(lambda a: jnp.array(a, copy=True), init)
        step = jit_data_parallel(step_fn, mesh)
        losses, info = [], {}
        for b in batches:
            sharded = shard_batch(b, batch_sharded(mesh))
            img = sharded["image"]
            info = {"batch_devices": len(img.sharding.device_set),
                    "batch_shards": sorted([list(s.data.shape) for s in img.addressable_shards]),
                    "batch_shard_devices": len({s.device for s in img.addressable_shards}),
                    "batch_spec": str(img.sharding.spec)}
            state, metrics = step(state, sharded)
            losses.append(float(metrics["loss"]))
        kernel = jax.tree.leaves(state.params)[0]
        info["state_replicated"] = bool(kernel.sharding.is_fully_replicated)
        info["state_devices"] = len(kernel.sharding.device_set)
        out = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        flat = {jax.tree_util.keystr(p): np.asarray(v).tolist()
                for p, v in jax.tree_util.tree_flatten_with_path(out)[0]}
        return {"losses": losses, "tree": flat, "step": int(state.step), **info}

    init_flat = {jax.tree_util.keystr(p): np.asarray(v).tolist()
                 for p, v in jax.tree_util.tree_flatten_with_path(init_host)[0]}
    print("RESULT " + json.dumps({"mesh8": run(make_mesh()), "mesh1": run(make_mesh(jax.devices()[:1])),
                                  "init": init_flat}))
''')


@pytest.fixture(scope="module")
def parallel_results(eight_devices):
    return eight_devices(SCRIPT)


def test_batch_is_sharded_over_eight_devices(parallel_results):
    r8, r1 = parallel_results["mesh8"], parallel_results["mesh1"]
    assert r8["batch_devices"] == 8 and r8["batch_shard_devices"] == 8
    assert r8["batch_shards"] == [[2, 8, 8, 3]] * 8  # global batch 16 = 8 x 2
    assert "data" in r8["batch_spec"]
    assert r8["state_replicated"] and r8["state_devices"] == 8
    assert r1["batch_devices"] == 1 and r1["batch_shards"] == [[16, 8, 8, 3]]
    assert r8["step"] == r1["step"] == 2


def test_eight_devices_match_one_device(parallel_results):
    r8, r1, init = parallel_results["mesh8"], parallel_results["mesh1"], parallel_results["init"]
    np.testing.assert_allclose(r8["losses"], r1["losses"], rtol=1e-5, atol=1e-6)
    assert r1["losses"][0] > 0 and np.isfinite(r1["losses"]).all()
    assert set(r8["tree"]) == set(r1["tree"]) == set(init)
    assert any("batch_stats" in k for k in init) and any("params" in k for k in init)
    for key in sorted(init):
        a, b = np.asarray(r8["tree"][key]), np.asarray(r1["tree"][key])
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=key)
    # The two steps really changed params and BatchNorm statistics (the match is not vacuous).
    for col in ("params", "batch_stats"):
        moved = max(np.abs(np.asarray(r1["tree"][k]) - np.asarray(init[k])).max() for k in init if col in k)
        assert moved > 1e-4, col


DONATION_SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp
    from jaxcompress.train.steps import make_mesh, replicated, replicated_copy

    mesh = make_mesh()
    step = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), out_shardings=replicated(mesh), donate_argnums=0)
    out = {}
    for name, place in (("single_device", lambda t: t), ("replicated", lambda t: jax.device_put(t, replicated(mesh)))):
        held = place({"w": jnp.arange(4.0), "b": jnp.ones(())})
        aliased = jax.device_put(held, replicated(mesh), may_alias=False)  # what fit did before
        step(aliased)
        out[name + "_device_put"] = any(x.is_deleted() for x in jax.tree.leaves(held))
        held = place({"w": jnp.arange(4.0), "b": jnp.ones(())})
        new = step(replicated_copy(held, mesh))
        out[name + "_copy"] = any(x.is_deleted() for x in jax.tree.leaves(held))
        out[name + "_values"] = jax.device_get(new["w"]).tolist() + jax.device_get(held["w"]).tolist()
    print("RESULT " + json.dumps(out))
''')


def test_donating_a_replicated_copy_leaves_the_callers_arrays_alive(eight_devices):
    """`fit` donates its state to the step: on 8 devices `device_put(may_alias=False)` of a
    single-device array keeps its buffer as the shard on its own device, so the donation
    deleted the caller's arrays (the quantize job's QAT crash); `replicated_copy` does not."""
    r = eight_devices(DONATION_SCRIPT, timeout=300)
    # r["single_device_device_put"] is True with JAX 0.10: the behaviour the copy guards against
    assert not r["single_device_copy"] and not r["replicated_copy"]
    for name in ("single_device", "replicated"):
        assert r[name + "_values"] == [1.0, 2.0, 3.0, 4.0, 0.0, 1.0, 2.0, 3.0]
