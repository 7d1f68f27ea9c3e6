"""The `quantize` job: float network -> bits -> (k-means) -> calibration -> PTQ or QAT
-> packed export -> load back and check.

The float network is a trained run (`quant.checkpoint`, its best/; trained there or
into `<workdir>/pretrain` when missing), a prune job's shrunk fine-tuned network
(`quant.pruned_checkpoint`), or pruned here first (`quant.prune_first`: the `prune`
job with `config.prune` runs into `<workdir>/prune`): prune, shrink, quantize, export
in one job (Deep Compression's pipeline).

Bits: `quant.bits_w` / `quant.bits_a` (one number), per-layer overrides
`quant.layer_bits_w` / `quant.layer_bits_a` ({layer path: bits}), or a policy file
(`quant.policy`, see `jaxcompress.quant.policy.write_policy`). Then, optionally, a
budget (`quant.budget_bytes`, `quant.budget_ratio` of the float32 size,
`quant.budget_uniform_bits` = the size of the network at that uniform width, or
`quant.budget_bitops`) enforced HAQ-style or by the sensitivity heuristic
(`quant.allocation`).

Writes `summary.json` (accuracies float / PTQ / QAT / exported, bytes by the
accounting and of the file, output agreement of the loaded model), `model.npz` (the
packed network), `policy.json` (the bits used, in the policy-file format) and
`bits.png`, `model.stablehlo` (the loaded network as serialized StableHLO, uint8
images in, runnable with plain `jax.export`; `jaxcompress.stablehlo`) and, where layers
run in integers, `model.int8.stablehlo` (the integer network: int8 x int8 -> int32
convolutions and products in the module, the same plain-JAX call). An interrupted
QAT resumes from `<workdir>/qat/checkpoints`.

The stages, each a function of the job's module: `float_network`, `choose_bits`,
`post_training_quantize` (`quant.qat.quantize_state`), `quantization_aware_training`
(`quant.qat.train_qat`), `export_and_verify` (with `verify_stablehlo`), `integer_check`
(`quant.integer_check`), `quantize_summary` and `write_outputs`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from jaxcompress import cost, files, schema
from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.latency import measured_latency
from jaxcompress.models import ModelTable, create_model, describe
from jaxcompress.pruning.job import prune_and_finetune
from jaxcompress.quant import budget as B
from jaxcompress.quant.calibrate import calibrate_ranges
from jaxcompress.quant.export import compare_outputs, export_packed, fold_batchnorm, load_packed, norm_epsilons
from jaxcompress.quant.integer import INTEGER, integer_apply, integer_layers, integerize
from jaxcompress.quant.policy import make_quant, resolve_bits, write_policy
from jaxcompress.quant.qat import QuantRecipe, _shared_apply, quantize_state, train_qat
from jaxcompress.quant.quantizers import FLOAT_BITS, WeightQuantizer
from jaxcompress.report import plot_layer_bars
from jaxcompress.stablehlo import export_stablehlo, load_stablehlo
from jaxcompress.timing import apply_latencies
from jaxcompress.train import Experiment, Recipe, Teacher, TrainState, create_train_state, setup_experiment
from jaxcompress.train import steps as S
from jaxcompress.train.checkpoint import Checkpointer, CheckpointError
from jaxcompress.train.loop import load_trained, make_eval_fn, train_and_evaluate
from jaxcompress.train.metrics import write_json

MODES = ("ptq", "qat")
ALLOCATIONS = ("uniform", "sensitivity")


def index_bits_from_config(q) -> dict[str, int]:
    """The CSR relative-index bits of `config.quant` ({"conv": ..., "dense": ...})."""
    return {"conv": int(q.index_bits_conv), "dense": int(q.index_bits_dense)}


def qat_recipe(config) -> Recipe:
    """The training recipe of QAT: `config.train`'s, for `quant.qat_epochs` epochs at
    `quant.qat_learning_rate`."""
    q = config.quant
    return Recipe.from_config(config).replace(num_epochs=q.qat_epochs, learning_rate=q.qat_learning_rate)


def requested_bits(q, table: ModelTable, model_name: str) -> tuple[dict[str, int], dict[str, int]]:
    """{layer: bits_w}, {layer: bits_a} from `config.quant`'s uniform values, per-layer
    overrides and policy file (`resolve_bits`), before any budget."""
    bits_w, bits_a = resolve_bits(table, q.bits_w, q.bits_a, layer_bits_w=q.layer_bits_w,
                                  layer_bits_a=q.layer_bits_a, policy=q.policy, model=model_name)
    if q.scheme == "kmeans" and any(b > 8 and b != FLOAT_BITS for b in bits_w.values()):
        raise ConfigError("k-means weight sharing supports 1..8 bits (or 32 = float)")
    return bits_w, bits_a


# ------------------------------------------------------------------------------------------------
# The float network
# ------------------------------------------------------------------------------------------------

def _restore_raw(directory: str) -> dict:
    """The saved TrainState tree of the latest intact step in `directory`, in its own structure."""
    with Checkpointer(directory) as ckpt:
        return dict(ckpt.restore_tree(None)[0])


def pruned_checkpoint_dir(directory: str) -> str:
    for sub in ("finetune/best", "finetune/checkpoints", "best", "checkpoints", ""):
        d = os.path.join(directory, sub) if sub else directory
        if any(name.isdigit() for name in files.list_names(d)):
            return d
    raise CheckpointError(f"no pruned checkpoint under {directory} (looked for finetune/best, best, checkpoints); "
                          f"run the prune job with that --workdir first")


def load_pruned(exp: Experiment, directory: str, model_name: str, seed: int = 0) -> tuple[Experiment, TrainState]:
    """(experiment for the shrunk network, its TrainState) from a prune job's workdir
    (`exp`: the dense network's experiment; `model_name`: its zoo name)."""
    tree = _restore_raw(pruned_checkpoint_dir(directory))
    flat_masks = traverse_util.flatten_dict(dict(tree.get("masks") or {}))
    widths = []
    for g in range(exp.table.num_groups):
        paths = exp.table.mask_paths(g)
        if not paths or paths[0] not in flat_masks:
            raise CheckpointError(f"the checkpoint in {directory} has no channel mask for group {g}; "
                                  f"is it a {model_name} network?")
        widths.append(int(np.asarray(flat_masks[paths[0]]).shape[0]))
    model = create_model(model_name, exp.num_classes, widths=tuple(widths))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *exp.input_shape)), train=False))
    want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
    got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(dict(tree["params"])).items()}
    if want != got:
        raise CheckpointError(f"the checkpoint in {directory} does not match {model_name} with widths "
                              f"{widths}")
    small = dataclasses.replace(exp, model=model, table=describe(model, exp.input_shape))
    variables = {k: tree[k] for k in ("params", "batch_stats", "masks") if tree.get(k)}
    state = create_train_state(model, optax.identity(), exp.input_shape, seed,
                               variables=jax.tree.map(jnp.asarray, variables))
    return small, state


def _has_checkpoint(directory: str) -> bool:
    return any(files.list_names(os.path.join(directory, d)) for d in ("best", "checkpoints"))


def float_network(config, exp: Experiment, workdir: str) -> tuple[Experiment, TrainState, str]:
    """Stage 1: (experiment, TrainState, description of the source) of the network to
    quantize: `quant.pruned_checkpoint`, pruned here (`quant.prune_first`), or the trained
    `quant.checkpoint` (trained first where missing)."""
    q = config.quant
    if q.pruned_checkpoint:
        small, state = load_pruned(exp, q.pruned_checkpoint, config.model.name, config.seed)
        return small, state, f"pruned:{q.pruned_checkpoint}"
    if q.prune_first:
        prune_dir = os.path.join(workdir, "prune")
        if not files.is_file(os.path.join(prune_dir, "summary.json")):
            pcfg = config.copy_and_resolve_references()
            pcfg.job = "prune"
            if q.checkpoint:
                pcfg.prune.checkpoint = q.checkpoint
            prune_and_finetune(pcfg, prune_dir)
        small, state = load_pruned(exp, prune_dir, config.model.name, config.seed)
        return small, state, f"pruned here:{prune_dir}"
    directory = q.checkpoint or os.path.join(workdir, "pretrain")
    if not _has_checkpoint(directory) and (q.train_if_missing or not q.checkpoint):
        logging.info("no trained network in %s: training one there first", directory)
        tcfg = config.copy_and_resolve_references()
        tcfg.job = "train"
        train_and_evaluate(tcfg, directory)
    return exp, load_trained(exp, directory, Recipe.from_config(config)), f"float:{directory}"


# ------------------------------------------------------------------------------------------------
# Choosing the bits
# ------------------------------------------------------------------------------------------------

def size_budget(q, size_model: B.SizeModel, float_bytes: float) -> float | None:
    """The size budget in bytes of `config.quant` (None: none); `float_bytes`: what
    `quant.budget_ratio` is a fraction of."""
    if q.budget_bytes:
        return float(q.budget_bytes)
    if q.budget_ratio:
        return float(q.budget_ratio) * float_bytes
    if q.budget_uniform_bits:
        return size_model({p: int(q.budget_uniform_bits) for p in size_model.paths})
    return None


def _sensitivity_loss(apply_fn, mesh=None):
    """Jitted `loss(variables, quant, x, y, weight)`: the `weight`-weighted mean
    cross-entropy of the network with `quant` on (x, y) (weight 0: padding). With a `mesh`,
    x, y and weight are split over 'data' (the sum over examples is an all-reduce), the
    variables and `quant` replicated."""

    def loss(variables, quant, x, y, weight):
        logits = apply_fn({**variables, "quant": quant}, x, train=False)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(jnp.where(weight > 0, ce * weight, 0.0)) / jnp.sum(weight)

    if mesh is None:
        return jax.jit(loss)
    rep, rows = S.replicated(mesh), S.batch_sharded(mesh)
    return jax.jit(loss, in_shardings=(rep, rep, rows, rows, rows), out_shardings=rep)


def layer_sensitivity(exp, state, quantizer: WeightQuantizer, bits_a, candidates, examples: int, seed: int,
                      mesh=None) -> dict[str, dict[int, float]]:
    """Validation loss increase when one layer alone has its weights at each candidate width
    (others float; activations at their bits, calibrated min-max). k-means is measured with
    the symmetric uniform quantizer (a proxy: its assignments depend on the bits).

    `mesh` (e.g. `exp.mesh`): a 1-D ('data',) mesh over which the examples are split (and
    the calibration batch); the variables are replicated and the loss is a global mean, so
    the table is the single-device one up to float rounding. Examples are zero-padded to a
    multiple of its size with weight 0. None: one device."""
    if quantizer.scheme == "kmeans":
        quantizer = WeightQuantizer("symmetric", "channel")
    table = exp.table
    paths = [l.path for l in table.layers]
    x_val, y_val = exp.val
    idx = np.random.default_rng(seed).choice(len(x_val), min(examples, len(x_val)), replace=False)
    x = np.asarray(normalize(x_val[idx], exp.mean, exp.std))
    y = y_val[idx].astype(np.int32)
    apply_fn = _shared_apply(exp.model, quantizer)  # shares the compiled calibration with PTQ's
    base_quant = make_quant(table, bits_w=FLOAT_BITS, bits_a=bits_a)
    variables = state.variables()
    base_quant, _ = calibrate_ranges(apply_fn, {**variables, "quant": base_quant}, [x[:256]], "minmax", mesh=mesh)
    pad = 0 if mesh is None else -len(x) % mesh.size
    weight = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
    x, y = np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)), np.pad(y, (0, pad))
    if mesh is None:
        x, y, weight = jnp.asarray(x), jnp.asarray(y), jnp.asarray(weight)
    else:
        variables = jax.device_put(variables, S.replicated(mesh))
        x, y, weight = S.split_rows((x, y, weight), mesh)
    loss_fn = _sensitivity_loss(apply_fn, mesh)
    loss = lambda quant: loss_fn(variables, quant, x, y, weight)

    flat = traverse_util.flatten_dict(base_quant)
    ref = float(loss(base_quant))
    out = {}
    for p in paths:
        key = tuple(p.split("/")) + ("bits_w",)
        out[p] = {}
        for b in candidates:
            trial = dict(flat)
            trial[key] = jnp.asarray(float(b), jnp.float32)
            out[p][int(b)] = float(loss(traverse_util.unflatten_dict(trial))) - ref
        out[p][FLOAT_BITS] = 0.0
    return out


def choose_bits(q, exp: Experiment, state: TrainState, model_name: str, qrecipe: QuantRecipe,
                index_bits: dict[str, int], dense_table: ModelTable) -> tuple[dict, dict, dict]:
    """Stage 2: `requested_bits`, then the budget of `config.quant` (if any) met by
    lowering weight bits (HAQ order or the sensitivity heuristic, `quant.allocation`).
    Returns (bits_w, bits_a, summary fields: the request, budget, sensitivity, float bytes)."""
    bits_w, bits_a = requested_bits(q, exp.table, model_name)
    table, masks, quantizer = exp.table, state.masks or None, qrecipe.quantizer
    size_model = B.SizeModel(table, masks, bits_a, quantizer, index_bits)
    float_bytes = cost.summarize(table, masks, None, quantizer=quantizer, index_bits=index_bits)["totals"]["bytes"]
    original_bytes = cost.summarize(dense_table)["totals"]["bytes"]
    budget = size_budget(q, size_model, original_bytes if q.budget_ratio else float_bytes)
    info = dict(bits_w_requested=dict(bits_w), budget_bytes=budget, budget_bitops=q.budget_bitops or None,
                sensitivity=None, bytes_original_float32=original_bytes, bytes_float32=float_bytes)
    floors = (q.min_bits_w, q.first_last_min_bits)
    if budget is not None and q.allocation == "sensitivity":
        start = time.time()
        info["sensitivity"] = layer_sensitivity(exp, state, quantizer, bits_a, tuple(q.sensitivity_bits),
                                                q.sensitivity_examples, qrecipe.seed, mesh=exp.mesh)
        bits_w = B.allocate_by_sensitivity(bits_w, info["sensitivity"], size_model, budget, *floors)
        logging.info("sensitivity allocation (%.1fs): %s", time.time() - start, bits_w)
    elif budget is not None:
        bits_w = B.enforce_budget(bits_w, size_model, budget, *floors)
    if q.budget_bitops:
        bitops = B.bitops(table, masks)
        bits_w = B.enforce_budget(bits_w, lambda bw: bitops(bw, bits_a), float(q.budget_bitops), *floors,
                                  what="BitOps")
    return bits_w, bits_a, info


# ------------------------------------------------------------------------------------------------
# Quantizing, training, exporting
# ------------------------------------------------------------------------------------------------

def post_training_quantize(exp: Experiment, state: TrainState, bits_w, bits_a, qrecipe: QuantRecipe, evaluate
                           ) -> tuple[TrainState, dict]:
    """Stage 3 (PTQ): `quantize_state` (calibrated ranges), evaluated on the test and
    validation splits. Returns (quantized state, summary fields)."""
    start = time.time()
    state, ranges = quantize_state(exp, state, bits_w, bits_a, qrecipe)
    calib_time = time.time() - start
    test, val = evaluate(state, exp.test), evaluate(state, exp.val)
    return state, dict(accuracy_ptq=test["accuracy"], val_accuracy_ptq=val["accuracy"], calibration_ranges=ranges,
                       calibration_time_s=calib_time)


def quantization_aware_training(exp: Experiment, state: TrainState, recipe: Recipe, workdir: str, evaluate, *,
                                teacher: Teacher | None = None) -> tuple[TrainState, dict]:
    """Stage 4 (QAT): `train_qat` into `workdir`, evaluated on the test split. Returns
    (trained state, summary fields)."""
    state, info = train_qat(exp, state, recipe, workdir, teacher=teacher)
    return state, dict(accuracy_qat=evaluate(state, exp.test)["accuracy"], qat_train_time_s=info["train_time_s"])


def _eval_state(model, variables, input_shape, seed):
    return create_train_state(model, optax.identity(), input_shape, seed, variables=variables)


def export_and_verify(path: str, exp: Experiment, state: TrainState, evaluate, *, model_name: str,
                      quantizer: WeightQuantizer, index_bits: dict[str, int], verify_batch: int, seed: int = 0
                      ) -> dict:
    """Stage 5: the quantized network `state` (a `quantize_state` / `train_qat` result)
    packed into `path` (`export_packed`), loaded back and checked: its outputs on the first
    `verify_batch` test images against the fake-quant network's (BatchNorm folded), its
    payload against the exact size accounting, its test accuracy. Returns {"accounting":
    `cost.summarize` of the quantized network, "exported": `export_packed`'s record,
    "agreement": `compare_outputs`', "outputs_match", "payload_equals_accounting",
    "accuracy": the loaded network's test accuracy, "stablehlo": `verify_stablehlo`'s
    record, "model": the loaded model, "export_time_s"}."""
    # Host copies: `state` may be replicated over a mesh (after `fit`), and the program XLA
    # compiles for 8 devices can round an activation code differently from the one-device
    # program the loaded network runs; both sides of the check run on one device.
    variables = jax.device_get(state.variables())
    accounting = cost.summarize(exp.table, variables.get("masks"), variables.get("quant"), quantizer=quantizer,
                                index_bits=index_bits)
    start = time.time()
    exported = export_packed(path, exp.table, variables, model_name=model_name,
                             num_classes=exp.num_classes, quantizer=quantizer, index_bits=index_bits,
                             input_mean=exp.mean, input_std=exp.std)
    export_time = time.time() - start
    loaded_model, loaded_vars, _ = load_packed(path)
    folded = fold_batchnorm(variables, norm_epsilons(exp.model, exp.input_shape))
    x_check = jnp.asarray(normalize(exp.test[0][:verify_batch], exp.mean, exp.std))
    agreement = compare_outputs(state.apply_fn, folded, loaded_model.apply, loaded_vars, x_check)
    accuracy = evaluate(_eval_state(loaded_model, loaded_vars, exp.input_shape, seed), exp.test)["accuracy"]
    stablehlo = verify_stablehlo(os.path.splitext(path)[0] + ".stablehlo",
                                 functools.partial(loaded_model.apply, train=False), loaded_vars, exp, verify_batch)
    return dict(accounting=accounting, exported=exported, agreement=agreement, accuracy=accuracy, stablehlo=stablehlo,
                outputs_match=agreement["max_abs_diff"] <= 1e-5 * max(1.0, agreement["max_abs_output"]),
                payload_equals_accounting=exported["payload_bytes"] == int(accounting["totals"]["bytes"]),
                model=loaded_model, export_time_s=export_time)


def verify_stablehlo(path: str, apply, variables, exp: Experiment, verify_batch: int) -> dict:
    """The network `apply(variables, x)` exported as StableHLO to `path`
    (`jaxcompress.stablehlo`, uint8 images in), read back with plain `jax.export` and run
    on the first `verify_batch` test images: the export's record plus "max_abs_diff" /
    "argmax_agreement" against `apply`, and "int8_ops": how many of the module's
    convolutions and dot products take int8 operands (`int8_ops`)."""
    record = export_stablehlo(path, apply, variables, exp.input_shape, input_mean=exp.mean, input_std=exp.std)
    exported = load_stablehlo(path)
    images = exp.test[0][:verify_batch]
    got = np.asarray(exported.call(images))
    want = np.asarray(jax.jit(apply)(variables, normalize(images, exp.mean, exp.std)))
    return dict(record, max_abs_diff=float(np.max(np.abs(got - want))) if got.size else 0.0,
                argmax_agreement=float(np.mean(got.argmax(-1) == want.argmax(-1))) if got.size else 1.0,
                int8_ops=int8_ops(exported.mlir_module()))


def int8_ops(module_text: str) -> int:
    """The distinct StableHLO convolutions and dot products in `module_text` whose operands
    are int8 (`tensor<...xi8>`), i.e. run on integer codes (a module exported for several
    platforms holds the same op, with the same location, once per platform)."""
    ops = set(re.findall(r"stablehlo\.(?:convolution|dot_general)\b[^\n]*", module_text))
    return sum(bool(re.search(r":\s*\(tensor<[^>]*xi8>,\s*tensor<[^>]*xi8>\)", op)) for op in ops)


def integer_check(exp: Experiment, state: TrainState, quantizer: WeightQuantizer, evaluate,
                  latency_batch: int, stablehlo_path: str | None = None, verify_batch: int = 256) -> dict:
    """Stage 5b (`quant.integer_check`, on by default): the quantized network `state`
    executed in integers (`jaxcompress.quant.integer`: int8 x int8 -> int32 wherever bits_w
    and bits_a are 2-8, symmetric weights): its test accuracy, and its forward latency
    against the fake-quantized float network's (timed in alternation, `latency_batch`; 0:
    not timed); with `stablehlo_path`, that integer network exported as StableHLO there
    and checked (`verify_stablehlo`: int8 convolutions and products, runnable with plain
    JAX). `no_integer_check()` when no layer can run integer."""
    variables = jax.device_get(state.variables())
    layers = integer_layers(exp.table, variables.get("quant")) if quantizer.scheme == "symmetric" else []
    if not layers:
        return no_integer_check()
    codes = integerize(exp.table, variables, quantizer)[INTEGER]

    def integer(accumulate):
        int_apply = integer_apply(exp.model, quantizer, accumulate)
        return lambda v, *args, **kwargs: int_apply({**v, INTEGER: codes}, *args, **kwargs)

    # int32 sums everywhere, and "auto": small convolutions' exact sums on the float32 kernel
    apply, apply_auto = integer("int32"), integer("auto")
    latency = apply_latencies({"fake_quant": (state.apply_fn, variables), "integer": (apply, variables),
                               "integer_auto": (apply_auto, variables)}, exp.input_shape, latency_batch)
    stablehlo = (verify_stablehlo(stablehlo_path, functools.partial(apply, train=False), variables, exp, verify_batch)
                 if stablehlo_path else None)
    return dict(integer_layers=["/".join(p) for p in layers],
                accuracy_integer=evaluate(state.replace(apply_fn=apply), exp.test)["accuracy"],
                accuracy_integer_auto=evaluate(state.replace(apply_fn=apply_auto), exp.test)["accuracy"],
                latency_integer_s=latency, integer_stablehlo=stablehlo)


def no_integer_check() -> dict:
    """`integer_check`'s summary fields when no layer runs in integers (none can, or
    `quant.integer_check` is False)."""
    return dict(integer_layers=[], accuracy_integer=None, accuracy_integer_auto=None, latency_integer_s={},
                integer_stablehlo=None)


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------

def quantize(config, workdir: str) -> dict:
    """The `quantize` job: float network -> bits -> PTQ -> (QAT) -> export and check ->
    summary.json, model.npz, policy.json, bits.png (see the module docstring)."""
    wall_start = time.time()
    q = config.quant
    schema.validate(config)  # called directly (not through jaxcompress.jobs.run): still checked first
    qrecipe, index_bits = QuantRecipe.from_config(config), index_bits_from_config(q)
    exp = setup_experiment(config)
    requested_bits(q, exp.table, config.model.name)  # names and ranges: fail before any training
    dense_table = exp.table
    exp, float_state, source = float_network(config, exp, workdir)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    fields = dict(source=source, accuracy_float=evaluate(float_state, exp.test)["accuracy"])
    bits_w, bits_a, info = choose_bits(q, exp, float_state, config.model.name, qrecipe, index_bits, dense_table)
    state, ptq = post_training_quantize(exp, float_state, bits_w, bits_a, qrecipe, evaluate)
    logging.info("PTQ %s: test accuracy %.4f (float %.4f)", config.model.name, ptq["accuracy_ptq"],
                 fields["accuracy_float"])
    fields.update(info, **ptq, accuracy_qat=None, qat_train_time_s=None)
    if q.mode == "qat":  # distils from the float network when train.distill_weight > 0
        state, qat = quantization_aware_training(exp, state, qat_recipe(config), os.path.join(workdir, "qat"),
                                                 evaluate, teacher=Teacher.of(float_state))
        fields.update(qat)
    fields.update(accuracy_quantized=evaluate(state, exp.test)["accuracy"],
                  val_accuracy_quantized=evaluate(state, exp.val)["accuracy"])
    check = export_and_verify(os.path.join(workdir, "model.npz"), exp, state, evaluate, model_name=config.model.name,
                              quantizer=qrecipe.quantizer, index_bits=index_bits, verify_batch=q.verify_batch,
                              seed=config.seed)
    fields.update(integer_check(exp, state, qrecipe.quantizer, evaluate, config.hardware.latency_batch,
                                os.path.join(workdir, "model.int8.stablehlo"), q.verify_batch)
                  if q.integer_check else no_integer_check())
    summary = quantize_summary(config, exp, dense_table, qrecipe.quantizer, bits_w, bits_a, fields, check)
    summary["wall_time_s"] = time.time() - wall_start
    write_outputs(workdir, summary, exp.table, check)
    return summary


def quantize_summary(config, exp: Experiment, dense_table: ModelTable, quantizer: WeightQuantizer, bits_w: dict,
                     bits_a: dict, fields: dict, check: dict) -> dict:
    """Stage 6: summary.json's fields: the stages' `fields`, the export `check`'s sizes and
    agreement, and the measured float latency of the original and the exported network."""
    q, totals, exported = config.quant, check["accounting"]["totals"], check["exported"]
    batch = config.hardware.latency_batch
    return dict(
        job=config.job, model=config.model.name, dataset=config.data.name, mode=q.mode,
        weight_quantizer=quantizer.to_dict(), calibration=q.calibration, allocation=q.allocation, bits_w=bits_w,
        bits_a=bits_a, widths=list(exp.table.widths), **fields, accuracy_exported=check["accuracy"],
        drop_points=100.0 * (fields["accuracy_float"] - check["accuracy"]), bytes_quantized=totals["bytes"],
        file_bytes=exported["file_bytes"], payload_bytes=exported["payload_bytes"],
        file_metadata_bytes=exported["file_bytes"] - exported["payload_bytes"],
        payload_equals_accounting=check["payload_equals_accounting"],
        compression_ratio=fields["bytes_original_float32"] / totals["bytes"],
        params_original=cost.summarize(dense_table)["totals"]["params"], nonzero_params=totals["nonzero_params"],
        outputs_max_abs_diff=check["agreement"]["max_abs_diff"],
        outputs_argmax_agreement=check["agreement"]["argmax_agreement"], outputs_match=check["outputs_match"],
        layers=check["accounting"]["layers"], export_time_s=check["export_time_s"],
        stablehlo_bytes=check["stablehlo"]["bytes"], stablehlo_max_abs_diff=check["stablehlo"]["max_abs_diff"],
        stablehlo_argmax_agreement=check["stablehlo"]["argmax_agreement"],
        device_kind=jax.devices()[0].device_kind, latency_batch=batch,
        # float forward passes: the original network and the exported one as loaded (dequantized)
        latency_s=measured_latency({"original": dense_table.model, "exported": check["model"]}, exp.input_shape,
                                   batch))


def write_outputs(workdir: str, summary: dict, table: ModelTable, check: dict) -> None:
    """policy.json (the bits used), bits.png and summary.json into `workdir`; logs the result."""
    s, name = summary, summary["model"]
    bits_w, bits_a = s["bits_w"], s["bits_a"]
    write_policy(os.path.join(workdir, "policy.json"), bits_w, bits_a, model=name, widths=list(table.widths),
                 note="bits used by the quantize job")
    names = [l.path for l in table.layers]
    plot_layer_bars(os.path.join(workdir, "bits.png"), names,
                    {"bits_w": [bits_w[p] if bits_w[p] < FLOAT_BITS else 0 for p in names],
                     "bits_a": [bits_a[p] if bits_a[p] < FLOAT_BITS else 0 for p in names]}, "bits (0 = float)",
                    f"{name}: {s['mode']} {s['weight_quantizer']['scheme']} bits per layer")
    write_json(os.path.join(workdir, "summary.json"), s)
    if not s["payload_equals_accounting"] or not s["outputs_match"]:
        logging.warning("export check failed: payload %d vs accounting %d bytes, max output diff %.3g",
                        s["payload_bytes"], s["bytes_quantized"], s["outputs_max_abs_diff"])
    logging.info("quantized %s (%s, %s): acc %.4f -> %.4f (exported %.4f); %d -> %d bytes (%.1fx)", name,
                 s["mode"], s["weight_quantizer"]["scheme"], s["accuracy_float"], s["accuracy_quantized"],
                 s["accuracy_exported"], s["bytes_original_float32"], s["bytes_quantized"], s["compression_ratio"])
