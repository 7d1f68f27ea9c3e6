"""The config schema (`jaxcompress.schema`, declared in `jaxcompress.config`): the base
config's defaults are unchanged, every field refuses values outside its spec with a
one-line ConfigError naming it (hypothesis draws them: wrong types, out of range,
NaN / inf), accepts values inside it, and `jobs.run` validates before any work.
Fast: no job runs."""
import contextlib
import copy
import glob
import importlib
import math
import os

import ml_collections
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxcompress import config as base
from jaxcompress import jobs
from jaxcompress.config import RULES, SCHEMA, get_config
from jaxcompress.errors import ConfigError
from jaxcompress.schema import (Bool, Choice, Dict, Float, Int, Optional, Rule, Section, Str, Tuple, errors, get,
                                validate)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = [path for path, _ in SCHEMA.walk()]
SPECS = dict(SCHEMA.walk())

# ------------------------------------------------------------------------------------ defaults

# The base config as it was before the schema (field order, field type, default), frozen:
# `get_config()` built from the specs must return exactly this.
FROZEN_DEFAULTS = {
    'job': ('str', 'train'),
    'seed': ('int', 0),
    'distributed': {'enabled': ('bool', False), 'coordinator_address': ('str', ''), 'num_processes': ('int', 0),
                    'process_id': ('int', -1)},
    'hardware': {'multiple': ('int', None), 'latency_batch': ('int', 128)},
    'model': {'name': ('str', 'lenet5'), 'width_multiplier': ('float', 1.0)},
    'data': {'name': ('str', 'mnist'), 'data_dir': ('str', ''), 'image_size': ('int', 0), 'channels': ('int', 0),
             'val_size': ('int', 5000), 'classes': ('tuple', ()), 'augment': ('bool', False),
             'train_size': ('int', 0), 'test_size': ('int', 0), 'lazy': ('bool', False)},
    'train': {'num_epochs': ('int', 15), 'batch_size': ('int', 128), 'eval_batch_size': ('int', 1000),
              'optimizer': ('str', 'sgd'), 'learning_rate': ('float', 0.05), 'momentum': ('float', 0.9),
              'nesterov': ('bool', True), 'weight_decay': ('float', 0.0005), 'schedule': ('str', 'cosine'),
              'warmup_epochs': ('float', 0.0), 'decay_epochs': ('tuple', ()), 'decay_factor': ('float', 0.1),
              'label_smoothing': ('float', 0.0), 'distill_weight': ('float', 0.0),
              'distill_temperature': ('float', 4.0), 'dtype': ('str', 'float32'), 'prefetch': ('int', 2)},
    'prune': {'checkpoint': ('str', ''), 'criterion': ('str', 'l1'), 'keep_ratio': ('float', 0.5),
              'keep_ratios': {}, 'allocation': ('str', 'uniform'), 'scope': ('str', 'inner'),
              'element_rate': ('float', 0.0), 'element_rates': {}, 'iterations': ('int', 1),
              'iteration_epochs': ('int', 2), 'sample_size': ('int', 256),
              'variational': {'spatial_rate': ('float', 0.0), 'num_steps': ('int', 500), 'beta': ('float', 1.0),
                              'learning_rate': ('float', 0.01), 'noise_learning_rate': ('float', 0.01),
                              'batch_size': ('int', 128), 'include_dense': ('bool', False),
                              'init_alpha': ('float', 0.05)},
              'finetune_epochs': ('int', 5), 'finetune_learning_rate': ('float', 0.01),
              'flops_budget': ('float', 0.0), 'latency_budget': ('float', 0.0)},
    'quant': {'mode': ('str', 'ptq'), 'checkpoint': ('str', ''), 'train_if_missing': ('bool', False),
              'pruned_checkpoint': ('str', ''), 'prune_first': ('bool', False), 'bits_w': ('int', 8),
              'bits_a': ('int', 8), 'layer_bits_w': {}, 'layer_bits_a': {}, 'policy': ('str', ''),
              'scheme': ('str', 'symmetric'), 'granularity': ('str', 'channel'), 'kmeans_iters': ('int', 20),
              'calibration': ('str', 'minmax'), 'percentile': ('float', 99.99), 'calib_batches': ('int', 4),
              'calib_batch_size': ('int', 256), 'budget_bytes': ('int', 0), 'budget_ratio': ('float', 0.0),
              'budget_uniform_bits': ('int', 0), 'budget_bitops': ('float', 0.0), 'allocation': ('str', 'uniform'),
              'min_bits_w': ('int', 2), 'first_last_min_bits': ('int', 8),
              'sensitivity_bits': ('tuple', (2, 3, 4, 5, 6, 7, 8)), 'sensitivity_examples': ('int', 1000),
              'qat_epochs': ('int', 3), 'qat_learning_rate': ('float', 0.01), 'index_bits_conv': ('int', 8),
              'index_bits_dense': ('int', 5), 'verify_batch': ('int', 256), 'integer_check': ('bool', True)},
    'search': {'checkpoint': ('str', ''), 'agent': ('str', 'ppo'), 'num_actors': ('int', 16),
               'episodes': ('int', 400), 'flops_budget': ('float', 0.5), 'params_budget': ('float', 0.0),
               'latency_budget': ('float', 0.0), 'a_min': ('float', 0.0), 'a_max': ('float', 0.8),
               'scope': ('str', 'inner'), 'reward': ('str', 'acc'), 'cost_norm': ('str', 'bounds'),
               'rank_criterion': ('str', 'l1'), 'eval_size': ('int', 1000), 'rerank_top_k': ('int', 8),
               'rerank_size': ('int', 2000), 'select_finetune_top': ('int', 3),
               'select_finetune_steps': ('int', 50), 'eval_mode': ('str', 'stacked'),
               'eval_chunk': ('int', 0), 'bn_adapt': ('bool', True), 'candidate_finetune_steps': ('int', 0),
               'candidate_finetune_batch': ('int', 64), 'candidate_finetune_lr': ('float', 0.01),
               'granularity': ('str', 'channel'), 'element_iterations': ('int', 1),
               'element_iteration_epochs': ('int', 1), 'scheme': ('str', 'l1'), 'finetune_epochs': ('int', 5),
               'finetune_learning_rate': ('float', 0.01),
               'report_budgets': ('tuple', (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)),
               'checkpoint_every': ('int', 10), 'log_every': ('int', 10),
               'quant': {'episodes': ('int', 0), 'agent': ('str', ''), 'b_min': ('int', 2), 'b_max': ('int', 8),
                         'bits_budget': ('float', 5.0), 'bits_a': ('int', 8), 'eval_chunk': ('int', 0),
                         'qat_epochs': ('int', 3), 'qat_learning_rate': ('float', 0.005)},
               'ppo': {'hidden': ('int', 64), 'actor_lr': ('float', 0.003), 'critic_lr': ('float', 0.01),
                       'clip': ('float', 0.2), 'epochs': ('int', 4), 'critic_epochs': ('int', 32),
                       'tau': ('float', 0.05), 'target_noise': ('float', 0.1), 'noise_clip': ('float', 0.25),
                       'discount': ('float', 1.0), 'entropy_coef': ('float', 0.0), 'init_std': ('float', 1.0),
                       'policy': ('str', 'gaussian'), 'critic_target': ('str', 'mix'),
                       'return_weight': ('float', 0.5), 'advantage': ('str', 'q'), 'baseline': ('str', 'state'),
                       'normalize_advantages': ('bool', True)},
               'ddpg': {'hidden': ('int', 300), 'actor_lr': ('float', 0.0001), 'critic_lr': ('float', 0.001),
                        'tau': ('float', 0.01), 'discount': ('float', 1.0), 'batch_size': ('int', 64),
                        'warmup_episodes': ('int', 100), 'sigma': ('float', 0.5), 'sigma_decay': ('float', 0.95),
                        'buffer_size': ('int', 2000), 'moving_alpha': ('float', 0.5),
                        'updates_per_episode': ('int', 0)}},
    'stamp': {'reference_classes': ('tuple', (0, 1, 2, 3, 4)), 'reference_train_size': ('int', 0),
              'target': {'name': ('str', ''), 'data_dir': ('str', ''), 'image_size': ('int', 0),
                         'channels': ('int', 0), 'classes': ('tuple', (5, 6, 7, 8, 9))},
              'target_train_size': ('int', 0), 'val_size': ('int', 500), 'allow_overlap': ('bool', False),
              'head_classes': ('int', 0), 'pretrained': ('str', ''), 'meta_checkpoint': ('str', ''),
              'scope': ('str', 'all'), 'budget': ('float', 0.3), 'budget_metric': ('str', 'params'),
              'budget_weight': ('float', 5.0), 'budget_penalty': ('str', 'target'), 'kl_weight': ('float', 1.0),
              'prior_alpha': ('float', 0.0001), 'a_init': ('float', 2.0), 'temperature': ('float', 0.1),
              'selection': ('str', 'global'), 'channel_stats': ('bool', False), 'diagnostic_sets': ('int', 8),
              'mask_mode': ('str', 'budget'), 'threshold': ('float', 0.001), 'instance': ('str', 'pretrained'),
              'feature_convs': ('int', 2), 'pooling': ('str', 'pma'), 'embed_dim': ('int', 64),
              'num_heads': ('int', 4), 'set_size': ('int', 100), 'algorithm': ('str', 'fomaml'),
              'meta_steps': ('int', 200), 'tasks_per_step': ('int', 4), 'meta_learning_rate': ('float', 0.001),
              'task_ways': ('tuple', ()), 'inner_steps': ('int', 5), 'inner_batch': ('int', 32),
              'inner_lr': ('float', 0.01), 'query_size': ('int', 64), 'reptile_lr': ('float', 0.01),
              'meta_weights': ('bool', False), 'meta_val_size': ('int', 0), 'meta_val_tasks': ('int', 16),
              'checkpoint_every': ('int', 50),
              'methods': ('tuple', ('stamp', 'dense', 'magnitude', 'snip_pretrained', 'snip_init', 'random',
                                    'random_stamp_widths', 'bbdropout', 'scratch')),
              'baseline_widths': ('str', 'uniform'), 'finetune_epochs': ('int', 5),
              'finetune_learning_rate': ('float', 0.01), 'scratch_learning_rate': ('float', 0.05),
              'bbdropout_epochs': ('int', 5), 'snip_batch': ('int', 256)},
    'checkpoint': {'every_steps': ('int', 0), 'max_to_keep': ('int', 2)},
    'eval': {'checkpoint': ('str', 'best')},
}


def _structure(c: ml_collections.ConfigDict) -> dict:
    """{field: (declared type, value)} in declaration order; sections nested."""
    return {k: _structure(c[k]) if isinstance(c[k], ml_collections.ConfigDict) else (c.get_type(k).__name__, c[k])
            for k in c._fields}


def _same(a, b) -> bool:
    """Equal with the same order, types and float bit patterns (0 != 0.0 here)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_get_config_is_todays_base_config():
    c = get_config()
    assert _same(_structure(c), FROZEN_DEFAULTS), _structure(c)
    assert c.is_type_safe and not c.is_locked
    assert c.to_dict() == get_config().to_dict() and get_config() is not get_config()  # fresh each call
    # the placeholder stays typed: an int override passes, a string is refused by ml_collections
    c.hardware.multiple = 8
    with pytest.raises(TypeError):
        c.hardware.multiple = "eight"
    # every field of the config is declared in the schema, and nothing else
    flat = lambda s, p="": [x for k in s._fields for x in (flat(s[k], f"{p}{k}.") if isinstance(
        s[k], ml_collections.ConfigDict) and k not in ("keep_ratios", "element_rates", "layer_bits_w",
                                                        "layer_bits_a") else [p + k])]
    assert flat(get_config()) == PATHS


def test_defaults_and_every_shipped_config_validate():
    validate(get_config())
    args = {"stamp_cifar10": ("full", "small"), "stamp_mnist": ("full", "small"), "search_lenet5": ("channel",
                                                                                                    "element")}
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")) +
                   glob.glob(os.path.join(ROOT, "benchmarks", "configs", "*.py")))
    checked = 0
    for f in files:
        stem = os.path.basename(f)[:-3]
        if stem == "__init__":
            continue
        module = importlib.import_module(os.path.relpath(f, ROOT)[:-3].replace(os.sep, "."))
        for arg in args.get(stem, (None,)):
            c = module.get_config(arg) if arg else module.get_config()
            # the one error a fresh clone may show: a benchmark reading another benchmark's workdir
            # (e.g. a pruned network) is refused in one line, naming it, until that one has run
            found = errors(c)
            assert all("='workdirs/" in e and "must be an existing directory" in e for e in found), (f, arg, found)
            checked += 1
    assert checked >= 30


def test_choices_agree_with_the_modules_that_use_them():
    from jaxcompress.layers.information_dropout import ALPHA_MAX, ALPHA_MIN
    from jaxcompress.models.registry import MODELS
    from jaxcompress.pruning.job import CRITERIA
    from jaxcompress.quant.calibrate import CALIBRATIONS
    from jaxcompress.quant.job import ALLOCATIONS, MODES
    from jaxcompress.quant.policy import SUPPORTED_BITS_A, SUPPORTED_BITS_W
    from jaxcompress.stamp.generator import BUDGET_METRICS
    from jaxcompress.stamp.job import BUDGET_PENALTIES, METHODS
    from jaxcompress.stamp.meta import ALGORITHMS
    from jaxcompress.storage import GRANULARITIES as QUANT_GRANULARITIES, SCHEMES as QUANT_SCHEMES
    from jaxcompress.train.optim import OPTIMIZERS, SCHEDULES
    choices = lambda path: set(SPECS[path].choices())
    assert choices("model.name") == set(MODELS)
    assert choices("train.optimizer") == set(OPTIMIZERS) and choices("train.schedule") == set(SCHEDULES)
    assert choices("prune.criterion") == set(CRITERIA)
    assert choices("quant.mode") == set(MODES) and choices("quant.allocation") == set(ALLOCATIONS)
    assert choices("quant.calibration") == set(CALIBRATIONS)
    assert choices("quant.scheme") == set(QUANT_SCHEMES) and choices("quant.granularity") == set(QUANT_GRANULARITIES)
    assert choices("quant.bits_w") == set(SUPPORTED_BITS_W) == set(base.BITS_W)
    assert choices("quant.bits_a") == set(SUPPORTED_BITS_A) == set(base.BITS_A)
    assert set(SPECS["quant.layer_bits_w"].of.choices()) == set(SUPPORTED_BITS_W)
    assert choices("stamp.algorithm") == set(ALGORITHMS) and choices("stamp.budget_penalty") == set(BUDGET_PENALTIES)
    assert choices("stamp.budget_metric") == set(BUDGET_METRICS)
    assert set(SPECS["stamp.methods"].of.choices()) == set(METHODS) == set(SPECS["stamp.methods"].default)
    alpha = SPECS["prune.variational.init_alpha"]
    assert (alpha.lo, alpha.hi) == pytest.approx((ALPHA_MIN, ALPHA_MIN + ALPHA_MAX))
    pytest.importorskip("distrax")
    from jaxcompress.rl.evaluate import EVAL_MODES
    from jaxcompress.rl.job import AGENTS, GRANULARITIES, SCHEMES
    from jaxcompress.rl.search import COST_NORMS, REWARDS
    assert choices("search.agent") == set(AGENTS) and choices("search.quant.agent") == set(AGENTS) | {""}
    assert choices("search.reward") == set(REWARDS) and choices("search.cost_norm") == set(COST_NORMS)
    assert choices("search.eval_mode") == set(EVAL_MODES) and choices("search.scheme") == set(SCHEMES)
    assert choices("search.granularity") == set(GRANULARITIES)


# ------------------------------------------------------------------------------------ strategies

NONFINITE = (math.nan, math.inf, -math.inf)
ANY_SCALAR = st.one_of(st.text(max_size=6), st.none(), st.booleans(), st.integers(), st.floats())


def _excluding_zero(spec, strategy):
    return strategy.filter(lambda v: v != 0) if spec.zero is not None else strategy


def bad(spec) -> st.SearchStrategy:
    """Values outside `spec`: a wrong type, out of range, NaN / inf where not allowed."""
    if isinstance(spec, Float):
        options = [st.text(max_size=6), st.none(), st.booleans(), st.tuples(st.floats())]
        if spec.lo is not None:
            options.append(_excluding_zero(spec, st.floats(max_value=spec.lo, exclude_max=not spec.lo_open,
                                                           allow_nan=False)))
            options.append(_excluding_zero(spec, st.integers(max_value=math.floor(spec.lo) - (not spec.lo_open))))
        if spec.hi is not None:
            options.append(_excluding_zero(spec, st.floats(min_value=spec.hi, exclude_min=not spec.hi_open,
                                                           allow_nan=False)))
        if spec.finite:
            options.append(st.sampled_from(NONFINITE))
        return st.one_of(options)
    if isinstance(spec, Int):
        options = [st.floats(), st.text(max_size=6), st.none(), st.booleans(), st.tuples(st.integers())]
        if spec.lo is not None:
            options.append(_excluding_zero(spec, st.integers(max_value=spec.lo - 1)))
        if spec.hi is not None:
            options.append(_excluding_zero(spec, st.integers(min_value=spec.hi + 1)))
        return st.one_of(options)
    if isinstance(spec, Choice):
        choices = spec.choices()
        if all(isinstance(o, str) for o in choices):
            return st.one_of(st.text(max_size=12).filter(lambda v: v not in choices), st.integers(), st.none(),
                             st.booleans(), st.tuples(st.sampled_from(choices)))
        return st.one_of(st.integers().filter(lambda v: v not in choices), st.floats(), st.booleans(), st.none(),
                         st.text(max_size=4), st.sampled_from([str(o) for o in choices]))
    if isinstance(spec, Bool):
        return st.one_of(st.integers(), st.floats(), st.text(max_size=6), st.none(), st.sampled_from(["True", ""]))
    if isinstance(spec, Str):
        options = [st.integers(), st.floats(), st.booleans(), st.none(), st.tuples(st.text(max_size=3))]
        if spec.nonempty:
            options.append(st.sampled_from(["", " ", "\t"]))
        return st.one_of(options)
    if isinstance(spec, Tuple):
        options = [st.text(max_size=6), st.integers(), st.none(), st.floats()]
        good_items = good(spec.of)
        # one bad item among good ones
        options.append(st.tuples(st.lists(good_items, max_size=2), bad(spec.of), st.lists(good_items, max_size=2))
                       .map(lambda t: tuple(t[0]) + (t[1],) + tuple(t[2])))
        if spec.min_len:
            options.append(st.just(()))
        if spec.lengths is not None:
            options.append(st.integers(0, 5).filter(lambda n: n not in spec.lengths)
                           .flatmap(lambda n: st.lists(good_items, min_size=n, max_size=n).map(tuple)))
        if spec.distinct:
            options.append(good_items.map(lambda x: (x, x)))
        return st.one_of(options)
    if isinstance(spec, Dict):
        return st.one_of(st.text(max_size=6), st.integers(), st.none(), st.tuples(st.integers()),
                         st.dictionaries(st.text(min_size=1, max_size=6), bad(spec.of), min_size=1, max_size=2),
                         st.dictionaries(st.integers(), good(spec.of), min_size=1, max_size=2))
    if isinstance(spec, Optional):
        return bad(spec.inner).filter(lambda v: v is not None)
    raise TypeError(spec)


def good(spec) -> st.SearchStrategy:
    """Values inside `spec`."""
    if isinstance(spec, Float):
        options = [st.floats(min_value=spec.lo, max_value=spec.hi, exclude_min=spec.lo_open and spec.lo is not None,
                             exclude_max=spec.hi_open and spec.hi is not None, allow_nan=not spec.finite,
                             allow_infinity=not spec.finite and None)]
        lo = None if spec.lo is None else math.floor(spec.lo) + 1 if spec.lo_open or spec.lo % 1 else int(spec.lo)
        hi = None if spec.hi is None else math.ceil(spec.hi) - 1 if spec.hi_open or spec.hi % 1 else int(spec.hi)
        if lo is None or hi is None or lo <= hi:
            options.append(st.integers(lo, hi))  # ints are numbers too
        if spec.zero is not None:
            options.append(st.just(0.0))
        return st.one_of(options)
    if isinstance(spec, Int):
        return st.one_of(st.integers(spec.lo, spec.hi), *([st.just(0)] if spec.zero is not None else []))
    if isinstance(spec, Choice):
        return st.sampled_from(spec.choices())
    if isinstance(spec, Bool):
        return st.booleans()
    if isinstance(spec, Str):
        return st.text(max_size=12).filter(lambda v: v.strip() or not spec.nonempty)
    if isinstance(spec, Tuple):
        lengths = spec.lengths or (max(spec.min_len, 0), max(spec.min_len, 4))
        items = st.lists(good(spec.of), min_size=min(lengths), max_size=max(lengths), unique=spec.distinct)
        items = items.filter(lambda v: len(v) in spec.lengths) if spec.lengths else items
        return st.one_of(items.map(tuple), items)  # lists are taken like tuples
    if isinstance(spec, Dict):
        return st.dictionaries(st.text(min_size=1, max_size=6), good(spec.of), max_size=3)
    if isinstance(spec, Optional):
        return st.one_of(st.none(), good(spec.inner))
    raise TypeError(spec)


BASE = get_config()


def _with(config, path: str, value):
    """A copy of `config` with the field at `path` holding `value` as it is: stored
    directly, past ml_collections' type checks and casts (which would turn a bool into
    0.0 in a float field), so the schema alone has to refuse it."""
    config = copy.deepcopy(config)
    parent, _, key = path.rpartition(".")
    (get(config, parent) if parent else config)._fields[key] = value
    return config


@contextlib.contextmanager
def _set(config, path: str, value):
    """`_with` in place for the duration (cheaper than a copy per hypothesis example)."""
    parent, _, key = path.rpartition(".")
    node = get(config, parent) if parent else config
    saved = node._fields[key]  # the stored object itself (a placeholder's reference too)
    node._fields[key] = value
    try:
        yield config
    finally:
        node._fields[key] = saved


def _rule_fields(path: str) -> set[str]:
    return {rule.field for rule in RULES if path in rule.fields}


# ~235 fields, one test each; nothing is written to a hypothesis database
FAST = settings(max_examples=15, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.mark.parametrize("path", PATHS)
@FAST
@given(data=st.data())
def test_every_field_refuses_values_outside_its_spec_and_accepts_those_inside(path, data):
    value = data.draw(bad(SPECS[path]), label=f"{path} (outside)")
    assert not SPECS[path].accepts(value)
    with _set(BASE, path, value) as c, pytest.raises(ConfigError) as e:
        validate(c)
    message = str(e.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path}="), message
    assert "must be " in message and f"set --config.{path}" in message, message

    value = data.draw(good(SPECS[path]), label=f"{path} (inside)")
    assert SPECS[path].accepts(value), value
    with _set(BASE, path, value) as c:
        found = errors(c)
    # alone it can only break a relation with another field (train.warmup_epochs >= num_epochs, ...)
    assert not found or any(found[0].startswith(f"{field}=") for field in _rule_fields(path)), found


@settings(max_examples=15, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(data=st.data())
def test_a_config_drawn_wholly_inside_the_schema_has_no_field_errors(data):
    c = copy.deepcopy(BASE)
    for path in PATHS:
        parent, _, key = path.rpartition(".")
        (get(c, parent) if parent else c)._fields[key] = data.draw(good(SPECS[path]), label=path)
    assert errors(c, rules=()) == []


# ------------------------------------------------------------------------------------ named cases

ISSUE_CASES = [  # the issue's "accepted silently" and "traceback" single-field cases
    ("train.learning_rate", math.nan), ("train.learning_rate", -0.1), ("train.learning_rate", math.inf),
    ("train.weight_decay", math.nan), ("train.weight_decay", -1.0), ("train.momentum", math.nan),
    ("train.momentum", -1.0), ("train.label_smoothing", 2.0), ("train.label_smoothing", -0.5),
    ("train.label_smoothing", math.nan), ("train.num_epochs", 10 ** 12),
    ("search.ppo.clip", -1.0), ("search.ppo.clip", math.nan), ("search.log_every", 0),
    ("search.checkpoint_every", 0), ("search.eval_chunk", -1), ("search.report_budgets", ("a",)),
    ("search.ddpg.hidden", 0),
    ("quant.budget_ratio", 2.0), ("quant.budget_ratio", math.nan), ("quant.kmeans_iters", -1),
    ("quant.verify_batch", 0), ("quant.qat_learning_rate", math.nan),
    ("stamp.prior_alpha", 0.0), ("stamp.prior_alpha", -1.0), ("stamp.temperature", 0.0),
    ("stamp.feature_convs", 0), ("stamp.feature_convs", 99), ("stamp.methods", ()),
    ("stamp.baseline_widths", "foo"), ("stamp.inner_steps", -1), ("stamp.query_size", 0),
    ("stamp.tasks_per_step", 0), ("stamp.task_ways", (9,)),
    ("model.width_multiplier", 1e-9), ("model.width_multiplier", math.inf), ("model.width_multiplier", math.nan),
    ("model.width_multiplier", 5000.0),
    ("data.image_size", 1), ("data.image_size", 3), ("data.classes", (1, 1)), ("data.classes", (-1,)),
    ("data.classes", ("a",)), ("prune.sample_size", 0), ("prune.sample_size", -1),
    ("hardware.latency_batch", -1), ("checkpoint.max_to_keep", -1), ("checkpoint.max_to_keep", 0),
]


@pytest.mark.parametrize("path,value", ISSUE_CASES)
def test_the_issues_bad_values_are_refused(path, value):
    with pytest.raises(ConfigError, match=f"^{path}=") as e:
        validate(_with(BASE, path, value))
    assert "\n" not in str(e.value)


def test_messages_name_field_value_and_what_is_allowed():
    def message(path, value):
        with pytest.raises(ConfigError) as e:
            validate(_with(BASE, path, value))
        return str(e.value)
    assert message("train.learning_rate", math.nan) == ("train.learning_rate=nan: must be positive and finite; "
                                                        "set --config.train.learning_rate")
    assert message("train.distill_weight", 1.5).startswith("train.distill_weight=1.5: must be in [0, 1] (")
    assert message("data.image_size", 3) == ("data.image_size=3: must be 0 (keep as stored) or an integer in "
                                             "8..1024; set --config.data.image_size")
    assert message("prune.latency_budget", 1.5).startswith("prune.latency_budget=1.5: must be 0 (none) or in (0, 1]")
    assert message("stamp.baseline_widths", "foo").startswith("stamp.baseline_widths='foo': must be one of uniform, "
                                                              "stamp;")
    assert "distinct items, each an integer >= 0" in message("data.classes", (1, 1))
    assert message("hardware.multiple", 0).startswith("hardware.multiple=0: must be None or an integer >= 1")
    assert message("quant.calib_batches", 0).count("calibration data is empty") == 1
    long = message("search.report_budgets", tuple(range(100)))
    assert len(long) < 300 and "..." in long


RULE_CASES = [  # (overrides, the field the error names)
    ({"train.num_epochs": 2, "train.warmup_epochs": 2.0}, "train.warmup_epochs"),
    ({"stamp.num_heads": 3}, "stamp.num_heads"),
    ({"stamp.task_ways": (2, 9)}, "stamp.task_ways"),
    ({"stamp.task_ways": (3, 2)}, "stamp.task_ways"),
    ({"search.a_min": 0.6, "search.a_max": 0.5}, "search.a_min"),
    ({"search.quant.b_min": 6, "search.quant.b_max": 4}, "search.quant.b_min"),
    ({"search.quant.episodes": 8, "search.quant.b_min": 6, "search.quant.bits_budget": 5.0},
     "search.quant.bits_budget"),
    ({"prune.flops_budget": 0.5, "prune.latency_budget": 0.5}, "prune.latency_budget"),
    ({"quant.pruned_checkpoint": "x", "quant.prune_first": True}, "quant.prune_first"),
    ({"quant.mode": "qat", "quant.qat_epochs": 0}, "quant.qat_epochs"),
    ({"quant.budget_bytes": 1000, "quant.budget_ratio": 0.5}, "quant.budget_ratio"),
    ({"quant.budget_ratio": 0.5, "quant.budget_bitops": 1e9}, "quant.budget_bitops"),
]


@pytest.mark.parametrize("overrides,field", RULE_CASES)
def test_relations_between_fields(overrides, field):
    c = BASE
    for path, value in overrides.items():
        c = _with(c, path, value)
    with pytest.raises(ConfigError, match=f"^{field}=") as e:
        validate(c)
    assert "\n" not in str(e.value)


def test_relations_hold_only_when_they_apply():
    ok = [{"stamp.num_heads": 3, "stamp.pooling": "mean"},  # no attention heads without PMA
          {"search.quant.b_min": 6, "search.quant.bits_budget": 5.0},  # stage 2 off: bits budget unused
          {"stamp.task_ways": (2, 5)}, {"quant.budget_ratio": 0.5}, {"prune.flops_budget": 0.5}]
    for overrides in ok:
        c = BASE
        for path, value in overrides.items():
            c = _with(c, path, value)
        validate(c)


def test_unknown_sections_and_missing_fields_are_left_alone():
    c = get_config()
    c.bench = ml_collections.ConfigDict(dict(models=("resnet56",), budget=7.0, learning_rate=math.nan))
    validate(c)
    partial = ml_collections.ConfigDict(dict(job="train", train=dict(learning_rate=0.1)))
    validate(partial)
    partial.train.learning_rate = -1.0
    with pytest.raises(ConfigError, match="^train.learning_rate=-1.0"):
        validate(partial)
    with pytest.raises(ConfigError, match="^train=5: must be a section"):
        validate(_with(BASE, "train", 5))


def test_a_schema_of_its_own():
    schema = Section(lr=Float(0.1, lo=0.0, lo_open=True), sub=Section(n=Int(3, lo=1, hi=5), name=Str("a")),
                     ids=Tuple((1, 2), of=Int(lo=0), distinct=True), flag=Bool(True),
                     opt=Optional(Float(lo=0.0)), kind=Choice("x", ("x", "y")), table=Dict({}, of=Int(lo=1)),
                     anything=Float(0.0, finite=False))
    rules = (Rule("sub.n", "<= {ids}", lambda c: c.sub.n <= len(c.ids), others=("ids",)),)
    c = schema.build()
    assert c.to_dict() == dict(lr=0.1, sub=dict(n=3, name="a"), ids=(1, 2), flag=True, opt=None, kind="x",
                               table={}, anything=0.0)
    validate(c, schema, ())
    c.anything = math.nan  # NaN allowed here
    validate(c, schema, ())
    with pytest.raises(ConfigError, match=r"^sub.n=3: must be <= \(1, 2\); set --config.sub.n or --config.ids$"):
        validate(c, schema, rules)
    c.opt = -1.0
    assert errors(c, schema, ()) == ["opt=-1.0: must be None or a finite number >= 0; set --config.opt"]


# ------------------------------------------------------------------------------------ jobs.run


@pytest.mark.parametrize("job", ["train", "search", "bench_anything"])
def test_jobs_run_validates_before_importing_the_job_or_writing_anything(tmp_path, job):
    c = get_config()
    c.job = job
    c.train.learning_rate = math.nan
    workdir = tmp_path / "run"
    registry = {job: "no_such_module_anywhere:run"}  # importing it would fail: validation comes first
    with pytest.raises(ConfigError, match="^train.learning_rate=nan") as e:
        jobs.run(c, str(workdir), registry, ())
    assert "\n" not in str(e.value)
    assert not workdir.exists()
