"""Orbax checkpoints of a TrainState plus JSON metadata (data position, epoch), with a
checksum manifest per step.

Orbax does not checksum what it restores: flipped bytes in an array file restore
silently as garbage weights. So every step `Checkpointer.save` writes (after Orbax
has finished it) gets `<step>/jaxcompress_manifest.json`, the sha256 and size of every
file of the step, and `Checkpointer.restore` verifies it before Orbax reads anything:

* a mismatch, a missing file or a damaged manifest is a one-line `CheckpointError`
  naming the step and the file;
* restoring the latest step (no explicit `step`, as `fit` resumes) falls back to the
  newest intact step with one warning; the corrupt newer steps are moved aside
  (`<step>.corrupt`) before the next save, so training writes those steps afresh;
* a step without a manifest is corrupt too ("manifest is missing"), unless it is
  listed in the directory's `jaxcompress_checksums.json`: the steps that were there
  before this code first saved into the directory, and a step while it is being saved
  (a run killed between Orbax's commit and the manifest leaves an intact step without
  one). Those, and every step of a directory without that file (written before
  manifests existed), restore unchecked, with no warning.

Every error path closes the Orbax manager (its async work finished), and the
"Event loop is closed" reports that Orbax's abandoned reads send to
`sys.unraisablehook` after a failed restore, and asyncio's "exception was never
retrieved" logs of the same reads, are dropped (`_drop_closed_loop_reports`).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging as py_logging
import os
import sys
import weakref

import jax
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from jaxcompress import files
from jaxcompress.storage import canonical_json, file_sha256, sha256_hex
from jaxcompress.train.state import TrainState

_FIELDS = ("step", "params", "batch_stats", "masks", "quant", "opt_state", "rng")
MANIFEST = "jaxcompress_manifest.json"
MANIFEST_FORMAT = "jaxcompress.checkpoint-manifest/1"
NO_MANIFEST = f"its checksum manifest {MANIFEST} is missing"
# in a checkpoint directory: the steps that may lack a manifest (from before manifests; one being saved)
CHECKSUMS = "jaxcompress_checksums.json"


class CheckpointError(ValueError):
    pass


def state_tree(state: TrainState) -> dict:
    return {f: getattr(state, f) for f in _FIELDS}


# ------------------------------------------------------------------------------------------------
# Checksum manifests
# ------------------------------------------------------------------------------------------------

def _step_files(step_dir: str) -> list[str]:
    """Every file under `step_dir` (relative, '/'-separated, sorted), the manifest excluded."""
    def files_under(d: epath.Path, prefix: str):  # iterdir keeps a remote path's scheme (fsspec's walk does not)
        for child in d.iterdir():
            rel = f"{prefix}{child.name}"
            yield from files_under(child, rel + "/") if child.is_dir() else (rel,)

    # the manifest and its temporary files excluded
    return sorted(r for r in files_under(epath.Path(step_dir), "") if not r.startswith(MANIFEST))


def write_manifest(step_dir: str) -> None:
    """Writes `<step_dir>/jaxcompress_manifest.json` (atomically): {"body": {"format",
    "files": {path: {"bytes", "sha256"}}}, "sha256": of the canonical body}, in canonical
    JSON, so any change to the manifest itself is detected too."""
    entries = {rel: {"bytes": _size(os.path.join(step_dir, rel)),
                     "sha256": file_sha256(os.path.join(step_dir, rel))} for rel in _step_files(step_dir)}
    body = {"format": MANIFEST_FORMAT, "files": entries}
    files.write_atomic(os.path.join(step_dir, MANIFEST),
                       canonical_json({"body": body, "sha256": sha256_hex(canonical_json(body))}))


def _size(path: str) -> int:
    return epath.Path(path).stat().length


def verify_manifest(step_dir: str) -> str | None:
    """What is wrong with the step in `step_dir` against its manifest ("file X does not
    match its checksum", ...); None when it is intact, `NO_MANIFEST` when it has none."""
    path = os.path.join(step_dir, MANIFEST)
    if not files.exists(path):
        return NO_MANIFEST
    damaged = f"its checksum manifest {MANIFEST} is damaged"
    try:
        raw = files.read_bytes(path)
        doc = json.loads(raw)
        body = doc["body"]
        if (raw != canonical_json(doc) or doc["sha256"] != sha256_hex(canonical_json(body))
                or body["format"] != MANIFEST_FORMAT):
            return damaged
        listed = body["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return damaged
    for rel, want in sorted(listed.items()):
        full = os.path.join(step_dir, rel)
        if not files.is_file(full):
            return f"file {rel} is missing"
        if _size(full) != want["bytes"] or file_sha256(full) != want["sha256"]:
            return f"file {rel} does not match its checksum"
    return None


# ------------------------------------------------------------------------------------------------
# Orbax noise
# ------------------------------------------------------------------------------------------------

def _drop_closed_loop_reports() -> None:
    """When one of Orbax's tensorstore reads fails, `asyncio.run` closes its event loop
    while other reads are still in flight. Nobody waits for those reads, but each reports
    itself later (a traceback on stderr after the one-line error, sometimes at exit), in
    one of three ways:

    * `RuntimeError: Event loop is closed` through `sys.unraisablehook`;
    * "Exception ignored in: <coroutine object ...>" through `sys.unraisablehook`, with
      the read's own exception;
    * asyncio's "Future/Task exception was never retrieved" log with that exception.

    Drop exactly these (an exception raised in Orbax's code, or the closed loop) and pass
    every other report on. Installed before Orbax reads or writes."""
    current = sys.unraisablehook
    if getattr(current, "_jaxcompress_drops_closed_loop", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or _raised_in_orbax(exc):
            return
        current(unraisable)

    hook._jaxcompress_drops_closed_loop = True
    sys.unraisablehook = hook
    py_logging.getLogger("asyncio").addFilter(_AbandonedOrbaxRead())


def _raised_in_orbax(exc: BaseException | None) -> bool:
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if f"{os.sep}orbax{os.sep}" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


class _AbandonedOrbaxRead(py_logging.Filter):
    """asyncio's "... exception was never retrieved" logs of abandoned Orbax reads
    (`_drop_closed_loop_reports`)."""

    def filter(self, record):
        if not str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved"):
            return True
        return not (record.exc_info and _raised_in_orbax(record.exc_info[1]))


class _MetadataNoise(py_logging.Filter):
    """Orbax logs an ERROR (with the file's content) for each step whose
    `_CHECKPOINT_METADATA` it cannot parse when it lists the steps; the manifest check
    reports such a step in one line when it is restored."""

    def filter(self, record):
        return not str(record.msg).startswith(("Failed to json parse Metadata file", "Failed to read Metadata file"))


@contextlib.contextmanager
def _quiet_metadata_errors():
    logger, noise = py_logging.getLogger("absl"), _MetadataNoise()
    logger.addFilter(noise)
    try:
        yield
    finally:
        logger.removeFilter(noise)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


# ------------------------------------------------------------------------------------------------
# Checkpointer
# ------------------------------------------------------------------------------------------------

_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@atexit.register
def _close_open_checkpointers() -> None:
    """Finishes the async work of managers a failed job left open (before Orbax's and
    JAX's own exit handlers, registered earlier, run)."""
    for ckpt in list(_OPEN):
        ckpt._abandon()


class Checkpointer:
    """`ocp.CheckpointManager` keeping the last `max_to_keep` steps of a run, with a
    checksum manifest per step (module docstring). The manager is opened on first use
    and closed by `close()` or by any error; it reopens when used again."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = directory if files.is_remote(directory) else os.path.abspath(directory)
        self.max_to_keep = max_to_keep
        self._manager: ocp.CheckpointManager | None = None
        self._corrupt: set[int] = set()  # steps found corrupt by `restore`, set aside at the next save
        _OPEN.add(self)
        self.manager  # creates the directory, as Orbax does

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            try:
                with _quiet_metadata_errors():
                    self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                        max_to_keep=self.max_to_keep, create=True))
            except Exception as e:
                raise CheckpointError(f"cannot open the checkpoint directory {self.directory} "
                                      f"({type(e).__name__}: {_first_line(e)}); use another --workdir") from None
        return self._manager

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, meta: dict) -> None:
        """Saves `state` and `meta` as step `state.step` (a no-op if it exists)."""
        self.save_tree(int(jax.device_get(state.step)), state_tree(state), meta)

    def save_tree(self, step: int, tree, meta: dict) -> None:
        """Saves any pytree of arrays plus JSON `meta` as `step` (a no-op if it exists),
        waits for Orbax to finish it and writes its manifest."""
        self._set_aside_corrupt()
        if step in self.manager.all_steps():
            return
        _drop_closed_loop_reports()
        try:
            primary = jax.process_index() == 0  # one writer of the manifests (multi-host: a shared directory)
            if primary:
                self._mark_unchecked(add={step})
            saved = self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                                    meta=ocp.args.JsonSave(meta)))
            self.manager.wait_until_finished()
            if primary:
                if saved:
                    write_manifest(self.step_dir(step))
                self._mark_unchecked(remove={step})
        except Exception as e:
            self._abandon()
            raise CheckpointError(f"cannot save checkpoint step {step} in {self.directory} ({type(e).__name__}: "
                                  f"{_first_line(e)}); check the free space and permissions there") from None
        except BaseException:  # KeyboardInterrupt: finish (or fail) Orbax's work before unwinding
            self._abandon()
            raise

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _corrupt_message(self, step: int, problem: str) -> str:
        return (f"checkpoint step {step} in {self.directory} is corrupt: {problem}; delete {self.step_dir(step)} "
                f"(training then resumes from an earlier step) or use another checkpoint")

    def restore(self, template: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restores `step` (default: the latest intact one, see the module docstring) into
        the structure and shardings of `template`. Returns (state, meta)."""
        tree, meta = self.restore_tree(state_tree(template), step)
        return template.replace(**tree), meta

    def intact_step(self, step: int | None = None) -> int:
        """`step`, checked against its manifest, or (None) the latest intact step; a
        one-line `CheckpointError` when there is none."""
        if step is None:
            candidates = sorted(self.manager.all_steps(), reverse=True)
            if not candidates:
                raise CheckpointError(f"no checkpoint in {self.directory}; train first or point to another workdir")
        elif step not in self.manager.all_steps():
            raise CheckpointError(f"no checkpoint step {step} in {self.directory} (it has steps "
                                  f"{list(self.manager.all_steps())}); use one of those")
        else:
            candidates = [step]
        found, bad = None, []
        for s in candidates:
            problem = verify_manifest(self.step_dir(s))
            if problem == NO_MANIFEST and self._predates_manifests(s):
                problem = None
            if problem is None:
                found = s
                break
            bad.append((s, problem))
        if found is None:
            self._abandon()
            raise CheckpointError(self._corrupt_message(*bad[0]))
        if bad:
            logging.warning("checkpoint step %d in %s is corrupt (%s); using step %d, the latest intact one",
                            bad[0][0], self.directory, bad[0][1], found)
            self._corrupt.update(s for s, _ in bad)
        return found

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default: the latest intact one), without reading
        its arrays: what a job checks its settings against before any work."""
        found = self.intact_step(step)
        try:
            return dict(json.loads(files.read_text(os.path.join(self.step_dir(found), "meta", "metadata"))))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"cannot read the metadata of checkpoint step {found} in {self.directory} "
                                  f"({type(e).__name__}); delete it or use a new --workdir") from None

    def restore_tree(self, template, step: int | None = None) -> tuple[object, dict]:
        """Restores `step` (default: the latest intact one) into the structure, dtypes and
        shardings of the pytree `template` (None: as saved). Returns (tree, meta)."""
        found = self.intact_step(step)
        abstract = None if template is None else jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        _drop_closed_loop_reports()
        try:
            restored = self.manager.restore(found, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types for corrupt / mismatched files
            self._abandon()
            raise CheckpointError(
                f"cannot restore checkpoint step {found} in {self.directory} ({type(e).__name__}: {_first_line(e)}); "
                f"it is corrupt or was written for another model/config: delete it or use a new --workdir") from None
        except BaseException:
            self._abandon()
            raise
        return restored.state, dict(restored.meta or {})

    def _unchecked_steps(self) -> set[int] | None:
        """The steps of this directory that may lack a manifest (`jaxcompress_checksums.json`):
        those from before manifests, and one being saved. None: no step needs one (this
        code never saved here)."""
        path = os.path.join(self.directory, CHECKSUMS)
        if not files.exists(path):
            return None
        try:
            return {int(s) for s in json.loads(files.read_text(path))["unchecked_steps"]}
        except (OSError, ValueError, TypeError, KeyError):
            return set()

    def _mark_unchecked(self, add: set[int] = frozenset(), remove: set[int] = frozenset()) -> None:
        """Updates `jaxcompress_checksums.json`; the first save here lists the steps
        already present without a manifest. A step is listed while it is saved (a run
        killed between Orbax's commit and the manifest leaves an intact step without one)."""
        steps = set(self.manager.all_steps())
        current = self._unchecked_steps()
        if current is None:
            current = {s for s in steps if not files.exists(os.path.join(self.step_dir(s), MANIFEST))}
        listed = sorted(((current | set(add)) - set(remove)) & (steps | set(add)))
        files.write_atomic(os.path.join(self.directory, CHECKSUMS),
                           json.dumps({"format": MANIFEST_FORMAT, "unchecked_steps": listed}))

    def _predates_manifests(self, step: int) -> bool:
        unchecked = self._unchecked_steps()
        return unchecked is None or int(step) in unchecked

    def _set_aside_corrupt(self) -> None:
        """Renames the steps `restore` found corrupt to `<step>.corrupt` (Orbax ignores
        them), so their step numbers can be saved again."""
        if not self._corrupt:
            return
        for s in sorted(self._corrupt):
            src = self.step_dir(s)
            if epath.Path(src).is_dir() and jax.process_index() == 0:
                dst, n = f"{src}.corrupt", 1
                while files.exists(dst):
                    dst, n = f"{src}.corrupt{n}", n + 1
                epath.Path(src).rename(dst)
                logging.info("moved corrupt checkpoint step %d aside to %s", s, dst)
        self._corrupt.clear()
        self.manager.reload()

    def _abandon(self) -> None:
        """Closes the manager (waiting for its async work) and swallows its errors: for
        error paths, which raise their own."""
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.close()
            except Exception as e:  # already failing: the caller's error is the one to report
                logging.debug("closing the checkpoint manager of %s: %s", self.directory, e)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Closes the manager; after an error (NaN, Ctrl-C, ...) without raising its own:
        the checkpoints on disk stand, and the caller's error is the one to report."""
        if exc_type is None:
            self.close()
        else:
            self._abandon()

    def close(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.wait_until_finished()
            finally:
                manager.close()
