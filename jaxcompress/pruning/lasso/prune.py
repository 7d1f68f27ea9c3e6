"""He et al. 2017's channel pruning over a whole network: `lasso_prune`, `lasso_groups`.

He, Zhang, Sun, "Channel Pruning for Accelerating Very Deep Neural Networks" (ICCV
2017), Eq. (5) / Sec. 3.2: layers are pruned one after the other, each by the LASSO
selection of Eq. (3) (`solver.py`) and the least-squares refit of Eq. (4)
(`refit.py`), with the target Y' the *original* network's output while X is sampled
(`sampling.py`) from the *current*, already pruned network, so each layer's
reconstruction also absorbs the error accumulated upstream.

Here a layer's input channels are one channel group of `jaxcompress.models.table`
(the producer(s) of the group lose those output channels, recorded in the `masks`
collection). A group may feed several layers (a residual stream feeds every block of
its stage and the next projection): the LASSO objective sums over all of them, each
consumer's term divided by ||Y_l||_F^2 so that every consumer counts by its relative
reconstruction error (*our choice*; He et al. treat one layer at a time).

Other choices of ours: groups are processed in network order, i.e. by the call order
of their first consumer (stream 0 of a ResNet before block 0's inner group), each
once; a consumer read later in the network (a stream's next-stage projection) is
refitted on features sampled before the groups between them are pruned. The refit's
ridge defaults to "auto" (exact leave-one-out choice, 0 included), which matters for
Dense layers fed by a flattened map (one sample per image). Depthwise / grouped
consumers are not handled (`lasso_groups` skips their groups), nor consumers with
element (kernel) masks, and the `quant` collection is ignored while sampling.

With a `mesh` (a 1-D ('data',) mesh, e.g. `Experiment.mesh`) the heavy statistics run
data parallel: the sampling forward passes split each batch of images over the devices
(`sampling.py`), the sampled patches and targets stay split by rows, and the Gram
matrices of Eq. (3) are all-reduced sums (`gram.gram_fns`). Batches are zero-padded to
a multiple of the device count (the padding's rows are zeros, neutral for every sum,
and cut off before the refit), so any number of images works. The refit's SVD (Eq. 4)
runs on one device, on the gathered rows, and the LASSO solve on the c x c (G, b).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxcompress.models.table import LayerInfo, ModelTable
from jaxcompress.pruning.lasso.gram import gram_fns
from jaxcompress.pruning.lasso.refit import least_squares_refit
from jaxcompress.pruning.lasso.sampling import _bucket, _input_sampler, _np_pad, valid_rows
from jaxcompress.pruning.lasso.solver import _select_padded
from jaxcompress.train.steps import replicated

__all__ = ["lasso_groups", "lasso_prune"]


def _consumers(table: ModelTable, group: int) -> list[LayerInfo]:
    return [l for l in table.layers if l.in_group == group]


def _kernel_path(path: str) -> tuple[str, ...]:
    return tuple(path.split("/")) + ("kernel",)


def lasso_groups(table: ModelTable, params: Mapping | None = None) -> list[int]:
    """Groups LASSO can prune, in network order (first consumer's call order).

    A group qualifies when it has at least one consumer (a layer with in_group == g)
    and every consumer is a dense or ordinary (not depthwise, not grouped) conv, i.e.
    a layer whose output is a sum over the group's channels (He et al.'s Z_i).
    `params` (optional) lets grouped convs be detected from kernel shapes.
    """
    flat = traverse_util.flatten_dict(dict(params)) if params is not None else None
    first = {}
    for g in range(table.num_groups):
        cons = _consumers(table, g)
        if not cons or any(l.depthwise for l in cons):
            continue
        if flat is not None and any(
                _kernel_path(l.path) in flat and
                flat[_kernel_path(l.path)].shape[-2 if l.kind == "conv" else 0] != table.widths[g] * l.in_repeat
                for l in cons):
            continue
        first[g] = min(table.layers.index(l) for l in cons)
    return sorted(first, key=first.get)


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------

def _check_inputs(table: ModelTable, images: np.ndarray, keep_counts: Sequence[int]):
    if tuple(images.shape[1:]) != tuple(table.input_shape):
        raise ValueError(f"lasso_prune: images of shape {images.shape[1:]} but the table was built for "
                         f"{tuple(table.input_shape)}")
    if len(keep_counts) != table.num_groups:
        raise ValueError(f"lasso_prune: {len(keep_counts)} keep counts for {table.num_groups} channel groups")


def _groups_to_process(table: ModelTable, eligible: list[int], groups: Sequence[int] | None,
                       keep_counts: Sequence[int], group_masks: list, masks_flat: Mapping) -> list[int]:
    """`groups` (default: the eligible groups whose kept count would shrink) in network
    order, after checking that each is eligible, that its keep count is in range and
    that none of its consumers has an element (kernel) mask."""
    alive = [int((np.asarray(m) > 0).sum()) for m in group_masks]
    if groups is None:
        groups = [g for g in eligible if keep_counts[g] < alive[g]]
    else:
        bad = [g for g in groups if g not in eligible]
        if bad:
            raise ValueError(f"lasso_prune: groups {[table.group_names[g] for g in bad]} cannot be pruned by "
                             f"LASSO (no consumer, or a depthwise / grouped consumer); eligible groups: "
                             f"{[table.group_names[g] for g in eligible]}")
        groups = [g for g in eligible if g in set(groups)]
    for g in groups:
        if not 1 <= keep_counts[g] <= alive[g]:
            raise ValueError(f"lasso_prune: keep count {keep_counts[g]} for group {table.group_names[g]} must be "
                             f"in [1, {alive[g]}] (its currently kept channels)")
    for g in groups:
        for l in _consumers(table, g):
            if _kernel_path(l.path) in masks_flat:
                raise ValueError(f"lasso_prune: layer {l.path} has an element (kernel) mask; LASSO channel "
                                 f"pruning refits dense kernels, run it before element pruning")
    return groups


# --------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class _Consumer:
    """A consumer layer of a processed group with its reference data."""
    layer: LayerInfo
    kernel: jax.Array  # the original kernel (its shape and dtype are those of the refitted one)
    W: np.ndarray  # the original kernel as (r, c, m), zero-padded to _bucket multiples
    target: jax.Array  # the original network's pre-bias output at the sampled positions


def _out_mask(masks_flat: Mapping, layer: LayerInfo, m: int) -> np.ndarray:
    """The layer's output-channel mask (ones if it has none), zero-padded to _bucket(m).
    (Host-side numpy for these small pads and slices: no per-shape compilations.)"""
    mask = masks_flat.get(tuple(layer.path.split("/")) + ("channel",), np.ones(m))
    return _np_pad(np.asarray(mask, np.float32), 0, _bucket(m))


def _reference_consumers(table: ModelTable, groups: list[int], params_flat: Mapping, masks_flat: Mapping,
                         sample_inputs: Callable, base: Mapping, mesh=None) -> dict[int, list[_Consumer]]:
    """Each group's consumers with their targets: the original network's outputs
    (pre-bias) at the sampled positions, He et al. Eq. (5). Kernels are viewed as
    (r, c, m) and, like the patches, zero-padded to _BUCKET multiples."""
    consumers = {g: _consumers(table, g) for g in groups}
    orig_x = sample_inputs(base, tuple(l.path for g in groups for l in consumers[g]))
    target = gram_fns(mesh)[0]
    refs = {}
    for g in groups:
        refs[g] = []
        for l in consumers[g]:
            kernel = params_flat[_kernel_path(l.path)]
            m = kernel.shape[-1]
            W = np.asarray(kernel, np.float32).reshape(-1, table.widths[g], m)
            W = _np_pad(_np_pad(W, 1, _bucket(W.shape[1])), 2, _bucket(m))
            refs[g].append(_Consumer(l, kernel, W, target(orig_x[l.path], W, _out_mask(masks_flat, l, m))))
    return refs


def _lasso_select(consumers: list[_Consumer], xs: Mapping, layer_masks: Mapping, keep: int, alive: np.ndarray,
                  num_bisect: int, num_iters: int, mesh=None) -> np.ndarray:
    """Eq. (3) summed over the consumers (each over the outputs `layer_masks` keep):
    the (c,) bool mask of the `keep` channels kept among the `alive` ones."""
    c = alive.shape[0]
    masks_flat = traverse_util.flatten_dict(dict(layer_masks))
    consumer_gram = gram_fns(mesh)[1]
    G = b = 0.0
    for ref in consumers:
        G_l, b_l = consumer_gram(xs[ref.layer.path], ref.W, ref.target,
                                  _out_mask(masks_flat, ref.layer, ref.kernel.shape[-1]))
        G, b = G + np.asarray(G_l)[:c, :c], b + np.asarray(b_l)[:c]
    return np.asarray(_select_padded(G, b, keep, alive, num_bisect=num_bisect, num_iters=num_iters)[0])


def _on_one_device(x: jax.Array, mesh) -> jax.Array:
    """The whole of `x` (split over `mesh`) on this process's first device of it. The refit's
    SVD runs there: partitioned over the mesh, XLA would run it replicated on every device
    (on simulated CPU devices, 8 times over)."""
    return x if mesh is None else jax.device_put(x, replicated(mesh)).addressable_data(0)


def _refit_consumers(consumers: list[_Consumer], xs: Mapping, kept: np.ndarray, ridge: float | str,
                     params_flat: dict, num_images: int, mesh=None):
    """Eq. (4): refits every consumer's kernel on the `kept` channels, in `params_flat`
    (on the rows of the `num_images` images sampled, without the batch padding)."""
    c = kept.shape[0]
    kept_padded = _np_pad(kept, 0, _bucket(c))
    for ref in consumers:
        X, Y = _on_one_device(xs[ref.layer.path], mesh), _on_one_device(ref.target, mesh)
        W = np.asarray(least_squares_refit(X, Y, kept_padded, ridge=ridge, num_rows=valid_rows(X, num_images, mesh)))
        params_flat[_kernel_path(ref.layer.path)] = jnp.asarray(
            W[:, :c, :ref.kernel.shape[-1]].reshape(ref.kernel.shape), ref.kernel.dtype)


def _prune_in_order(table: ModelTable, refs: dict[int, list[_Consumer]], base: Mapping, params_flat: dict,
                    sample_inputs: Callable, keep_counts: Sequence[int], group_masks: list, *,
                    ridge: float | str, num_bisect: int, num_iters: int, num_images: int, mesh=None) -> dict:
    """He et al.'s sequential pruning (Sec. 3.2): for each group of `refs` in order,
    sample its consumers' inputs with the current network, select, refit. Updates
    `group_masks` and `params_flat` in place; returns the final variables."""
    current = dict(base)
    for g, consumers in refs.items():
        xs = sample_inputs(current, tuple(ref.layer.path for ref in consumers))
        kept = _lasso_select(consumers, xs, current["masks"], keep_counts[g], np.asarray(group_masks[g]) > 0,
                             num_bisect, num_iters, mesh)
        group_masks[g] = jnp.asarray(kept, jnp.float32)
        _refit_consumers(consumers, xs, kept, ridge, params_flat, num_images, mesh)
        current["params"] = traverse_util.unflatten_dict(params_flat)
        current["masks"] = table.layer_masks(group_masks, current["masks"])
        del xs
    return current


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------

def lasso_prune(table: ModelTable, variables: Mapping, images, keep_counts: Sequence[int],
                groups: Sequence[int] | None = None, positions_per_image: int = 10, seed: int = 0, *,
                batch_size: int = 256, ridge: float | str = "auto", num_bisect: int = 60, num_iters: int = 3000,
                mesh=None):
    """Channel pruning of He et al. 2017 over a whole network; returns (group_masks, variables).

    For every group g in `groups` (default: every group of `lasso_groups` whose kept
    count would shrink), in network order:

    1. sample the inputs of g's consumer layers with the *current* network (earlier
       groups already pruned and refitted: He et al.'s sequential pruning, Sec. 3.2)
       on `images`, at `positions_per_image` random output positions per image for a
       conv (one row per image for a dense layer);
    2. take as targets the consumers' outputs (pre-bias) in the *original* network at
       the same positions (Eq. 5: Y' from the un-pruned model);
    3. pick exactly `keep_counts[g]` of the currently kept channels by the LASSO of
       Eq. (3) with ||W_i||_F = 1 (Eq. 2), summed over consumers (each divided by its
       ||Y_l||^2), restricted to outputs the current masks keep;
    4. write the group mask, and refit every consumer's kernel on the kept channels by
       least squares (Eq. 4); rows of pruned channels are set to 0, so the masked
       network and `jaxcompress.pruning.shrink`'s smaller network agree.

    Biases and BatchNorm statistics are unchanged (the refit reconstructs the
    original pre-bias outputs). The `quant` collection is ignored while sampling
    (full-precision reconstruction) and passed through unchanged.

    Args:
      table: the model's `ModelTable`.
      variables: `params` (+ `batch_stats`, `masks`, `quant`) of the network.
      images: float32 NHWC batch, normalised, shaped like the table's input (a few
        hundred images; He et al. sample 5000 images x 10 positions on ImageNet).
      keep_counts: channels to keep, one entry per group (entries of groups not
        processed are ignored).
      groups: groups to process (each must be in `lasso_groups`); processed in
        network order whatever order is given.
      positions_per_image: sampled output positions per image (all if fewer exist).
      seed: seed of the position sampling.
      batch_size: images per forward pass while sampling.
      ridge: ridge of the refit (`least_squares_refit`): "auto" (default; leave-one-out
        choice, 0 included) or a fixed float (0.0 = He et al.'s plain least squares).
      mesh: a 1-D ('data',) device mesh (e.g. `Experiment.mesh`) to sample and sum the
        statistics over, data parallel (module docstring); None: one device. Batches are
        zero-padded to a multiple of its size, so any number of images works.
    Returns:
      (group_masks, new_variables): one float32 0/1 mask per group and the variables
      with refitted kernels and the new `masks` collection.
    """
    images = np.asarray(images, np.float32)
    _check_inputs(table, images, keep_counts)
    masks = variables.get("masks")
    masks_flat = traverse_util.flatten_dict(dict(masks)) if masks is not None else {}
    group_masks = [jnp.asarray(m, jnp.float32) for m in (
        table.group_masks(masks) if masks is not None else [np.ones(w, np.float32) for w in table.widths])]
    eligible = lasso_groups(table, variables["params"])
    groups = _groups_to_process(table, eligible, groups, keep_counts, group_masks, masks_flat)
    if not groups:
        return group_masks, dict(variables)

    all_paths = tuple(l.path for l in table.layers if l.in_group in eligible)
    sample_inputs = _input_sampler(table, images, all_paths, positions_per_image, seed, batch_size, mesh)
    base = {k: v for k, v in variables.items() if k != "quant"}
    if "masks" not in base:
        base["masks"] = table.layer_masks(group_masks)
    params_flat = traverse_util.flatten_dict(dict(variables["params"]))
    refs = _reference_consumers(table, groups, params_flat, masks_flat, sample_inputs, base, mesh)
    current = _prune_in_order(table, refs, base, params_flat, sample_inputs, keep_counts, group_masks,
                              ridge=ridge, num_bisect=num_bisect, num_iters=num_iters, num_images=images.shape[0],
                              mesh=mesh)
    return group_masks, dict(variables, params=current["params"], masks=current["masks"])
