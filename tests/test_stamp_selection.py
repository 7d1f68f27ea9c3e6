"""Issue 17's STAMP pieces: per-channel target statistics (against a plain computation),
the straight-through top-k gates, per-layer selection, the E[pi] variation diagnostic,
the held-out reference/target split, and the baselines at STAMP's widths (a short job)."""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from test_stamp import TinyNet, _tiny_problem  # tests/ is on sys.path (pytest's prepend import mode)
from test_stamp_job import stamp_config
from conftest import fast_jit

from jaxcompress.data import load_dataset
from jaxcompress.models import describe
from jaxcompress.stamp import GroupLayout, MaskGenerator, Stamp
from jaxcompress.stamp import deploy as D
from jaxcompress.stamp.channel_stats import channel_statistics, standardized
from jaxcompress.stamp.job import load_experiments
from jaxcompress.stamp.meta import straight_through_top_k


def test_channel_statistics_equal_a_plain_computation():
    model = TinyNet()
    table = describe(model, (8, 8, 3))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    bs = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(jax.random.key(1), v.shape), variables["batch_stats"])
    variables = {**variables, "batch_stats": bs}
    layout = GroupLayout(table, (0, 1))
    x = np.asarray(jax.random.normal(jax.random.key(2), (6, 8, 8, 3)), np.float64)
    y = np.array([0, 1, 2, 0, 1, 2])
    stats = [np.asarray(s) for s in jax.jit(lambda v: channel_statistics(layout, v, jnp.asarray(x, jnp.float32),
                                                                         jnp.asarray(y)))(variables)]

    # the same network written out in numpy (float64), gates g1, g2 on the two groups
    p, s = jax.tree.map(np.asarray, variables["params"]), jax.tree.map(np.asarray, bs)
    names = sorted(p)  # BatchNorm_0, Conv_0, Conv_1, Dense_0

    def conv(x, k, stride=1, b=None):  # SAME padding, as XLA pads it (the extra row/column at the end)
        kh, kw = k.shape[:2]
        total = max((-(-x.shape[1] // stride) - 1) * stride + kh - x.shape[1], 0)
        pad = (total // 2, total - total // 2)
        xp = np.pad(x, ((0, 0), pad, pad, (0, 0)))
        out = np.stack([np.stack([np.einsum("nhwc,hwco->no", xp[:, i:i + kh, j:j + kw], k)
                                  for j in range(0, x.shape[2], stride)], 1)
                        for i in range(0, x.shape[1], stride)], 1)
        return out if b is None else out + b

    bn, bn_s = p[names[0]], s[names[0]]

    def forward(g1, g2):  # a group's mask multiplies the output of each of its members (conv and BN)
        c1 = conv(x, p[names[1]]["kernel"]) * g1
        b1 = (c1 - bn_s["mean"]) / np.sqrt(bn_s["var"] + 1e-5) * bn["scale"] + bn["bias"]
        h = np.maximum(b1 * g1, 0)
        c2 = conv(h, p[names[2]]["kernel"], 2, p[names[2]]["bias"])
        out = np.maximum(c2 * g2, 0).mean((1, 2)) @ p[names[3]]["kernel"] + p[names[3]]["bias"]
        logp = out - out.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        return -logp[np.arange(len(y)), y].mean(), (c1, b1, c2)

    ones1, ones2 = np.ones(8), np.ones(12)
    _, (c1, b1, c2) = forward(ones1, ones2)
    # group 0's members: the conv and its BatchNorm (mean over members); group 1: the second conv
    want_mean = [(c1.reshape(-1, 8).mean(0) + b1.reshape(-1, 8).mean(0)) / 2, c2.reshape(-1, 12).mean(0)]
    want_std = [(c1.reshape(-1, 8).std(0) + b1.reshape(-1, 8).std(0)) / 2, c2.reshape(-1, 12).std(0)]
    eps = 1e-5  # saliency |dL/dg| by central differences
    sal = [np.array([abs(forward(ones1 + eps * e, ones2)[0] - forward(ones1 - eps * e, ones2)[0]) / (2 * eps)
                     for e in np.eye(8)]),
           np.array([abs(forward(ones1, ones2 + eps * e)[0] - forward(ones1, ones2 - eps * e)[0]) / (2 * eps)
                     for e in np.eye(12)])]
    for g in range(2):
        np.testing.assert_allclose(stats[g][:, 0], want_mean[g], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[g][:, 1], want_std[g], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(stats[g][:, 2], sal[g], rtol=2e-3, atol=1e-6)
    z = [np.asarray(v) for v in standardized([jnp.asarray(v) for v in stats])]
    for v in z:
        np.testing.assert_allclose(v.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(v.std(0), 1, atol=1e-3)


def test_straight_through_top_k_keeps_exactly_k_and_passes_gradients():
    gates = jnp.array([0.3, 0.9, 0.1, 0.9, 0.5, 0.0])
    hard = straight_through_top_k(gates, 3)
    np.testing.assert_array_equal(np.asarray(hard), [0, 1, 0, 1, 1, 0])  # ties: the lower index first
    w = jnp.arange(6.0) + 1
    np.testing.assert_allclose(jax.grad(lambda g: (w * straight_through_top_k(g, 3)).sum())(gates), w)
    for k in range(7):  # exactly k, whatever the gates (ties included)
        assert float(straight_through_top_k(jnp.zeros(6), k).sum()) == k


def test_per_layer_selection_meets_its_counts_and_the_meta_step_trains():
    """A Stamp with keep_counts and per-channel statistics: masks of exactly those counts in
    meta-training (sampled) and at deployment, and a meta step runs and moves the generator."""
    stamp, sampler, _ = _tiny_problem("fomaml")
    counts = (3, 5)
    stamp = Stamp(**{**{f: getattr(stamp, f) for f in stamp.__dataclass_fields__},
                     "keep_counts": counts, "channel_stats": True,
                     "generator": MaskGenerator(group_widths=stamp.layout.widths, hidden=16, stat_features=3)})
    sampler.set_images = True
    tasks = sampler.sample(0, 2)
    state = stamp.create_state(jax.random.key(0), tasks["set_x"][0], tasks["set_y"][0], optax.adam(0.01),
                               tasks["set_images"][0])
    a, b = stamp.kumaraswamy_params(state.params, tasks["set_x"][0], tasks["set_y"][0], tasks["set_images"][0])
    masks = stamp.sample_masks(jax.random.key(1), a, b)
    for g, k in zip(stamp.layout.groups, counts):
        for path in stamp.layout.table.mask_paths(g):
            leaf = masks
            for name in path:
                leaf = leaf[name]
            assert float(leaf.sum()) == k and set(np.unique(np.asarray(leaf))) <= {0.0, 1.0}
    new_state, info = fast_jit(stamp.meta_step)(state, tasks)
    assert np.isfinite(float(info["query_loss"]))
    moved = jax.tree.map(lambda u, v: float(jnp.abs(u - v).max()), new_state.params["generator"],
                         state.params["generator"])
    assert max(jax.tree.leaves(moved)) > 0
    group_masks, probs = D.stamp_masks(stamp, new_state.params, tasks["set_x"][0], tasks["set_y"][0], mode="budget",
                                       threshold=0.0, budget=1.0, metric="params", set_images=tasks["set_images"][0])
    assert [int(m.sum()) for m in group_masks] == list(counts)
    for m, p in zip(group_masks, probs):  # the highest E[pi] kept
        assert p[m > 0].min() >= p[m == 0].max()
    with pytest.raises(ValueError, match="pass the set's images"):
        stamp.keep_probabilities(new_state.params, tasks["set_x"][0], tasks["set_y"][0])


def test_keep_prob_variation_by_hand():
    sets = [[np.array([0.2, 0.8]), np.array([0.5])], [np.array([0.4, 0.8]), np.array([0.7])]]
    masks = [[np.array([0, 1]), np.array([1])], [np.array([1, 1]), np.array([0])]]
    v = D.keep_prob_variation(sets, masks)
    # std across the 2 sets per channel: 0.1, 0, 0.1 -> mean 1/15
    assert v["across_sets"] == pytest.approx(0.2 / 3)
    # means per channel: (0.3, 0.8) | (0.6): std within groups 0.25 and 0, weighted 2:1
    assert v["across_channels"] == pytest.approx(2 * 0.25 / 3)
    assert v["ratio"] == pytest.approx((0.2 / 3) / (0.5 / 3))
    assert v["mask_agreement"] == pytest.approx(1 / 3)  # kept {1, 2} vs {0, 1}: one of three
    assert D.undecided_share([np.array([0.05, 0.5]), np.array([0.95])]) == pytest.approx(1 / 3)


def test_no_target_class_is_seen_in_meta_training():
    c = stamp_config()
    ref, tgt = load_experiments(c)
    ds = load_dataset("digits", image_size=28)
    label_of = {}
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        for img, lab in zip(x, y):
            label_of.setdefault(hashlib.sha1(img.tobytes()).hexdigest(), set()).add(int(lab))
    for x, classes in ((ref.train[0], c.stamp.reference_classes), (ref.val[0], c.stamp.reference_classes),
                       (tgt.train[0], c.stamp.target.classes)):
        seen = set().union(*(label_of[hashlib.sha1(img.tobytes()).hexdigest()] for img in x))
        assert seen == set(classes)


def test_meta_validation_deploys_the_best_checkpoint(tmp_path, monkeypatch):
    """Meta-training with held-out validation tasks returns the meta-parameters of the
    checkpoint that scored best on them (scores recomputed here)."""
    from jaxcompress.stamp.meta import BEST_CHECKPOINT, meta_train
    from jaxcompress.train.metrics import read_metrics
    jit = jax.jit  # meta_train's jits without XLA's backend optimisations (fast_jit): half the compile time
    monkeypatch.setattr(jax, "jit", lambda f, **kw: jit(f, compiler_options={"xla_backend_optimization_level": 0},
                                                         **kw))
    stamp, sampler, _ = _tiny_problem("fomaml")
    held_out = sampler.sample(10 ** 6, 4)  # tasks no meta step draws
    kwargs = dict(tasks_per_step=2, learning_rate=0.05, workdir=str(tmp_path), seed=0, checkpoint_every=1,
                  log_every=1, validation_tasks=held_out)
    state, info = meta_train(stamp, sampler, num_steps=3, **kwargs)
    scores = {r["step"]: r["val_query_accuracy"] for r in read_metrics(str(tmp_path)) if "val_query_accuracy" in r}
    assert sorted(scores) == [1, 2, 3]
    best = max(scores, key=lambda k: (scores[k], -k))  # the first step reaching the best score
    assert info["best_step"] == best and info["val_accuracy"] == pytest.approx(scores[best])
    keys = jax.random.split(jax.random.key(0), 4)
    score = jax.jit(lambda p: jax.vmap(stamp.task_loss, in_axes=(None, 0, 0))(
        p, jax.tree.map(jnp.asarray, held_out), keys)[1]["query_accuracy"].mean())
    assert float(score(state.params)) == pytest.approx(scores[best])  # the returned params are that checkpoint's
    assert (tmp_path / BEST_CHECKPOINT / str(best)).is_dir()


def test_counts_penalty_by_hand_and_refused_without_per_layer_selection():
    from configs import default
    from jaxcompress import schema
    from jaxcompress.errors import ConfigError
    from jaxcompress.stamp import SparsityObjective
    from jaxcompress.stamp.kumaraswamy import kumaraswamy_mean
    stamp, _, _ = _tiny_problem()
    layout = stamp.layout  # widths (8, 12)
    a = [jnp.full((8,), 2.0), jnp.full((12,), 0.5)]
    b = [jnp.full((8,), 1.0), jnp.full((12,), 3.0)]
    obj = SparsityObjective(kl_weight=0.0, budget_weight=2.0, penalty="counts", counts=(3, 5))
    reg, _ = obj(layout, a, b)
    e = [8 * float(kumaraswamy_mean(2.0, 1.0)), 12 * float(kumaraswamy_mean(0.5, 3.0))]
    assert float(reg) == pytest.approx(2.0 * (abs(e[0] - 3) / 8 + abs(e[1] - 5) / 12) / 2, rel=1e-5)
    with pytest.raises(ConfigError, match="selection=per_layer"):
        SparsityObjective(penalty="counts")
    c = default.get_config()
    c.job, c.stamp.budget_penalty = "stamp", "counts"
    with pytest.raises(ConfigError, match="stamp.budget_penalty.*stamp.selection"):
        schema.validate(c)
    c.stamp.selection = "per_layer"
    schema.validate(c)
