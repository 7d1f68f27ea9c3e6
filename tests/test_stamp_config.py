"""STAMP bad input: one-line ConfigError from the schema (jaxcompress.config), before any work."""
import pytest

from configs import default
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, describe
from jaxcompress.stamp import GroupLayout, check_budget
from jaxcompress.schema import validate as check_stamp_config


def _config(**stamp):
    c = default.get_config()
    c.job = "stamp"
    c.data.name = "cifar10"
    for k, v in stamp.items():
        setattr(c.stamp, k, v)
    return c


def test_valid_default_config_passes():
    check_stamp_config(_config())


@pytest.mark.parametrize("change,words", [
    (dict(set_size=0), "set_size"),
    (dict(algorithm="maml2"), "algorithm"),
    (dict(budget_penalty="ceiling"), "budget_penalty"),
    (dict(methods=("stamp", "oracle")), "methods"),
])
def test_bad_stamp_fields(change, words):
    with pytest.raises(ConfigError, match=words) as e:
        check_stamp_config(_config(**change))
    assert "\n" not in str(e.value)


def test_target_with_more_classes_than_head():
    c = _config()
    c.stamp.target.classes = (5, 6, 7, 8, 9)
    c.stamp.reference_classes = (0, 1, 2)
    c.stamp.allow_overlap = True
    with pytest.raises(ConfigError, match=r"stamp.target.classes=\(5, 6, 7, 8, 9\): must be at most 3 class"):
        check_stamp_config(c)


def test_reference_target_overlap_forbidden():
    c = _config()
    c.stamp.target.classes = (4, 5, 6)
    with pytest.raises(ConfigError, match=r"stamp.target.classes=\(4, 5, 6\): must be disjoint"):
        check_stamp_config(c)
    c.stamp.allow_overlap = True
    check_stamp_config(c)
    c.stamp.target.name = "mnist"  # another dataset: class ids do not overlap
    c.stamp.allow_overlap = False
    check_stamp_config(c)


def test_budget_below_reach():
    table = describe(create_model("lenet5", 10), (28, 28, 1))
    layout = GroupLayout(table, (0, 1))  # only the convs prunable: the fc layers keep 23% of the params
    assert abs(layout.min_fraction("params") - 0.2299) < 1e-3
    with pytest.raises(ConfigError, match="below reach") as e:
        check_budget(layout, 0.1, "params")
    assert "\n" not in str(e.value)
    check_budget(layout, 0.3, "params")
    check_budget(GroupLayout(table, (0, 1, 2, 3)), 0.1, "flops")


def test_meta_checkpoint_written_with_other_settings_is_refused_before_work(tmp_path):
    import jax.numpy as jnp
    from jaxcompress.stamp.job import check_meta_checkpoint, meta_settings
    from jaxcompress.stamp.meta import META_CHECKPOINTS
    from jaxcompress.train import Checkpointer
    c = _config()
    directory = str(tmp_path / "meta")
    check_meta_checkpoint(directory, meta_settings(c))  # nothing there yet: nothing to compare
    with Checkpointer(str(tmp_path / "meta" / META_CHECKPOINTS)) as ckpt:
        ckpt.save_tree(3, {"w": jnp.ones(2)}, {"settings": meta_settings(c)})
    check_meta_checkpoint(directory, meta_settings(c))  # the same settings resume
    c.stamp.embed_dim, c.stamp.num_heads = 32, 2
    with pytest.raises(ConfigError) as e:
        check_meta_checkpoint(directory, meta_settings(c))
    assert str(e.value).startswith("stamp.embed_dim=32: must be 64, as in the meta-training in ")
    assert "\n" not in str(e.value) and "--config.stamp.embed_dim=64" in str(e.value)
