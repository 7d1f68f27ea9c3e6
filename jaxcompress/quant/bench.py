"""The `bench_quant_mixed` job: uniform bit widths against a sensitivity-based mixed
allocation of the same size, from one float network, with the same training budget.

Rows: every width in `quant.bench_uniform_bits` (all layers at that width), then for
every width in `quant.bench_mixed_bits` a mixed allocation whose exact size is at most
the uniform network's at that width (`allocate_by_sensitivity` from 8 bits, floors
`quant.min_bits_w` and `quant.first_last_min_bits`). Each row is calibrated
(`quant.calibration`), evaluated (PTQ), optionally trained `quant.qat_epochs` epochs
(`quant.mode=qat`; identical budget for every row), exported and checked (payload ==
accounting, loaded outputs == fake-quant outputs). Activation bits are the same for
every row (`quant.bits_a`). Writes `summary.json` and `results.md` (a Markdown table).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import logging

from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.quant import budget as B
from jaxcompress.quant.calibrate import calibrate_ranges
from jaxcompress.quant.export import compare_outputs, export_packed, fold_batchnorm, load_packed, norm_epsilons
from jaxcompress.quant.job import (_eval_state, calibration_batches, check_quant_config, float_network,
                                   index_bits_from_config, layer_sensitivity, quantizer_from_config, resolve_bits)
from jaxcompress.quant.policy import make_quant
from jaxcompress.quant.qat import add_kmeans_assignments, make_quantized_apply
from jaxcompress import cost
from jaxcompress.train import make_optimizer, setup_experiment
from jaxcompress.train.loop import fit, make_eval_fn, steps_per_epoch
from jaxcompress.train.metrics import write_json


def run(config, workdir: str) -> dict:
    wall_start = time.time()
    q = config.quant
    check_quant_config(q)
    if not q.bench_uniform_bits and not q.bench_mixed_bits:
        raise ConfigError("bench_quant_mixed needs quant.bench_uniform_bits and/or quant.bench_mixed_bits")
    quantizer, index_bits = quantizer_from_config(q), index_bits_from_config(q)
    exp = setup_experiment(config)
    exp, state, source = float_network(config, exp, workdir)
    table, masks = exp.table, state.masks or None
    paths = [layer.path for layer in table.layers]
    _, bits_a = resolve_bits(config, table)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    float_test = evaluate(state, exp.test)
    size_model = B.SizeModel(table, masks, bits_a, quantizer, index_bits)
    original_bytes = cost.summarize(table, masks)["totals"]["bytes"]

    rows = [("uniform", int(b), {p: int(b) for p in paths}) for b in q.bench_uniform_bits]
    sensitivity = None
    if q.bench_mixed_bits:
        start = time.time()
        sensitivity = layer_sensitivity(exp, state, quantizer, bits_a, tuple(q.sensitivity_bits),
                                        q.sensitivity_examples, config.seed)
        logging.info("layer sensitivity measured in %.1fs", time.time() - start)
        for b in q.bench_mixed_bits:
            target = size_model({p: int(b) for p in paths})
            try:
                bits = B.allocate_by_sensitivity({p: 8 for p in paths}, sensitivity, size_model, target,
                                                 q.min_bits_w, q.first_last_min_bits)
            except ConfigError as e:
                logging.warning("mixed row at the size of %d bits skipped: %s", b, e)
                continue
            rows.append(("mixed", int(b), bits))

    apply_fn = make_quantized_apply(exp.model, quantizer)
    batches = calibration_batches(exp, q, config.seed)
    x_check = jnp.asarray(normalize(exp.test[0][:q.verify_batch], exp.mean, exp.std))
    results = []
    for kind, b, bits_w in rows:
        name = f"{kind}{b}"
        quant = make_quant(table, bits_w=bits_w, bits_a=bits_a)
        if quantizer.scheme == "kmeans":
            quant = add_kmeans_assignments(state.params, masks, quant, q.kmeans_iters)
        quant, _ = calibrate_ranges(apply_fn, {**state.variables(), "quant": quant}, batches, q.calibration,
                                    q.percentile, seed=config.seed)
        row_state = state.replace(quant=quant, apply_fn=apply_fn)
        ptq = evaluate(row_state, exp.test)["accuracy"]
        qat, train_time = None, None
        if q.mode == "qat":
            qcfg = config.copy_and_resolve_references()
            qcfg.train.num_epochs = q.qat_epochs
            qcfg.train.learning_rate = q.qat_learning_rate
            tx = make_optimizer(qcfg.train, steps_per_epoch(qcfg, exp))
            row_state = row_state.replace(tx=tx, opt_state=tx.init(row_state.params), step=jnp.zeros((), jnp.int32))
            row_state, info = fit(qcfg, exp, row_state, os.path.join(workdir, name))
            row_state = row_state.replace(apply_fn=apply_fn)
            qat, train_time = evaluate(row_state, exp.test)["accuracy"], info["train_time_s"]
        path = os.path.join(workdir, name, "model.npz")
        exported = export_packed(path, table, row_state.variables(), model_name=config.model.name,
                                 num_classes=exp.num_classes, quantizer=quantizer, index_bits=index_bits,
                                 input_mean=exp.mean, input_std=exp.std)
        loaded_model, loaded_vars, _ = load_packed(path)
        folded = fold_batchnorm(row_state.variables(), norm_epsilons(exp.model, exp.input_shape))
        agreement = compare_outputs(apply_fn, folded, loaded_model.apply, loaded_vars, x_check)
        exported_acc = evaluate(_eval_state(loaded_model, loaded_vars, exp.input_shape, config.seed),
                                exp.test)["accuracy"]
        accounting = cost.summarize(table, masks, row_state.quant, quantizer=quantizer,
                                    index_bits=index_bits)["totals"]["bytes"]
        results.append(dict(row=name, kind=kind, size_of_uniform_bits=b, bits_w=bits_w,
                            accuracy_ptq=ptq, accuracy_qat=qat, accuracy_exported=exported_acc,
                            bytes=accounting, file_bytes=exported["file_bytes"],
                            payload_equals_accounting=exported["payload_bytes"] == int(accounting),
                            outputs_max_abs_diff=agreement["max_abs_diff"], qat_train_time_s=train_time))
        logging.info("%s: bits %s, PTQ %.4f, QAT %s, exported %.4f, %d bytes", name, bits_w, ptq, qat,
                     exported_acc, accounting)

    summary = dict(job=config.job, model=config.model.name, dataset=config.data.name, source=source,
                   mode=q.mode, qat_epochs=q.qat_epochs if q.mode == "qat" else 0,
                   weight_quantizer=quantizer.to_dict(), bits_a=bits_a, accuracy_float=float_test["accuracy"],
                   bytes_float32=original_bytes, rows=results, sensitivity=sensitivity,
                   wall_time_s=time.time() - wall_start, device_kind=jax.devices()[0].device_kind)
    write_json(os.path.join(workdir, "summary.json"), summary)
    lines = ["| row | bits_w per layer | bytes | PTQ acc | " + ("QAT acc | " if q.mode == "qat" else "")
             + "exported acc |", "|---|---|---|---|" + ("---|" if q.mode == "qat" else "") + "---|"]
    for r in results:
        bits = "/".join(str(r["bits_w"][p]) for p in paths)
        qat = f" {100 * r['accuracy_qat']:.2f}% |" if q.mode == "qat" else ""
        lines.append(f"| {r['row']} | {bits} | {int(r['bytes']):,} | {100 * r['accuracy_ptq']:.2f}% |{qat} "
                     f"{100 * r['accuracy_exported']:.2f}% |")
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    logging.info("\n%s", "\n".join(lines))
    summary["accuracy_best_mixed"] = max([r["accuracy_exported"] for r in results if r["kind"] == "mixed"],
                                         default=None)
    return summary
