"""STAMP: set-based task-adaptive meta-pruning (Song, Yoon, Yang, Hwang, arXiv:2006.12139).

Set encoder (Deep Sets / Set Transformer pooling) -> mask generator (BBDropout
Beta-Bernoulli gates per prunable channel) -> meta-training over reference tasks
(FOMAML, MAML or Reptile) -> one forward pass on a target sample gives a structural
mask; the network is shrunk physically and only the small network is fine-tuned.
The `stamp` job (`jaxcompress.stamp.job.run`) adds the baselines and the report.
"""
from jaxcompress.stamp.encoder import PMA, ConvStem, SetEncoder, pretrained_features
from jaxcompress.stamp.generator import (FreeGates, GroupLayout, MaskGenerator, SparsityObjective, check_budget,
                                         hard_group_masks)
from jaxcompress.stamp.kumaraswamy import (kl_kumaraswamy_beta, kumaraswamy_mean, kumaraswamy_moment,
                                           kumaraswamy_sample, relaxed_bernoulli, sample_gates)
from jaxcompress.stamp.channel_stats import channel_statistics
from jaxcompress.stamp.meta import MetaState, Stamp, TaskSampler, meta_train, straight_through_top_k

__all__ = ["PMA", "ConvStem", "SetEncoder", "pretrained_features", "FreeGates", "GroupLayout", "MaskGenerator",
           "SparsityObjective", "check_budget", "hard_group_masks", "kl_kumaraswamy_beta", "kumaraswamy_mean",
           "kumaraswamy_moment", "kumaraswamy_sample", "relaxed_bernoulli", "sample_gates", "MetaState", "Stamp",
           "TaskSampler", "meta_train", "straight_through_top_k", "channel_statistics"]
