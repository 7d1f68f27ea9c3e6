"""Benchmark (issue 21): integer execution of 8-bit PTQ networks on the CPU.

W8A8 post-training quantization (symmetric per-channel weights, min-max activation
ranges), then the `quantize` job's integer check: the network executed as int8 x int8 ->
int32 (`jaxcompress.quant.integer`), its test accuracy against the fake-quantized
network's, and its forward latency at batch 128 against the fake-quantized float network
and the original float32 network. Sizes are the exact accounting of the packed file.

    python -m benchmarks.run --config=benchmarks/configs/quant_integer.py:lenet5 --workdir=workdirs/bench_integer_lenet5
    JAXCOMPRESS_DATA_DIR=../shared/data python -m benchmarks.run \\
        --config=benchmarks/configs/quant_integer.py:resnet20 --workdir=workdirs/bench_integer_resnet20

`lenet5` quantizes benchmarks/configs/lenet5_mnist.py's network (trained into
workdirs/bench_lenet5_mnist if missing); `resnet20` the short-budget ResNet-20 of
benchmarks/configs/quant_resnet20_cifar10_mixed.py (10 epochs on 10,000 CIFAR-10 images,
trained into workdirs/bench_resnet20_cifar10_short if missing).
"""
from benchmarks.configs import lenet5_mnist, quant_resnet20_cifar10_mixed


def get_config(arg: str = "lenet5"):
    if arg == "lenet5":
        c = lenet5_mnist.get_config()
        c.quant.checkpoint = "workdirs/bench_lenet5_mnist"
    elif arg == "resnet20":
        c = quant_resnet20_cifar10_mixed.get_config()
        del c["bench"]
    else:
        raise ValueError(f"quant_integer.py:<lenet5|resnet20>, got {arg!r}")
    c.job = "quantize"
    c.quant.train_if_missing = True
    c.quant.mode = "ptq"
    c.quant.scheme, c.quant.granularity = "symmetric", "channel"
    c.quant.bits_w = c.quant.bits_a = 8
    c.quant.calibration = "minmax"
    c.hardware.latency_batch = 128
    return c
