"""Benchmark: the two-stage paper's Section 5.5 single-layer experiment (Zhan, Lin, Cao 2021,
Figure 6). A small 4-layer CNN (`cnn4`: conv5x5-pool-conv5x5-pool-fc-fc, width multiplier
0.5: widths 16-32-128, 277,610 parameters) is trained on CIFAR-10, then each of its three
prunable layers (conv1, conv2, fc1) is pruned ALONE at 25 / 50 / 75% of its channels by
weight magnitude (L1), LASSO channel selection + least-squares refit (He et al. 2017) and
variational pruning (information-dropout noise on the layer's channels), each followed by
the same short fine-tune; reported: test-error increase over the dense network.

Sized for about 25 minutes on a 2-core CPU, pretraining included: measured 17 min 14 s
(pretraining 4 epochs, 290 s, 69.4% test accuracy: a small, briefly trained reference, not
the paper's; 27 cells + 1 control, ~25 s each, variational cells +35 s for the noise fit).
Fine-tune: 100 SGD steps (batch 128, lr 0.01, cosine) for every cell, the same for every
method; variational noise: 150 steps on the layer's channel multipliers, weights frozen.

JAXCOMPRESS_DATA_DIR=../shared/data python -m benchmarks.run --config=benchmarks/configs/single_layer_cifar10.py --workdir=workdirs/bench_single_layer

Resumable: rerun the same command; finished cells (results.jsonl) are skipped.
"""
import ml_collections

from configs import default


def get_config():
    c = default.get_config()
    c.job = "bench_single_layer"
    c.model.name = "cnn4"
    c.model.width_multiplier = 0.5
    c.data.name = "cifar10"
    c.data.val_size = 2000
    c.train.num_epochs = 4  # pretraining of the dense network
    c.train.batch_size = 128
    c.train.learning_rate = 0.05
    c.train.eval_batch_size = 1000
    c.bench = ml_collections.ConfigDict(dict(
        pretrained="",  # a trained cnn4 run's workdir; "" trains into <workdir>/pretrain
        layers=("conv1", "conv2", "fc1"),
        rates=(0.25, 0.5, 0.75),  # fraction of the layer's channels removed
        methods=("magnitude", "lasso", "variational"),
        finetune_steps=100, finetune_learning_rate=0.01,  # the same for every method
        finetune_dense=True, eval_before_finetune=True,
        lasso_sample_size=1000,
        variational=dict(num_steps=150, beta=1.0, learning_rate=0.0, noise_learning_rate=0.02, init_alpha=0.05,
                         batch_size=128)))
    return c
