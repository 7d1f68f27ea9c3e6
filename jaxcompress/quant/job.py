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
`bits.png`. An interrupted QAT resumes from `<workdir>/qat/checkpoints`.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from jaxcompress import cost
from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.models import create_model, describe
from jaxcompress.quant import budget as B
from jaxcompress.quant.calibrate import calibrate_ranges, check_calibration
from jaxcompress.quant.export import compare_outputs, export_packed, fold_batchnorm, load_packed, norm_epsilons
from jaxcompress.quant.policy import (SUPPORTED_BITS_A, SUPPORTED_BITS_W, _as_bits, layer_bits, make_quant,
                                      read_policy, write_policy)
from jaxcompress.quant.qat import add_kmeans_assignments, make_quantized_apply
from jaxcompress.quant.quantizers import FLOAT_BITS, WeightQuantizer
from jaxcompress.report import plot_layer_bars
from jaxcompress.train import create_train_state, make_optimizer, setup_experiment, with_teacher
from jaxcompress.train.checkpoint import CheckpointError
from jaxcompress.train.loop import fit, load_trained, make_eval_fn, steps_per_epoch, train_and_evaluate
from jaxcompress.latency import measured_latency
from jaxcompress.train.metrics import write_json

MODES = ("ptq", "qat")
ALLOCATIONS = ("uniform", "sensitivity")


def quantizer_from_config(q) -> WeightQuantizer:
    return WeightQuantizer(q.scheme, q.granularity)


def index_bits_from_config(q) -> dict[str, int]:
    return {"conv": int(q.index_bits_conv), "dense": int(q.index_bits_dense)}


def check_quant_config(q) -> None:
    """Every check that needs no data or model: one-line ConfigError."""
    if q.mode not in MODES:
        raise ConfigError(f"unknown quant.mode '{q.mode}'; choose one of {', '.join(MODES)}")
    quantizer_from_config(q)
    check_calibration(q.calibration, None, q.percentile)
    if q.calib_batches <= 0 or q.calib_batch_size <= 0:
        raise ConfigError(f"calibration data is empty: quant.calib_batches={q.calib_batches} and "
                          f"quant.calib_batch_size={q.calib_batch_size} must both be positive")
    _as_bits(q.bits_w, "quant.bits_w", "every layer", SUPPORTED_BITS_W)
    _as_bits(q.bits_a, "quant.bits_a", "every layer", SUPPORTED_BITS_A)
    _as_bits(q.min_bits_w, "quant.min_bits_w", "the budget", SUPPORTED_BITS_W)
    _as_bits(q.first_last_min_bits, "quant.first_last_min_bits", "the budget", SUPPORTED_BITS_W)
    if q.allocation not in ALLOCATIONS:
        raise ConfigError(f"unknown quant.allocation '{q.allocation}'; choose one of {', '.join(ALLOCATIONS)}")
    budgets = {k: q[k] for k in ("budget_bytes", "budget_ratio", "budget_uniform_bits", "budget_bitops") if q[k]}
    if any(v < 0 for v in budgets.values()):
        raise ConfigError(f"quant budgets must be non-negative, got {budgets}")
    if len(budgets) > 1:
        raise ConfigError(f"give at most one quant budget, got {', '.join(budgets)}")
    if q.budget_uniform_bits:
        _as_bits(q.budget_uniform_bits, "quant.budget_uniform_bits", "the budget", SUPPORTED_BITS_W)
    if q.allocation == "sensitivity" and not (budgets and "budget_bitops" not in budgets):
        raise ConfigError("quant.allocation=sensitivity needs a size budget (quant.budget_bytes, budget_ratio "
                          "or budget_uniform_bits)")
    if q.pruned_checkpoint and q.prune_first:
        raise ConfigError("set either quant.pruned_checkpoint (quantize a pruned network) or quant.prune_first "
                          "(prune here first), not both")
    if q.mode == "qat" and q.qat_epochs <= 0:
        raise ConfigError(f"quant.qat_epochs must be positive for quant.mode=qat, got {q.qat_epochs}")
    for key in ("index_bits_conv", "index_bits_dense"):
        if not 1 <= q[key] <= 16:
            raise ConfigError(f"quant.{key}={q[key]} is outside 1..16")
    if q.policy and not os.path.isfile(q.policy):
        raise ConfigError(f"quant.policy file {q.policy} does not exist")


def resolve_bits(config, table) -> tuple[dict[str, int], dict[str, int]]:
    """{layer: bits_w}, {layer: bits_a} from the uniform values, overrides and policy file."""
    q = config.quant
    overrides_w, overrides_a = dict(q.layer_bits_w), dict(q.layer_bits_a)
    if q.policy:
        policy = read_policy(q.policy, table, config.model.name)
        overrides_w.update(policy.get("bits_w", {}))
        overrides_a.update(policy.get("bits_a", {}))
    bits_w = layer_bits(table, q.bits_w, overrides_w, "bits_w")
    bits_a = layer_bits(table, q.bits_a, overrides_a, "bits_a")
    if q.scheme == "kmeans" and any(b > 8 and b != FLOAT_BITS for b in bits_w.values()):
        raise ConfigError("k-means weight sharing supports 1..8 bits (or 32 = float)")
    return bits_w, bits_a


# ------------------------------------------------------------------------------------------------
# The float network
# ------------------------------------------------------------------------------------------------

def _restore_raw(directory: str) -> dict:
    """The saved TrainState tree of the latest step in `directory`, in its own structure."""
    manager = ocp.CheckpointManager(os.path.abspath(directory))
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"no checkpoint in {directory}")
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
        except Exception as e:  # orbax raises many types for corrupt files
            raise CheckpointError(f"cannot restore the checkpoint in {directory} ({type(e).__name__})") from None
    finally:
        manager.close()
    return dict(restored.state)


def pruned_checkpoint_dir(directory: str) -> str:
    for sub in ("finetune/best", "finetune/checkpoints", "best", "checkpoints", ""):
        d = os.path.join(directory, sub) if sub else directory
        if os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d)):
            return d
    raise CheckpointError(f"no pruned checkpoint under {directory} (looked for finetune/best, best, checkpoints); "
                          f"run the prune job with that --workdir first")


def load_pruned(config, exp, directory: str):
    """(experiment for the shrunk network, its TrainState) from a prune job's workdir."""
    tree = _restore_raw(pruned_checkpoint_dir(directory))
    flat_masks = traverse_util.flatten_dict(dict(tree.get("masks") or {}))
    widths = []
    for g in range(exp.table.num_groups):
        paths = exp.table.mask_paths(g)
        if not paths or paths[0] not in flat_masks:
            raise CheckpointError(f"the checkpoint in {directory} has no channel mask for group {g}; "
                                  f"is it a {config.model.name} network?")
        widths.append(int(np.asarray(flat_masks[paths[0]]).shape[0]))
    model = create_model(config.model.name, exp.num_classes, widths=tuple(widths))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *exp.input_shape)), train=False))
    want = {k: v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}
    got = {k: np.shape(v) for k, v in traverse_util.flatten_dict(dict(tree["params"])).items()}
    if want != got:
        raise CheckpointError(f"the checkpoint in {directory} does not match {config.model.name} with widths "
                              f"{widths}")
    small = dataclasses.replace(exp, model=model, table=describe(model, exp.input_shape))
    variables = {k: tree[k] for k in ("params", "batch_stats", "masks") if tree.get(k)}
    state = create_train_state(model, optax.identity(), exp.input_shape, config.seed,
                               variables=jax.tree.map(jnp.asarray, variables))
    return small, state


def _has_checkpoint(directory: str) -> bool:
    return any(os.path.isdir(os.path.join(directory, d)) and os.listdir(os.path.join(directory, d))
               for d in ("best", "checkpoints"))


def float_network(config, exp, workdir: str):
    """(experiment, TrainState, description of the source) of the network to quantize."""
    q = config.quant
    if q.pruned_checkpoint:
        small, state = load_pruned(config, exp, q.pruned_checkpoint)
        return small, state, f"pruned:{q.pruned_checkpoint}"
    if q.prune_first:
        prune_dir = os.path.join(workdir, "prune")
        if not os.path.isfile(os.path.join(prune_dir, "summary.json")):
            from jaxcompress.pruning.job import prune_and_finetune
            pcfg = config.copy_and_resolve_references()
            pcfg.job = "prune"
            if q.checkpoint:
                pcfg.prune.checkpoint = q.checkpoint
            prune_and_finetune(pcfg, prune_dir)
        small, state = load_pruned(config, exp, prune_dir)
        return small, state, f"pruned here:{prune_dir}"
    directory = q.checkpoint or os.path.join(workdir, "pretrain")
    if not _has_checkpoint(directory) and (q.train_if_missing or not q.checkpoint):
        logging.info("no trained network in %s: training one there first", directory)
        tcfg = config.copy_and_resolve_references()
        tcfg.job = "train"
        train_and_evaluate(tcfg, directory)
    return exp, load_trained(config, exp, directory), f"float:{directory}"


# ------------------------------------------------------------------------------------------------
# Pieces of the job
# ------------------------------------------------------------------------------------------------

def calibration_batches(exp, q, seed: int) -> list[np.ndarray]:
    n = len(exp.train[0])
    if n == 0:
        raise ConfigError("calibration data is empty: the training split has no examples")
    rng = np.random.default_rng(seed)
    idx = rng.choice(n, min(n, q.calib_batches * q.calib_batch_size), replace=False)
    x = np.asarray(normalize(exp.train[0][idx], exp.mean, exp.std))
    return [x[i:i + q.calib_batch_size] for i in range(0, len(x), q.calib_batch_size)]


def size_budget(q, size_model: B.SizeModel, float_bytes: float) -> float | None:
    if q.budget_bytes:
        return float(q.budget_bytes)
    if q.budget_ratio:
        return float(q.budget_ratio) * float_bytes
    if q.budget_uniform_bits:
        return size_model({p: int(q.budget_uniform_bits) for p in size_model.paths})
    return None


def layer_sensitivity(exp, state, quantizer: WeightQuantizer, bits_a, candidates, examples: int, seed: int
                      ) -> dict[str, dict[int, float]]:
    """Validation loss increase when one layer alone has its weights at each candidate width
    (others float; activations at their bits, calibrated min-max). k-means is measured with
    the symmetric uniform quantizer (a proxy: its assignments depend on the bits)."""
    if quantizer.scheme == "kmeans":
        quantizer = WeightQuantizer("symmetric", "channel")
    table = exp.table
    paths = [l.path for l in table.layers]
    x_val, y_val = exp.val
    idx = np.random.default_rng(seed).choice(len(x_val), min(examples, len(x_val)), replace=False)
    x = jnp.asarray(normalize(x_val[idx], exp.mean, exp.std))
    y = jnp.asarray(y_val[idx].astype(np.int32))
    apply_fn = make_quantized_apply(exp.model, quantizer)
    base_quant = make_quant(table, bits_w=FLOAT_BITS, bits_a=bits_a)
    variables = state.variables()
    base_quant, _ = calibrate_ranges(apply_fn, {**variables, "quant": base_quant}, [x[:256]], "minmax")

    @jax.jit
    def loss(quant):
        logits = apply_fn({**variables, "quant": quant}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

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


def _eval_state(model, variables, input_shape, seed):
    return create_train_state(model, optax.identity(), input_shape, seed, variables=variables)


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------

def quantize(config, workdir: str) -> dict:
    wall_start = time.time()
    q = config.quant
    check_quant_config(q)
    quantizer = quantizer_from_config(q)
    index_bits = index_bits_from_config(q)
    exp = setup_experiment(config)
    resolve_bits(config, exp.table)  # names and ranges: fail before any training
    dense_table = exp.table
    exp, state, source = float_network(config, exp, workdir)
    exp = with_teacher(exp, state)  # QAT distils from the float network when train.distill_weight > 0
    table = exp.table
    bits_w, bits_a = resolve_bits(config, table)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    float_test = evaluate(state, exp.test)
    masks = state.masks or None

    # Budget (exact bytes) and allocation.
    size_model = B.SizeModel(table, masks, bits_a, quantizer, index_bits)
    float_bytes = cost.summarize(table, masks, None, quantizer=quantizer, index_bits=index_bits)["totals"]["bytes"]
    original_bytes = cost.summarize(dense_table)["totals"]["bytes"]
    budget = size_budget(q, size_model, original_bytes if q.budget_ratio else float_bytes)
    requested_bits = dict(bits_w)
    sensitivity = None
    if budget is not None and q.allocation == "sensitivity":
        start = time.time()
        sensitivity = layer_sensitivity(exp, state, quantizer, bits_a, tuple(q.sensitivity_bits),
                                        q.sensitivity_examples, config.seed)
        bits_w = B.allocate_by_sensitivity(bits_w, sensitivity, size_model, budget, q.min_bits_w,
                                           q.first_last_min_bits)
        logging.info("sensitivity allocation (%.1fs): %s", time.time() - start, bits_w)
    elif budget is not None:
        bits_w = B.enforce_budget(bits_w, size_model, budget, q.min_bits_w, q.first_last_min_bits)
    if q.budget_bitops:
        bitops = B.bitops(table, masks)
        bits_w = B.enforce_budget(bits_w, lambda bw: bitops(bw, bits_a), float(q.budget_bitops), q.min_bits_w,
                                  q.first_last_min_bits, what="BitOps")

    # Quant collection: bits, k-means assignments, activation ranges.
    quant = make_quant(table, bits_w=bits_w, bits_a=bits_a)
    if q.scheme == "kmeans":
        quant = add_kmeans_assignments(state.params, masks, quant, q.kmeans_iters)
    apply_fn = make_quantized_apply(exp.model, quantizer)
    calib_start = time.time()
    quant, calib = calibrate_ranges(apply_fn, {**state.variables(), "quant": quant},
                                    calibration_batches(exp, q, config.seed), q.calibration, q.percentile,
                                    seed=config.seed)
    calib_time = time.time() - calib_start
    state = state.replace(quant=quant, apply_fn=apply_fn)
    ptq_test, ptq_val = evaluate(state, exp.test), evaluate(state, exp.val)
    logging.info("PTQ %s: test accuracy %.4f (float %.4f)", config.model.name, ptq_test["accuracy"],
                 float_test["accuracy"])

    qat_info, qat_test = {}, None
    if q.mode == "qat":
        qcfg = config.copy_and_resolve_references()
        qcfg.train.num_epochs = q.qat_epochs
        qcfg.train.learning_rate = q.qat_learning_rate
        tx = make_optimizer(qcfg.train, steps_per_epoch(qcfg, exp))
        state = state.replace(tx=tx, opt_state=tx.init(state.params), step=jnp.zeros((), jnp.int32))
        state, qat_info = fit(qcfg, exp, state, os.path.join(workdir, "qat"))
        state = state.replace(apply_fn=apply_fn)
        qat_test = evaluate(state, exp.test)
    final_test, final_val = evaluate(state, exp.test), evaluate(state, exp.val)

    # Exact size, export, load back, check.
    quant_summary = cost.summarize(table, masks, state.quant, quantizer=quantizer, index_bits=index_bits)
    model_path = os.path.join(workdir, "model.npz")
    export_start = time.time()
    exported = export_packed(model_path, table, state.variables(), model_name=config.model.name,
                             num_classes=exp.num_classes, quantizer=quantizer, index_bits=index_bits,
                             input_mean=exp.mean, input_std=exp.std)
    export_time = time.time() - export_start
    loaded_model, loaded_vars, _ = load_packed(model_path)
    folded = fold_batchnorm(state.variables(), norm_epsilons(exp.model, exp.input_shape))
    x_check = jnp.asarray(normalize(exp.test[0][:q.verify_batch], exp.mean, exp.std))
    agreement = compare_outputs(apply_fn, folded, loaded_model.apply, loaded_vars, x_check)
    loaded_state = _eval_state(loaded_model, loaded_vars, exp.input_shape, config.seed)
    exported_test = evaluate(loaded_state, exp.test)
    outputs_match = agreement["max_abs_diff"] <= 1e-5 * max(1.0, agreement["max_abs_output"])

    write_policy(os.path.join(workdir, "policy.json"), bits_w, bits_a, model=config.model.name,
                 widths=list(table.widths), note="bits used by the quantize job")
    names = [l.path for l in table.layers]
    plot_layer_bars(os.path.join(workdir, "bits.png"), names,
                    {"bits_w": [bits_w[p] if bits_w[p] < FLOAT_BITS else 0 for p in names],
                     "bits_a": [bits_a[p] if bits_a[p] < FLOAT_BITS else 0 for p in names]}, "bits (0 = float)",
                    f"{config.model.name}: {q.mode} {q.scheme} bits per layer")
    acc_float, acc_final = float_test["accuracy"], final_test["accuracy"]
    summary = dict(
        job=config.job, model=config.model.name, dataset=config.data.name, source=source, mode=q.mode,
        weight_quantizer=quantizer.to_dict(), calibration=q.calibration, allocation=q.allocation,
        bits_w=bits_w, bits_a=bits_a, bits_w_requested=requested_bits, widths=list(table.widths),
        budget_bytes=budget, budget_bitops=q.budget_bitops or None,
        accuracy_float=acc_float, accuracy_ptq=ptq_test["accuracy"], val_accuracy_ptq=ptq_val["accuracy"],
        accuracy_qat=None if qat_test is None else qat_test["accuracy"], accuracy_quantized=acc_final,
        val_accuracy_quantized=final_val["accuracy"], accuracy_exported=exported_test["accuracy"],
        drop_points=100.0 * (acc_float - exported_test["accuracy"]),
        bytes_original_float32=original_bytes, bytes_float32=float_bytes,
        bytes_quantized=quant_summary["totals"]["bytes"], file_bytes=exported["file_bytes"],
        payload_bytes=exported["payload_bytes"], file_metadata_bytes=exported["file_bytes"] - exported["payload_bytes"],
        payload_equals_accounting=exported["payload_bytes"] == int(quant_summary["totals"]["bytes"]),
        compression_ratio=original_bytes / quant_summary["totals"]["bytes"],
        params_original=cost.summarize(dense_table)["totals"]["params"],
        nonzero_params=quant_summary["totals"]["nonzero_params"],
        outputs_max_abs_diff=agreement["max_abs_diff"], outputs_argmax_agreement=agreement["argmax_agreement"],
        outputs_match=outputs_match, layers=quant_summary["layers"], calibration_ranges=calib,
        sensitivity=sensitivity, calibration_time_s=calib_time, export_time_s=export_time,
        qat_train_time_s=qat_info.get("train_time_s"), wall_time_s=time.time() - wall_start,
        device_kind=jax.devices()[0].device_kind, latency_batch=config.prune.latency_batch,
        # float forward passes: the original network and the exported one as loaded (dequantized)
        latency_s=measured_latency({"original": dense_table.model, "exported": loaded_model}, exp.input_shape,
                                   config.prune.latency_batch))
    write_json(os.path.join(workdir, "summary.json"), summary)
    if not summary["payload_equals_accounting"] or not outputs_match:
        logging.warning("export check failed: payload %d vs accounting %d bytes, max output diff %.3g",
                        exported["payload_bytes"], quant_summary["totals"]["bytes"], agreement["max_abs_diff"])
    logging.info("quantized %s (%s, %s): acc %.4f -> %.4f (exported %.4f); %d -> %d bytes (%.1fx)",
                 config.model.name, q.mode, q.scheme, acc_float, acc_final, exported_test["accuracy"],
                 original_bytes, quant_summary["totals"]["bytes"], summary["compression_ratio"])
    return summary
