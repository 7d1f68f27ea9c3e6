"""Latency table: prediction is the sum of entries; cache keyed by device and JAX version."""
import json

import numpy as np

from jaxcompress.latency import LatencyTable, device_key, layer_shapes
from jaxcompress.models import create_model, describe


def _table():
    return describe(create_model("lenet300_100", 10), (28, 28, 1))


def test_predict_is_sum_of_entries_and_cached(tmp_path):
    path = str(tmp_path / "lat.json")
    table = _table()
    lut = LatencyTable.load(path)
    total = lut.predict(table, table.widths, batch=4)
    keys = layer_shapes(table, table.widths, 4)
    assert len(keys) == 3 and keys[0][3:5] == (784, 300) and keys[2][3:5] == (100, 10)
    np.testing.assert_allclose(total, sum(lut.entries[repr(k)] for k in keys))
    reloaded = LatencyTable.load(path)
    assert reloaded.entries == lut.entries  # same device: the cached timings are reused
    assert reloaded.predict(table, table.widths, batch=4) == total


def test_table_from_another_device_is_discarded(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text(json.dumps({"device": "gpu:H100:1:jax-0.0", "entries": {"k": 1.0}}))
    assert LatencyTable.load(str(path)).entries == {}
    assert LatencyTable.load(str(path)).device == device_key()


def test_corrupt_table_is_rebuilt(tmp_path):
    path = tmp_path / "lat.json"
    path.write_text("{not json")
    assert LatencyTable.load(str(path)).entries == {}
