"""What every compression environment shares: the episode state, the observation
features, the normalised action map, the budget checks and `play`.

An environment object holds only static numpy constants (the network's geometry,
the bounds and the budget); everything that changes lives in an explicit `EnvState`
pytree, so an episode is a `lax.scan` over the steps and N parallel actors a
`jax.vmap` over keys (see `jaxcompress.rl.search.rollout`). Agents act in a
*normalised* action space [0, 1]; the environment maps it onto its own range.

Observation of step t (`FEATURES`, 12 numbers): layer index, output channels, input
channels (of the group's first producer; a dense layer fed by a flattened map counts
every input row), kernel height and width, stride, the step's action bounds (lower
and upper: rate bounds for pruning, bit bounds for quantization), the step's FLOPs
(all producers of the group), the FLOPs of all later steps ("rest"), each min-max
normalised over the steps (a constant feature is 0); then the FLOPs (pruning) or
weight bits (quantization) removed so far as a fraction of the dense network's, and
the previous step's executed action normalised to [0, 1] (0 at the first step).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxcompress.errors import ConfigError
from jaxcompress.models.table import ModelTable

FEATURES = ("index", "c_out", "c_in", "kernel_h", "kernel_w", "stride", "bound_lo", "bound_hi", "flops",
            "flops_rest", "reduced", "prev_action")
OBS_DIM = len(FEATURES)


class EnvState(struct.PyTreeNode):
    """What changes during an episode.

    `values` holds the decisions so far: kept channels per *group* (undecided groups
    at full width) for pruning, bits per *layer* (undecided at b_max) for quantization.
    `actions` the executed actions in the environment's units (rate or bits), per step.
    """

    t: jax.Array
    values: jax.Array
    actions: jax.Array
    prev_action: jax.Array


def minmax(x) -> np.ndarray:
    """Min-max normalisation over the first axis; a constant column becomes 0."""
    x = np.asarray(x, np.float64)
    lo, hi = x.min(0), x.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (x - lo) / span, 0.0)


def layer_geometry(table: ModelTable, layer_index: int, widths) -> list[float]:
    """c_out, c_in, kernel height and width, stride of one layer at these group widths."""
    layer = table.layers[layer_index]
    c_out = widths[layer.out_group] if layer.out_group >= 0 else layer.out_fixed
    c_in = widths[layer.in_group] * layer.in_repeat if layer.in_group >= 0 else layer.in_fixed
    return [float(c_out), float(c_in), float(layer.kernel_size[0]), float(layer.kernel_size[1]),
            float(layer.strides[0])]


def static_observations(table: ModelTable, layers: Sequence[int], low: float, high: float,
                        step_flops) -> np.ndarray:
    """(T, 10) float32: the static features of the T steps (module doc), min-max
    normalised: the step index, the geometry of layer `layers[t]` at the dense widths,
    the action bounds, the step's FLOPs and those of all later steps."""
    step_flops = np.asarray(step_flops, np.float64)
    rest = np.asarray([step_flops[t + 1:].sum() for t in range(len(layers))])
    rows = [[float(t)] + layer_geometry(table, i, table.widths) + [low, high, step_flops[t], rest[t]]
            for t, i in enumerate(layers)]
    return minmax(np.asarray(rows)).astype(np.float32)


class CompressionEnv:
    """Shared machinery: static features, the normalised action map, the episode API."""

    num_steps: int
    low: np.ndarray  # (T,) action lower bounds in environment units
    high: np.ndarray  # (T,) action upper bounds
    static_obs: np.ndarray  # (T, 10) normalised static features

    def to_units(self, t, a_norm):
        a_norm = jnp.clip(a_norm, 0.0, 1.0)
        low, high = jnp.asarray(self.low)[t], jnp.asarray(self.high)[t]
        return low + (high - low) * a_norm

    def normalised(self, t, a):
        low, high = jnp.asarray(self.low)[t], jnp.asarray(self.high)[t]
        return jnp.where(high > low, (a - low) / jnp.where(high > low, high - low, 1.0), 0.0)

    def initial_values(self) -> np.ndarray:
        raise NotImplementedError

    def reset(self) -> EnvState:
        return EnvState(t=jnp.zeros((), jnp.int32), values=jnp.asarray(self.initial_values(), jnp.float32),
                        actions=jnp.zeros((self.num_steps,), jnp.float32), prev_action=jnp.zeros((), jnp.float32))

    def reduced(self, values):
        raise NotImplementedError

    def observe(self, state: EnvState) -> jax.Array:
        t = jnp.minimum(state.t, self.num_steps - 1)
        static = jnp.asarray(self.static_obs, jnp.float32)[t]
        return jnp.concatenate([static, jnp.stack([self.reduced(state.values), state.prev_action])])

    def step(self, state: EnvState, a_norm) -> EnvState:
        raise NotImplementedError

    def finalize(self, state: EnvState) -> EnvState:
        return state

    def result(self, state: EnvState) -> dict:
        raise NotImplementedError


class PruningEnv(CompressionEnv):
    """Shared by the pruning environments (`PruneEnv`, `ElementEnv`): a FLOPs budget and
    an optional parameter budget, both kept by the action wall; the observation's
    `reduced` is the fraction of the dense FLOPs removed. Subclasses define `flops` and
    `params` of their `values` and set `flops_dense`, `params_dense`."""

    flops_dense: float
    params_dense: float
    budget: float  # FLOPs
    params_budget: float | None

    def flops(self, values):
        raise NotImplementedError

    def params(self, values):
        raise NotImplementedError

    def set_budgets(self, flops_budget: float, params_budget: float | None, lowest, a_max: float) -> None:
        """The budgets in absolute units; ConfigError if `lowest` (every step at a_max)
        does not meet one."""
        self.budget = float(flops_budget) * self.flops_dense
        check_reachable("FLOPs", flops_budget, float(self.flops(lowest)) / self.flops_dense, a_max)
        self.params_budget = None if params_budget is None else float(params_budget) * self.params_dense
        if self.params_budget is not None:
            check_reachable("parameter", params_budget, float(self.params(lowest)) / self.params_dense, a_max)

    def reduced(self, values):
        return (self.flops_dense - self.flops(values)) / self.flops_dense


def check_reachable(what: str, budget: float, lowest: float, a_max: float) -> None:
    """One-line error when every searched group at its lowest count (a_max) still
    leaves more than `budget` of the dense network's `what` (both fractions)."""
    if lowest > budget * (1 + 1e-6):
        field = {"parameter": "params"}.get(what, what.lower())
        raise ConfigError(
            f"a {what} budget of {budget:.1%} cannot be met: pruning every searched group at the maximum rate "
            f"a_max={a_max:g} leaves {lowest:.1%} of the dense network's {what}; raise search.a_max or "
            f"search.{field}_budget, or search more groups (search.scope=all)")


def check_prune_bounds(flops_budget: float, a_min: float, a_max: float, multiple: int | None = 1,
                       params_budget: float | None = None) -> None:
    if not 0.0 < flops_budget <= 1.0:
        raise ConfigError(f"search.flops_budget={flops_budget:g} must be a fraction of the dense FLOPs in (0, 1]")
    if not 0.0 <= a_min < 1.0 or not 0.0 <= a_max < 1.0:
        raise ConfigError(f"pruning-rate bounds must lie in [0, 1): got a_min={a_min:g}, a_max={a_max:g}")
    if a_min > a_max:
        raise ConfigError(f"search.a_min={a_min:g} > search.a_max={a_max:g}; the lower pruning-rate bound must "
                          f"not exceed the upper one")
    if multiple is not None and multiple < 1:
        raise ConfigError(f"search.multiple={multiple} must be >= 1 (or None: the backend's)")
    if params_budget is not None and not 0.0 < params_budget <= 1.0:
        raise ConfigError(f"search.params_budget={params_budget:g} must be a fraction of the dense "
                          f"parameters in (0, 1] (or 0 for none)")


def play(env: CompressionEnv, actions) -> EnvState:
    """Final state of one episode with the given normalised actions (T,) (jittable; vmap
    it over a batch of action sequences)."""
    final, _ = jax.lax.scan(lambda s, a: (env.step(s, a), None), env.reset(), jnp.asarray(actions, jnp.float32))
    return env.finalize(final)
