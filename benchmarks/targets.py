"""The targets each benchmark is judged against, as functions of its summary.json.

`judge(name, summary)` gives the results record's `targets` (schema of
benchmarks/results.py: what, target, measured, met) and, where the benchmark has one,
its markdown `table`, for the results file a run is filed under (`name`, the config's
stem). A target is stated here once, with the issue that set it; it is never changed to
pass: a missed target is reported as missed.
"""
from __future__ import annotations

from typing import Callable, Mapping

MODEL_NAMES = {"lenet5": "LeNet-5", "resnet20": "ResNet-20", "resnet56": "ResNet-56", "vgg16": "VGG-16"}


def _t(what: str, target: str, measured: str, met: bool | None) -> dict:
    return dict(what=what, target=target, measured=measured, met=met)


def layer_overhead(s: Mapping) -> tuple[list, str]:
    """Training step of masked + quantized layers (all-ones masks, 32 bits) vs plain Flax: <= 1.10x."""
    rows = s["rows"]
    table = "\n".join(["| model | jaxcompress layers | plain Flax | ratio | max logit diff |", "|---|---|---|---|---|"]
                      + [f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['compressed_step_ms']:.2f} ms | "
                         f"{r['plain_step_ms']:.2f} ms | {r['ratio']:.3f}x | {r['max_logit_diff']:.1e} |"
                         for r in rows])
    targets = [_t(f"{MODEL_NAMES.get(r['model'], r['model'])} step time", "<= 1.10x", f"{r['ratio']:.3f}x",
                  r["ratio"] <= 1.10) for r in rows]
    return targets, table


def search_speed(s: Mapping) -> tuple[list, str]:
    """Jitted vmapped search vs the Python loop: >= 10x episodes/s at N = 16 actors (every eval size)."""
    rows = [r for r in s["rows"] if "speedup" in r]
    table = "\n".join(["| eval images | actors N | jit ep/s | loop ep/s | speed-up | same rewards |",
                       "|---|---|---|---|---|---|"]
                      + [f"| {r['eval_size']} | {r['actors']} | {r['jit_episodes_per_s']:.1f} | "
                         f"{r['loop_episodes_per_s']:.1f} | {r['speedup']:.1f}x | {r['rewards_match']} |" for r in rows])
    targets = [_t(f"speed-up, N = 16, {r['eval_size']} images", ">= 10x", f"{r['speedup']:.1f}x",
                  r["speedup"] >= 10.0) for r in rows if r["actors"] == 16]
    return targets, table


def prune_speedup(s: Mapping) -> tuple[list, str]:
    """Shrunk networks at the FLOPs budget: >= 1.6x faster than dense at batch 128 (aligned widths)."""
    rows = s["rows"]
    table = "\n".join(["| model | multiple | widths | FLOPs left | dense -> masked -> shrunk (ms) | shrunk speed-up |"
                       " masked speed-up |", "|---|---|---|---|---|---|---|"]
                      + [f"| {MODEL_NAMES.get(r['model'], r['model'])} | {r['multiple']} | "
                         f"{'/'.join(map(str, r['widths'][:3]))}... | {r['flops_left']:.3f} | "
                         f"{r['latency_ms']['dense']:.0f} -> {r['latency_ms'].get('masked', float('nan')):.0f} -> "
                         f"{r['latency_ms']['shrunk']:.0f} | {r['speedup_shrunk']:.2f}x | "
                         f"{r.get('speedup_masked', float('nan')):.2f}x |" for r in rows])
    targets = [_t(f"{MODEL_NAMES.get(r['model'], r['model'])} speed-up, widths aligned to 8", ">= 1.6x",
                  f"{r['speedup_shrunk']:.2f}x", r["speedup_shrunk"] >= 1.6) for r in rows if r["multiple"] == 8]
    return targets, table


def latency_predictor(s: Mapping) -> tuple[list, str]:
    """Latency model (layer table + affine fit) on random aligned widths: median error < 10%."""
    table = ("| median error | max error | networks | fit scale | fit offset | table entries |\n|---|---|---|---|---|---|\n"
             f"| {s['median_error']:.1%} | {s['max_error']:.1%} | {1e3 * min(s['measured_s']):.0f}-"
             f"{1e3 * max(s['measured_s']):.0f} ms | {s['scale']:.3f} | {1e3 * s['offset_s']:.1f} ms | "
             f"{s['table_entries']} |")
    return [_t("median error", "< 10%", f"{s['median_error']:.1%}", s["median_error"] < 0.10)], table


def lenet5_mnist(s: Mapping) -> tuple[list, str]:
    """The LeNet-5 reference network: >= 99.0% test accuracy."""
    table = ("| test accuracy | best val accuracy | epochs | train time | wall |\n|---|---|---|---|---|\n"
             f"| {s['test_accuracy']:.2%} | {s['best_val_accuracy']:.2%} | {s['epochs']} | "
             f"{s['train_time_s']:.0f} s | {s['wall_time_s']:.0f} s |")
    return [_t("test accuracy", ">= 99.0%", f"{s['test_accuracy']:.2%}", s["test_accuracy"] >= 0.99)], table


def prune_lenet5_mnist(s: Mapping) -> tuple[list, str]:
    """Hand-set LeNet-5 pruning (Zhan et al.'s row): >= 90% parameters removed, <= 20% FLOPs,
    test error increase <= +0.15 points."""
    inc = 100 * (s["accuracy_dense"] - s["accuracy_pruned"])
    table = ("| widths | params removed | FLOPs left | test accuracy | error increase |\n|---|---|---|---|---|\n"
             f"| {'/'.join(map(str, s['widths_pruned']))} | {s['params_removed']:.1%} | {s['flops_left']:.1%} | "
             f"{s['accuracy_dense']:.2%} -> {s['accuracy_pruned']:.2%} | {inc:+.2f} |")
    return [_t("params removed", ">= 90%", f"{s['params_removed']:.1%}", s["params_removed"] >= 0.90),
            _t("FLOPs", "<= 20%", f"{s['flops_left']:.1%}", s["flops_left"] <= 0.20),
            _t("error", "<= +0.15", f"{inc:+.2f}", inc <= 0.15)], table


def bad_input(s: Mapping) -> tuple[list, str]:
    """Issue 20's bad overrides through the launcher: all refused in one line, 0 tracebacks."""
    rows, counts, n = s["rows"], s["counts"], s["cases"]
    table = "\n".join(["| outcome | cases |", "|---|---|"] + [f"| {k} | {v} |" for k, v in counts.items()]
                      + ["", "| job | override | outcome | first line of stderr |", "|---|---|---|---|"]
                      + [f"| {r['job']} | `{r['override']}` | {r['outcome']} | "
                         f"{r['line'][:140].replace('|', '/')} |" for r in rows])
    targets = [_t("refused in one line, exit 2", f"{n}/{n}", f"{counts['refused']}/{n}", counts["refused"] == n),
               _t("tracebacks", "0", str(counts["traceback"]), counts["traceback"] == 0)]
    return targets, table


def quant_integer(s: Mapping) -> tuple[list, str]:
    """Issue 21: the W8A8 network executed in int8 x int8 -> int32 has the fake-quantized
    network's test accuracy; its latency against float32 is measured (no threshold set)."""
    model = MODEL_NAMES.get(s["model"], s["model"])
    lat = {k: 1e3 * v for k, v in {**s["latency_s"], **s["latency_integer_s"]}.items()}
    diff = 100 * (s["accuracy_integer"] - s["accuracy_quantized"])
    table = ("| model | float32 | W8A8 fake-quant | W8A8 integer | bytes float32 -> packed | latency float32 / "
             "fake-quant / integer (batch " f"{s['latency_batch']}) | integer vs float32 |\n|---|---|---|---|---|---|---|\n"
             f"| {model} | {s['accuracy_float']:.2%} | {s['accuracy_quantized']:.2%} | {s['accuracy_integer']:.2%} | "
             f"{int(s['bytes_original_float32']):,} -> {int(s['bytes_quantized']):,} | {lat['original']:.1f} / "
             f"{lat['fake_quant']:.1f} / {lat['integer']:.1f} ms | {lat['original'] / lat['integer']:.2f}x the speed |")
    return [_t(f"{model} integer accuracy - fake-quant accuracy", "0.00 points", f"{diff:+.2f} points", diff == 0),
            _t(f"{model} integer speed / float32 speed (XLA:CPU)", "measured (no target set)",
               f"{lat['original'] / lat['integer']:.2f}x", None)], table


def peer_torch_pruning(s: Mapping) -> tuple[list, str]:
    """Issue 21: ResNet-56 at about 50% MACs, side by side in one run: jaxcompress's pruned
    latency <= Torch-Pruning's channels_last pruned latency, and its speed-up >= 1.95x."""
    tp = s["torch_pruning"]
    tp_ms = tp["latency_ms"].get("pruned_channels_last", tp["latency_ms"]["pruned"])
    targets = []
    for allocation, jc in s["jaxcompress"].items():
        ms, macs = jc["latency_ms"]["pruned"], f"MACs {jc['macs_fraction']:.3f} vs {tp['macs_fraction']:.3f}"
        targets += [_t(f"ResNet-56 pruned latency, {allocation} allocation", "<= Torch-Pruning's (channels_last)",
                       f"{ms:.0f} vs {tp_ms:.0f} ms ({macs})", ms <= tp_ms),
                    _t(f"ResNet-56 speed-up over dense, {allocation} allocation", ">= 1.95x",
                       f"{jc['speedup']:.2f}x", jc["speedup"] >= 1.95)]
    return targets, s["table"]


def lm_prune(s: Mapping) -> tuple[list, str]:
    """Issue 18: the LM's perplexity after pruning 25% of its heads and 30% of its MLP neurons,
    fine-tuned, against dense (no target set); masked == shrunk (logits within 1e-4)."""
    return s["targets"], s["table"]


JUDGES: dict[str, Callable[[Mapping], tuple[list, str]]] = {
    "peer_torch_pruning": peer_torch_pruning, "lm_prune": lm_prune,
    "layer_overhead": layer_overhead, "search_speed": search_speed, "prune_speedup": prune_speedup,
    "width_alignment": prune_speedup, "latency_predictor": latency_predictor, "lenet5_mnist": lenet5_mnist,
    "prune_lenet5_mnist": prune_lenet5_mnist, "bad_input": bad_input,
    "quant_integer_lenet5": quant_integer, "quant_integer_resnet20": quant_integer,
}


def judge(name: str, summary: Mapping) -> tuple[list, str | None]:
    """(targets, table or None) of a finished run filed as `name`; ([], None) when no judge is defined."""
    if name not in JUDGES:
        return [], None
    return JUDGES[name](summary)
