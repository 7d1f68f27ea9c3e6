"""Variational pruning of conv kernels (H, W) and output channels via information dropout.

The two-stage paper's third pruning scheme (Zhan, Lin, Cao 2021, Sec. 3.2 and
Algorithm 2): after training, the network is fine-tuned with learned
multiplicative log-normal noise on its weights; elements whose noise the loss
tolerates carry no information about the task and are removed, then the network
is fine-tuned again. We implement it with the noise of information dropout
(Achille & Soatto 2018, section "Information Dropout"; the two-stage paper's
Eqs. 6-8) placed on *weight multipliers*, which is variational dropout on
weights with its scale-invariant log-uniform prior (Kingma, Salimans, Welling
2015, Sec. 3) and its use for sparsification (sparse variational dropout,
Molchanov, Ashukha, Vetrov 2017: prune the weights with the largest learned
noise alpha).

Noise model (hand-written; no library does structured weight noise for Flax).
Every prunable Conv layer (kind "conv", not depthwise, kernel larger than 1x1)
gets one noise scale per kernel position (kh, kw), shared over input and output
channels; every Conv (and, with `include_dense=True`, Dense) layer whose output
belongs to a channel group gets one per output channel. A train step draws
n ~ N(0, 1) once per step for every multiplier and runs the unchanged model
with

    kernel[kh, kw, ci, co] <- kernel * exp(alpha_s[kh, kw] n_s[kh, kw] + alpha_c[co] n_c[co]),

so log eps ~ N(0, alpha^2) on each multiplier (the layers are not modified).
The noise is shared over the batch (one sample per step), plain weight noise
rather than Kingma et al.'s local reparameterisation trick: the
multipliers act on whole kernel slices, so per-example noise would need one
kernel per example. alpha = alpha_min + alpha_max * sigmoid(rho) with a free
parameter rho, as in Achille & Soatto (alpha_max = 0.7 by default).

Objective: cross-entropy + beta * KL / N_train (Achille & Soatto's loss as in
their reference code; the minibatch SGVB estimate of Kingma et al. 2015's
variational lower bound, scaled by 1 / N_train, when beta = 1). KL is the
log-uniform-prior KL of information dropout, -log(alpha / (alpha_max +
alpha_min)), per multiplier, **weighted by the number of weights the multiplier
covers** (a spatial multiplier covers cin * cout weights, a channel multiplier
kh * kw * cin). Our choice: it is the KL the same noise level would cost if
every covered weight had its own log-normal posterior, so layers and the two
kinds of multiplier are charged in proportion to the parameters they gate and
the beta / N_train scale matches weight-level variational dropout.

BatchNorm: the network runs with `train=False` (BatchNorm frozen at its running
statistics). In training mode BatchNorm would divide every per-output-channel
multiplier out of the batch again, so channel noise would cost nothing and its
alpha would carry no information.

Decisions: `variational_masks` turns the learned noise into masks at the rates
the caller (e.g. the RL agent's a_t) asks for: the kernel positions / channels
with the *largest* alpha (most noise = least information) are zeroed. Channel
groups are scored by the mean log alpha over their noisy member layers, so every
member of a group is pruned the same way.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from tqdm.auto import trange

from jaxcompress.data import BatchIterator, normalize, shard_batch
from jaxcompress.distributed import process_slice
from jaxcompress.errors import ConfigError
from jaxcompress.layers.information_dropout import (ALPHA_MAX, ALPHA_MIN, information_dropout_alpha,
                                                    information_dropout_kl_relu)
from jaxcompress.models.table import LayerInfo, ModelTable
from jaxcompress.pruning import align
from jaxcompress.train.steps import cross_entropy, jit_data_parallel, make_mesh, replicated_copy

SPATIAL, CHANNEL = "spatial", "channel"


# --------------------------------------------------------------------------- noise parameters

def noisy_layers(table: ModelTable, include_dense: bool = False) -> tuple[LayerInfo, ...]:
    """Layers that carry weight noise: non-depthwise convs (and dense layers if asked)."""
    return tuple(l for l in table.layers
                 if (l.kind == "conv" and not l.depthwise) or (include_dense and l.kind == "dense"))


def init_noise_logits(table: ModelTable, include_dense: bool = False, init_alpha: float = 0.05,
                      alpha_max: float = ALPHA_MAX, alpha_min: float = ALPHA_MIN) -> dict:
    """Noise parameters rho, `{layer path: {"spatial": (kh, kw), "channel": (cout,)}}`.

    A layer gets `spatial` only if it is a conv with more than one kernel position
    and `channel` only if its output is a channel group (not the classifier).
    Every alpha starts at `init_alpha` (small: the trained network is barely disturbed).
    """
    if not alpha_min < init_alpha < alpha_min + alpha_max:
        raise ConfigError(f"init_alpha={init_alpha:g} must lie in ({alpha_min:g}, {alpha_min + alpha_max:g})")
    p = (init_alpha - alpha_min) / alpha_max
    rho0 = float(np.log(p) - np.log1p(-p))
    out = {}
    for layer in noisy_layers(table, include_dense):
        entry = {}
        if layer.kind == "conv" and layer.kernel_size[0] * layer.kernel_size[1] > 1:
            entry[SPATIAL] = jnp.full(layer.kernel_size, rho0, jnp.float32)
        if layer.out_group >= 0:
            entry[CHANNEL] = jnp.full((table.widths[layer.out_group],), rho0, jnp.float32)
        if entry:
            out[layer.path] = entry
    return out


def log_alpha_from_logits(noise_logits: Mapping, alpha_max: float = ALPHA_MAX,
                          alpha_min: float = ALPHA_MIN) -> dict:
    """log alpha of every multiplier as float64 numpy (keeps the ranking of rho where
    float32 would saturate the sigmoid)."""
    def conv(rho):
        rho = np.asarray(rho, np.float64)
        return np.log(alpha_min + alpha_max * (0.5 * (1.0 + np.tanh(0.5 * rho))))
    return jax.tree.map(conv, dict(noise_logits))


def _kernel_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) + ("kernel",)


def perturb_kernels(params: Mapping, noise_logits: Mapping, rng: jax.Array,
                    alpha_max: float = ALPHA_MAX, alpha_min: float = ALPHA_MIN) -> dict:
    """params with every noisy kernel multiplied by exp(alpha * n), n ~ N(0, 1).

    Spatial multipliers broadcast over (cin, cout), channel multipliers over
    (kh, kw, cin) (or over the rows of a dense kernel). Differentiable in params
    and in the noise logits (reparameterisation trick).
    """
    flat = traverse_util.flatten_dict(dict(params))
    for i, path in enumerate(sorted(noise_logits)):
        entry = noise_logits[path]
        key = _kernel_key(path)
        kernel = flat[key]
        r_spatial, r_channel = jax.random.split(jax.random.fold_in(rng, i))
        log_eps = jnp.zeros((), kernel.dtype)
        if SPATIAL in entry:
            alpha = information_dropout_alpha(entry[SPATIAL], alpha_max, alpha_min)
            n = jax.random.normal(r_spatial, alpha.shape, alpha.dtype)
            log_eps = log_eps + (alpha * n).reshape(alpha.shape + (1,) * (kernel.ndim - 2))
        if CHANNEL in entry:
            alpha = information_dropout_alpha(entry[CHANNEL], alpha_max, alpha_min)
            log_eps = log_eps + alpha * jax.random.normal(r_channel, alpha.shape, alpha.dtype)
        flat[key] = kernel * jnp.exp(log_eps).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def weight_noise_kl(noise_logits: Mapping, params: Mapping, alpha_max: float = ALPHA_MAX,
                    alpha_min: float = ALPHA_MIN) -> jax.Array:
    """Sum over multipliers of (weights covered) * -log(alpha / (alpha_max + alpha_min)).

    Achille & Soatto 2018 (ReLU / log-uniform prior KL); the weighting is explained in
    the module docstring. Only kernel *shapes* are read from `params`.
    """
    flat = traverse_util.flatten_dict(dict(params))
    total = jnp.zeros((), jnp.float32)
    for path, entry in noise_logits.items():
        size = int(np.prod(flat[_kernel_key(path)].shape))
        for rho in entry.values():
            alpha = information_dropout_alpha(rho, alpha_max, alpha_min)
            total = total + (size // rho.size) * jnp.sum(information_dropout_kl_relu(alpha, alpha_max, alpha_min))
    return total


# --------------------------------------------------------------------------- training

class VariationalState(struct.PyTreeNode):
    """Weights and noise logits trained jointly, with frozen masks / quant / BN statistics."""

    step: jax.Array
    params: Any
    noise: Any
    batch_stats: Any
    masks: Any
    quant: Any
    opt_state: Any
    rng: jax.Array
    kl_weight: jax.Array  # beta / N_train, traced: changing beta does not recompile the step
    apply_fn: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def variables(self, params=None) -> dict:
        out = {"params": self.params if params is None else params}
        for col in ("batch_stats", "masks", "quant"):
            tree = getattr(self, col)
            if tree:
                out[col] = tree
        return out


@functools.lru_cache(maxsize=16)
def make_optimizer(learning_rate: float, noise_learning_rate: float, momentum: float = 0.9):
    """SGD with momentum on the weights (the paper's optimiser), Adam on the noise logits
    (their gradients, beta * covered / N_train, differ by orders of magnitude between layers).
    Cached, so repeated runs with the same rates reuse one compiled step."""
    labels = lambda t: {"params": jax.tree.map(lambda _: "params", t["params"]),
                        "noise": jax.tree.map(lambda _: "noise", t["noise"])}
    return optax.multi_transform({"params": optax.sgd(learning_rate, momentum=momentum or None),
                                  "noise": optax.adam(noise_learning_rate)}, labels)


def make_variational_step(mean, std, alpha_max: float = ALPHA_MAX, alpha_min: float = ALPHA_MIN):
    """`step(state, batch) -> (state, metrics)`: one step on CE + beta * KL / N_train
    (`state.kl_weight` = beta / N_train)."""

    def step(state: VariationalState, batch):
        x = normalize(batch["image"], mean, std)
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(trainable):
            noisy = perturb_kernels(trainable["params"], trainable["noise"], rng, alpha_max, alpha_min)
            logits = state.apply_fn(state.variables(noisy), x, train=False)
            ce = cross_entropy(logits, batch["label"]).mean()
            kl = weight_noise_kl(trainable["noise"], trainable["params"], alpha_max, alpha_min)
            return ce + state.kl_weight * kl, (ce, kl, logits)

        trainable = {"params": state.params, "noise": state.noise}
        (loss, (ce, kl, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = state.tx.update(grads, state.opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        leaves = [information_dropout_alpha(r, alpha_max, alpha_min) for r in jax.tree.leaves(trainable["noise"])]
        mean_log_alpha = (jnp.mean(jnp.log(jnp.concatenate([a.reshape(-1) for a in leaves])))
                          if leaves else jnp.zeros(()))
        metrics = {"loss": loss, "ce": ce, "kl": kl, "mean_log_alpha": mean_log_alpha,
                   "accuracy": (logits.argmax(-1) == batch["label"]).mean()}
        return state.replace(step=state.step + 1, params=trainable["params"], noise=trainable["noise"],
                             opt_state=opt_state), metrics

    return step


_STEPS: dict = {}


def _jitted_step(mean, std, alpha_max, alpha_min, mesh):
    """One jitted data-parallel step per (normalisation, alpha range, mesh), reused by
    later calls (an RL search prunes many times: only the first call compiles)."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    key = (mean.tobytes(), mean.shape, std.tobytes(), std.shape, float(alpha_max), float(alpha_min), mesh)
    if key not in _STEPS:
        if len(_STEPS) >= 8:
            _STEPS.clear()
        _STEPS[key] = jit_data_parallel(make_variational_step(mean, std, alpha_max, alpha_min), mesh)
    return _STEPS[key]


@dataclasses.dataclass
class VariationalResult:
    """What `fit_variational` learned.

    log_alpha: `{layer path: {"spatial": (kh, kw), "channel": (cout,)}}`, float64
        numpy, the input of `variational_masks`.
    noise_logits: the raw parameters rho (float32), to resume training.
    variables: the jointly trained variables (params; masks, quant, batch_stats
        passed through unchanged), evaluated without noise.
    history: per-step metrics (loss, ce, kl, mean_log_alpha, accuracy) as arrays.
    """

    log_alpha: dict
    noise_logits: dict
    variables: dict
    history: dict


def _num_train(train_iter, first_batch) -> int:
    steps = getattr(train_iter, "steps_per_epoch", None)
    if steps is None:
        raise ConfigError("cannot tell the training-set size from the iterator; pass num_train=")
    return int(steps) * int(getattr(train_iter, "batch_size", None) or len(first_batch["label"]))  # global batch


def fit_variational(table: ModelTable, variables: Mapping, train_iter: Iterator, mean, std, num_steps: int,
                    learning_rate: float, beta: float, seed: int, *, noise_learning_rate: float = 1e-2,
                    momentum: float = 0.9, num_train: int | None = None, include_dense: bool = False,
                    init_alpha: float = 0.05, alpha_max: float = ALPHA_MAX, alpha_min: float = ALPHA_MIN,
                    noise_logits: Mapping | None = None, mesh=None, progress: bool = True) -> VariationalResult:
    """Trains weights and weight noise jointly from the trained `variables`.

    `train_iter` yields host batches {"image": uint8 NHWC, "label"} (a
    `jaxcompress.data.BatchIterator`); each is split over the ('data',) `mesh`
    (default: all devices), so the batch size must be a multiple of the device
    count. `num_train` (N_train in the KL scale) defaults to
    `train_iter.steps_per_epoch * batch size`, within one batch of the true size
    for a BatchIterator. One jitted step per batch (compiled once per
    normalisation / mesh and reused by later calls), with a tqdm bar.
    """
    if num_steps < 0:
        raise ConfigError(f"num_steps must be >= 0, got {num_steps}")
    if beta < 0:
        raise ConfigError(f"beta must be >= 0, got {beta:g}")
    if learning_rate < 0 or noise_learning_rate <= 0:
        raise ConfigError(f"learning rates must be positive, got {learning_rate:g} / {noise_learning_rate:g}")
    mesh = make_mesh() if mesh is None else mesh
    noise = (init_noise_logits(table, include_dense, init_alpha, alpha_max, alpha_min)
             if noise_logits is None else jax.tree.map(jnp.asarray, dict(noise_logits)))
    if not noise:
        raise ConfigError("the model has no layer to carry weight noise (no non-depthwise conv"
                          + ("" if include_dense else "; try include_dense=True") + ")")
    params = variables["params"]
    tx = make_optimizer(float(learning_rate), float(noise_learning_rate), float(momentum))
    state = VariationalState(
        step=jnp.zeros((), jnp.int32), params=params, noise=noise,
        batch_stats=variables.get("batch_stats", {}), masks=variables.get("masks", {}),
        quant=variables.get("quant", {}), opt_state=tx.init({"params": params, "noise": noise}),
        rng=jax.random.PRNGKey(seed), kl_weight=jnp.zeros((), jnp.float32), apply_fn=table.model.apply, tx=tx)
    first = next(train_iter) if num_steps else None
    if first is not None:
        n = _num_train(train_iter, first) if num_train is None else int(num_train)
        state = state.replace(kl_weight=jnp.asarray(float(beta) / n, jnp.float32))
    # A copy (the step donates its input), placed as the step's outputs are, so that the
    # second step does not recompile for a different input sharding.
    state = replicated_copy(state, mesh)
    history = []
    step_fn = _jitted_step(mean, std, alpha_max, alpha_min, mesh)
    with trange(num_steps, desc="variational pruning", disable=not progress, leave=False) as bar:
        for i in bar:
            batch = first if i == 0 else next(train_iter)
            state, metrics = step_fn(state, shard_batch(batch, mesh))
            history.append(metrics)
            if progress and (i % 25 == 0 or i == num_steps - 1):
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}",
                                log_alpha=f"{float(metrics['mean_log_alpha']):.3f}")
    history = {k: np.asarray([float(h[k]) for h in jax.device_get(history)]) for k in
               (history[0] if history else {})}
    noise = jax.device_get(state.noise)
    return VariationalResult(log_alpha=log_alpha_from_logits(noise, alpha_max, alpha_min),
                             noise_logits=noise, variables=jax.device_get(state.variables()), history=history)


def train_variational(table: ModelTable, variables: Mapping, train_iter: Iterator, mean, std, num_steps: int,
                      learning_rate: float, beta: float, seed: int, **kwargs) -> dict:
    """`fit_variational(...)`'s log alpha pytree (see there for the keyword options)."""
    return fit_variational(table, variables, train_iter, mean, std, num_steps, learning_rate, beta, seed,
                           **kwargs).log_alpha


# --------------------------------------------------------------------------- decisions

def _rates(rate, names: Sequence[str], what: str) -> dict[str, float]:
    if isinstance(rate, Mapping):
        unknown = sorted(set(rate) - set(names))
        if unknown:
            raise ConfigError(f"{what} rates name {unknown}, which carry no noise; choose among: "
                              f"{', '.join(names)}")
        rates = {k: float(v) for k, v in rate.items()}
    else:
        rates = {k: float(rate) for k in names}
    for k, r in rates.items():
        if not 0.0 <= r < 1.0:
            raise ConfigError(f"{what} pruning rate {r:g} for {k} is outside [0, 1)")
    return rates


def _prune_highest(score: np.ndarray, alive: np.ndarray, rate: float) -> np.ndarray:
    """Keep mask: of the alive entries, zero round(rate * alive) with the largest score
    (ties: lower index first), always keeping at least one."""
    idx = np.flatnonzero(alive)
    k = min(int(round(rate * idx.size)), idx.size - 1)
    keep = alive.astype(np.float32).copy()
    if k > 0:
        order = idx[np.argsort(-score[idx], kind="stable")]
        keep[order[:k]] = 0.0
    return keep


def _kernel_shape(table: ModelTable, layer: LayerInfo) -> tuple[int, ...]:
    cin = layer.in_fixed if layer.in_group < 0 else table.widths[layer.in_group] * layer.in_repeat
    cout = layer.out_fixed if layer.out_group < 0 else table.widths[layer.out_group]
    return (*layer.kernel_size, cin, cout) if layer.kind == "conv" else (cin, cout)


def variational_masks(table: ModelTable, log_alpha: Mapping, element_rate: float | Mapping[str, float] = 0.0,
                      channel_rate: float | Mapping[str, float] = 0.0, masks: Mapping | None = None,
                      groups: Sequence[int] | None = None, multiple: int | None = 1) -> dict:
    """Masks that prune the noisiest kernel positions and channels.

    `log_alpha` is `{layer path: {"spatial": (kh, kw), "channel": (cout,)}}` (from
    `train_variational`); only the ranking matters. `element_rate` (one rate, or a
    `{layer path: rate}` dict) is the fraction of each layer's kernel positions
    (kh, kw) to zero; the element mask `masks/<layer>/kernel` has the kernel's
    shape, constant over (cin, cout). `channel_rate` (one rate, or a `{group name:
    rate}` dict) is the fraction of each channel group's channels to zero, scored
    by the mean log alpha over the group's noisy member layers; groups without
    channel noise, or outside `groups`, are left whole. Rates count the positions /
    channels still alive in `masks` (already-pruned ones stay pruned and are not
    counted again); at least one position per layer and one channel per group is
    always kept; kept channel counts are aligned to `multiple` (`align.aligned`: an
    integer, or None for the backend's). Returns the whole `masks` collection (starting from `masks`, or
    all-ones group masks when None).
    """
    flat = traverse_util.flatten_dict(dict(masks)) if masks is not None else {}
    by_path = {l.path: l for l in table.layers}
    unknown = sorted(set(log_alpha) - set(by_path))
    if unknown:
        raise ConfigError(f"log_alpha names layers {unknown} that the model does not have")

    spatial_layers = [p for p in by_path if SPATIAL in log_alpha.get(p, {})]
    for path, rate in _rates(element_rate, spatial_layers, "element").items():
        if rate == 0.0:
            continue
        score = np.asarray(log_alpha[path][SPATIAL], np.float64)
        key = _kernel_key(path)
        old = np.asarray(flat[key], np.float32) if key in flat else np.ones(_kernel_shape(table, by_path[path]),
                                                                            np.float32)
        if old.shape[:2] != score.shape:
            raise ValueError(f"{path}: log_alpha spatial shape {score.shape} != kernel positions {old.shape[:2]}")
        alive = (old.reshape(score.size, -1) > 0).any(axis=1)
        keep = _prune_highest(score.reshape(-1), alive, rate).reshape(score.shape)
        flat[key] = jnp.asarray(old * keep[:, :, None, None])

    group_masks = ([np.asarray(m, np.float32) for m in table.group_masks(traverse_util.unflatten_dict(flat))]
                   if masks is not None else [np.ones(w, np.float32) for w in table.widths])
    allowed = set(range(table.num_groups) if groups is None else groups)
    members: dict[int, list[np.ndarray]] = {}
    for path, entry in log_alpha.items():
        g = by_path[path].out_group
        if CHANNEL in entry and g >= 0 and g in allowed:
            members.setdefault(g, []).append(np.asarray(entry[CHANNEL], np.float64))
    names = table.group_names
    noisy_names = [names[g] for g in sorted(members)]
    mults = align.group_multiples(table.widths, sorted(members), multiple)
    for name, rate in _rates(channel_rate, noisy_names, "channel").items():
        g = names.index(name)
        alive = int(np.sum(group_masks[g] > 0))
        rate = 1.0 - align.aligned(alive, alive * (1.0 - rate), min(mults[g], alive)) / alive
        score = np.mean(np.stack(members[g]), axis=0)
        if score.shape != (table.widths[g],):
            raise ValueError(f"group {name}: channel log_alpha shape {score.shape} != ({table.widths[g]},)")
        group_masks[g] = _prune_highest(score, group_masks[g] > 0, rate)
    return table.layer_masks([jnp.asarray(m) for m in group_masks], traverse_util.unflatten_dict(flat))


# --------------------------------------------------------------------------- prune job

def variational_prune(exp, variables: Mapping, channel_rate: float | Mapping[str, float], *,
                      groups: Sequence[int] | None = None, settings: Mapping | None = None,
                      learning_rate: float = 0.01, batch_size: int = 128, seed: int = 0,
                      multiple: int | None = 1) -> tuple[dict, dict]:
    """Variational channel pruning of `exp`'s network (Zhan et al. Sec. 4.2): fit the
    information-dropout noise on `exp`'s training split, then mask.

    Channels: `channel_rate` (a fraction, or {group name: fraction}) of each group in
    `groups`, kept counts multiples of `multiple`. Kernel positions and training
    settings come from `settings` (`prune.variational`): spatial_rate (0.0), num_steps
    (500), beta (1.0), learning_rate (`learning_rate`), noise_learning_rate (0.01),
    batch_size (`batch_size`), include_dense (False), init_alpha (0.05).
    Returns `(masks, params)`, the params trained jointly with the noise.
    """
    v = dict(settings or {})
    x, y = exp.train
    process_index, process_count = process_slice()  # this process's rows of each global batch
    it = BatchIterator(x, y, int(v.get("batch_size", batch_size)), seed=seed, process_index=process_index,
                       process_count=process_count)
    result = fit_variational(
        exp.table, variables, it, exp.mean, exp.std, int(v.get("num_steps", 500)),
        float(v.get("learning_rate", learning_rate)), float(v.get("beta", 1.0)), seed,
        noise_learning_rate=float(v.get("noise_learning_rate", 1e-2)), num_train=len(x),
        include_dense=bool(v.get("include_dense", False)), init_alpha=float(v.get("init_alpha", 0.05)),
        mesh=exp.mesh)
    masks = variational_masks(exp.table, result.log_alpha, float(v.get("spatial_rate", 0.0)), channel_rate,
                              masks=variables.get("masks"), groups=groups, multiple=multiple)
    return masks, result.variables["params"]
