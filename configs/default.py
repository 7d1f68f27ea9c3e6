"""Base config: every field a job reads, with defaults. Other configs override it.

Run: python -m launch.main --config=configs/default.py --workdir=/tmp/run
     --config.train.num_epochs=3
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.job = "train"  # train | evaluate | prune | bench_overhead
    c.seed = 0
    c.multihost = False  # call jax.distributed.initialize() first (multi-host GPU/TPU)

    c.model = ml_collections.ConfigDict(dict(name="lenet5", width_multiplier=1.0))

    # data.name: digits (embedded, offline) | mnist | cifar10 | npz:<path> | tfds:<name>
    c.data = ml_collections.ConfigDict(dict(
        name="mnist", data_dir="", image_size=0, channels=0,  # 0: keep as stored
        val_size=5000, classes=(), augment=False))

    c.train = ml_collections.ConfigDict(dict(
        num_epochs=15, batch_size=128, eval_batch_size=1000,
        optimizer="sgd", learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="cosine", warmup_epochs=0.0, decay_epochs=(), decay_factor=0.1, label_smoothing=0.0))

    # job "prune": criterion l1 | l2 | bn | snip | random | lasso | variational
    c.prune = ml_collections.ConfigDict(dict(
        checkpoint="",  # a trained run's workdir (its best/ is used); "" trains one into <workdir>/pretrain
        criterion="l1", keep_ratio=0.5, keep_ratios={},  # keep_ratios: {group name: fraction} overrides
        allocation="uniform",  # uniform | global (one threshold over normalised scores)
        scope="inner",  # inner: leave residual streams whole | all
        multiple=1,  # kept channel counts rounded to a multiple of this
        element_rate=0.0, element_rates={},  # then magnitude-prune this fraction of each layer's weights
        # (element_rates: {layer path: fraction} overrides)
        sample_size=256,  # training images for snip / lasso
        finetune_epochs=5, finetune_learning_rate=0.01, latency_batch=128))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=0, max_to_keep=2))
    c.eval = ml_collections.ConfigDict(dict(checkpoint="best"))  # best | last | <directory>
    return c
