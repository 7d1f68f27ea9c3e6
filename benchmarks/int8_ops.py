"""Benchmark: why integer execution is slower than float32 on XLA:CPU (issue 21).

For the convolutions and products of LeNet-5 and ResNet-20 at batch `bench.batch_size`,
times float32 against int8 x int8 -> int32 (`lax.conv_general_dilated` /
`lax.dot_general` with `preferred_element_type=int32`, as `jaxcompress.quant.integer`
issues them; `conv4` / `dot4` rows with int4 weights), in alternation (`jaxcompress.timing.interleaved_medians`), and reads the
optimized HLO XLA compiled for the int8 op: the element type its convolution or dot
runs in, and whether the int8 operands are first converted (`convert`). A row whose
integer op runs on s32 operands (the int8 ones converted) has no int8 kernel behind it.
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcompress.timing import interleaved_medians
from jaxcompress.train.metrics import write_json

DIMS = ("NHWC", "HWIO", "NHWC")


def parse_shape(spec: str) -> dict:
    """"conv:HxWxCin:KxK:Cout" or "dot:K:N" -> dict(kind, ...); "conv4" / "dot4": int4
    weights (and, for a convolution, which needs equal operand types, int4 inputs)."""
    kind, *rest = spec.split(":")
    int4 = kind in ("conv4", "dot4")
    if kind in ("conv", "conv4"):
        h, w, cin = (int(v) for v in rest[0].split("x"))
        k = int(rest[1].split("x")[0])
        return dict(kind="conv", int4=int4, hw=(h, w), cin=cin, k=k, cout=int(rest[2]))
    if kind in ("dot", "dot4"):
        return dict(kind="dot", int4=int4, k=int(rest[0]), n=int(rest[1]))
    raise ValueError(f"unknown op spec {spec!r}; use conv[4]:HxWxC:KxK:Cout or dot[4]:K:N")


def op_fns(op: dict):
    """(float32 fn, int8 fn) of one op spec."""
    if op["kind"] == "conv":
        def conv(x, w, **kw):
            return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DIMS, **kw)
        return conv, lambda x, w: conv(x, w, preferred_element_type=jnp.int32)
    dims = (((1,), (0,)), ((), ()))
    return (lambda x, w: lax.dot_general(x, w, dims),
            lambda x, w: lax.dot_general(x, w, dims, preferred_element_type=jnp.int32))


def operands(op: dict, batch: int, rng) -> tuple:
    """(x, w) as int8 / int4 device arrays (int4 codes in -7..7)."""
    if op["kind"] == "conv":
        shapes = ((batch, *op["hw"], op["cin"]), (op["k"], op["k"], op["cin"], op["cout"]))
    else:
        shapes = ((batch, op["k"]), (op["k"], op["n"]))
    int4 = (op["int4"] and op["kind"] == "conv", op["int4"])
    return tuple(jnp.asarray(rng.integers(-7, 8, s), jnp.int4) if four else
                 jnp.asarray(rng.integers(-127, 128, s).astype(np.int8)) for s, four in zip(shapes, int4))


def hlo_facts(compiled_text: str) -> dict:
    """What the optimized HLO runs the op as: the element types of its convolution's or
    dot's result and operands (an s8 operand converted to s32 first shows as s32)."""
    types = dict(re.findall(r"(%[\w.\-]+) = (\w+)\[", compiled_text))
    for line in compiled_text.splitlines():
        m = re.search(r"= (\w+)\[[^\]]*\][^ ]* (convolution|dot)\(([^)]*)\)", line)
        if m:
            names = [n.strip() for n in m.group(3).split(",")]
            return dict(op=m.group(2), result_type=m.group(1), operand_types=[types.get(n, "?") for n in names])
    return dict(op=None, result_type=None, operand_types=[])


def run(config, workdir: str) -> dict:
    b = config.bench
    rng = np.random.default_rng(0)
    rows = []
    for spec in b.ops:
        op = parse_shape(spec)
        f32, i8 = (jax.jit(f) for f in op_fns(op))
        xi, wi = operands(op, b.batch_size, rng)
        xf, wf = xi.astype(jnp.float32), wi.astype(jnp.float32)
        try:
            compiled = i8.lower(xi, wi).compile()
        except Exception as e:  # noqa: BLE001 - XLA refuses some integer types: recorded, not fatal
            rows.append(dict(op=spec, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"))
            print(f"{spec}: {rows[-1]['error']}", flush=True)
            continue
        exact = bool(np.array_equal(np.asarray(i8(xi, wi)), np.asarray(f32(xf, wf)).astype(np.int64)))
        times = interleaved_medians({"float32": lambda: f32(xf, wf), "int8": lambda: i8(xi, wi)},
                                    rounds=b.rounds, calls=b.calls)
        facts = hlo_facts(compiled.as_text())
        rows.append(dict(op=spec, float32_ms=1e3 * times["float32"], int8_ms=1e3 * times["int8"],
                         int8_vs_float32=times["float32"] / times["int8"], int8_equals_float=exact,
                         hlo_op=facts["op"], result_type=facts["result_type"], operand_types=facts["operand_types"]))
        print(f"{spec}: float32 {rows[-1]['float32_ms']:.2f} ms, int8 {rows[-1]['int8_ms']:.2f} ms "
              f"({rows[-1]['int8_vs_float32']:.2f}x the speed), HLO {facts}", flush=True)
    summary = dict(job=config.job, batch_size=b.batch_size, device_kind=jax.devices()[0].device_kind,
                   backend=jax.default_backend(), rows=rows)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
