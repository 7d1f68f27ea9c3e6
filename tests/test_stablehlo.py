"""StableHLO export (`jaxcompress.stablehlo`): the file, deserialised with plain `jax.export`,
computes what the in-library network computes, for zoo models shrunk and quantized."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxcompress.data.transforms import normalize
from jaxcompress.models import MODELS, create_model, describe, get_spec
from jaxcompress.pruning import shrink
from jaxcompress.quant import make_quant, make_quantized_apply
from jaxcompress.stablehlo import StableHLOFileError, export_stablehlo, load_stablehlo

# One model per family in CI; the deep and ImageNet-sized ones with JAXCOMPRESS_SLOW_TESTS=1
# (compiling them costs minutes on a 2-core CPU).
FAST = ("lenet5",)  # conv + dense (the quantize job test exports one too); attention: vit, slow
_slow = pytest.mark.skipif(not os.environ.get("JAXCOMPRESS_SLOW_TESTS"), reason="set JAXCOMPRESS_SLOW_TESTS=1")
ZOO = [name if name in FAST else pytest.param(name, marks=_slow) for name in sorted(MODELS)]


def _shrunk_quantized(name):
    """A thin zoo model with one channel of its first group pruned, shrunk, W4A8-quantized."""
    shape = get_spec(name).input_shape
    model = create_model(name, 10, 0.125)
    table = describe(model, shape)
    x = jax.random.normal(jax.random.key(1), (1, *shape))
    v = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    group_masks = [jnp.ones(w).at[0].set(0.0) if g == 0 and w > 1 else jnp.ones(w) for g, w in enumerate(table.widths)]
    small, sv = shrink(table, {**v, "masks": table.layer_masks(group_masks, v["masks"])})
    sv = {**sv, "quant": make_quant(describe(small, shape), bits_w=4, bits_a=8)}
    return small, sv, shape


@pytest.mark.parametrize("name", ZOO)
def test_zoo_round_trip_equals_the_library_network(name, tmp_path):
    small, sv, shape = _shrunk_quantized(name)
    apply = functools.partial(make_quantized_apply(small), train=False)
    record = export_stablehlo(str(tmp_path / "m.stablehlo"), apply, sv, shape, platforms=("cpu",))
    net = export.deserialize(bytearray((tmp_path / "m.stablehlo").read_bytes()))  # plain JAX
    x = jax.random.normal(jax.random.key(2), (3, *shape))  # a batch size never traced
    got = np.asarray(net.call(x))
    # bit for bit what the library computes with the variables as constants. (With them as
    # arguments XLA rounds differently, which can move a fake-quantized activation by one code.)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(lambda x: apply(sv, x))(x)))
    assert got.shape == (3, 10) and record["bytes"] == (tmp_path / "m.stablehlo").stat().st_size


def test_uint8_input_normalises_as_training_did_and_runs_on_cpu_and_cuda(tmp_path):
    model = create_model("lenet5", 10, 0.5)
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    v = model.init(jax.random.key(0), normalize(x, 0.13, 0.31), train=False)
    apply = functools.partial(model.apply, train=False)
    record = export_stablehlo(str(tmp_path / "m.stablehlo"), apply, v, (28, 28, 1), input_mean=0.13, input_std=0.31)
    net = load_stablehlo(str(tmp_path / "m.stablehlo"))
    assert tuple(net.platforms) == ("cpu", "cuda") == tuple(record["platforms"]) and record["input"] == "uint8[n,28,28,1]"
    np.testing.assert_allclose(net.call(x), apply(v, normalize(x, 0.13, 0.31)), rtol=1e-6, atol=1e-6)


def test_missing_damaged_or_foreign_files_are_one_line_errors(tmp_path):
    path = str(tmp_path / "m.stablehlo")
    with pytest.raises(StableHLOFileError, match="no StableHLO file at"):
        load_stablehlo(path)
    export_stablehlo(path, lambda v, x: x * v["w"], {"w": jnp.float32(2.0)}, (3,), platforms=("cpu",))
    np.testing.assert_array_equal(load_stablehlo(path).call(jnp.ones((2, 3))), 2 * np.ones((2, 3)))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(StableHLOFileError, match="does not match its checksum") as info:
        load_stablehlo(path)
    assert "\n" not in str(info.value)
    os.remove(path + ".sha256")  # no checksum to check: the reader itself must fail in one line
    open(path, "wb").write(b"not a flatbuffer at all")
    with pytest.raises(StableHLOFileError, match="is not a serialized jax.export module"):
        load_stablehlo(path)
    with pytest.raises(ValueError, match="both input_mean and input_std"):
        export_stablehlo(path, lambda v, x: x, {}, (3,), input_mean=0.5)
