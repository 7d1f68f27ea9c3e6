"""Quantization-aware apply: every zoo model, every weight quantizer, one pure function.

The layers quantize activations themselves (`bits_a`, `range_a` in the `quant`
collection). Weights are fake-quantized here, before `model.apply`, by a
`WeightQuantizer` (symmetric / asymmetric, per channel / per tensor, k-means), with
the straight-through estimator of the two-stage paper's QAT stage (Zhan et al. 2021,
Sec. 4.2) and HAQ (Wang et al. 2019). `bits_w` (and, for k-means, the fixed cluster
assignment `assign_w`) stay in the `quant` collection, so they are checkpointed with
the parameters; `quantized_apply` hands the layers a `quant` collection without them,
so weights are never quantized twice. For the default quantizer (symmetric, per
channel) the result equals the layers' own `bits_w` path up to float rounding (this
path multiplies by exactly rounded reciprocals instead of dividing, so that training,
export and loading compute identical numbers); unlike it, pruned elements stay exactly
zero at one bit.

    apply_fn = make_quantized_apply(model, WeightQuantizer("kmeans"))
    state = state.replace(apply_fn=apply_fn)   # then `fit` trains it (QAT)

A whole network, the way the `quantize` job, its benchmark and the RL search's stage 2
do it: `quantize_state` (bits, k-means assignments, calibrated activation ranges: PTQ),
then `train_qat` (QAT with a training `Recipe`):

    qrecipe = QuantRecipe.from_config(config)           # or QuantRecipe(seed=...)
    qstate, ranges = quantize_state(exp, state, bits_w, bits_a, qrecipe)
    qstate, info = train_qat(exp, qstate, recipe, workdir, teacher=Teacher.of(state))
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.quant.calibrate import calibrate_ranges
from jaxcompress.quant.policy import make_quant
from jaxcompress.quant.quantizers import FLOAT_BITS, WeightQuantizer, fake_quant_weight, kmeans_1d
from jaxcompress.train import Experiment, Recipe, Teacher, TrainState, fit

WEIGHT_KEYS = ("bits_w", "assign_w")


def kernel_out_ndim(flat_params: Mapping, path: tuple) -> int:
    """Trailing kernel axes that index outputs: the bias's rank where the layer has a bias
    (2 for an attention projection's (heads, head_dim)), else 1 (Conv, Dense). A bias-free
    DenseGeneral with several feature axes is read as one output axis."""
    bias = flat_params.get(path + ("bias",))
    return 1 if bias is None else max(1, len(np.shape(bias)))


def output_matrix(a, out_ndim: int):
    """A kernel (or its mask / cluster indices) as an (inputs, outputs) matrix: the weight
    quantizers' one scale per output covers every output axis, (heads, head_dim) included
    (None stays None)."""
    if a is None or out_ndim == 1:
        return a
    shape = np.shape(a)
    return jnp.reshape(a, (-1, int(np.prod(shape[len(shape) - out_ndim:]))))


def weight_mask(flat_masks: Mapping, path: tuple, shape, out_ndim: int = 1) -> jnp.ndarray | None:
    """Element mask times the output-channel mask of a kernel (None when unmasked). The
    channel mask indexes the first of the `out_ndim` trailing output axes (`kernel_out_ndim`:
    the heads of a (heads, head_dim) projection)."""
    km, cm = flat_masks.get(path + ("kernel",)), flat_masks.get(path + ("channel",))
    if km is None and cm is None:
        return None
    mask = jnp.ones(shape, jnp.float32)
    if km is not None:
        mask = mask * jnp.asarray(km, jnp.float32)
    if cm is not None:
        cm = jnp.asarray(cm, jnp.float32)
        mask = mask * cm.reshape(cm.shape + (1,) * (out_ndim - 1))
    return mask


def activation_quant(quant: Mapping | None) -> dict:
    """The `quant` collection without the weight entries (what the layers should see)."""
    if not quant:
        return {}
    flat = {k: v for k, v in traverse_util.flatten_dict(dict(quant)).items() if k[-1] not in WEIGHT_KEYS}
    return traverse_util.unflatten_dict(flat) if flat else {}


def quantized_params(params: Mapping, masks: Mapping | None, quant: Mapping | None,
                     quantizer: WeightQuantizer) -> dict:
    """`params` with every kernel that has a `bits_w` replaced by its fake-quantized value."""
    if not quant:
        return params
    flat_q = traverse_util.flatten_dict(dict(quant))
    flat_p = dict(traverse_util.flatten_dict(dict(params)))
    flat_m = traverse_util.flatten_dict(dict(masks)) if masks else {}
    for key, bits in flat_q.items():
        if key[-1] != "bits_w":
            continue
        path = key[:-1]
        kernel = flat_p[path + ("kernel",)]
        n_out = kernel_out_ndim(flat_p, path)
        as_matrix = functools.partial(output_matrix, out_ndim=n_out)
        mask = weight_mask(flat_m, path, kernel.shape, n_out)
        flat_p[path + ("kernel",)] = fake_quant_weight(
            as_matrix(kernel), bits, quantizer, as_matrix(mask), as_matrix(flat_q.get(path + ("assign_w",)))
        ).reshape(kernel.shape)
    return traverse_util.unflatten_dict(flat_p)


def make_quantized_apply(model, quantizer: WeightQuantizer | None = None):
    """`apply(variables, x, **kw)` like `model.apply`, with weights quantized by `quantizer`."""
    quantizer = quantizer or WeightQuantizer()

    def apply(variables, *args, **kwargs):
        quant = variables.get("quant")
        if quant:
            variables = dict(variables)
            variables["params"] = quantized_params(variables["params"], variables.get("masks"), quant, quantizer)
            act = activation_quant(quant)
            if act:
                variables["quant"] = act
            else:
                del variables["quant"]
        return model.apply(variables, *args, **kwargs)

    return apply


def add_kmeans_assignments(params: Mapping, masks: Mapping | None, quant: Mapping, iters: int = 20) -> dict:
    """Runs Lloyd's k-means on every kernel with `bits_w` < 32 and stores the cluster
    indices as `assign_w` (fixed afterwards: QAT then fine-tunes the centroids)."""
    flat_q = dict(traverse_util.flatten_dict(dict(quant)))
    flat_p = traverse_util.flatten_dict(dict(params))
    flat_m = traverse_util.flatten_dict(dict(masks)) if masks else {}
    for key, bits in list(flat_q.items()):
        if key[-1] != "bits_w" or float(bits) >= FLOAT_BITS:
            continue
        path = key[:-1]
        kernel = flat_p[path + ("kernel",)]
        n_out = kernel_out_ndim(flat_p, path)
        mask = weight_mask(flat_m, path, kernel.shape, n_out)
        assign, _ = kmeans_1d(output_matrix(kernel, n_out), bits, output_matrix(mask, n_out), iters=iters)
        assign = assign.reshape(kernel.shape)
        flat_q[path + ("assign_w",)] = assign
    return traverse_util.unflatten_dict(flat_q)


# ------------------------------------------------------------------------------------------------
# A whole network: PTQ (`quantize_state`), then QAT (`train_qat`)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """How `quantize_state` quantizes a float network (besides its bits): the weight
    quantizer, k-means iterations, and the activation-range calibration (`calibrate_ranges`
    with method `calibration` on `calib_batches` random training batches of
    `calib_batch_size` images, drawn with `seed`). The field names are `config.quant`'s."""

    quantizer: WeightQuantizer = WeightQuantizer()
    kmeans_iters: int = 20
    calibration: str = "minmax"
    percentile: float = 99.99
    calib_batches: int = 4
    calib_batch_size: int = 256
    seed: int = 0

    @classmethod
    def from_config(cls, config) -> "QuantRecipe":
        """`config.quant` (its scheme and granularity make the quantizer) and `config.seed`."""
        q = config.quant
        return cls(WeightQuantizer(q.scheme, q.granularity), int(q.kmeans_iters), q.calibration,
                   float(q.percentile), int(q.calib_batches), int(q.calib_batch_size), int(config.seed))

    def replace(self, **changes) -> "QuantRecipe":
        return dataclasses.replace(self, **changes)


def calibration_batches(exp: Experiment, num_batches: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """`num_batches` normalised batches of `batch_size` distinct random training images
    of `exp` (fewer when the split is smaller)."""
    n = len(exp.train[0])
    if n == 0:
        raise ConfigError("calibration data is empty: the training split has no examples")
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, min(n, num_batches * batch_size), replace=False)
    x = np.asarray(normalize(exp.train[0][idx], exp.mean, exp.std))
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


@functools.lru_cache(maxsize=16)
def _shared_apply(model, quantizer: WeightQuantizer):
    """One quantized apply per (model, quantizer), so that every network quantized from the
    same model shares the jitted calibration, evaluation and training steps."""
    return make_quantized_apply(model, quantizer)


def quantize_state(exp: Experiment, state: TrainState, bits_w, bits_a, qrecipe: QuantRecipe = QuantRecipe()
                   ) -> tuple[TrainState, dict]:
    """Post-training quantization of the float network `state` of `exp.model`.

    `bits_w` / `bits_a`: weight / input-activation bits, each one number or a {layer path:
    bits} dict (`resolve_bits` makes both from uniform values and a policy file; 32 =
    float). Builds the `quant` collection, adds k-means assignments (`qrecipe.quantizer`
    k-means), calibrates the activation ranges on training batches and sets the quantized
    apply. Returns `(quantized state, {layer: calibration record})`; train it with
    `train_qat`.
    """
    quant = make_quant(exp.table, bits_w=bits_w, bits_a=bits_a)
    if qrecipe.quantizer.scheme == "kmeans":
        quant = add_kmeans_assignments(state.params, state.masks or None, quant, qrecipe.kmeans_iters)
    apply_fn = _shared_apply(exp.model, qrecipe.quantizer)
    batches = calibration_batches(exp, qrecipe.calib_batches, qrecipe.calib_batch_size, qrecipe.seed)
    quant, ranges = calibrate_ranges(apply_fn, {**state.variables(), "quant": quant}, batches,
                                     qrecipe.calibration, qrecipe.percentile, seed=qrecipe.seed,
                                     mesh=getattr(exp, "mesh", None))  # data parallel over the run's devices
    return state.replace(quant=quant, apply_fn=apply_fn), ranges


def train_qat(exp: Experiment, state: TrainState, recipe: Recipe, workdir: str, *, teacher: Teacher | None = None
              ) -> tuple[TrainState, dict]:
    """Quantization-aware training: `fit`s the quantized network `state` (from
    `quantize_state`: its `quant` collection and quantized apply; weights and activations
    fake-quantized, straight-through gradients) with the training `recipe` (a new
    optimiser, from step 0) into `workdir` (resumed from `<workdir>/checkpoints`). With
    `teacher` (e.g. `Teacher.of(float_state)`) and `recipe.distill_weight` > 0 it distils.
    Returns `(trained state, {"best_val_accuracy", "train_time_s"})`: the last state,
    still quantized (bits and ranges stay fixed; k-means trains the centroids).
    """
    if not state.quant:
        raise ValueError("train_qat needs a quantized network: quantize the float one with quantize_state first")
    if recipe.num_epochs <= 0:
        raise ConfigError(f"QAT needs a positive number of epochs, got {recipe.num_epochs}")
    return fit(state, exp, recipe, workdir, teacher=teacher)
