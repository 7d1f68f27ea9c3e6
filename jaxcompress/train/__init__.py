"""Training: state, optimisers, jitted data-parallel steps, checkpoints, loops."""
from jaxcompress.train.checkpoint import Checkpointer, CheckpointError
from jaxcompress.train.experiment import Experiment, Teacher, setup_experiment
from jaxcompress.train.loop import evaluate, fit, load_trained, train_and_evaluate
from jaxcompress.train.optim import make_optimizer
from jaxcompress.train.recipe import Recipe
from jaxcompress.train.state import TrainState, create_train_state
from jaxcompress.train.steps import (cross_entropy, distillation_loss, jit_data_parallel, make_eval_step,
                                     make_mesh, make_train_step)

__all__ = ["Checkpointer", "CheckpointError", "Experiment", "Teacher", "setup_experiment", "evaluate", "fit",
           "load_trained", "train_and_evaluate", "Recipe", "make_optimizer", "TrainState", "create_train_state",
           "cross_entropy", "distillation_loss", "jit_data_parallel", "make_eval_step", "make_mesh",
           "make_train_step"]
