"""The Torch-Pruning peer benchmark (`bench_peer_pruning`): its jaxcompress half and its
config check, without torch (the PyTorch half runs in its own environment)."""
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from benchmarks.configs import peer_torch_pruning as peer_config
from jaxcompress import cost
from benchmarks import peer
from jaxcompress.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 torch-pruning"
# ResNet-56 conv + linear MACs per 32x32 image and parameters (weights, biases, BN scale/shift),
# as the PyTorch script counts them with forward hooks and `model.parameters()`.
RESNET56_MACS, RESNET56_PARAMS = 125_747_840, 855_770


def test_missing_torch_interpreter_is_a_one_line_error_before_any_work(tmp_path, monkeypatch):
    config = peer_config.get_config()
    config.bench.torch_python = str(tmp_path / "no-venv" / "bin" / "python")
    started = []
    monkeypatch.setattr(peer, "jaxcompress_side", lambda *a, **k: started.append(1))
    monkeypatch.setattr(peer, "check_torch", lambda *a, **k: started.append(2))
    with pytest.raises(ConfigError) as err:
        peer.run(config, str(tmp_path / "workdir"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"bench.torch_python '{config.bench.torch_python}' does not exist")
    assert message.endswith(INSTALL)
    assert started == []
    assert not os.path.exists(tmp_path / "workdir" / "summary.json")


def test_launch_exits_2_with_the_install_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--config=benchmarks/configs/peer_torch_pruning.py",
                           f"--workdir={tmp_path}", "--config.bench.torch_python=no-such-venv/bin/python"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and errors[0].endswith(INSTALL), proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "summary.json")


def test_bad_bench_fields_are_config_errors(tmp_path):
    for field, value in (("model", "vgg16"), ("flops_budget", 1.5), ("scope", "streams"),
                         ("allocations", ("fastest",)), ("conv_shapes", ((32, 0),))):
        config = peer_config.get_config()
        config.bench[field] = value
        with pytest.raises(ConfigError, match=field if field != "scope" else "scope"):
            peer.run(config, str(tmp_path))


def test_jaxcompress_half_prunes_every_group_to_half_the_macs(zoo):
    result, nets = peer.jaxcompress_side("resnet56", 0.5, "all", 1, repeats=1, variables=zoo.variables("resnet56"))
    assert result["macs_dense"] == RESNET56_MACS and result["params_dense"] == RESNET56_PARAMS
    assert 0.48 <= result["macs_fraction"] <= 0.5
    assert result["groups_pruned"] == 30
    dense, widths = result["widths_dense"], result["widths"]
    assert dense[:3] == [16, 32, 64] and len(widths) == 30
    assert all(w < d for w, d in zip(widths, dense))  # residual streams and inner widths alike
    small_model, small_vars = nets["pruned"]
    assert list(small_model.widths) == widths
    table = peer.describe(small_model, (32, 32, 3))
    assert result["params_pruned"] == int(cost.count(table)["params"])
    assert result["macs_pruned"] == int(cost.count(table)["macs"])
    assert result["prune_seconds"]["first"] > 0.0


def test_weights_convert_to_the_torch_state_dict_names(zoo):
    state = peer.torch_state_dict(zoo.variables("resnet56"))
    # 57 convs (stem, 54 in blocks, 2 projections), 57 BatchNorms x 4, classifier weight + bias
    assert len(state) == 57 + 57 * 4 + 2
    assert state["stem_conv.weight"].shape == (16, 3, 3, 3)
    assert state["stage2_block0.proj_conv.weight"].shape == (32, 16, 1, 1)
    assert state["stage3_block8.b_bn.running_var"].shape == (64,)
    assert state["classifier.weight"].shape == (10, 64)
    kernel = np.asarray(zoo.variables("resnet56")["params"]["stage1_block3_a_conv"]["kernel"])
    np.testing.assert_array_equal(state["stage1_block3.a_conv.weight"][5, 7], kernel[:, :, 7, 5])
    assert sum(v.size for k, v in state.items() if "running" not in k) == RESNET56_PARAMS


def test_peer_script_imports_without_torch():
    module = importlib.import_module("benchmarks.peer_torch_pruning")
    assert callable(module.main)
    assert "torch" not in sys.modules
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert "torch" not in f.read()
