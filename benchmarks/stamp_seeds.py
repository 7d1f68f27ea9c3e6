"""Benchmark: the `stamp` job over several seeds, methods compared pairwise (issue 17).

Each seed `k` of `bench.seeds` is one `stamp` job (`config.seed = k`: its data split,
meta-training, target sample and fine-tunes) into `<workdir>/seed_<k>`; the reference
network is trained once, by the first seed, and reused. A finished seed (its
summary.json) is read back, so an interrupted benchmark resumes.

Reported per method: test accuracy mean +- standard error over the seeds, and STAMP
minus the method paired on the same seeds (mean +- standard error, paired t-test p).
Targets (issue 17): STAMP above SNIP (pretrained) and above random channels by at least
one standard error of the paired difference; magnitude pruning's target-side time to
STAMP's validation accuracy at least 3x STAMP's (every seed). Diagnostics: how much
E[pi] varies across target sets against across channels, the share of undecided
E[pi], and, from the method pairs, whether widths or channel choice is what costs.
"""
from __future__ import annotations

import json
import os

from benchmarks.stats import mean_se, paired
from jaxcompress.stamp import job as stamp_job
from jaxcompress.train.metrics import write_json

TIME_RATIO_TARGET = 3.0
BASELINES_TO_BEAT = ("snip_pretrained", "random")


def run_seeds(config, workdir: str, seeds, reuse: str = "") -> dict:
    """{seed: the stamp job's summary} for each seed (finished seeds read back). `reuse`:
    another run's workdir whose reference network (seed_<first>/pretrain) and per-seed
    meta-training (seed_<k>/meta) are deployed here, e.g. on another target dataset."""
    summaries, pretrained = {}, config.stamp.pretrained
    if reuse:
        pretrained = os.path.join(reuse, f"seed_{seeds[0]}", "pretrain")
    for seed in seeds:
        directory = os.path.join(workdir, f"seed_{seed}")
        path = os.path.join(directory, "summary.json")
        if os.path.exists(path):
            with open(path) as f:
                summaries[seed] = json.load(f)
        else:
            c = config.copy_and_resolve_references()
            with c.unlocked():  # the launcher locks its config
                del c["bench"]
            c.job, c.seed = "stamp", seed
            c.stamp.pretrained = pretrained
            if reuse:
                c.stamp.meta_checkpoint = os.path.join(reuse, f"seed_{seed}", "meta")
            summaries[seed] = stamp_job.run(c, directory)
        pretrained = pretrained or os.path.join(directory, "pretrain")
    return summaries


def compare(summaries: dict) -> dict:
    """Per method accuracies, mean +- se, and STAMP minus the method paired over the seeds."""
    seeds = list(summaries)
    methods = sorted(summaries[seeds[0]]["methods"], key=lambda m: (m != "stamp", m))  # STAMP first
    acc = {m: [summaries[s]["methods"][m]["accuracy"] for s in seeds] for m in methods}
    rows = {m: dict(accuracy=acc[m], **{f"accuracy_{k}": v for k, v in mean_se(acc[m]).items()},
                    params_pct=mean_se([summaries[s]["methods"][m]["params_pct"] for s in seeds])["mean"],
                    flops_pct=mean_se([summaries[s]["methods"][m]["flops_pct"] for s in seeds])["mean"],
                    stamp_minus=None if m == "stamp" else paired(acc["stamp"], acc[m])) for m in methods}
    ratios = [summaries[s]["time_ratio_to_stamp"].get("magnitude") for s in seeds]
    stamp = [summaries[s]["methods"]["stamp"] for s in seeds]
    variation = [r.get("keep_prob_variation") for r in stamp]
    diagnostics = dict(
        keep_prob_undecided=[r.get("keep_prob_undecided") for r in stamp],
        variation_ratio=[v["ratio"] if v else None for v in variation],
        mask_agreement=[v["mask_agreement"] if v else None for v in variation],
        stamp_widths=[r["widths"] for r in stamp])
    return dict(seeds=seeds, methods=rows, magnitude_time_ratio=ratios, diagnostics=diagnostics)


def diagnosis(cmp: dict) -> list[str]:
    """What the method pairs say about where STAMP loses (or wins)."""
    rows, out = cmp["methods"], []

    def diff(a, b):
        d = paired(rows[a]["accuracy"], rows[b]["accuracy"])
        return f"{100 * d['mean']:+.2f} +- {100 * d['se']:.2f} points"

    if "random_stamp_widths" in rows:
        out.append(f"channel choice at STAMP's widths (stamp - random_stamp_widths): "
                   f"{diff('stamp', 'random_stamp_widths')}")
        if "random" in rows:
            out.append(f"STAMP's widths vs uniform widths (random_stamp_widths - random): "
                       f"{diff('random_stamp_widths', 'random')}")
    elif "random" in rows:
        out.append(f"channel choice at the same (uniform) widths (stamp - random): {diff('stamp', 'random')}")
    ratios = [r for r in cmp["diagnostics"]["variation_ratio"] if r is not None]
    if ratios:
        mean = sum(ratios) / len(ratios)
        kind = ("nearly a fixed learned mask" if mean < 0.1 else "a task-dependent mask")
        out.append(f"E[pi] varies {mean:.3f}x as much across target sets as across channels: STAMP is {kind}")
    return out


def _pct(m: dict) -> str:
    return f"{100 * m['accuracy_mean']:.2f} +- {100 * m['accuracy_se']:.2f}%"


def table(cmp: dict) -> str:
    lines = ["| method | test accuracy (mean +- se) | per seed | % params | % FLOPs | STAMP - method (paired) | p |",
             "|---|---|---|---|---|---|---|"]
    for name, m in cmp["methods"].items():
        d = m["stamp_minus"]
        lines.append(f"| {name} | {_pct(m)} | {' / '.join(f'{100 * a:.2f}' for a in m['accuracy'])} | "
                     f"{m['params_pct']:.1f} | {m['flops_pct']:.1f} | "
                     + ("-" if d is None else f"{100 * d['mean']:+.2f} +- {100 * d['se']:.2f}") + " | "
                     + ("-" if d is None or d["p"] is None else f"{d['p']:.3f}") + " |")
    return "\n".join(lines)


def targets(cmp: dict, wall_time_s: float, wall_target_s: float = 0.0) -> list[dict]:
    """Issue 17's targets on the comparison `cmp`; with `wall_target_s` (> 0), the whole
    run's wall time too (the small budget's "a newcomer's run in <= 10 minutes")."""
    rows, out = cmp["methods"], []
    for name in BASELINES_TO_BEAT:
        if name in rows:
            d = rows[name]["stamp_minus"]
            out.append(dict(what=f"STAMP - {name}, paired over {d['n']} seeds", target=">= +1 standard error",
                            measured=f"{100 * d['mean']:+.2f} +- {100 * d['se']:.2f} points",
                            met=bool(d["a_better_by_1se"])))
    if "magnitude" in rows:
        ratios = cmp["magnitude_time_ratio"]
        shown = ", ".join("never reached" if r is None else f"{r:.1f}x" for r in ratios)
        out.append(dict(what="magnitude's target time to STAMP's val accuracy / STAMP's",
                        target=f">= {TIME_RATIO_TARGET:g}x every seed", measured=shown,
                        met=all(r is None or r >= TIME_RATIO_TARGET for r in ratios)))
    if wall_target_s:
        out.append(dict(what=f"wall time of the whole comparison ({len(cmp['seeds'])} seeds)",
                        target=f"<= {wall_target_s / 60:g} min", measured=f"{wall_time_s / 60:.1f} min",
                        met=wall_time_s <= wall_target_s))
    return out


def run(config, workdir: str) -> dict:
    """`bench_stamp_seeds`: the stamp job of `config` for each of `bench.seeds`, compared."""
    summaries = run_seeds(config, workdir, tuple(config.bench.seeds), config.bench.reuse)
    cmp = compare(summaries)
    first = summaries[cmp["seeds"][0]]
    wall = sum(s["wall_time_s"] for s in summaries.values())
    summary = dict(job=config.job, selection=config.stamp.selection, channel_stats=config.stamp.channel_stats,
                   baseline_widths=config.stamp.baseline_widths, model=first["model"],
                   reference=first["reference"], target=first["target"], budget=first["budget"],
                   budget_metric=first["budget_metric"], **cmp, diagnosis=diagnosis(cmp),
                   wall_time_s=wall,
                   table=table(cmp) + "\n\n" + "\n".join(f"- {line}" for line in diagnosis(cmp)),
                   targets=targets(cmp, wall, config.bench.wall_target_s))
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
