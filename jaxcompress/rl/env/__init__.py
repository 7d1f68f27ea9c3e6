"""The layer-wise compression environments: pure `reset` / `observe` / `step` / `finalize`.

Hand-written (no RL library models a network being compressed). One module per
environment on top of `common` (the episode state, the observation features, the
normalised action map, `play`):

* `prune.PruneEnv` (stage 1): a pruning rate per channel group, AMC's action wall
  keeps the FLOPs (and optional parameter and latency) budget;
* `element.ElementEnv` (stage 1 at element granularity): a magnitude pruning rate per
  conv / dense layer, sparse costs walled alike;
* `quant.QuantEnv` (stage 2): weight bits per conv / dense layer, HAQ's back-off
  keeps the storage budget.
"""
from jaxcompress.rl.env.common import (FEATURES, OBS_DIM, CompressionEnv, EnvState, PruningEnv, check_prune_bounds,
                                       check_reachable, layer_geometry, minmax, play, static_observations)
from jaxcompress.rl.env.element import ElementEnv
from jaxcompress.rl.env.prune import PruneEnv
from jaxcompress.rl.env.quant import QuantEnv, backoff, check_bits_bounds

__all__ = ["FEATURES", "OBS_DIM", "CompressionEnv", "EnvState", "PruningEnv", "check_prune_bounds", "check_reachable",
           "layer_geometry", "minmax", "play", "static_observations", "ElementEnv", "PruneEnv", "QuantEnv",
           "backoff", "check_bits_bounds"]
