"""Held-out re-ranking of a search's best candidates (EagleEye's selection, Li et al. 2020).

A search scores hundreds of candidates on one fixed sample of validation images
(split A) and keeps the highest score: a winner's curse, since on a few hundred
images one standard error is a few points of accuracy. Re-ranking takes the top-k
*distinct* policies by their split-A score (`top_distinct`), scores them again with
the same evaluator and reward on a disjoint, larger validation sample (split B), and
keeps the one best on B (`choose`). Both are pure functions of score tables;
`rerank` wires them to an evaluator and a search's history. `finetune_select`, the
protocol's last step, briefly fine-tunes the few best on B and keeps the best after it.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.rl.search import place_on_mesh
from jaxcompress.train.steps import replicated


def top_distinct(values, scores: Sequence[float], k: int) -> list[int]:
    """Indices of the `k` best-scoring distinct policies (rows of `values`), best first.

    A policy that appears several times (the same row of `values`) counts once, at its
    best score (its first occurrence among equal scores); ties between different
    policies go to the earlier one. Fewer than `k` indices when there are fewer
    distinct policies."""
    values = np.asarray(values, np.float64).reshape(len(scores), -1)
    scores = np.asarray(scores, np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))  # score descending, then index
    seen, out = set(), []
    for i in order:
        key = tuple(np.round(values[i], 6))
        if key not in seen:
            seen.add(key)
            out.append(int(i))
            if len(out) == k:
                break
    return out


def choose(scores_a: Sequence[float], scores_b: Sequence[float]) -> int:
    """Position of the candidate best on split B; ties go to the better split-A score,
    then to the earlier candidate."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"choose: need equally many split-A and split-B scores, got {a.shape} and {b.shape}")
    return int(np.lexsort((np.arange(a.size), -a, -b))[0])


def rerank(evaluate: Callable, reward_fn: Callable, history: dict, data_b, top_k: int, mesh=None) -> dict:
    """Re-scores the search's top-`top_k` distinct candidates on `data_b` and picks one.

    `evaluate(values (n, ...), data) -> accuracy (n,)` and `reward_fn(acc, cost, lo, hi)`
    are the search's own (`run_search`'s); `history` its record of every candidate
    (values, actions, accuracy, reward, cost, ...); lo, hi are the lowest and highest
    cost it observed (R_FLOPs with `cost_norm="observed"`); on a `mesh` split B's images
    are split over its devices (`place_on_mesh`). Returns dict(top_k, size_b,
    candidates (one row each: index and episode in the history, values, cost, split-A
    and split-B accuracy and reward), chosen (a position in candidates), best (the
    chosen candidate as `SearchResult.best`: split-A reward and accuracy, plus
    reward_b and accuracy_b))."""
    if top_k < 1:
        raise ValueError(f"rerank: top_k={top_k} must be >= 1")
    idx = top_distinct(history["values"], history["reward"], top_k)
    values = np.asarray(history["values"], np.float32)[idx]
    cost_all = np.asarray(history["cost"], np.float64)
    acc_b = np.asarray(_jit_replicated(evaluate, mesh)(jnp.asarray(values), place_on_mesh(data_b, mesh)), np.float64)
    cost = cost_all[idx]
    reward_b = np.asarray(reward_fn(jnp.asarray(acc_b, jnp.float32), jnp.asarray(cost, jnp.float32),
                                    jnp.float32(cost_all.min()), jnp.float32(cost_all.max())), np.float64)
    rows = []
    for j, i in enumerate(idx):
        row = dict(index=i, values=values[j].tolist(), actions=np.asarray(history["actions"][i]).tolist(),
                   cost=float(cost[j]),
                   accuracy_a=float(history["accuracy"][i]), reward_a=float(history["reward"][i]),
                   accuracy_b=float(acc_b[j]), reward_b=float(reward_b[j]))
        for key in ("episode", "cost_ratio", "params"):
            if key in history:
                row[key] = history[key][i]
        rows.append(row)
    chosen = choose([r["reward_a"] for r in rows], [r["reward_b"] for r in rows])
    return dict(top_k=top_k, size_b=int(np.shape(data_b["labels"])[0]), candidates=rows, chosen=chosen,
                best=_best(rows[chosen]))


def _jit_replicated(evaluate: Callable, mesh):
    """`evaluate` jitted with its result replicated over `mesh` (readable on every host)."""
    return jax.jit(evaluate) if mesh is None or mesh.size == 1 else jax.jit(evaluate, out_shardings=replicated(mesh))


def _best(row: dict) -> dict:
    """A candidate row as `SearchResult.best` (split-A reward and accuracy) plus its other scores."""
    return dict(reward=row["reward_a"], accuracy=row["accuracy_a"],
                **{k: row[k] for k in ("cost", "values", "actions", "reward_b", "accuracy_b", "reward_ft",
                                       "accuracy_ft") if k in row})


def finetune_select(evaluate_ft: Callable, reward_fn: Callable, reranked: dict, data_b, top: int, cost_lo: float,
                    cost_hi: float, mesh=None) -> dict:
    """EagleEye's last step on a `rerank` result: its `top` candidates best on split B
    (ties: the better split-A reward, then the earlier), each briefly fine-tuned and
    scored on split B by `evaluate_ft(values (n, ...), data) -> accuracy (n,)` (the
    search's evaluator with `finetune_steps`: a few SGD steps on `data_b`'s fixed
    training batches, then split B's images), rewarded by `reward_fn` (cost bounds
    `cost_lo`, `cost_hi`). The best after fine-tuning is chosen (ties as `choose`).
    Returns `reranked` with `accuracy_ft` / `reward_ft` on those candidates, `finetuned`
    (their positions, best on B first), `chosen` and `best` (plus its reward_ft and
    accuracy_ft) updated."""
    if top < 1:
        raise ValueError(f"finetune_select: top={top} must be >= 1")
    rows = [dict(r) for r in reranked["candidates"]]
    order = np.lexsort((np.arange(len(rows)), [-r["reward_a"] for r in rows], [-r["reward_b"] for r in rows]))
    picked = [int(i) for i in order[:top]]
    values = jnp.asarray([rows[i]["values"] for i in picked], jnp.float32)
    acc = np.asarray(_jit_replicated(evaluate_ft, mesh)(values, place_on_mesh(data_b, mesh)), np.float64)
    reward = np.asarray(reward_fn(jnp.asarray(acc, jnp.float32),
                                  jnp.asarray([rows[i]["cost"] for i in picked], jnp.float32),
                                  jnp.float32(cost_lo), jnp.float32(cost_hi)), np.float64)
    for j, i in enumerate(picked):
        rows[i].update(accuracy_ft=float(acc[j]), reward_ft=float(reward[j]))
    chosen = picked[choose([rows[i]["reward_b"] for i in picked], reward.tolist())]
    return dict(reranked, candidates=rows, finetuned=picked, chosen=chosen, best=_best(rows[chosen]))
