"""The RL search and STAMP meta-training on 8 simulated devices (issue 19): the
search's evaluation images and the meta step's tasks are split over the ('data',) mesh,
the states replicated, and both compute the numbers they compute on one device.

The 8 CPU devices need XLA_FLAGS before JAX starts, so the searches run in a subprocess
that prints its results as JSON; the assertions are made here. One subprocess runs
every case (LeNet-5, random weights, 64 validation images of 28x28):

* a PPO search (stage 1, channel pruning, stacked evaluation), 2 iterations of 8 actors
  on one device and on the mesh, and the re-ranking of its top candidates on split B;
* adaptive-BatchNorm and per-candidate fine-tune evaluation (ResNet-20 x 0.25 on 8x8
  images: BatchNorm statistics over the images the devices share, SGD on split batches);
* the quantization evaluator (stage 2);
* two STAMP meta steps of 8 tasks (tests/test_stamp.py's tiny problem, first-order).
"""
import textwrap

import numpy as np
import pytest


SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from jaxcompress.models import create_model, describe
    from jaxcompress.pruning import criteria as C
    from jaxcompress.errors import ConfigError
    from jaxcompress.rl import PruneEnv, QuantEnv, channel_ranks
    from jaxcompress.rl import search as S
    from jaxcompress.rl.evaluate import make_prune_evaluator, make_quant_evaluator
    from jaxcompress.rl.ppo import PPO, PPOConfig
    from jaxcompress.rl.env import OBS_DIM
    from jaxcompress.rl.rerank import rerank
    from jaxcompress.train.steps import make_mesh

    assert jax.device_count() == 8, jax.devices()
    mesh, out = make_mesh(), {}
    rng = np.random.default_rng(0)

    def network(name, shape, width=1.0):
        model = create_model(name, 10, width_multiplier=width)
        table = describe(model, shape)
        variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
        return model, table, jax.device_get(variables)

    def data_for(variables, n, shape, train_steps=0):
        x = rng.normal(size=(n,) + shape).astype(np.float32)
        d = dict(variables=variables, images=x, labels=rng.integers(0, 10, n).astype(np.int32))
        if train_steps:
            d["train_images"] = rng.normal(size=(train_steps, 16) + shape).astype(np.float32)
            d["train_labels"] = rng.integers(0, 10, (train_steps, 16)).astype(np.int32)
        return d

    # --- a whole search, one device vs the mesh
    model, table, variables = network("lenet5", (28, 28, 1))
    env = PruneEnv(table, 0.5, 0.0, 0.8)
    ranks = channel_ranks(C.channel_scores(table, variables, "l1"))
    evaluate = make_prune_evaluator(env, model, ranks)
    reward = S.make_reward_fn("acc")
    agent = PPO(PPOConfig(), OBS_DIM)
    data = data_for(variables, 64, (28, 28, 1))
    runs = {}
    for name, m in (("one", None), ("mesh", mesh)):
        res = S.run_search(env, agent, evaluate, reward, data, num_actors=8, episodes=16, seed=0, log_every=0,
                           mesh=m)
        leaves = jax.tree.leaves(jax.device_get(res.state.agent))
        runs[name] = dict(accuracy=res.history["accuracy"], reward=res.history["reward"],
                          values=res.history["values"], best=res.best,
                          agent=[np.asarray(l, np.float64).ravel().tolist() for l in leaves],
                          rerank=rerank(evaluate, reward, res.history, data, 4, m)["best"])
    out["search"] = runs

    # what the compiled iteration is given: images and labels split, variables replicated
    placed = S.place_on_mesh(data, mesh)
    state = S.replicated_copy(S.init_search_state(env, agent, 0), mesh)
    compiled, _ = S._compiled_iteration(S.IterationSpec(env, agent, evaluate, reward, 8), state, placed, mesh)
    (_, data_shardings), _ = compiled.input_shardings
    out["shardings"] = dict(
        images=[list(data_shardings["images"].spec), list(placed["images"].sharding.spec),
                sorted({s.data.shape[0] for s in placed["images"].addressable_shards}),
                len(placed["images"].addressable_shards)],
        labels=list(data_shardings["labels"].spec),
        kernel=list(jax.tree.leaves(data_shardings["variables"])[0].spec))
    try:
        S.place_on_mesh(data_for(variables, 60, (28, 28, 1)), mesh)
        out["indivisible"] = None
    except ConfigError as e:
        out["indivisible"] = str(e)

    # --- adaptive BatchNorm and per-candidate fine-tune (ResNet-20 x 0.25, 8x8 images)
    model, table, variables = network("resnet20", (8, 8, 3), 0.25)
    env = PruneEnv(table, 0.6, 0.0, 0.8)
    ranks = channel_ranks(C.channel_scores(table, variables, "l1"))
    widths = jnp.asarray([[max(1, w // d) for w in table.widths] for d in (1, 2, 3, 4)], jnp.float32)
    d = data_for(variables, 32, (8, 8, 3), train_steps=2)
    fns = dict(bn_adapt=make_prune_evaluator(env, model, ranks, bn_adapt=True),
               finetune=make_prune_evaluator(env, model, ranks, finetune_steps=2, finetune_lr=0.05))
    out["evaluators"] = {k: [np.asarray(jax.jit(f)(widths, S.place_on_mesh(d, m))).tolist() for m in (None, mesh)]
                         for k, f in fns.items()}

    # --- stage 2: the quantization evaluator
    model, table, variables = network("lenet5", (28, 28, 1))
    qenv = QuantEnv(table, 5.0, 2, 8)
    bits = jnp.asarray([[8.0] * 5, [4.0] * 5, [2.0] * 5, [3.0, 8.0, 2.0, 8.0, 4.0]], jnp.float32)
    d = data_for(variables, 64, (28, 28, 1))
    qeval = make_quant_evaluator(qenv, model, None, chunk=2)
    out["quant"] = [np.asarray(jax.jit(qeval)(bits, S.place_on_mesh(d, m))).tolist() for m in (None, mesh)]

    # --- STAMP: two meta steps of 8 tasks, one device vs one task per device
    import sys, tempfile
    sys.path.insert(0, "tests")
    from test_stamp import _tiny_problem
    from jaxcompress.stamp.meta import meta_train
    stamp, sampler, _ = _tiny_problem("fomaml")
    metas = {}
    for name, m in (("one", None), ("mesh", mesh)):
        state, info = meta_train(stamp, sampler, num_steps=2, tasks_per_step=8, learning_rate=0.01,
                                 workdir=tempfile.mkdtemp(), log_every=1, mesh=m)
        metas[name] = dict(devices=info["task_devices"], step=int(state.step),
                           params=[np.asarray(l, np.float64).ravel().tolist() for l in jax.tree.leaves(state.params)],
                           sharding=list(jax.tree.leaves(state.params)[0].sharding.spec) if m is not None else None)
    out["stamp"] = metas
    # what meta_train's step is given on the mesh: the tasks split one per device
    import optax
    from jaxcompress.stamp.meta import meta_step_fn
    step_fn, devices = meta_step_fn(stamp, mesh, 8)
    tasks = sampler.sample(0, 8)
    state = stamp.create_state(jax.random.key(0), tasks["set_x"][0], tasks["set_y"][0], optax.adam(0.01))
    (_, task_shardings, _), _ = step_fn.lower(state, tasks, jnp.zeros((), jnp.int32)).compile().input_shardings
    out["stamp_tasks"] = dict(devices=devices, specs=sorted({str(list(x.spec)) for x in jax.tree.leaves(task_shardings)}))
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def results(eight_devices):
    return eight_devices(SCRIPT)


def test_search_on_the_mesh_computes_what_it_computes_on_one_device(results):
    one, mesh = results["search"]["one"], results["search"]["mesh"]
    assert len(one["accuracy"]) == 16
    # the same candidates (the agents act alike) with the same accuracies: counts of 64 images
    assert one["values"] == mesh["values"]
    np.testing.assert_allclose(mesh["accuracy"], one["accuracy"], atol=1e-6)
    np.testing.assert_allclose(mesh["reward"], one["reward"], atol=1e-6)
    assert all(abs(64 * a - round(64 * a)) < 1e-4 for a in one["accuracy"])
    for a, b in zip(one["agent"], mesh["agent"]):  # after two PPO updates
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert one["best"]["values"] == mesh["best"]["values"]
    assert one["rerank"]["values"] == mesh["rerank"]["values"]
    assert one["rerank"]["accuracy_b"] == pytest.approx(mesh["rerank"]["accuracy_b"], abs=1e-6)


def test_evaluation_images_are_split_over_the_devices_not_replicated(results):
    s = results["shardings"]
    # the compiled iteration's own input sharding, the placed array's, its 8 shards of 64 / 8 rows
    assert s["images"] == [["data"], ["data"], [8], 8]
    assert s["labels"] == ["data"]
    assert s["kernel"] == []  # the network's variables are replicated
    assert "60 examples, not a multiple of the 8 devices" in results["indivisible"]
    assert "\n" not in results["indivisible"]


def test_batchnorm_adapted_and_finetuned_evaluations_on_the_mesh_equal_one_device(results):
    for kind, (one, mesh) in results["evaluators"].items():
        assert len(one) == 4
        # accuracies on 32 images: equal, or one image apart where float rounding flips an argmax
        np.testing.assert_allclose(mesh, one, atol=1 / 32 + 1e-6, err_msg=kind)
        assert sum(abs(a - b) > 1e-6 for a, b in zip(one, mesh)) <= 1, kind


def test_quantization_evaluator_on_the_mesh_equals_one_device(results):
    one, mesh = results["quant"]
    assert len(one) == 4
    np.testing.assert_allclose(mesh, one, atol=1e-6)


def test_stamp_meta_steps_on_the_mesh_equal_one_device(results):
    one, mesh = results["stamp"]["one"], results["stamp"]["mesh"]
    assert (one["devices"], mesh["devices"]) == (1, 8)  # the 8 tasks split one per device
    assert one["step"] == mesh["step"] == 2 and mesh["sharding"] == []
    assert len(one["params"]) == len(mesh["params"]) > 0
    # the meta step meta_train compiles takes every task array split over the devices
    assert results["stamp_tasks"] == {"devices": 8, "specs": ["['data']"]}
    for a, b in zip(one["params"], mesh["params"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
