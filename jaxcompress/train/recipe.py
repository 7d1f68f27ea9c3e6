"""Recipe: how a network is trained, the explicit input of `fit`.

A compression pipeline trains several times with different epochs and learning rates
(pretraining, gradual-pruning steps, the shrunk network's fine-tune, QAT); each is
`recipe.replace(num_epochs=..., learning_rate=...)` of the one `Recipe.from_config`
reads from `config.train`, never an edited copy of the config.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything `fit` uses besides the network and the data. The optimiser fields
    have `config.train`'s names, so `optim.make_optimizer` reads either."""

    num_epochs: int
    learning_rate: float
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    decay_epochs: tuple = ()
    decay_factor: float = 0.1
    label_smoothing: float = 0.0
    augment: bool = False  # random crops and flips (data.augment)
    distill_weight: float = 0.0  # with a teacher: (1 - w) CE + w T^2 KL (Hinton et al. 2015)
    distill_temperature: float = 4.0
    dtype: str = "float32"  # compute dtype of the steps: float32 | bfloat16 (mixed precision, steps.py)
    prefetch: int = 2  # batches placed on the devices ahead of the step (0: none)
    seed: int = 0  # data order
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: at epoch ends only)
    max_to_keep: int = 2

    @classmethod
    def from_config(cls, config) -> "Recipe":
        """`config.train` with `data.augment`, `seed` and `checkpoint`."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in config.train.to_dict().items() if k in names}
        fields["decay_epochs"] = tuple(fields.get("decay_epochs", ()))
        return cls(**fields, augment=bool(config.data.augment), seed=int(config.seed),
                   checkpoint_every=int(config.checkpoint.every_steps),
                   max_to_keep=int(config.checkpoint.max_to_keep))

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def steps_per_epoch(self, num_examples: int) -> int:
        return max(1, num_examples // self.batch_size)
