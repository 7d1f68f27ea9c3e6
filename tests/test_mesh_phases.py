"""The heavy statistics phases run data parallel over a ('data',) mesh and give the
single-device numbers: LASSO's sampled features and Gram matrices (He et al. 2017,
`jaxcompress.pruning.lasso`), activation-range calibration (`calibrate_ranges`) and the
per-layer bit sensitivity of the quantize job (`layer_sensitivity`).

As in test_parallel.py, the 8 CPU devices need XLA_FLAGS before JAX starts, so all the
checks run in one subprocess that prints its results as JSON; the assertions are made
here. The factories of the jitted functions are wrapped in the subprocess to record the
arrays really passed to them (their sharding and per-device shards). Batch sizes are
chosen not to divide by 8 (44 LASSO images, a 20-image calibration batch, 20
sensitivity examples), so the padding and its masking are exercised too.
"""
import textwrap

import numpy as np
import pytest


SCRIPT = textwrap.dedent('''
    import json, types
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from jaxcompress.models import create_model, describe
    from jaxcompress.pruning.lasso import lasso_groups, lasso_prune
    from jaxcompress.pruning.lasso import prune as LP, sampling as LS
    from jaxcompress.quant import calibrate as QC, job as QJ
    from jaxcompress.quant.policy import make_quant
    from jaxcompress.quant.qat import _shared_apply
    from jaxcompress.quant.quantizers import WeightQuantizer
    from jaxcompress.train import make_mesh

    assert jax.device_count() == 8, jax.devices()
    MESHES = {"mesh8": make_mesh(), "none": None}
    seen = []  # (phase, mesh label, placement of the batch array passed to the jitted function)

    def placement(x):
        return {"split_over_data": getattr(x.sharding, "spec", None) == P("data"),
                "devices": len(x.sharding.device_set), "rows": int(x.shape[0]),
                "shard_rows": sorted(int(s.data.shape[0]) for s in x.addressable_shards)}

    def recorder(phase, factory, pick, argnum):
        """`factory` with the jitted function it returns (`pick`) wrapped to record argument `argnum`."""
        def patched(*args, **kwargs):
            out = factory(*args, **kwargs)
            mesh = args[-1] if args and isinstance(args[-1], jax.sharding.Mesh) else kwargs.get("mesh")
            label = "none" if mesh is None else f"mesh{mesh.size}"
            def wrap(fn):
                def call(*a, **k):
                    seen.append((phase, label, placement(a[argnum])))
                    return fn(*a, **k)
                return call
            return pick(out, wrap)
        return patched

    LS._make_sampler = recorder("lasso_sample", LS._make_sampler, lambda out, w: w(out), 1)
    LP.gram_fns = recorder("lasso_gram", LP.gram_fns, lambda out, w: (out[0], w(out[1])), 0)
    QC._batch_stats_fn = recorder("calibrate", QC._batch_stats_fn, lambda out, w: (w(out[0]), out[1]), 1)
    QJ._sensitivity_loss = recorder("sensitivity", QJ._sensitivity_loss, lambda out, w: w(out), 2)

    def tolist(tree):
        return jax.tree.map(lambda a: np.asarray(a, np.float64).tolist(), tree)

    def draw_variables(model, shape, seed):
        """Variables drawn with NumPy from the shapes (compiling ResNet-20's init is slow on CPU)."""
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
        rng = np.random.default_rng(seed)
        def draw(path, s):
            name = jax.tree_util.keystr(path)
            if "'masks'" in name:
                return jnp.ones(s.shape, s.dtype)
            if name.endswith("['scale']") or name.endswith("['var']"):
                return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
            if name.endswith("['kernel']"):
                return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
            return jnp.asarray(0.1 * rng.normal(size=s.shape), s.dtype)  # biases, BatchNorm means
        return jax.tree_util.tree_map_with_path(draw, shapes)

    out = {}
    rng = np.random.default_rng(0)

    # (a) LASSO on LeNet-5, 16x16 inputs: sampled features, Gram matrices, the whole prune.
    lenet = create_model("lenet5", 10)
    table = describe(lenet, (16, 16, 1))
    lv = draw_variables(lenet, (16, 16, 1), 1)
    # 44 images: not a multiple of 8, and more than fc1's 4 x 8 kept inputs, so that its refit is
    # overdetermined (with fewer images than weights, the auto ridge's leave-one-out errors are 0 / 0
    # at ridge 0 and its choice is float noise, on one device as on eight)
    images = rng.normal(size=(44, 16, 16, 1)).astype(np.float32)
    paths = tuple(l.path for l in table.layers if l.in_group in lasso_groups(table))
    kernels = {}
    for name, mesh in MESHES.items():
        sampler = LS._input_sampler(table, images, paths, 10, 0, 16, mesh)  # lasso_prune's compilation
        xs = sampler({k: v for k, v in lv.items()}, ("conv2", "fc1"))
        target, gram = LP.gram_fns(mesh)
        stats = {}
        for p, x in xs.items():
            n = LS.valid_rows(x, images.shape[0], mesh)
            if p not in kernels:  # the same random consumer kernel (r, c, 32) for both runs
                kernels[p] = rng.normal(size=(x.shape[1], x.shape[2], 32)).astype(np.float32)
            W = kernels[p]
            mask = np.ones(32, np.float32)
            Y = target(x, W, mask)
            G, b = gram(x, W, Y, mask)
            stats[p] = {"x": np.asarray(x[:n]).tolist(), "pad_abs": float(np.abs(np.asarray(x[n:])).max(initial=0)),
                        "x_placement": placement(x), "y_placement": placement(Y),
                        "G": np.asarray(G).tolist(), "b": np.asarray(b).tolist()}
        masks, new = lasso_prune(table, lv, images, [3, 8, 60, 42], groups=[0, 1], batch_size=16, mesh=mesh)
        stats["masks"] = [np.asarray(m).tolist() for m in masks]
        stats["kernels"] = {k: np.asarray(v["kernel"]).tolist() for k, v in new["params"].items()}
        out["lasso_" + name] = stats

    # (b) calibration and (c) sensitivity on ResNet-20 (x0.25), 8x8 inputs.
    resnet = create_model("resnet20", 10, width_multiplier=0.25)
    rtable = describe(resnet, (8, 8, 3))
    rv = draw_variables(resnet, (8, 8, 3), 2)
    quantizer = WeightQuantizer("symmetric", "channel")
    apply_fn = _shared_apply(resnet, quantizer)  # the quantized apply layer_sensitivity uses too
    quant = make_quant(rtable, bits_w=6, bits_a=8)
    # one batch of 20 images: padded to 24 on 8 devices, the padding masked out
    batches = [rng.normal(size=(20, 8, 8, 3)).astype(np.float32)]
    for name, mesh in MESHES.items():
        cal = {}
        for method in ("minmax", "percentile", "mse"):
            _, report = QC.calibrate_ranges(apply_fn, {**rv, "quant": quant}, batches, method, percentile=99.0,
                                            mse_grid=50, mesh=mesh)
            cal[method] = report
        out["calibrate_" + name] = cal
    val = (rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 40))
    exp = types.SimpleNamespace(table=rtable, model=resnet, val=val, mean=np.array([0.5, 0.45, 0.4], np.float32),
                                std=np.array([0.25, 0.3, 0.2], np.float32))
    state = types.SimpleNamespace(variables=lambda: dict(rv))
    # Float activations: the weights quantize identically on 8 devices and on 1, but an activation
    # code can round the other way on a float difference of one ulp, and with 2-bit weights such a
    # flip moves the loss by ~1e-3 (activation quantization is checked through the calibration above).
    bits_a = {l.path: 32 for l in rtable.layers}
    for name, mesh in MESHES.items():
        out["sensitivity_" + name] = QJ.layer_sensitivity(exp, state, quantizer, bits_a, (2, 4), 20, 0, mesh=mesh)
    out["seen"] = seen
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def results(eight_devices):
    return eight_devices(SCRIPT)


def _placements(results, phase, label):
    return [p for ph, lab, p in results["seen"] if ph == phase and lab == label]


@pytest.mark.parametrize("phase", ["lasso_sample", "lasso_gram", "calibrate", "sensitivity"])
def test_batches_are_split_over_the_eight_devices(results, phase):
    sharded = _placements(results, phase, "mesh8")
    assert sharded, f"no {phase} call on the 8-device mesh was recorded"
    for p in sharded:
        assert p["split_over_data"] and p["devices"] == 8, p
        assert p["rows"] % 8 == 0 and p["shard_rows"] == [p["rows"] // 8] * 8, p  # 1/8 of the rows each
    for p in _placements(results, phase, "none"):  # the single-device path is today's: one device
        assert not p["split_over_data"] and p["devices"] == 1 and p["shard_rows"] == [p["rows"]], p
    if phase in ("calibrate", "sensitivity"):  # 20 images / examples, padded to 24 (3 per device)
        assert {p["rows"] for p in sharded} == {24}


def test_lasso_statistics_match_one_device(results):
    r8, r1 = results["lasso_mesh8"], results["lasso_none"]
    for path in ("conv2", "fc1"):
        a, b = r8[path], r1[path]
        assert a["x_placement"]["split_over_data"] and a["x_placement"]["devices"] == 8
        assert a["y_placement"]["split_over_data"]
        assert a["x_placement"]["shard_rows"] == [a["x_placement"]["rows"] // 8] * 8
        assert a["pad_abs"] == 0.0  # the padding images' rows are zeros
        x8, x1 = np.asarray(a["x"]), np.asarray(b["x"])
        assert x8.shape == x1.shape and x1.shape[0] == 44 * (10 if path == "conv2" else 1)
        np.testing.assert_allclose(x8, x1, rtol=1e-5, atol=1e-6)
        assert np.abs(x1).max() > 0
        np.testing.assert_allclose(a["G"], b["G"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(a["b"], b["b"], rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(b["G"])).max() > 0
    assert r8["masks"] == r1["masks"]
    assert [int(np.sum(m)) for m in r1["masks"]] == [3, 8, 120, 84]  # groups 0 and 1 pruned
    for k in r1["kernels"]:
        np.testing.assert_allclose(r8["kernels"][k], r1["kernels"][k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_calibration_ranges_match_one_device(results):
    c8, c1 = results["calibrate_mesh8"], results["calibrate_none"]
    for method in ("minmax", "percentile", "mse"):
        assert set(c8[method]) == set(c1[method]) and len(c1[method]) >= 19
        for layer, rec in c1[method].items():
            got = c8[method][layer]
            assert rec["range"] > 0 and got["signed"] == rec["signed"], layer
            if method == "minmax":  # max and min are exact (a max / min over the same values)
                assert got["range"] == rec["range"] and got["max"] == rec["max"] and got["min"] == rec["min"], layer
            else:
                np.testing.assert_allclose(got["range"], rec["range"], rtol=1e-5, err_msg=f"{method} {layer}")


def test_sensitivity_table_matches_one_device(results):
    s8, s1 = results["sensitivity_mesh8"], results["sensitivity_none"]
    assert set(s8) == set(s1) and len(s1) >= 19
    for layer in s1:
        assert set(s8[layer]) == set(s1[layer]) == {"2", "4", "32"}
        np.testing.assert_allclose([s8[layer][b] for b in ("2", "4")], [s1[layer][b] for b in ("2", "4")],
                                   rtol=1e-4, atol=1e-5, err_msg=layer)
    assert max(abs(s1[layer]["2"]) for layer in s1) > 1e-3  # 2-bit weights do change the loss
