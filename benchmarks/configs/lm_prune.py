"""Benchmark (issue 18): the decoder-only LM on the Python standard library's bytes,
25% of the heads and 30% of the MLP neurons of every block pruned by each criterion,
shrunk and fine-tuned, against dense (`benchmarks/lm_prune.py`), over 3 seeds.

On 2 CPU cores about 21 minutes: the dense network 10 (cached in the workdir, so a
rerun trains it only when a setting it depends on changes), then about 70 s per
criterion and seed (9 runs):

JAX_PLATFORMS=cpu python -m benchmarks.run --config=benchmarks/configs/lm_prune.py --workdir=workdirs/bench_lm_prune
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_lm_prune"
    c.seed = 0  # the dense network's initialisation and batch order
    c.bench = ml_collections.ConfigDict(dict(
        # the dense LM: widths (dim, heads x depth, mlp_ratio * dim x depth), byte tokens
        seq_len=64, dim=128, depth=4, heads=4, head_dim=32, mlp_ratio=4,
        batch_size=32, train_steps=1500, learning_rate=3e-3, warmup_steps=100, weight_decay=0.1,
        # pruning: kept fraction of every block's heads and MLP neurons (the residual stream whole)
        criteria=("l2", "snip", "random"), head_keep=0.75, mlp_keep=0.7, snip_batch=32,
        finetune_steps=200, finetune_lr=1e-3, finetune_warmup=20,
        seeds=(0, 1, 2),  # per run: random scores, SNIP batch, fine-tune batch order
        eval_sequences=1024, eval_batch=128))  # the fixed test subset, spread over the test files
    return c
