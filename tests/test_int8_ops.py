"""The int8-ops benchmark (issue 21): its op specs, its reading of XLA's optimized HLO, and
a tiny run whose integer results equal float32's exactly; its judge."""
import numpy as np
import pytest
from ml_collections import ConfigDict

from benchmarks import int8_ops as B
from benchmarks import targets as T

HLO = """
%wrapped_convert = s32[8,14,14,6]{3,2,1,0} fusion(%p0), kind=kLoop, calls=%wrapped_convert_computation
%wrapped_convert.1 = s32[5,5,6,16]{3,2,1,0} fusion(%p1), kind=kLoop, calls=%c1
ROOT %convolution = s32[8,14,14,16]{3,2,1,0} convolution(%wrapped_convert, %wrapped_convert.1), window={size=5x5}
"""


def test_op_specs_and_hlo_facts():
    assert B.parse_shape("conv:14x14x6:5x5:16") == dict(kind="conv", int4=False, hw=(14, 14), cin=6, k=5, cout=16)
    assert B.parse_shape("dot4:400:120") == dict(kind="dot", int4=True, k=400, n=120)
    with pytest.raises(ValueError):
        B.parse_shape("pool:2")
    assert B.hlo_facts(HLO) == dict(op="convolution", result_type="s32", operand_types=["s32", "s32"])
    direct = "%p0 = s8[8,400]{1,0} parameter(0)\n%p1 = s8[400,120]{1,0} parameter(1)\n" \
             "ROOT %dot.0 = s32[8,120]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}"
    assert B.hlo_facts(direct) == dict(op="dot", result_type="s32", operand_types=["s8", "s8"])


def test_a_tiny_run_is_exact_and_judged(tmp_path):
    c = ConfigDict(dict(job="bench_int8_ops", bench=dict(ops=("conv:6x6x3:3x3:4", "dot:16:8", "dot4:16:8"),
                                                          batch_size=4, rounds=1, calls=1)))
    s = B.run(c, str(tmp_path))
    assert [r["op"] for r in s["rows"]] == ["conv:6x6x3:3x3:4", "dot:16:8", "dot4:16:8"]
    assert "s4" in s["rows"][2]["operand_types"] or "s32" in s["rows"][2]["operand_types"]
    for r in s["rows"]:
        assert r["int8_equals_float"] and r["result_type"] == "s32" and r["float32_ms"] > 0 and r["int8_ms"] > 0
        assert r["int8_vs_float32"] == pytest.approx(r["float32_ms"] / r["int8_ms"])
    targets, table = T.judge("int8_ops", s)
    assert [t["what"] for t in targets] == ["int8 ops slower than float32",
                                            "int8 ops XLA runs on s32 (converted) operands",
                                            "integer ops XLA cannot compile"]
    slower = sum(r["int8_vs_float32"] < 1 for r in s["rows"])
    assert targets[0]["measured"] == f"{slower} of 3" and table.count("\n") == 4
    failed = dict(s, rows=s["rows"] + [dict(op="conv4:6x6x4:3x3:4", error="JaxRuntimeError: INVALID_ARGUMENT")])
    targets, table = T.judge("int8_ops", failed)
    assert targets[2]["measured"] == "conv4:6x6x4:3x3:4" and "| conv4:6x6x4:3x3:4 |  | JaxRuntimeError" in table
    assert np.isfinite([r["int8_ms"] for r in s["rows"]]).all()
