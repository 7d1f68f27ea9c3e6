"""The `bench_proxy_fidelity` job: how faithfully each cheap candidate score (proxy)
ranks pruning policies the way a real fine-tune does (issue 16, item 1).

The search scores thousands of candidates with a proxy and keeps the best; that is
only as good as the proxy's ranking. Here, for a trained reference network at a FLOPs
budget (`search.flops_budget`):

1. policies: `bench.num_policies` random feasible channel-pruning policies, drawn
   exactly as random search draws them (`RandomSearch` acting in `PruneEnv`: uniform
   actions walled by the environment, so every policy ends within the budget; draw i
   uses `fold_in(seed, i)`, so a larger `num_policies` keeps the first ones;
   duplicates are skipped), plus the uniform policy at the budget (the largest uniform
   keep ratio, as `search_rl.agents` builds it);
2. proxies, each scoring every policy from the same reference weights, channels
   ranked by `search.rank_criterion` (the search's masks):
   - `masked`: accuracy of the masked network, running BatchNorm statistics, on the
     search's sample (`search.eval_size` validation images, split A);
   - `bn_<n>` for n in `bench.bn_sizes`: adaptive-BatchNorm accuracy (EagleEye) on n
     validation images;
   - `sgd_<k>`: accuracy after k = `bench.sgd_steps` plain SGD steps per candidate
     (`search.candidate_finetune_batch` / `_lr`, BatchNorm as `search.bn_adapt`), on
     split A;
   - `distill`: minus the distillation loss, KL(dense reference || masked network) of
     the softmax at temperature `bench.distill_temperature` (1), mean over split A
     (`distill_kl`; BatchNorm as `search.bn_adapt`; lower loss is better, so the score
     is its negative);
   - the search's default proxy (`search.bn_adapt`, `search.candidate_finetune_steps`,
     `search.eval_size`): the one above it equals (for a network without BatchNorm the
     `bn_adapt` flag changes nothing), else an extra row `search_default`.
   Each proxy is one jitted call over every policy; its cost is the median wall time
   of `bench.timing_repeats` calls after the first (compile excluded), divided by the
   number of policies;
3. ground truth: every policy shrunk and fine-tuned alike (`pipeline.shrink_and_finetune`,
   `search.finetune_epochs` at `search.finetune_learning_rate`, seed `config.seed` for
   every policy), test accuracy recorded;
4. per proxy: Kendall's tau-b and Spearman's rho of its scores with the fine-tuned
   accuracies, each with a 95% percentile bootstrap interval (`bench.resamples`
   resamples of the policies, seed `bench.bootstrap_seed`; `benchmarks.stats`); the
   same for the policy's FLOPs fraction alone, the floor a proxy has to clear (random
   policies can end well below the budget, and fewer FLOPs fine-tune worse).

Each fine-tuned policy is appended to `<workdir>/results.jsonl` at once (keyed by its
widths and a fingerprint of the settings its result depends on); a rerun skips those
found there and resumes an interrupted fine-tune from its checkpoints. The proxies are
recomputed on every run (they take seconds). Writes `summary.json` (rows per proxy,
every policy with its scores and fine-tuned accuracy, the best proxy by tau, the
markdown table in `table`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from benchmarks import stats
from benchmarks.resume import append_row, read_rows
from jaxcompress import pipeline
from jaxcompress.errors import ConfigError
from jaxcompress.pruning import criteria as C
from jaxcompress.rl.env import PruneEnv
from jaxcompress.rl.evaluate import _chunked, make_prune_evaluator, stacked_logits
from jaxcompress.rl.job import eval_data
from jaxcompress.rl.random_search import RandomSearch
from jaxcompress.rl.search import batched_rollout, channel_ranks
from jaxcompress.timing import time_call
from jaxcompress.train import Recipe, setup_experiment
from jaxcompress.train.loop import make_eval_fn
from jaxcompress.train.metrics import write_json

DEFAULTS = dict(
    num_policies=32,  # random feasible policies (the uniform policy comes on top)
    bn_sizes=(256, 2048),  # validation images of the adaptive-BatchNorm proxies
    sgd_steps=10,  # SGD steps of the sgd_<k> proxy (0: no such proxy)
    distill_temperature=1.0,
    resamples=2000, bootstrap_seed=0, level=0.95,
    timing_repeats=3,  # timed calls per proxy after the compiling one
    max_draws=0,  # random draws tried for num_policies distinct policies (0: 20 x num_policies)
)


@dataclasses.dataclass(frozen=True)
class Proxy:
    """One candidate score: `kind` accuracy | distill; `n` validation images (split A
    and its supersets); `bn_adapt`; `steps` SGD steps first (accuracy only)."""

    name: str
    kind: str
    n: int
    bn_adapt: bool
    steps: int = 0

    def describe(self, has_bn: bool = True) -> str:
        bn = ("adaptive BN" if self.bn_adapt else "running BN") if has_bn else "no BN in the network"
        if self.kind == "distill":
            return f"-KL(dense, masked), {bn}"
        return (f"accuracy after {self.steps} SGD steps, {bn}" if self.steps else f"accuracy, {bn}")

    def same_as(self, other: "Proxy", has_bn: bool) -> bool:
        """Equal scores for every policy (without BatchNorm, `bn_adapt` changes nothing)."""
        return (self.kind, self.n, self.steps) == (other.kind, other.n, other.steps) and (
            self.bn_adapt == other.bn_adapt or not has_bn)


# ------------------------------------------------------------------------------------ config

def settings(config) -> dict:
    """`config.bench` merged over DEFAULTS; unknown fields and bad values are ConfigErrors."""
    given = config.bench.to_dict() if "bench" in config else {}
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown config.bench fields {unknown}; bench_proxy_fidelity reads "
                          f"{', '.join(sorted(DEFAULTS))}")
    b = {**DEFAULTS, **given}
    b["bn_sizes"] = tuple(int(n) for n in b["bn_sizes"])
    if b["num_policies"] < 2 or any(n < 2 for n in b["bn_sizes"]) or b["sgd_steps"] < 0 or b["resamples"] < 1 \
            or b["timing_repeats"] < 1 or b["distill_temperature"] <= 0 or not 0 < b["level"] < 1:
        raise ConfigError("config.bench needs num_policies >= 2, bn_sizes >= 2 each, sgd_steps >= 0, resamples >= 1, "
                          "timing_repeats >= 1, distill_temperature > 0 and 0 < level < 1")
    if not config.search.finetune_epochs:
        raise ConfigError("bench_proxy_fidelity fine-tunes every policy: set search.finetune_epochs >= 1")
    return b


def proxy_specs(s, b: dict, has_bn: bool) -> tuple[list[Proxy], str]:
    """The proxies (module doc) and the name of the search's default one."""
    a = int(s.eval_size)
    proxies = [Proxy("masked", "accuracy", a, False)]
    proxies += [Proxy(f"bn_{n}", "accuracy", n, True) for n in b["bn_sizes"]]
    if b["sgd_steps"]:
        proxies.append(Proxy(f"sgd_{b['sgd_steps']}", "accuracy", a, bool(s.bn_adapt), int(b["sgd_steps"])))
    proxies.append(Proxy("distill", "distill", a, bool(s.bn_adapt)))
    default = Proxy("search_default", "accuracy", a, bool(s.bn_adapt), int(s.candidate_finetune_steps))
    for p in proxies:
        if p.same_as(default, has_bn):
            return proxies, p.name
    return proxies + [default], default.name


def _fingerprint(config) -> str:
    """The settings a fine-tuned policy's accuracy depends on (besides its widths)."""
    s = config.search
    keep = dict(model=config.model.to_dict(), data=config.data.to_dict(), train=config.train.to_dict(),
                seed=config.seed, multiple=config.hardware.multiple, reference=s.checkpoint,
                rank_criterion=s.rank_criterion, finetune_epochs=s.finetune_epochs,
                finetune_learning_rate=s.finetune_learning_rate)
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ------------------------------------------------------------------------------------ proxies

def distill_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """Distillation loss of each candidate: KL(softmax(t / T) || softmax(s / T)) per image,
    averaged over the images (axis -2), classes on the last axis (Hinton et al. 2015,
    without the T^2 factor). (N, B, K) student logits against (B, K) teacher ones -> (N,)."""
    log_s = jax.nn.log_softmax(jnp.asarray(student_logits, jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(jnp.asarray(teacher_logits, jnp.float32) / temperature, axis=-1)
    return optax.losses.kl_divergence_with_log_targets(log_s, jnp.broadcast_to(log_t, log_s.shape)).mean(-1)


def make_distill_evaluator(env, model, ranks, chunk: int = 0, bn_adapt: bool = False, temperature: float = 1.0):
    """`evaluate(widths (N, G), data) -> -distill_kl (N,)` of the masked networks (kept
    channels: rank < width, as `make_prune_evaluator`) against `data["teacher_logits"]`
    on `data["images"]`, the N networks stacked on the batch (`stacked_logits`)."""
    ranks = [np.asarray(r, np.int32) for r in ranks]
    defer = True

    def chunk_score(widths, data):
        masks = [(jnp.asarray(r)[None, :] < widths[:, g:g + 1]).astype(jnp.float32) for g, r in enumerate(ranks)]
        logits = stacked_logits(model, env.table, data["variables"], data["images"], masks, defer, bn_adapt)
        return -distill_kl(logits, data["teacher_logits"], temperature)

    def evaluate(values, data):
        nonlocal defer
        if defer:
            try:  # as make_prune_evaluator: deferred stacking traces only for some models
                jax.eval_shape(chunk_score, values[:min(2, values.shape[0])], data)
            except Exception:  # noqa: BLE001
                defer = False
        return _chunked(lambda w: chunk_score(w, data), values, chunk)

    return evaluate


def proxy_evaluator(p: Proxy, s, b: dict, env, model, ranks):
    if p.kind == "distill":
        return make_distill_evaluator(env, model, ranks, s.eval_chunk, p.bn_adapt, b["distill_temperature"])
    return make_prune_evaluator(env, model, ranks, s.eval_chunk, s.eval_mode, p.steps, s.candidate_finetune_lr,
                                p.bn_adapt)


def proxy_data(p: Proxy, s, exp, variables, seed: int) -> dict:
    """The validation sample of `p` (`eval_data`: n images, the same permutation as the
    search's split A), its SGD batches, the dense network's logits for `distill`."""
    data = eval_data(exp, variables, p.n, seed, p.steps, s.candidate_finetune_batch)
    if p.kind == "distill":
        data["teacher_logits"] = exp.model.apply(data["variables"], data["images"], train=False)
    return data


def score_proxies(proxies: list[Proxy], s, b: dict, exp, env, variables, ranks, widths: np.ndarray,
                  seed: int) -> dict[str, dict]:
    """{proxy name: {scores (one per policy), n, seconds_per_candidate, compile_s}}."""
    out = {}
    values = jnp.asarray(widths, jnp.float32)
    for p in proxies:
        data = proxy_data(p, s, exp, variables, seed)
        fn = jax.jit(proxy_evaluator(p, s, b, env, exp.model, ranks))
        t0 = time.perf_counter()
        scores = np.asarray(jax.block_until_ready(fn(values, data)), np.float64)
        first = time.perf_counter() - t0
        times = [time_call(lambda: fn(values, data)) for _ in range(b["timing_repeats"])]
        per = float(np.median(times)) / len(widths)
        out[p.name] = dict(scores=scores.tolist(), n=int(data["labels"].shape[0]), seconds_per_candidate=per,
                           compile_s=max(first - float(np.median(times)), 0.0))
        print(f"proxy {p.name:>14s} (n={out[p.name]['n']}): {1e3 * per:8.2f} ms per candidate, "
              f"scores {scores.min():.4f} .. {scores.max():.4f}", flush=True)
    return out


# ------------------------------------------------------------------------------------ policies

def draw_policies(env: PruneEnv, num: int, seed: int, exclude=(), max_draws: int = 0, batch: int = 64) -> np.ndarray:
    """(num, G) kept widths of `num` distinct random feasible policies (not in `exclude`):
    random search's draws (`RandomSearch` in `env`, walled), draw i from `fold_in(seed, i)`."""
    agent = RandomSearch()
    agent_state = agent.init(jax.random.key(seed))
    base = jax.random.key(seed)

    @jax.jit
    def draw(indices):
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(indices)
        final, _ = batched_rollout(env, agent, agent_state, keys, indices)
        return final.values

    seen = {tuple(int(v) for v in w) for w in exclude}
    out, start, max_draws = [], 0, max_draws or 20 * num
    while len(out) < num:
        if start >= max_draws:
            raise ConfigError(f"only {len(out)} distinct feasible policies in {max_draws} random draws; lower "
                              f"bench.num_policies or widen the search space (search.a_min / a_max / scope)")
        for w in np.asarray(draw(jnp.arange(start, start + batch, dtype=jnp.int32))):
            key = tuple(int(v) for v in w)
            if key not in seen and len(out) < num:
                seen.add(key)
                out.append(key)
        start += batch
    return np.asarray(out, np.int64)


def uniform_policy(exp, env, s, multiple) -> tuple[list[int], float]:
    """(widths, keep ratio) of the largest uniform keep ratio within the budget (as `search_rl.agents`)."""
    ratio = C.keep_ratio_for_flops(exp.table, s.flops_budget, list(env.groups), multiple)
    return [int(w) for w in C.keep_counts(exp.table, ratio, list(env.groups), multiple)], float(ratio)


def policy_key(widths) -> str:
    return "-".join(str(int(w)) for w in widths)


def finetune_policy(exp, variables, scores, widths, recipe: Recipe, eval_batch_size: int, workdir: str) -> dict:
    """The policy's masked network (the `scores`' top channels, the proxies' masks), shrunk
    and fine-tuned with `recipe`; its test accuracy."""
    masks = exp.table.layer_masks(C.masks_from_scores(scores, [int(w) for w in widths]), variables.get("masks"))
    small_exp, st = pipeline.shrink_and_finetune(exp, {**variables, "masks": masks}, recipe, workdir)
    return dict(accuracy=float(make_eval_fn(small_exp, eval_batch_size)(st, small_exp.test)["accuracy"]))


# ------------------------------------------------------------------------------------ report

def markdown(rows: list[dict], default: str, best: str, finetune_s: float, flops: dict) -> str:
    """One row per proxy: what it is, images, tau and rho with intervals, seconds per candidate;
    then the FLOPs-fraction baseline and the fine-tune itself."""
    lines = ["| proxy | score | images | Kendall tau [95% CI] | Spearman rho [95% CI] | time / candidate |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        tags = [t for t, on in (("search default", r["name"] == default), ("best tau", r["name"] == best)) if on]
        name = f"{r['name']}" + (f" ({', '.join(tags)})" if tags else "")
        lines.append(f"| {name} | {r['what']} | {r['n']} | {r['tau']:.2f} [{r['tau_lo']:.2f}, {r['tau_hi']:.2f}] | "
                     f"{r['rho']:.2f} [{r['rho_lo']:.2f}, {r['rho_hi']:.2f}] | "
                     f"{_seconds(r['seconds_per_candidate'])} |")
    lines.append(f"| flops (baseline) | {flops['what']} | - | {flops['tau']:.2f} [{flops['tau_lo']:.2f}, "
                 f"{flops['tau_hi']:.2f}] | {flops['rho']:.2f} [{flops['rho_lo']:.2f}, {flops['rho_hi']:.2f}] | - |")
    lines.append(f"| fine-tune (ground truth) | test accuracy | all | 1 | 1 | {_seconds(finetune_s)} |")
    return "\n".join(lines)


def _seconds(x: float) -> str:
    return f"{x:.1f} s" if x >= 1 else f"{1e3 * x:.2f} ms"


# ------------------------------------------------------------------------------------ the job

def run(config, workdir: str) -> dict:
    """Random feasible policies + uniform, every proxy's scores and cost, every policy
    fine-tuned, rank correlations with bootstrap intervals (module doc)."""
    wall_start = time.time()
    s = config.search
    b = settings(config)
    exp = setup_experiment(config)
    multiple = config.hardware.multiple
    env = PruneEnv(exp.table, s.flops_budget, s.a_min, s.a_max, C.prunable_groups(exp.table, s.scope), multiple,
                   s.params_budget or None)
    state = pipeline.reference(config, exp, s.checkpoint, workdir, "search.checkpoint")
    variables = state.variables()
    has_bn = bool(jax.tree.leaves(variables.get("batch_stats", {})))
    channel_scores = C.channel_scores(exp.table, variables, s.rank_criterion)
    ranks = channel_ranks(channel_scores)
    test_eval = make_eval_fn(exp, config.train.eval_batch_size)
    dense_accuracy = float(test_eval(state, exp.test)["accuracy"])

    uniform, keep_ratio = uniform_policy(exp, env, s, multiple)
    drawn = draw_policies(env, b["num_policies"], config.seed, exclude=[uniform], max_draws=b["max_draws"])
    labels = ["uniform"] + [f"random_{i:02d}" for i in range(len(drawn))]
    widths = np.concatenate([np.asarray([uniform], np.int64), drawn])
    flops_ratio = [float(env.flops(np.asarray(w, np.float32))) / env.flops_dense for w in widths]
    print(f"{config.model.name} at {s.flops_budget:.0%} FLOPs: {len(widths)} policies (uniform keep ratio "
          f"{keep_ratio:.3f}; random FLOPs {min(flops_ratio[1:]):.1%} .. {max(flops_ratio[1:]):.1%}), dense test "
          f"accuracy {dense_accuracy:.4f}", flush=True)

    proxies, default = proxy_specs(s, b, has_bn)
    scored = score_proxies(proxies, s, b, exp, env, variables, ranks, widths, config.seed)

    fp = _fingerprint(config)
    results_path = os.path.join(workdir, "results.jsonl")
    done = read_rows(results_path, fp)
    recipe = Recipe.from_config(config).replace(num_epochs=s.finetune_epochs, learning_rate=s.finetune_learning_rate)
    skipped = sum(policy_key(w) in done for w in widths)
    if skipped:
        print(f"{skipped} of {len(widths)} policies already fine-tuned in {results_path}", flush=True)
    for i, (label, w) in enumerate(zip(labels, widths)):
        key = policy_key(w)
        if key in done:
            continue
        start = time.time()
        ft = finetune_policy(exp, variables, channel_scores, w, recipe, config.train.eval_batch_size,
                             os.path.join(workdir, "finetune", f"{label}_{fp}"))
        row = dict(key=key, fingerprint=fp, label=label, widths=[int(v) for v in w], flops_ratio=flops_ratio[i],
                   finetune_s=time.time() - start, **ft)
        append_row(results_path, row)
        done[key] = row
        print(f"[{i + 1}/{len(widths)}] {label} widths {key} FLOPs {flops_ratio[i]:.1%}: fine-tuned test accuracy "
              f"{ft['accuracy']:.4f} ({row['finetune_s']:.0f} s)", flush=True)

    accuracy = [done[policy_key(w)]["accuracy"] for w in widths]
    spec = {p.name: p for p in proxies}
    rows = []
    for name, sc in scored.items():
        p = spec[name]
        corr = stats.rank_correlations(sc["scores"], accuracy, b["resamples"], b["bootstrap_seed"], b["level"])
        rows.append(dict(name=name, what=p.describe(has_bn), kind=p.kind, n=sc["n"], bn_adapt=p.bn_adapt, steps=p.steps,
                         seconds_per_candidate=sc["seconds_per_candidate"], compile_s=sc["compile_s"],
                         **{k: corr[k] for k in ("tau", "tau_lo", "tau_hi", "rho", "rho_lo", "rho_hi")}))
    best = max(rows, key=lambda r: -np.inf if np.isnan(r["tau"]) else r["tau"])["name"]
    # the floor a proxy has to clear: the policy's FLOPs fraction alone (no network evaluated)
    flops = dict(name="flops", what="FLOPs fraction (baseline)",
                 **stats.rank_correlations(flops_ratio, accuracy, b["resamples"], b["bootstrap_seed"], b["level"]))
    finetune_s = float(np.median([done[policy_key(w)]["finetune_s"] for w in widths]))
    table = markdown(rows, default, best, finetune_s, flops)
    policies = [dict(label=label, widths=[int(v) for v in w], flops_ratio=flops_ratio[i],
                     scores={name: sc["scores"][i] for name, sc in scored.items()}, accuracy=accuracy[i])
                for i, (label, w) in enumerate(zip(labels, widths))]
    d = next(r for r in rows if r["name"] == default)
    summary = dict(
        job=config.job, model=config.model.name, dataset=config.data.name, flops_budget=s.flops_budget,
        reference=s.checkpoint or os.path.join(workdir, "pretrain"), dense_test_accuracy=dense_accuracy,
        has_batch_norm=has_bn, groups=[exp.table.group_names[g] for g in env.groups],
        num_policies=len(widths), uniform_keep_ratio=keep_ratio,
        finetune_epochs=s.finetune_epochs, finetune_learning_rate=s.finetune_learning_rate,
        finetune_seconds_per_policy=finetune_s, resamples=b["resamples"], level=b["level"],
        default_proxy=default,
        default_proxy_settings=dict(bn_adapt=bool(s.bn_adapt), eval_size=int(s.eval_size),
                                    candidate_finetune_steps=int(s.candidate_finetune_steps)),
        default_tau=d["tau"], best_proxy=best, rows=rows, flops_baseline=flops, policies=policies, table=table,
        wall_time_s=time.time() - wall_start, device_kind=jax.devices()[0].device_kind)
    write_json(os.path.join(workdir, "summary.json"), summary)
    logging.info("bench_proxy_fidelity: default proxy %s tau %.3f, best %s", default, d["tau"], best)
    print(table)
    print(f"default proxy {default}: Kendall tau {d['tau']:.3f} [{d['tau_lo']:.3f}, {d['tau_hi']:.3f}]; "
          f"best by tau: {best}", flush=True)
    return summary
