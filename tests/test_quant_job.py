"""The `quantize` job end to end on the embedded digits (offline): train briefly, PTQ,
export, load back; the summary's checks must hold."""
import json
import os
import tempfile

from configs import quickstart
from jaxcompress import jobs


def test_quantize_job_ptq_export_and_checks():
    c = quickstart.get_config()
    c.job = "quantize"
    c.train.num_epochs = 1
    c.quant.mode = "ptq"
    c.quant.scheme = "asymmetric"
    c.quant.bits_w = 4
    c.quant.layer_bits_w = {"conv1": 8, "fc3": 32}
    c.quant.bits_a = 6
    c.quant.calib_batches = 2
    c.quant.calib_batch_size = 64
    c.quant.budget_ratio = 0.12  # of the float32 bytes: HAQ lowers fc2 then fc1
    with tempfile.TemporaryDirectory() as d:
        s = jobs.run(c, d)
        assert os.path.isfile(os.path.join(d, "model.npz")) and os.path.isfile(os.path.join(d, "bits.png"))
        assert s["payload_equals_accounting"] and s["outputs_match"] and s["outputs_max_abs_diff"] == 0.0
        assert s["accuracy_exported"] == s["accuracy_quantized"]
        # model.stablehlo, read back with plain jax.export, computes the loaded network (uint8 images in)
        assert os.path.getsize(os.path.join(d, "model.stablehlo")) == s["stablehlo_bytes"] > 0
        assert s["stablehlo_argmax_agreement"] == 1.0 and s["stablehlo_max_abs_diff"] < 1e-3
        assert s["bytes_quantized"] <= 0.12 * s["bytes_original_float32"]
        # ~35.8 kB at the start; HAQ's sweep from the back: fc3 32 -> 8 (its floor), fc2 4 -> 3,
        # fc1 4 -> 3 brings it to ~26 kB <= 29.6 kB, so the sweep stops before conv2.
        assert s["bits_w"] == {"conv1": 8, "conv2": 4, "fc1": 3, "fc2": 3, "fc3": 8}
        assert s["file_bytes"] == s["payload_bytes"] + s["file_metadata_bytes"]
        with open(os.path.join(d, "policy.json")) as f:
            assert json.load(f)["bits_w"] == s["bits_w"]
        assert s["accuracy_float"] - s["accuracy_exported"] < 0.1
