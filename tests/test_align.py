"""Hardware-aligned channel counts: per-backend multiples, group constraints, no zero widths."""
import numpy as np
import pytest

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.pruning import align
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.surgery import shrink


def test_backend_multiples():
    assert align.backend_multiple("cpu") == 8 and align.backend_multiple("gpu") == 8
    assert align.backend_multiple("tpu") == 128
    assert align.backend_multiple() == 8  # the tests run on CPU


def test_auto_multiple_is_capped_at_half_the_width():
    # widths 6, 16, 120, 84, 10: the backend's 8, capped at the largest power of two <= W / 2
    assert align.group_multiples([6, 16, 120, 84, 10], [0, 1, 2, 3], None) == [2, 8, 8, 8, 1]


@pytest.mark.parametrize("multiple", [0, -8, 17, 2.5])
def test_bad_multiple_is_a_clear_error(multiple):
    with pytest.raises(ConfigError, match="multiple"):
        align.group_multiples([16, 32], [0, 1], multiple)


def test_aligned_and_candidates_by_hand():
    assert align.aligned(64, 0.5 * 64 - 0.1, 8) == 32
    assert align.aligned(64, 3.0, 8) == 8  # never below the multiple
    assert align.aligned(20, 19.0, 8) == 20  # the full width is always allowed
    assert align.aligned(6, 3.0, 2) == 4  # round(1.5) = 2 (half to even)
    np.testing.assert_array_equal(align.candidates(20, 8), [8, 16, 20])
    np.testing.assert_array_equal(align.candidates(64, 16, lowest=24), [32, 48, 64])


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg11", "mobilenet_v2"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_keep_counts_are_aligned_never_zero_and_shrink(zoo, name, ratio):
    table = zoo.table(name)
    groups = C.prunable_groups(table, "all")
    mults = align.group_multiples(table.widths, groups, None)
    counts = C.keep_counts(table, ratio, groups, None)
    for g, (w, k, m) in enumerate(zip(table.widths, counts, mults)):
        assert 1 <= k <= w
        assert k == w or k % m == 0, (table.group_names[g], w, k, m)
        if g in groups and m > 1:
            assert abs(k - ratio * w) <= m / 2 + 1e-9 or k in (m, w)
    if name in ("lenet5", "resnet20"):  # surgery honours the counts: group constraints hold
        variables = zoo.variables(name)
        scores = C.channel_scores(table, variables, "l1")
        masks = table.layer_masks(C.masks_from_scores(scores, counts), variables.get("masks"))
        small_model, _ = shrink(table, {**variables, "masks": masks})
        assert cost.summarize(table, masks)["widths"] == counts


def test_global_counts_are_aligned(zoo):
    table = zoo.table("resnet20")
    groups = C.prunable_groups(table, "all")
    scores = [np.random.default_rng(g).random(w) for g, w in enumerate(table.widths)]
    counts = C.global_counts(table, scores, 0.5, groups, 8)
    assert all(k % 8 == 0 for g, k in enumerate(counts) if g in groups)
    assert sum(counts[g] for g in groups) == pytest.approx(0.5 * sum(table.widths[g] for g in groups), rel=0.15)


def test_explicit_multiple_larger_than_a_width_fails_before_work(zoo):
    table = zoo.table("lenet5")  # conv1 has 6 channels
    with pytest.raises(ConfigError, match="larger than group 0's width 6"):
        C.keep_counts(table, 0.5, None, 8)


def test_variational_channel_counts_are_aligned(zoo):
    from jaxcompress.pruning.variational import variational_masks
    table = zoo.table("resnet20")
    rng = np.random.default_rng(0)
    log_alpha = {l.path: {"channel": rng.normal(size=table.widths[l.out_group])}
                 for l in table.layers if l.out_group >= 0 and l.kind == "conv"}
    masks = variational_masks(table, log_alpha, channel_rate=0.6, multiple=8)
    counts = [int(np.sum(np.asarray(m))) for m in table.group_masks(masks)]
    # 40% of 16 / 32 / 64 channels kept: 6.4 -> 8, 12.8 -> 16, 25.6 -> 24
    assert sorted(set(counts)) == [8, 16, 24]
    unaligned = variational_masks(table, log_alpha, channel_rate=0.6)
    assert sorted(set(int(np.sum(np.asarray(m))) for m in table.group_masks(unaligned))) == [6, 13, 26]
