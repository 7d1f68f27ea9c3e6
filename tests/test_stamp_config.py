"""STAMP bad input: one-line ConfigError before any work."""
import pytest

from configs import default
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, describe
from jaxcompress.stamp import GroupLayout, check_budget
from jaxcompress.stamp.job import check_stamp_config


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
    with pytest.raises(ConfigError, match="head supports 3"):
        check_stamp_config(c)


def test_reference_target_overlap_forbidden():
    c = _config()
    c.stamp.target.classes = (4, 5, 6)
    with pytest.raises(ConfigError, match=r"share classes \[4\]"):
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
