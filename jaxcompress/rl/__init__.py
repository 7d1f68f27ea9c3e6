"""Automated compression search: the layer-wise environment, PPO, DDPG, random search,
held-out re-ranking, the two-stage job."""
from jaxcompress.rl.ddpg import DDPG, DDPGConfig
from jaxcompress.rl.evaluate import make_element_evaluator, make_prune_evaluator, make_quant_evaluator, stacked_logits
from jaxcompress.rl.env import FEATURES, OBS_DIM, ElementEnv, EnvState, PruneEnv, QuantEnv, backoff, play
from jaxcompress.rl.ppo import PPO, PPOConfig
from jaxcompress.rl.random_search import RandomSearch, RandomSearchConfig
from jaxcompress.rl.rerank import choose, rerank, top_distinct
from jaxcompress.rl.search import (REWARDS, SearchDiverged, SearchState, batched_rollout, channel_ranks,
                                   make_iteration, make_reward_fn, rollout, run_search)

__all__ = ["DDPG", "DDPGConfig", "FEATURES", "OBS_DIM", "ElementEnv", "EnvState", "PruneEnv", "QuantEnv", "backoff",
           "play", "PPO", "PPOConfig", "RandomSearch", "RandomSearchConfig", "REWARDS", "SearchDiverged",
           "SearchState", "batched_rollout", "channel_ranks", "choose", "make_element_evaluator", "make_iteration",
           "make_prune_evaluator", "make_quant_evaluator", "make_reward_fn", "rerank", "rollout", "run_search",
           "stacked_logits", "top_distinct"]
