"""A standard serialized export: a (shrunk, quantized) network as StableHLO via `jax.export`.

`export_stablehlo(path, apply_fn, variables, input_shape)` traces
`apply_fn(variables, x)` once, with a symbolic batch size and the variables baked in
as constants, and writes `jax.export.Exported.serialize()`'s bytes to `path` plus a
`<path>.sha256` beside it. The file runs with plain JAX (no jaxcompress, no Flax):

    from jax import export
    net = export.deserialize(bytearray(open("model.stablehlo", "rb").read()))
    logits = net.call(images)   # images: uint8 (n, H, W, C) as the dataset stores them, any n

With `input_mean` / `input_std` the artifact takes uint8 images and normalises them as
training did (`jaxcompress.data.transforms.normalize`); without, it takes the float32
inputs `apply_fn` takes. `platforms` (default: cpu and cuda) are the backends the one
file runs on. `load_stablehlo` is the same deserialisation with the checksum verified
and one-line errors for a missing or damaged file. StableHLO has backward compatibility
guarantees (jax.export docs), unlike a pickled Flax model, and is what serving stacks
(IREE, TF Serving via jax2tf, XLA's PJRT) consume.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import export

from jaxcompress import files
from jaxcompress.data.transforms import normalize
from jaxcompress.storage import sha256_hex

DEFAULT_PLATFORMS = ("cpu", "cuda")


class StableHLOFileError(ValueError):
    """A StableHLO file that is missing, damaged or not one."""


def export_stablehlo(path: str, apply_fn: Callable, variables: Mapping, input_shape: Sequence[int], *,
                     input_mean=None, input_std=None, platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Writes `apply_fn(variables, x)` (inference mode is the caller's: pass e.g.
    `functools.partial(model.apply, train=False)`) as serialized StableHLO to `path`.
    The batch axis is symbolic. Returns {"path", "bytes", "sha256", "platforms", "input"}."""
    raw = input_mean is not None
    if raw != (input_std is not None):
        raise ValueError("export_stablehlo: give both input_mean and input_std (uint8 input) or neither")
    variables = jax.device_get(variables)  # constants in the module, not device buffers of this process

    def net(x):
        if raw:
            x = normalize(x, input_mean, input_std)
        return apply_fn(variables, x)

    batch, = export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *input_shape), jnp.uint8 if raw else jnp.float32)
    data = bytes(export.export(jax.jit(net), platforms=tuple(platforms))(spec).serialize())
    files.write_atomic(path, data)
    digest = sha256_hex(data)
    files.write_atomic(path + ".sha256", f"{digest}  {os.path.basename(path)}\n")
    return {"path": path, "bytes": len(data), "sha256": digest, "platforms": list(platforms),
            "input": f"{spec.dtype.name}[n,{','.join(map(str, input_shape))}]"}


def load_stablehlo(path: str) -> export.Exported:
    """`jax.export.deserialize` of `path`, its `<path>.sha256` (when present) verified
    first; call the result's `.call(x)`."""
    if not files.is_file(path):
        raise StableHLOFileError(f"no StableHLO file at {path}; export one with export_stablehlo or the quantize job")
    data = files.read_bytes(path)
    sidecar = path + ".sha256"
    if files.is_file(sidecar):
        expected = files.read_text(sidecar).split()[:1]
        if expected != [sha256_hex(data)]:
            raise StableHLOFileError(f"{path} does not match its checksum in {sidecar}: the file is damaged; "
                                     f"export it again")
    try:
        return export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - whatever the flatbuffer reader raises on foreign bytes
        raise StableHLOFileError(f"{path} is not a serialized jax.export module ({type(e).__name__}); "
                                 f"export it again") from None
