"""Benchmark: Deep-Compression-style pipeline on LeNet-5 / MNIST (Han et al. 2016, Table 1).

Takes the pruned, shrunk and fine-tuned network of benchmarks/configs/prune_lenet5_mnist.py
(channel + element pruning; `quant.pruned_checkpoint`), shares weights by k-means with
one codebook per layer (8 bits for the convolutions, 5 for the dense layers, as the
paper does for its conv / fc layers), fine-tunes the centroids for 3 epochs (QAT with
fixed assignments) and exports the packed file: CSR with relative indices (8-bit gaps
for conv, 5-bit for dense), codebooks, float32 biases. Activations stay float, as in
the paper. Without that workdir, set --config.quant.prune_first=True to prune here.

python -m benchmarks.run --config=benchmarks/configs/quant_lenet5_deep_compression.py --workdir=workdirs/bench_quant_lenet5_dc
"""
from benchmarks.configs import prune_lenet5_mnist


def get_config():
    c = prune_lenet5_mnist.get_config()  # its prune settings serve quant.prune_first
    c.job = "quantize"
    c.quant.checkpoint = prune_lenet5_mnist.REFERENCE
    c.quant.train_if_missing = True
    c.quant.pruned_checkpoint = "workdirs/bench_prune_lenet5"
    c.quant.mode = "qat"
    c.quant.scheme = "kmeans"
    c.quant.bits_w = 5
    c.quant.layer_bits_w = {"conv1": 8, "conv2": 8}
    c.quant.bits_a = 32
    c.quant.qat_epochs = 3
    c.quant.qat_learning_rate = 0.005
    c.hardware.multiple = 1  # unaligned channel counts, as in the paper (and the README's recorded row)
    return c
