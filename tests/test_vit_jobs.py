"""The prune and quantize jobs on the ViT (heads and MLP neurons as channel groups), end to end
on a CIFAR-10 subset: the jobs' own checks (masked == shrunk, packed file == fake-quantized
network, payload == accounting) must hold on attention, LayerNorm and embeddings too."""
import json
import os

from configs import quickstart
from jaxcompress.pruning.job import prune_and_finetune
from jaxcompress.quant.job import quantize


def _vit_config():
    c = quickstart.get_config()
    c.model.name, c.model.width_multiplier = "vit", 0.5  # dim 64, 2 heads and 256 MLP neurons per block
    c.data.name, c.data.image_size = "cifar10", 32
    c.data.train_size, c.data.test_size, c.data.val_size = 256, 128, 64
    c.train.num_epochs, c.train.batch_size, c.train.eval_batch_size = 1, 64, 128
    c.hardware.latency_batch = 0
    return c


def test_prune_then_quantize_the_vit(tmp_path):
    c = _vit_config()
    c.prune.keep_ratio, c.prune.scope, c.prune.finetune_epochs = 0.5, "inner", 1
    s = prune_and_finetune(c, str(tmp_path / "prune"))
    depth = (len(s["widths_dense"]) - 1) // 2
    assert s["widths_dense"][:1 + depth] == [64] + [2] * depth
    assert s["widths_pruned"] == [64] + [1] * depth + [128] * depth  # one head of two, half the neurons
    assert s["flops_left"] < 0.75 and 0.0 <= s["accuracy_pruned"] <= 1.0
    q = _vit_config()
    q.job, q.quant.checkpoint = "quantize", str(tmp_path / "prune" / "pretrain")
    s = quantize(q, str(tmp_path / "quant"))
    assert s["outputs_match"] and s["outputs_max_abs_diff"] == 0.0
    assert s["payload_equals_accounting"] and s["accuracy_exported"] == s["accuracy_quantized"]
    assert all(s["bits_w"][f"block{i}_attn/query"] == 8 for i in range(depth))
    with open(tmp_path / "quant" / "summary.json") as f:
        assert json.load(f)["model"] == "vit"
    assert os.path.exists(tmp_path / "quant" / "model.npz")
