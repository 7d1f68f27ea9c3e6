"""Benchmark: training-step cost of the compressed layers against plain Flax.

The same LeNet-5 and ResNet-20 are written here with `nn.Conv` / `nn.Dense` /
`nn.BatchNorm`; the benchmark first checks that, given the zoo model's parameters,
they compute the same logits, then times one SGD training step of each
(interleaved, medians), the zoo model carrying all-ones masks and 32-bit `quant`
entries on every layer (the full mask and fake-quant code path).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.timing import interleaved_medians
from jaxcompress.models import create_model, describe, get_spec
from jaxcompress.models.common import conv_init
from jaxcompress.quant import make_quant
from jaxcompress.train import create_train_state, make_train_step
from jaxcompress.train.metrics import write_json


class PlainLeNet5(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding="SAME", name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="fc1")(x))
        x = nn.relu(nn.Dense(84, name="fc2")(x))
        return nn.Dense(10, name="fc3")(x)


class PlainResNet20(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        def conv_bn(x, f, k, name, strides=1, act=True):
            x = nn.Conv(f, (k, k), strides=strides, padding="SAME", use_bias=False, kernel_init=conv_init,
                        name=f"{name}_conv")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
            return nn.relu(x) if act else x

        x = conv_bn(x, 16, 3, "stem")
        for s, width in enumerate((16, 32, 64)):
            for b in range(3):
                name, stride = f"stage{s + 1}_block{b}", 2 if (b == 0 and s > 0) else 1
                y = conv_bn(x, width, 3, f"{name}_a", strides=stride)
                y = conv_bn(y, width, 3, f"{name}_b", act=False)
                if b == 0 and s > 0:
                    x = conv_bn(x, width, 1, f"{name}_proj", strides=stride, act=False)
                x = nn.relu(x + y)
        return nn.Dense(10, name="classifier")(x.mean(axis=(1, 2)))


PLAIN = {"lenet5": PlainLeNet5, "resnet20": PlainResNet20}


def measure(name: str, batch_size: int, rounds: int, seed: int = 0) -> dict:
    shape = get_spec(name).input_shape
    model, plain = create_model(name, 10), PLAIN[name]()
    table = describe(model, shape)
    rng = np.random.default_rng(seed)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (batch_size, *shape)), jnp.uint8),
             "label": jnp.asarray(rng.integers(0, 10, batch_size), jnp.int32)}
    tx = optax.sgd(0.01, momentum=0.9)
    state = create_train_state(model, tx, shape, seed)
    state = state.replace(quant=make_quant(table, bits_w=32, bits_a=32))
    plain_state = create_train_state(plain, tx, shape, seed, variables={
        "params": state.params, "batch_stats": state.batch_stats})
    x = jnp.asarray(rng.normal(size=(8, *shape)), jnp.float32)
    max_diff = float(jnp.abs(model.apply(state.variables(), x) - plain.apply(plain_state.variables(), x)).max())
    step = jax.jit(make_train_step(np.zeros(shape[-1]), np.ones(shape[-1])))
    states = {"compressed": state, "plain": plain_state}

    def runner(key):
        def run():
            states[key], metrics = step(states[key], batch)
            return metrics["loss"]
        return run

    times = interleaved_medians({k: runner(k) for k in states}, rounds=rounds)
    return dict(model=name, batch_size=batch_size, plain_step_ms=1e3 * times["plain"],
                compressed_step_ms=1e3 * times["compressed"], ratio=times["compressed"] / times["plain"],
                max_logit_diff=max_diff)


def run(config, workdir: str) -> dict:
    rows = [measure(name, config.bench.batch_size, config.bench.rounds) for name in config.bench.models]
    summary = dict(job=config.job, device_kind=jax.devices()[0].device_kind, rows=rows)
    write_json(os.path.join(workdir, "summary.json"), summary)
    for r in rows:
        print(f"{r['model']:10s} plain {r['plain_step_ms']:.2f} ms  compressed {r['compressed_step_ms']:.2f} ms  "
              f"ratio {r['ratio']:.3f}  (max logit diff {r['max_logit_diff']:.1e})")
    return summary
