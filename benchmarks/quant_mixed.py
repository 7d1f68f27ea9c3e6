"""The `bench_quant_mixed` job: uniform bit widths against a sensitivity-based mixed
allocation of the same size, from one float network, with the same training budget.

Rows: every width in `bench.uniform_bits` (all layers at that width), then for
every width in `bench.mixed_bits` a mixed allocation whose exact size is at most
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
from absl import logging

from jaxcompress import cost
from jaxcompress.errors import ConfigError
from jaxcompress.quant import budget as B
from jaxcompress.quant.job import (export_and_verify, float_network, index_bits_from_config,
                                   layer_sensitivity, qat_recipe, requested_bits)
from jaxcompress.quant.qat import QuantRecipe, quantize_state, train_qat
from jaxcompress.train import setup_experiment
from jaxcompress.train.loop import make_eval_fn
from jaxcompress.train.metrics import write_json


def run(config, workdir: str) -> dict:
    wall_start = time.time()
    q = config.quant
    if not config.bench.uniform_bits and not config.bench.mixed_bits:
        raise ConfigError("bench_quant_mixed needs bench.uniform_bits and/or bench.mixed_bits")
    qrecipe, index_bits = QuantRecipe.from_config(config), index_bits_from_config(q)
    quantizer = qrecipe.quantizer
    exp = setup_experiment(config)
    exp, state, source = float_network(config, exp, workdir)
    table, masks = exp.table, state.masks or None
    paths = [layer.path for layer in table.layers]
    _, bits_a = requested_bits(q, table, config.model.name)
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    float_test = evaluate(state, exp.test)
    original_bytes = cost.summarize(table, masks)["totals"]["bytes"]
    rows, sensitivity = bench_rows(config, exp, state, bits_a, qrecipe, index_bits)

    results = []
    for kind, b, bits_w in rows:
        name = f"{kind}{b}"
        row_state, _ = quantize_state(exp, state, bits_w, bits_a, qrecipe)
        ptq = evaluate(row_state, exp.test)["accuracy"]
        qat, train_time = None, None
        if q.mode == "qat":
            row_state, info = train_qat(exp, row_state, qat_recipe(config), os.path.join(workdir, name))
            qat, train_time = evaluate(row_state, exp.test)["accuracy"], info["train_time_s"]
        check = export_and_verify(os.path.join(workdir, name, "model.npz"), exp, row_state, evaluate,
                                  model_name=config.model.name, quantizer=quantizer, index_bits=index_bits,
                                  verify_batch=q.verify_batch, seed=config.seed)
        accounting = check["accounting"]["totals"]["bytes"]
        results.append(dict(row=name, kind=kind, size_of_uniform_bits=b, bits_w=bits_w,
                            accuracy_ptq=ptq, accuracy_qat=qat, accuracy_exported=check["accuracy"],
                            bytes=accounting, file_bytes=check["exported"]["file_bytes"],
                            payload_equals_accounting=check["payload_equals_accounting"],
                            outputs_max_abs_diff=check["agreement"]["max_abs_diff"], qat_train_time_s=train_time))
        logging.info("%s: bits %s, PTQ %.4f, QAT %s, exported %.4f, %d bytes", name, bits_w, ptq, qat,
                     check["accuracy"], accounting)

    summary = dict(job=config.job, model=config.model.name, dataset=config.data.name, source=source,
                   mode=q.mode, qat_epochs=q.qat_epochs if q.mode == "qat" else 0,
                   weight_quantizer=quantizer.to_dict(), bits_a=bits_a, accuracy_float=float_test["accuracy"],
                   bytes_float32=original_bytes, rows=results, sensitivity=sensitivity,
                   wall_time_s=time.time() - wall_start, device_kind=jax.devices()[0].device_kind)
    write_json(os.path.join(workdir, "summary.json"), summary)
    write_table(os.path.join(workdir, "results.md"), results, paths, q.mode == "qat")
    summary["accuracy_best_mixed"] = max([r["accuracy_exported"] for r in results if r["kind"] == "mixed"],
                                         default=None)
    return summary


def bench_rows(config, exp, state, bits_a, qrecipe: QuantRecipe, index_bits) -> tuple[list, dict | None]:
    """([(kind, width, {layer: bits_w})], sensitivity): the uniform rows, then the mixed rows
    (the sensitivity allocation at most the size of the uniform network at each width)."""
    q, paths = config.quant, [layer.path for layer in exp.table.layers]
    rows = [("uniform", int(b), {p: int(b) for p in paths}) for b in config.bench.uniform_bits]
    if not config.bench.mixed_bits:
        return rows, None
    size_model = B.SizeModel(exp.table, state.masks or None, bits_a, qrecipe.quantizer, index_bits)
    start = time.time()
    sensitivity = layer_sensitivity(exp, state, qrecipe.quantizer, bits_a, tuple(q.sensitivity_bits),
                                    q.sensitivity_examples, config.seed)
    logging.info("layer sensitivity measured in %.1fs", time.time() - start)
    for b in config.bench.mixed_bits:
        target = size_model({p: int(b) for p in paths})
        try:
            bits = B.allocate_by_sensitivity({p: 8 for p in paths}, sensitivity, size_model, target,
                                             q.min_bits_w, q.first_last_min_bits)
        except ConfigError as e:
            logging.warning("mixed row at the size of %d bits skipped: %s", b, e)
            continue
        rows.append(("mixed", int(b), bits))
    return rows, sensitivity


def write_table(path: str, results: list[dict], paths: list[str], qat: bool) -> None:
    """results.md: one Markdown row per bench row (also logged)."""
    lines = ["| row | bits_w per layer | bytes | PTQ acc | " + ("QAT acc | " if qat else "")
             + "exported acc |", "|---|---|---|---|" + ("---|" if qat else "") + "---|"]
    for r in results:
        bits = "/".join(str(r["bits_w"][p]) for p in paths)
        qat_cell = f" {100 * r['accuracy_qat']:.2f}% |" if qat else ""
        lines.append(f"| {r['row']} | {bits} | {int(r['bytes']):,} | {100 * r['accuracy_ptq']:.2f}% |{qat_cell} "
                     f"{100 * r['accuracy_exported']:.2f}% |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    logging.info("\n%s", "\n".join(lines))
