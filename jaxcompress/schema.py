"""A declarative config schema: each field's default next to its type, range or
choices and whether NaN / inf is allowed, plus a few cross-field rules.

`jaxcompress.config` declares every field of the base config with these specs
(`Float`, `Int`, `Choice`, `Bool`, `Str`, `Tuple`, `Dict`, `Optional`, grouped in
`Section`s) and builds `get_config()` from them; `validate(config)` checks a config
against that schema before any job starts and raises a one-line `ConfigError`
naming the field, the value and what is allowed:

    train.learning_rate=nan: must be positive and finite; set --config.train.learning_rate

Fields and sections the schema does not declare (a benchmark's `config.bench`) are
left alone, as are fields a config lacks. Checks that need data, devices, files or a
model (class ids against a dataset, batch sizes against the device count, budgets
against a network's cost) stay with the jobs.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping

import ml_collections

from jaxcompress.errors import ConfigError


def _num(x) -> str:
    """A bound as written in messages: 0, 1, 0.5, 1e-06, 1000000."""
    if isinstance(x, numbers.Integral):
        return str(int(x))
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:g}"


def show(value) -> str:
    """A value as one short line: strings quoted, floats as Python writes them (nan, inf)."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_mapping(v) -> bool:
    return isinstance(v, (Mapping, ml_collections.ConfigDict))


class Spec:
    """One field: `default` (what `get_config()` holds) and what values are allowed.
    `note` (optional) is appended to the error in parentheses."""

    default: Any
    note: str

    def build(self):
        """The value the ConfigDict is built with."""
        return self.default

    def accepts(self, value) -> bool:
        raise NotImplementedError

    def requirement(self) -> str:
        """What is allowed, to follow "must be": "in [0, 1]", "an integer >= 1"."""
        raise NotImplementedError

    def explain(self) -> str:
        return self.requirement() + (f" ({self.note})" if self.note else "")


def _range_text(lo, hi, lo_open, hi_open, integer: bool) -> str | None:
    if lo is not None and hi is not None:
        if integer:
            return f"in {_num(lo)}..{_num(hi)}"
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_num(hi)}"
    return None


def _in_range(v, lo, hi, lo_open, hi_open) -> bool:
    if lo is not None and (v < lo or (lo_open and v == lo)):
        return False
    if hi is not None and (v > hi or (hi_open and v == hi)):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Float(Spec):
    """A real number (ints are accepted, bools are not) in [lo, hi] (either end open,
    either bound optional); NaN and +-inf only with `finite=False`; `zero` (the
    meaning of 0, e.g. "none") also allows 0 outside the range."""

    default: float | None = None
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    finite: bool = True
    zero: str | None = None
    note: str = ""

    def accepts(self, value) -> bool:
        if not _is_real(value):
            return False
        v = float(value)
        if self.zero is not None and v == 0.0:
            return True
        if math.isnan(v):
            return not self.finite
        if math.isinf(v) and self.finite:
            return False
        return _in_range(v, self.lo, self.hi, self.lo_open, self.hi_open)

    def requirement(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            text = _range_text(lo, hi, self.lo_open, self.hi_open, integer=False)
        elif lo == 0 and self.lo_open and hi is None:
            text = "positive and finite" if self.finite else "positive"
        else:
            bound = _range_text(lo, hi, self.lo_open, self.hi_open, integer=False)
            text = ("a finite number" if self.finite else "a number") + (f" {bound}" if bound else "")
        return (f"0 ({self.zero}) or " if self.zero is not None else "") + text


@dataclasses.dataclass(frozen=True)
class Int(Spec):
    """An integer (not a bool, not a float) in lo..hi (either bound optional); `zero`
    (the meaning of 0) also allows 0 outside the range."""

    default: int | None = None
    lo: int | None = None
    hi: int | None = None
    zero: str | None = None
    note: str = ""

    def accepts(self, value) -> bool:
        if not _is_int(value):
            return False
        if self.zero is not None and value == 0:
            return True
        return _in_range(value, self.lo, self.hi, False, False)

    def requirement(self) -> str:
        bound = _range_text(self.lo, self.hi, False, False, integer=True)
        return (f"0 ({self.zero}) or " if self.zero is not None else "") + "an integer" + (f" {bound}" if bound else "")


@dataclasses.dataclass(frozen=True)
class Choice(Spec):
    """One of `options` (strings or integers; a value of another type is refused).
    `options` may be a callable returning them, resolved when validating (names
    registered elsewhere, e.g. the model zoo)."""

    default: Any = None
    options: tuple | Callable[[], Iterable] = ()
    note: str = ""

    def choices(self) -> tuple:
        return tuple(self.options() if callable(self.options) else self.options)

    def accepts(self, value) -> bool:
        choices = self.choices()
        if all(isinstance(o, str) for o in choices):
            return isinstance(value, str) and value in choices
        return _is_int(value) and value in choices

    def requirement(self) -> str:
        return "one of " + ", ".join(str(o) if o != "" else '""' for o in self.choices())


@dataclasses.dataclass(frozen=True)
class Bool(Spec):
    default: bool | None = None
    note: str = ""

    def accepts(self, value) -> bool:
        return isinstance(value, bool)

    def requirement(self) -> str:
        return "True or False"


@dataclasses.dataclass(frozen=True)
class Str(Spec):
    default: str | None = None
    nonempty: bool = False
    note: str = ""

    def accepts(self, value) -> bool:
        return isinstance(value, str) and (bool(value.strip()) or not self.nonempty)

    def requirement(self) -> str:
        return "a non-empty string" if self.nonempty else "a string"


@dataclasses.dataclass(frozen=True)
class Tuple(Spec):
    """A tuple (or list; not a string) whose items each satisfy `of`; `min_len`,
    `lengths` (the allowed lengths) and `distinct` constrain it as a whole. `shape`
    replaces the "a tuple" of the message (e.g. "() or a pair (min, max)")."""

    default: tuple = ()
    of: Spec | None = None
    min_len: int = 0
    lengths: tuple[int, ...] | None = None
    distinct: bool = False
    shape: str = ""
    note: str = ""

    def accepts(self, value) -> bool:
        if not isinstance(value, (tuple, list)):
            return False
        if len(value) < self.min_len or (self.lengths is not None and len(value) not in self.lengths):
            return False
        if self.of is not None and not all(self.of.accepts(v) for v in value):
            return False
        if self.distinct:
            try:
                return len(set(value)) == len(value)
            except TypeError:  # unhashable items
                return False
        return True

    def requirement(self) -> str:
        text = self.shape or ("a non-empty tuple" if self.min_len >= 1 else "a tuple")
        if self.distinct:
            text += " of distinct items"
        if self.of is not None:
            text += ", each " + self.of.requirement()
        return text


@dataclasses.dataclass(frozen=True)
class Dict(Spec):
    """A {name: value} mapping (string keys) whose values each satisfy `of`."""

    default: Mapping = dataclasses.field(default_factory=dict)
    of: Spec | None = None
    note: str = ""

    def build(self):
        return dict(self.default)

    def accepts(self, value) -> bool:
        if not _is_mapping(value):
            return False
        return all(isinstance(k, str) and (self.of is None or self.of.accepts(v)) for k, v in value.items())

    def requirement(self) -> str:
        return "a {name: value} mapping" + (f", each value {self.of.requirement()}" if self.of is not None else "")


_PLACEHOLDER_TYPES = {Int: int, Float: float, Str: str, Bool: bool, Choice: str}


@dataclasses.dataclass(frozen=True)
class Optional(Spec):
    """None (the default: an ml_collections placeholder of the inner spec's type,
    so overrides are still type-checked) or a value of `inner`."""

    inner: Spec = None
    note: str = ""

    @property
    def default(self):
        return None

    def build(self):
        return ml_collections.config_dict.placeholder(_PLACEHOLDER_TYPES[type(self.inner)])

    def accepts(self, value) -> bool:
        return value is None or self.inner.accepts(value)

    def requirement(self) -> str:
        return "None or " + self.inner.requirement()


class Section:
    """A group of fields (a nested ConfigDict), in declaration order."""

    def __init__(self, **fields: Spec | Section):
        self.fields = fields

    def build(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({name: spec.build() for name, spec in self.fields.items()})

    def walk(self, prefix: str = "") -> Iterator[tuple[str, Spec]]:
        """(dotted path, spec) of every field, depth first, in declaration order."""
        for name, spec in self.fields.items():
            if isinstance(spec, Section):
                yield from spec.walk(f"{prefix}{name}.")
            else:
                yield prefix + name, spec


@dataclasses.dataclass(frozen=True)
class Rule:
    """A relation between fields: `ok(config)` must hold (checked when `when(config)`,
    and only once every field is valid on its own). The error names `field`, then
    `requirement` (formatted with the config, e.g. "a divisor of {stamp.embed_dim}", or
    a function of the config) and suggests setting `field` or any of `others`."""

    field: str
    requirement: str | Callable[[Any], str]
    ok: Callable[[Any], bool]
    others: tuple[str, ...] = ()
    when: Callable[[Any], bool] | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return (self.field,) + self.others


# ------------------------------------------------------------------------------------ checks

_MISSING = object()


def get(config, path: str, default=_MISSING):
    """The value at a dotted `path` of a config (`default`, if given, when absent)."""
    node = config
    for key in path.split("."):
        if not _is_mapping(node) or key not in node:
            if default is _MISSING:
                raise KeyError(path)
            return default
        node = node[key]
    return node


def message(path: str, value, requirement: str, fix: Iterable[str] = ()) -> str:
    fixes = " or ".join(f"--config.{p}" for p in (path, *fix))
    return f"{path}={show(value)}: must be {requirement}; set {fixes}"


def _field_errors(config, section: Section, prefix: str) -> Iterator[str]:
    for name, spec in section.fields.items():
        if not _is_mapping(config) or name not in config:
            continue  # a config without this field: nothing to check
        value, path = config[name], prefix + name
        if isinstance(spec, Section):
            if _is_mapping(value):
                yield from _field_errors(value, spec, path + ".")
            else:
                yield message(path, value, f"a section with fields {', '.join(spec.fields)}")
        elif not spec.accepts(value):
            yield message(path, value, spec.explain())


def _rule_errors(config, rules: Iterable[Rule]) -> Iterator[str]:
    for rule in rules:
        if any(get(config, p, None) is None for p in rule.fields):
            continue  # a config without one of its fields (or an unset placeholder)
        try:
            broken = (rule.when is None or rule.when(config)) and not rule.ok(config)
        except (AttributeError, KeyError):  # a partial config without a field the condition reads
            continue
        if broken:
            text = rule.requirement(config) if callable(rule.requirement) else rule.requirement.format_map(config)
            yield message(rule.field, get(config, rule.field), text, rule.others)


def errors(config, schema: Section | None = None, rules: Iterable[Rule] | None = None) -> list[str]:
    """Every field's problem (one line each, in declaration order); the rules are
    checked only when no single field is wrong. `schema` and `rules` default to the
    base config's (`jaxcompress.config.SCHEMA`, `RULES`)."""
    if schema is None or rules is None:
        from jaxcompress import config as base  # lazy: jaxcompress.config builds its defaults from this module
        schema = base.SCHEMA if schema is None else schema
        rules = base.RULES if rules is None else rules
    found = list(_field_errors(config, schema, ""))
    return found or list(_rule_errors(config, rules))


def validate(config, schema: Section | None = None, rules: Iterable[Rule] | None = None) -> None:
    """Raises a one-line ConfigError for the first field outside the schema (or the
    first broken rule). Fields the schema does not declare are not checked."""
    found = errors(config, schema, rules)
    if found:
        raise ConfigError(found[0])
