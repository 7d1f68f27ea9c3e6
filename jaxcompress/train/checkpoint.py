"""Orbax checkpoints of a TrainState plus JSON metadata (data position, epoch)."""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jaxcompress.train.state import TrainState

_FIELDS = ("step", "params", "batch_stats", "masks", "quant", "opt_state", "rng")


class CheckpointError(ValueError):
    pass


def state_tree(state: TrainState) -> dict:
    return {f: getattr(state, f) for f in _FIELDS}


class Checkpointer:
    """`ocp.CheckpointManager` keeping the last `max_to_keep` steps of a run."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

    def save(self, state: TrainState, meta: dict) -> None:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state_tree(state)),
                                                        meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores `step` (default latest) into the structure and shardings of `template`."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first or point to another workdir")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_tree(template))
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for corrupt / mismatched files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"cannot restore checkpoint step {step} in {self.directory} ({type(e).__name__}: {first[:200]}); "
                f"it is corrupt or was written for another model/config: delete it or use a new --workdir") from None
        return template.replace(**restored.state), dict(restored.meta)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
