"""Benchmark (issue 18): the decoder-only LM's perplexity after pruning 25% of its
attention heads and 30% of its MLP neurons, with a short fine-tune, against dense.

The LM (`jaxcompress.models.DecoderLM`) is trained on the Python standard library's
source as bytes (`jaxcompress.data.load_python_stdlib`; AdamW, warm-up then cosine
decay) and kept in `<workdir>/dense_<key>.npz`, the key a hash of the settings it
depends on, so a rerun does not retrain it. Then, for each criterion of
`bench.criteria` and each seed of `bench.seeds`: channel scores (`channel_scores`;
SNIP on a batch of next-token targets drawn with the seed, random scores from the
seed), the lowest-scoring heads and MLP neurons of every block masked (scope
'inner': the residual stream is kept), the network shrunk (`shrink`) and fine-tuned
for `bench.finetune_steps` steps (batch order from the seed). Perplexity is exp of
the mean next-token cross-entropy over every position of a fixed test subset
(`bench.eval_sequences` sequences spread evenly over the test files).

Reported: dense perplexity; per criterion, perplexity right after pruning and after
the fine-tune (mean +- standard error over the seeds) and the paired difference to
random (criterion - random, lower is better, paired t-test p); params and MACs dense
and pruned (`cost.count`); the masked network's perplexity next to the shrunk one's
and their largest logit difference (a check: they compute the same function).
Writes `summary.json` and `results.md`.
"""
from __future__ import annotations

import functools
import math
import os
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from benchmarks.stats import mean_se, paired
from jaxcompress import cost
from jaxcompress.data import load_python_stdlib
from jaxcompress.models import DecoderLM, describe
from jaxcompress.models.lm import default_widths
from jaxcompress.pruning import shrink
from jaxcompress.pruning.criteria import channel_scores, keep_counts, masks_from_scores, prunable_groups
from jaxcompress.storage import canonical_json, sha256_hex
from jaxcompress.train.metrics import write_json
from jaxcompress.train.optim import make_optimizer

# the settings the dense network depends on (its cache key, with the config's seed and the corpus size)
DENSE_FIELDS = ("seq_len", "dim", "depth", "heads", "head_dim", "mlp_ratio", "batch_size", "train_steps",
                "learning_rate", "warmup_steps", "weight_decay")
LOGIT_TOLERANCE = 1e-4  # masked vs shrunk: the same function up to float32 rounding


def optimizer(learning_rate: float, steps: int, warmup: int, weight_decay: float) -> optax.GradientTransformation:
    """The library's AdamW (weight decay on kernels), linear warm-up then cosine decay to 0
    over `steps` (one 'epoch' per step)."""
    cfg = types.SimpleNamespace(optimizer="adamw", learning_rate=learning_rate, weight_decay=weight_decay,
                                schedule="cosine", num_epochs=steps, warmup_epochs=warmup)
    return make_optimizer(cfg, 1)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, variables, tokens):
    return model.apply(variables, tokens)


def _token_loss(model, variables, batch):
    """Per-position next-token cross-entropy of `batch` (sequences of seq_len + 1 tokens)."""
    return optax.softmax_cross_entropy_with_integer_labels(_logits(model, variables, batch[:, :-1]), batch[:, 1:])


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _train_step(model, tx, params, opt_state, rest, batch):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(_token_loss(model, {**rest, "params": p}, batch)))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train(model, variables: dict, tokens: np.ndarray, tx, steps: int, batch_size: int, rng) -> tuple[dict, float]:
    """`steps` optimiser steps on batches of rows of `tokens` drawn by `rng`; returns the
    variables and the last step's loss. Masks and other collections stay fixed."""
    params = jax.tree.map(jnp.array, variables["params"])  # a copy: the steps donate their buffers
    rest = {k: v for k, v in variables.items() if k != "params"}
    opt_state, loss = tx.init(params), jnp.nan
    for _ in range(steps):
        batch = jnp.asarray(tokens[rng.integers(0, len(tokens), batch_size)], jnp.int32)
        params, opt_state, loss = _train_step(model, tx, params, opt_state, rest, batch)
    return {**rest, "params": params}, float(loss)


def perplexity(model, variables: dict, tokens: np.ndarray, batch_size: int) -> float:
    """exp(mean next-token cross-entropy over every position of `tokens`)."""
    total = sum(float(jnp.sum(_token_loss(model, variables, jnp.asarray(tokens[i:i + batch_size], jnp.int32))))
                for i in range(0, len(tokens), batch_size))
    return math.exp(total / (tokens.shape[0] * (tokens.shape[1] - 1)))


def _save(path: str, variables: dict) -> None:
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(variables).items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def _load(path: str) -> dict:
    with np.load(path) as f:
        return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files})


def dense_network(model, train_tokens: np.ndarray, b, seed: int, workdir: str) -> tuple[dict, dict]:
    """The trained dense variables (read back from the workdir's cache when it holds them)
    and how they were made."""
    key = sha256_hex(canonical_json(dict(seed=seed, train_sequences=len(train_tokens),
                                         **{f: b[f] for f in DENSE_FIELDS})))[:16]
    path = os.path.join(workdir, f"dense_{key}.npz")
    if os.path.exists(path):
        return _load(path), dict(cached=True, checkpoint=os.path.basename(path))
    start = time.time()
    variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, b.seq_len), jnp.int32))
    tx = optimizer(b.learning_rate, b.train_steps, b.warmup_steps, b.weight_decay)
    variables, loss = train(model, variables, train_tokens, tx, b.train_steps, b.batch_size,
                            np.random.default_rng([0, seed]))
    _save(path, variables)
    logging.info("bench_lm_prune: dense %s trained, %d steps in %.0fs, last loss %.3f", model.widths, b.train_steps,
                 time.time() - start, loss)
    return variables, dict(cached=False, checkpoint=os.path.basename(path), train_loss=loss,
                           train_time_s=time.time() - start)


def prune_counts(table, head_keep: float, mlp_keep: float) -> list[int]:
    """Kept channels per group: `head_keep` of every attention layer's heads, `mlp_keep`
    of every other prunable ('inner') group, the MLP neurons; the residual stream whole."""
    heads = {a.heads_group for a in table.attention}
    return keep_counts(table, {table.group_names[g]: head_keep if g in heads else mlp_keep
                               for g in prunable_groups(table, "inner")})


def prune_and_finetune(model, table, dense: dict, criterion: str, seed: int, counts, corpus, test, ft_tx, b) -> dict:
    """One criterion and seed: perplexity masked, shrunk and after the fine-tune."""
    rng = np.random.default_rng([1, seed])
    snip = jnp.asarray(corpus.train[rng.integers(0, len(corpus.train), b.snip_batch)], jnp.int32)
    scores = channel_scores(table, dense, criterion, batch=(snip[:, :-1], snip[:, 1:]), seed=seed)
    masked = {**dense, "masks": table.layer_masks(masks_from_scores(scores, counts), dense["masks"])}
    small_model, small = shrink(table, masked)
    probe = jnp.asarray(test[:b.eval_batch, :-1], jnp.int32)
    logit_diff = float(jnp.max(jnp.abs(_logits(model, masked, probe) - _logits(small_model, small, probe))))
    start = time.time()
    tuned, loss = train(small_model, small, corpus.train, ft_tx, b.finetune_steps, b.batch_size, rng)
    row = dict(seed=seed, finetune_time_s=time.time() - start, finetune_loss=loss, max_logit_diff=logit_diff,
               perplexity_masked=perplexity(model, masked, test, b.eval_batch),
               perplexity_pruned=perplexity(small_model, small, test, b.eval_batch),
               perplexity_finetuned=perplexity(small_model, tuned, test, b.eval_batch),
               widths=list(small_model.widths))
    logging.info("bench_lm_prune: %s seed %d: perplexity %.3f pruned, %.3f fine-tuned", criterion, seed,
                 row["perplexity_pruned"], row["perplexity_finetuned"])
    return row


def compare(runs: dict) -> dict:
    """Per criterion: perplexities per seed, mean +- se, and criterion - random paired over the seeds."""
    out = {}
    for name, rows in runs.items():
        r = {k: [row[k] for row in rows] for k in ("perplexity_pruned", "perplexity_finetuned")}
        out[name] = {**r, **{f"{k}_{s}": v for k in r for s, v in mean_se(r[k]).items() if s != "n"},
                     "max_logit_diff": max(row["max_logit_diff"] for row in rows),
                     "minus_random": None if name == "random" or "random" not in runs else {
                         k: paired(r[k], [row[k] for row in runs["random"]]) for k in r}}
    return out


def _random_last(criteria: dict) -> list[tuple[str, dict]]:
    """The criteria in run order (summary.json's sorted keys once read back), random last."""
    return sorted(criteria.items(), key=lambda item: item[0] == "random")


def _pm(m: dict, k: str) -> str:
    return f"{m[k + '_mean']:.3f} +- {m[k + '_se']:.3f}"


def _diff(d: dict | None) -> str:
    if d is None:
        return "- | -"
    return f"{d['mean']:+.3f} +- {d['se']:.3f} | " + ("-" if d["p"] is None else f"{d['p']:.3f}")


def markdown_table(s: dict) -> str:
    c, d = s["cost"], s["dense"]
    lines = ["| network | test perplexity, pruned | after fine-tune | per seed (fine-tuned) | "
             "fine-tuned - random (paired; < 0 better) | p |", "|---|---|---|---|---|---|",
             f"| dense | {d['perplexity']:.3f} | - | - | - | - |"]
    for name, m in _random_last(s["criteria"]):
        diff = m["minus_random"] and m["minus_random"]["perplexity_finetuned"]
        lines.append(f"| {name} | {_pm(m, 'perplexity_pruned')} | {_pm(m, 'perplexity_finetuned')} | "
                     f"{' / '.join(f'{p:.3f}' for p in m['perplexity_finetuned'])} | {_diff(diff)} |")
    lines += ["", f"- widths {s['widths_dense']} -> {s['widths_pruned']} (dim, heads per block, MLP per block); "
                  f"params {c['params_dense']:,} -> {c['params_pruned']:,} ({100 * c['params_fraction']:.1f}%), "
                  f"MACs per sequence {c['macs_dense']:,} -> {c['macs_pruned']:,} ({100 * c['macs_fraction']:.1f}%)",
              f"- {len(s['seeds'])} seeds, fine-tune {s['finetune_steps']} steps; dense: {s['train_steps']} steps "
              f"of batch {s['batch_size']} x {s['seq_len']} bytes; test subset {s['eval_sequences']} sequences",
              f"- masked == shrunk: largest logit difference {s['max_logit_diff']:.1e}"]
    return "\n".join(lines)


def targets(s: dict) -> list[dict]:
    """Issue 18 sets no perplexity target: the figures are recorded as such; the masked
    network must equal the shrunk one."""
    names = " / ".join(name for name, _ in _random_last(s["criteria"]))
    measured = " / ".join(f"{m['perplexity_finetuned_mean']:.3f}" for _, m in _random_last(s["criteria"]))
    return [dict(what=f"test perplexity after a {s['finetune_steps']}-step fine-tune, {names} (dense "
                      f"{s['dense']['perplexity']:.3f})", target="none", measured=measured, met=None),
            dict(what="masked == shrunk, largest logit difference", target=f"<= {LOGIT_TOLERANCE:g}",
                 measured=f"{s['max_logit_diff']:.1e}", met=s["max_logit_diff"] <= LOGIT_TOLERANCE)]


def run(config, workdir: str) -> dict:
    """`bench_lm_prune`: dense LM, then each criterion x seed pruned, shrunk and fine-tuned."""
    start, b = time.time(), config.bench
    corpus = load_python_stdlib(b.seq_len)
    test = corpus.test[np.linspace(0, len(corpus.test) - 1, b.eval_sequences).astype(int)]
    model = DecoderLM(widths=default_widths(b.dim, b.depth, b.heads, b.mlp_ratio), vocab_size=corpus.vocab_size,
                      seq_len=b.seq_len, head_dim=b.head_dim)
    table = describe(model, (b.seq_len,), "int32")
    dense, made = dense_network(model, corpus.train, b, config.seed, workdir)
    counts = prune_counts(table, b.head_keep, b.mlp_keep)
    ft_tx = optimizer(b.finetune_lr, b.finetune_steps, b.finetune_warmup, b.weight_decay)
    runs = {name: [prune_and_finetune(model, table, dense, name, seed, counts, corpus, test, ft_tx, b)
                   for seed in b.seeds] for name in b.criteria}
    dense_cost, pruned_cost = cost.count(table), cost.count(table, counts)
    c = {f"{k}_{n}": int(v[k]) for n, v in (("dense", dense_cost), ("pruned", pruned_cost)) for k in ("params", "macs")}
    c.update(params_fraction=c["params_pruned"] / c["params_dense"], macs_fraction=c["macs_pruned"] / c["macs_dense"])
    criteria = compare(runs)
    summary = dict(job=config.job, corpus=dict(name=corpus.name, train_sequences=len(corpus.train),
                                               test_sequences=len(corpus.test), test_files=len(corpus.test_files)),
                   widths_dense=list(model.widths), widths_pruned=counts, head_dim=b.head_dim, seeds=list(b.seeds),
                   **{k: b[k] for k in ("seq_len", "batch_size", "train_steps", "finetune_steps", "eval_sequences",
                                        "head_keep", "mlp_keep")},
                   dense=dict(made, perplexity=perplexity(model, dense, test, b.eval_batch)), cost=c,
                   criteria=criteria, runs=runs, max_logit_diff=max(m["max_logit_diff"] for m in criteria.values()))
    summary.update(table=markdown_table(summary), targets=targets(summary), wall_time_s=time.time() - start)
    write_json(os.path.join(workdir, "summary.json"), summary)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(summary["table"] + "\n")
    return summary
