"""The `search` job: the two-stage compression of Zhan, Lin, Cao (2021), end to end.

Stage 1 (pruning): the agent (`search.agent`: ppo | ddpg) searches one pruning rate
per channel group of the trained network under the FLOPs budget
(`search.flops_budget`, AMC action wall), every candidate evaluated in-graph on a
fixed sample of the *validation* split (`search.eval_size` images). The best
candidate (highest reward) is applied with the channel-selection scheme
`search.scheme` (l1 / l2 / bn magnitude, or lasso / variational via
`jaxcompress.pruning`), the network is shrunk physically and fine-tuned.

Stage 2 (quantization, when `search.quant.episodes > 0`): the agent searches weight
bits per layer of the pruned network under an average-bits budget
(`search.quant.bits_budget`, HAQ back-off), the policy is written as a
`jaxcompress.quant_policy/1` file (`bits_policy.json`) and quantization-aware
training runs through the quant package's `quantize` job (packed export included)
when it is available, else through `train.loop.fit` with the `quant` collection.

Writes into the workdir: `summary.json`, `pareto.json` and `pareto.png` (every
evaluated candidate: FLOPs, parameters / weight bits, validation accuracy; the
Pareto fronts; the best policy per budget), `rewards.png`, `policy.png` (per-layer
pruning rates and bits, the paper's Figure 4), `bits_policy.json`. The searches
checkpoint their whole state (agent, optimizers, replay buffer, RNG, episode
counter, history) under `stage1/` and `stage2/`; fine-tune and QAT checkpoint as
training runs do; a restarted job resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcompress import cost
from jaxcompress.bench.timing import forward_latencies
from jaxcompress.data import normalize
from jaxcompress.errors import ConfigError
from jaxcompress.latency import check_latency_budget, latency_model
from jaxcompress.models import describe
from jaxcompress.pruning import criteria as C
from jaxcompress.pruning.job import gradual_prune
from jaxcompress.pruning.surgery import shrink, without_masks
from jaxcompress.rl import report
from jaxcompress.rl.ddpg import DDPG, DDPGConfig
from jaxcompress.rl.env import OBS_DIM, ElementEnv, PruneEnv, QuantEnv, check_bits_bounds, check_prune_bounds
from jaxcompress.rl.evaluate import EVAL_MODES, make_element_evaluator, make_prune_evaluator, make_quant_evaluator
from jaxcompress.rl.ppo import PPO, PPOConfig
from jaxcompress.rl.search import COST_NORMS, REWARDS, channel_ranks, make_reward_fn, run_search
from jaxcompress.train import create_train_state, make_optimizer, setup_experiment, with_teacher
from jaxcompress.train.loop import fit, load_trained, make_eval_fn, reference_state, steps_per_epoch
from jaxcompress.train.metrics import write_json

AGENTS = ("ppo", "ddpg")
SCHEMES = ("l1", "l2", "bn", "lasso", "variational")
GRANULARITIES = ("channel", "element")


# ------------------------------------------------------------------------------------ config

def make_agent(name: str, search_cfg, num_steps: int):
    """PPO or DDPG from `search.ppo` / `search.ddpg` (ConfigError on bad values)."""
    if name == "ppo":
        return PPO(PPOConfig(**_fields(PPOConfig, search_cfg.ppo)), OBS_DIM)
    if name == "ddpg":
        return DDPG(DDPGConfig(**_fields(DDPGConfig, search_cfg.ddpg)), OBS_DIM, num_steps)
    raise ConfigError(f"unknown search.agent '{name}'; choose one of {', '.join(AGENTS)}")


def _fields(cls, cfg) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    given = dict(cfg) if cfg is not None else {}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}; known: {', '.join(sorted(names))}")
    return given


def check_search_config(s) -> None:
    """Every check that needs no data: one-line ConfigError before any work."""
    if s.agent not in AGENTS:
        raise ConfigError(f"unknown search.agent '{s.agent}'; choose one of {', '.join(AGENTS)}")
    if s.num_actors < 1:
        raise ConfigError(f"search.num_actors={s.num_actors} must be >= 1 (parallel actors per iteration)")
    if s.episodes < 1:
        raise ConfigError(f"search.episodes={s.episodes} must be >= 1")
    check_prune_bounds(s.flops_budget, s.a_min, s.a_max, s.multiple)
    if s.latency_budget:
        check_latency_budget(s.latency_budget, "search.latency_budget")
    if not 0.0 <= s.params_budget <= 1.0:
        raise ConfigError(f"search.params_budget={s.params_budget:g} must be a fraction in (0, 1], or 0 for none")
    if s.reward not in REWARDS:
        raise ConfigError(f"unknown search.reward '{s.reward}'; choose one of {', '.join(REWARDS)}")
    if s.cost_norm not in COST_NORMS:
        raise ConfigError(f"unknown search.cost_norm '{s.cost_norm}'; choose one of {', '.join(COST_NORMS)}")
    if s.scheme not in SCHEMES:
        raise ConfigError(f"unknown search.scheme '{s.scheme}'; choose one of {', '.join(SCHEMES)}")
    if s.granularity not in GRANULARITIES:
        raise ConfigError(f"unknown search.granularity '{s.granularity}'; choose one of {', '.join(GRANULARITIES)}")
    if s.granularity == "element":
        unsupported = [name for name, on in (("latency_budget", s.latency_budget),
                                             ("scheme=" + s.scheme, s.scheme in ("lasso", "variational"))) if on]
        if unsupported:
            raise ConfigError(f"search.granularity=element (magnitude element pruning) does not support "
                              f"search.{', search.'.join(unsupported)}; use search.granularity=channel for them")
    if s.element_iterations < 1:
        raise ConfigError(f"search.element_iterations={s.element_iterations} must be >= 1")
    if s.rank_criterion not in ("l1", "l2", "bn"):
        raise ConfigError(f"search.rank_criterion='{s.rank_criterion}' must be l1, l2 or bn")
    if s.eval_mode not in EVAL_MODES:
        raise ConfigError(f"unknown search.eval_mode '{s.eval_mode}'; choose one of {', '.join(EVAL_MODES)}")
    if s.candidate_finetune_steps < 0 or s.candidate_finetune_batch < 1:
        raise ConfigError("search.candidate_finetune_steps must be >= 0 and candidate_finetune_batch >= 1")
    if s.eval_size < 1:
        raise ConfigError(f"search.eval_size={s.eval_size} must be >= 1 validation images")
    q = s.quant
    if q.episodes < 0:
        raise ConfigError(f"search.quant.episodes={q.episodes} must be >= 0 (0 skips stage 2)")
    if q.episodes:
        check_bits_bounds(q.bits_budget, q.b_min, q.b_max)
        if q.bits_a and not (float(q.bits_a).is_integer() and 2 <= q.bits_a <= 8):
            raise ConfigError(f"search.quant.bits_a={q.bits_a:g} must be 0 (float activations) or 2..8")
    make_agent(s.agent, s, 1)
    if q.episodes and q.agent:
        make_agent(q.agent, s, 1)


# ------------------------------------------------------------------------------------ pieces

def eval_data(exp, variables, size: int, seed: int, train_steps: int = 0, train_batch: int = 64) -> dict:
    """A fixed sample of the validation split (never the test split), normalised; with
    `train_steps`, also that many fixed training batches (per-candidate fine-tune)."""
    x, y = exp.val
    idx = np.random.default_rng(seed).permutation(len(x))[:min(size, len(x))]
    data = dict(variables={k: v for k, v in variables.items() if k in ("params", "batch_stats", "masks")},
                images=jnp.asarray(normalize(x[idx], exp.mean, exp.std)), labels=jnp.asarray(y[idx], jnp.int32))
    if train_steps:
        xt, yt = exp.train
        idx = np.random.default_rng(seed + 1).choice(len(xt), train_steps * train_batch, replace=False)
        data["train_images"] = jnp.asarray(normalize(xt[idx], exp.mean, exp.std)).reshape(
            (train_steps, train_batch) + xt.shape[1:])
        data["train_labels"] = jnp.asarray(yt[idx], jnp.int32).reshape(train_steps, train_batch)
    return data


def history_points(history: dict) -> list[dict]:
    keys = [k for k in ("episode", "accuracy", "reward", "cost", "cost_ratio", "params") if k in history]
    return [dict({k: history[k][i] for k in keys}, values=history["values"][i]) for i in range(len(history["reward"]))]


def make_env(s, table):
    """The stage-1 environment of `search.granularity` (infeasible budgets fail here)."""
    if s.granularity == "element":
        return ElementEnv(table, s.flops_budget, s.a_min, s.a_max, s.params_budget or None)
    return PruneEnv(table, s.flops_budget, s.a_min, s.a_max, C.prunable_groups(table, s.scope), s.multiple,
                    s.params_budget or None)


def policy_prune_config(config, exp, env, values):
    """`config` with `prune` set to apply the searched policy: kept channel counts per
    group selected by `search.scheme` (channel granularity), or the searched element
    rates per layer pruned by magnitude in `search.element_iterations` gradual steps
    with `search.element_iteration_epochs` of masked fine-tuning between (element)."""
    s = config.search
    cfg = config.copy_and_resolve_references()
    p = cfg.prune
    p.flops_budget, p.latency_budget, p.element_rate, p.keep_ratio = 0.0, 0.0, 0.0, 1.0
    p.multiple, p.scope, p.allocation = 1, s.scope, "uniform"
    p.finetune_learning_rate = s.finetune_learning_rate
    if isinstance(env, ElementEnv):
        p.criterion, p.keep_ratios, p.element_rates = "l1", {}, env.rates(values)
        p.iterations, p.iteration_epochs = s.element_iterations, s.element_iteration_epochs
    else:
        names = exp.table.group_names
        p.criterion, p.element_rates, p.iterations = s.scheme, {}, 1
        p.keep_ratios = {names[g]: float(values[g]) / exp.table.widths[g] for g in env.groups}
    return cfg


def _finetune(config, exp, model, variables, workdir, epochs, lr):
    ft = config.copy_and_resolve_references()
    ft.train.num_epochs = max(1, epochs)
    ft.train.learning_rate = lr
    tx = make_optimizer(ft.train, steps_per_epoch(ft, exp))
    state = create_train_state(model, tx, exp.input_shape, config.seed, variables=variables)
    if epochs > 0:
        state, _ = fit(ft, exp, state, workdir)
    return state


def _quantize_with_package(config, workdir: str, policy_path: str) -> dict | None:
    """QAT + packed export through `jaxcompress.quant.job.quantize`, if that job exists."""
    try:
        from jaxcompress.quant.job import quantize
    except ImportError:
        return None
    q = config.search.quant
    qcfg = config.copy_and_resolve_references()
    if "quant" not in qcfg:
        return None
    qcfg.job = "quantize"
    settings = dict(mode="qat", pruned_checkpoint=workdir, prune_first=False, policy=policy_path,
                    bits_w=8, bits_a=int(q.bits_a) if q.bits_a else 32, qat_epochs=q.qat_epochs,
                    qat_learning_rate=q.qat_learning_rate, budget_bytes=0, budget_ratio=0.0,
                    budget_uniform_bits=0, budget_bitops=0.0, layer_bits_w={}, layer_bits_a={})
    for k, v in settings.items():
        if k in qcfg.quant:
            qcfg.quant[k] = v
    return quantize(qcfg, os.path.join(workdir, "quantize"))


def _write_policy(path, table, bits, bits_a, model_name, info) -> None:
    """A `jaxcompress.quant_policy/1` file. The pruned widths go under `pruned_widths`
    (an info key): the quantize job checks a `widths` key against the *dense* network
    before it loads the pruned one."""
    bits_w = {layer.path: int(b) for layer, b in zip(table.layers, bits)}
    bits_a_map = {layer.path: int(bits_a) for layer in table.layers} if bits_a else None
    info = dict(info, pruned_widths=[int(w) for w in table.widths])
    try:
        from jaxcompress.quant.policy import write_policy
    except ImportError:
        write_json(path, dict(format="jaxcompress.quant_policy/1", bits_w=bits_w, model=model_name,
                              **({"bits_a": bits_a_map} if bits_a_map else {}), **info))
        return
    write_policy(path, bits_w, bits_a_map, model=model_name, **info)


# ------------------------------------------------------------------------------------ the job

def search(config, workdir: str) -> dict:
    wall_start = time.time()
    s = config.search
    check_search_config(s)
    exp = setup_experiment(config)
    table = exp.table
    env = make_env(s, table)  # an infeasible budget fails here, before any training or evaluation
    if s.latency_budget:  # measured on this device (cached); the action wall then also keeps to it
        env.add_latency_budget(latency_model(table, config.prune.latency_batch, list(env.groups),
                                             env.min_widths.astype(int)), s.latency_budget)
    state = reference_state(config, exp, s.checkpoint, workdir, "search.checkpoint")
    exp = with_teacher(exp, state)  # fine-tunes distil from the reference when train.distill_weight > 0
    evaluate = make_eval_fn(exp, config.train.eval_batch_size)
    dense_test, dense_val = evaluate(state, exp.test), evaluate(state, exp.val)
    variables = state.variables()
    dense_cost = cost.summarize(table)["totals"]

    # ---- stage 1: pruning-rate search
    data = eval_data(exp, variables, s.eval_size, config.seed, s.candidate_finetune_steps, s.candidate_finetune_batch)
    agent = make_agent(s.agent, s, env.num_steps)
    if isinstance(env, ElementEnv):
        evaluator = make_element_evaluator(env, exp.model, variables, s.eval_chunk or 1, s.bn_adapt,
                                           s.candidate_finetune_steps, s.candidate_finetune_lr)
    else:
        ranks = channel_ranks(C.channel_scores(table, variables, s.rank_criterion))
        evaluator = make_prune_evaluator(env, exp.model, ranks, s.eval_chunk, s.eval_mode,
                                         s.candidate_finetune_steps, s.candidate_finetune_lr, s.bn_adapt)
    res1 = run_search(env, agent, evaluator,
                      make_reward_fn(s.reward, env.cost_bounds(), s.cost_norm), data, num_actors=s.num_actors,
                      episodes=s.episodes, seed=config.seed, checkpoint_dir=os.path.join(workdir, "stage1"),
                      checkpoint_every=s.checkpoint_every, log_every=s.log_every, name="stage 1 (pruning)")
    best1 = res1.best
    h1 = res1.history

    # ---- apply the best policy, shrink, fine-tune
    state = gradual_prune(policy_prune_config(config, exp, env, np.asarray(best1["values"])), exp, state,
                          os.path.join(workdir, "apply"))
    masks = state.masks
    masked_test = evaluate(state, exp.test)
    pruned_cost = cost.summarize(table, masks)["totals"]
    widths = cost.effective_widths(table, masks)
    small_model, small_vars = shrink(table, state.variables())
    small_exp = dataclasses.replace(exp, model=small_model, table=describe(small_model, exp.input_shape))
    ft_dir = os.path.join(workdir, "finetune")
    small_state = _finetune(config, small_exp, small_model, small_vars, ft_dir, s.finetune_epochs,
                            s.finetune_learning_rate)
    if s.finetune_epochs > 0 and os.path.isdir(os.path.join(ft_dir, "best")):
        small_state = load_trained(config, small_exp, ft_dir, small_state.variables())  # the best, as stage 2 reads it
    small_eval = make_eval_fn(small_exp, config.train.eval_batch_size)
    pruned_test, pruned_val = small_eval(small_state, small_exp.test), small_eval(small_state, small_exp.val)
    # FLOPs and parameters a sparse kernel costs (equal to the structural counts without element masks)
    flops_ratio = 2 * pruned_cost["sparse_macs"] / dense_cost["flops"]
    params_ratio = pruned_cost["nonzero_params"] / dense_cost["params"]
    logging.info("stage 1: widths %s, FLOPs %.1f%%, params removed %.1f%%, test acc %.4f -> %.4f (masked %.4f)",
                 widths.astype(int).tolist(), 100 * flops_ratio, 100 * (1 - params_ratio), dense_test["accuracy"],
                 pruned_test["accuracy"], masked_test["accuracy"])

    latency = forward_latencies({"dense": (exp.model, without_masks(variables)),
                                 "shrunk": (small_model, without_masks(small_state.variables()))},
                                exp.input_shape, config.prune.latency_batch)
    names = table.group_names
    rates = {names[g]: 1.0 - float(widths[g]) / table.widths[g] for g in range(table.num_groups)}
    element_rates = env.rates(best1["values"]) if isinstance(env, ElementEnv) else None
    stage1 = dict(
        agent=s.agent, granularity=s.granularity, element_rates=element_rates,
        episodes=len(h1["reward"]), num_actors=s.num_actors, flops_budget=s.flops_budget,
        params_budget=s.params_budget or None, latency_budget=s.latency_budget or None,
        latency_predicted_ratio=(float(env.latency(widths) / env.latency_dense)
                                 if getattr(env, "latency", None) is not None else None),
        latency_s=latency, latency_batch=config.prune.latency_batch,
        speedup=latency["dense"] / latency["shrunk"] if latency else None,
        reward=s.reward, scheme=s.scheme, best_reward=best1["reward"], best_val_accuracy_search=best1["accuracy"],
        widths=widths.astype(int).tolist(), rates=rates, flops_ratio=flops_ratio, params_ratio=params_ratio,
        accuracy_masked=masked_test["accuracy"],
        accuracy_pruned=pruned_test["accuracy"], val_accuracy_pruned=pruned_val["accuracy"],
        search_time_s=res1.wall_time_s, compile_time_s=res1.compile_time_s,
        episodes_per_s=len(h1["reward"]) / max(res1.wall_time_s - res1.compile_time_s, 1e-9))

    # ---- stage 2: bits search on the pruned network, QAT
    stage2, h2, bits = None, None, None
    q = s.quant
    if q.episodes > 0:
        qtable = small_exp.table
        # the bits budget averages over the weights stored: the nonzero ones of an element-pruned network
        stored = [row["nonzero_weights"] for row in cost.summarize(qtable, small_state.masks)["layers"]]
        qenv = QuantEnv(qtable, q.bits_budget, q.b_min, q.b_max, stored)
        qagent = make_agent(q.agent or s.agent, s, qenv.num_steps)
        data2 = eval_data(small_exp, small_state.variables(), s.eval_size, config.seed)
        chunk = q.eval_chunk if q.eval_chunk else (1 if jax.default_backend() == "cpu" else 0)
        res2 = run_search(qenv, qagent, make_quant_evaluator(qenv, small_model, q.bits_a or None, chunk),
                          make_reward_fn("acc"), data2, num_actors=s.num_actors, episodes=q.episodes,
                          seed=config.seed + 1, checkpoint_dir=os.path.join(workdir, "stage2"),
                          checkpoint_every=s.checkpoint_every, log_every=s.log_every, name="stage 2 (bits)")
        h2 = res2.history
        best2 = res2.best
        bits = np.asarray(best2["values"]).astype(int)
        policy_path = os.path.join(workdir, "bits_policy.json")
        _write_policy(policy_path, qtable, bits, q.bits_a, config.model.name,
                      dict(search_reward=best2["reward"], search_val_accuracy=best2["accuracy"]))
        qsummary = None
        if s.finetune_epochs > 0 and q.qat_epochs > 0:
            qsummary = _quantize_with_package(config, workdir, policy_path)
        if qsummary is not None:
            qat_acc = qsummary.get("accuracy_exported", qsummary.get("accuracy_qat"))
            qbytes = qsummary.get("bytes_quantized")
        else:
            from jaxcompress.quant import make_quant
            quant = make_quant(qtable, bits_w={l.path: int(b) for l, b in zip(qtable.layers, bits)},
                               bits_a=q.bits_a or None)
            qstate = small_state.replace(quant=quant)
            if q.qat_epochs > 0:
                qstate = _finetune(config, small_exp, small_model, qstate.variables(), os.path.join(workdir, "qat"),
                                   q.qat_epochs, q.qat_learning_rate)
            qat_acc = small_eval(qstate, small_exp.test)["accuracy"]
            qbytes = cost.summarize(qtable, None, quant)["totals"]["bytes"]
        stage2 = dict(agent=q.agent or s.agent, episodes=len(h2["reward"]), bits_budget=q.bits_budget,
                      bits={l.path: int(b) for l, b in zip(qtable.layers, bits)},
                      avg_bits=float(best2["cost"]) / float(qenv.weights.sum()), best_reward=best2["reward"],
                      best_val_accuracy_search=best2["accuracy"], accuracy_qat=qat_acc, bytes=qbytes,
                      bytes_dense_float32=dense_cost["bytes"],
                      compression=dense_cost["bytes"] / qbytes if qbytes else None,
                      quant_job=qsummary is not None,
                      quant_job_summary=None if qsummary is None else {
                          k: qsummary.get(k) for k in ("accuracy_float", "accuracy_ptq", "accuracy_qat",
                                                       "accuracy_exported", "bytes_quantized", "file_bytes",
                                                       "compression_ratio", "outputs_match")},
                      search_time_s=res2.wall_time_s,
                      compile_time_s=res2.compile_time_s)

    # ---- reports
    points1 = history_points(h1)
    acc1 = [p["accuracy"] for p in points1]
    front_flops = report.pareto_front([p["cost"] for p in points1], acc1)
    front_params = report.pareto_front([p["params"] for p in points1], acc1)
    pareto = dict(stage1=dict(points=points1, front_flops=[points1[i] for i in front_flops],
                              front_params=[points1[i] for i in front_params],
                              best_per_budget=report.best_per_budget([p["cost_ratio"] for p in points1], acc1,
                                                                     tuple(s.report_budgets)),
                              groups=list(names), flops_dense=env.flops_dense))
    ylabel1 = (f"val accuracy (after {s.candidate_finetune_steps} SGD steps)" if s.candidate_finetune_steps
               else "val accuracy (no fine-tune)")
    panels = [dict(x=[p["cost_ratio"] for p in points1], y=acc1, front=front_flops, xlabel="FLOPs / dense",
                   ylabel=ylabel1, title="stage 1: FLOPs"),
              dict(x=[p["params"] / dense_cost["params"] for p in points1], y=acc1, front=front_params,
                   xlabel="params / dense", ylabel=ylabel1, title="stage 1: parameters")]
    curves = {"stage 1 (pruning)": h1["reward"]}
    if h2 is not None:
        points2 = history_points(h2)
        acc2 = [p["accuracy"] for p in points2]
        front_size = report.pareto_front([p["cost"] for p in points2], acc2)
        pareto["stage2"] = dict(points=points2, front_size=[points2[i] for i in front_size],
                                layers=[l.path for l in small_exp.table.layers])
        panels.append(dict(x=[p["cost"] / float(qenv.weights.sum()) for p in points2], y=acc2, front=front_size,
                           xlabel="average weight bits", ylabel="val accuracy (no QAT)", title="stage 2: bits"))
        curves["stage 2 (bits)"] = h2["reward"]
    write_json(os.path.join(workdir, "pareto.json"), pareto)
    report.plot_pareto(os.path.join(workdir, "pareto.png"), panels)
    report.plot_reward_curves(os.path.join(workdir, "rewards.png"), curves,
                              f"{config.model.name}: search rewards ({s.agent})")
    layer_rates = ([element_rates[l.path] for l in table.layers] if element_rates else
                   [rates[names[l.out_group]] if l.out_group >= 0 else 0.0 for l in table.layers])
    report.plot_policy(os.path.join(workdir, "policy.png"), [l.path for l in table.layers], layer_rates,
                       None if bits is None else bits.tolist(),
                       f"{config.model.name}: searched pruning rates and bits")

    summary = dict(
        job=config.job, model=config.model.name, dataset=config.data.name, agent=s.agent,
        accuracy_dense=dense_test["accuracy"], val_accuracy_dense=dense_val["accuracy"],
        params_dense=dense_cost["params"], flops_dense=dense_cost["flops"], bytes_dense=dense_cost["bytes"],
        params_pruned=pruned_cost["nonzero_params"], flops_pruned=2 * pruned_cost["sparse_macs"],
        params_removed=1.0 - params_ratio, flops_left=flops_ratio,
        error_increase_pruned=dense_test["accuracy"] - pruned_test["accuracy"],
        stage1=stage1, stage2=stage2, wall_time_s=time.time() - wall_start,
        device_kind=jax.devices()[0].device_kind)
    write_json(os.path.join(workdir, "summary.json"), summary)
    return summary
