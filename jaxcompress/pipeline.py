"""The stages a compression job composes, each a function of explicit arguments:

    reference   load, or train the dense network           `reference`
    decide      criterion | RL search | STAMP -> masks      `pruning.plan`, `rl`, `stamp`
    apply       surgery: the same model at smaller widths   `pruning.shrink`
    fine-tune   `fit` with a `Recipe`                       `finetune`, `shrink_and_finetune`,
                                                            `gradual_prune`
    quantize    PTQ / QAT, packed export                    `quant`
    report      summary.json, plots                         `report`

No stage reads the config except `reference` (which may run the `train` job) and
none edits one: a decision reaches the next stage as a `PrunePlan`, masks or counts.
"""
from __future__ import annotations

import dataclasses
import os

from absl import logging

from jaxcompress import files
from jaxcompress.models import describe
from jaxcompress.pruning.plan import PrunePlan, pruning_masks
from jaxcompress.pruning.surgery import shrink
from jaxcompress.train.experiment import Experiment, Teacher
from jaxcompress.train.loop import fit, load_trained, train_and_evaluate
from jaxcompress.train.optim import make_optimizer
from jaxcompress.train.recipe import Recipe
from jaxcompress.train.state import TrainState, create_train_state


def reference(config, exp: Experiment, checkpoint: str, workdir: str, field: str) -> TrainState:
    """The trained network a compression job starts from: `checkpoint` (a run's workdir)
    if given, else one trained with `config` (the `train` job) into `<workdir>/pretrain`
    first (`field` names the config field in the log line)."""
    recipe = Recipe.from_config(config)
    if checkpoint:
        return load_trained(exp, checkpoint, recipe)
    pre_dir = os.path.join(workdir, "pretrain")
    logging.info("no %s given: training the reference network into %s", field, pre_dir)
    train_and_evaluate(config, pre_dir)  # trained, not distilled
    return load_trained(exp, pre_dir, recipe)


def finetune(exp: Experiment, variables: dict, recipe: Recipe, workdir: str, *, teacher: Teacher | None = None,
             best: bool = False, model=None) -> TrainState:
    """`variables` of `exp.model` (or `model`) trained with `recipe` into `workdir`
    (resumable); no training when `recipe.num_epochs` is 0. `best`: return the
    best-validation checkpoint rather than the last state."""
    model = exp.model if model is None else model
    state = create_train_state(model, make_optimizer(recipe, 1), exp.input_shape, recipe.seed, variables=variables)
    if recipe.num_epochs <= 0:
        return state
    state, _ = fit(state, exp, recipe, workdir, teacher=teacher)
    if best and files.is_dir(os.path.join(workdir, "best")):
        state = load_trained(exp, workdir, recipe, state.variables())
    return state


def shrink_and_finetune(exp: Experiment, variables: dict, recipe: Recipe, workdir: str, *,
                        teacher: Teacher | None = None, best: bool = False) -> tuple[Experiment, TrainState]:
    """Surgery, then fine-tuning: the masked network `variables` is rebuilt with its kept
    widths (`shrink`) and trained with `recipe` (`finetune`). Returns `(small_exp,
    small_state)`, `small_exp` being `exp` with the smaller model and its table."""
    small_model, small_vars = shrink(exp.table, variables)
    small_exp = dataclasses.replace(exp, model=small_model, table=describe(small_model, exp.input_shape))
    return small_exp, finetune(small_exp, small_vars, recipe, workdir, teacher=teacher, best=best)


def gradual_prune(exp: Experiment, state: TrainState, plan: PrunePlan, recipe: Recipe, workdir: str, *,
                  iterations: int = 1, teacher: Teacher | None = None) -> TrainState:
    """`state` pruned under `plan` in `iterations` steps (gradual pruning, Han et al.
    2015: prune part of the way, fine-tune the masked network with `recipe`, repeat;
    step i's fine-tune resumes from `<workdir>/iteration<i>`). One step = one-shot."""
    for i in range(iterations):
        masks, params = pruning_masks(exp, state.variables(), plan, (i + 1) / iterations)
        state = state.replace(params=params, masks=masks)
        if i + 1 < iterations and recipe.num_epochs > 0:
            state = finetune(exp, state.variables(), recipe, os.path.join(workdir, f"iteration{i + 1}"),
                             teacher=teacher)
    return state
