"""Model registry: zoo models by name, built from (scaled) default widths."""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from jaxcompress.models import lm, mobilenet, resnet, vgg, vit
from jaxcompress.models.cnn import CNN4
from jaxcompress.models.lenet import LeNet5, LeNet300100

MNIST_SHAPE, CIFAR_SHAPE, IMAGENET_SHAPE = (28, 28, 1), (32, 32, 3), (224, 224, 3)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build a zoo model: `build(widths, num_classes)` and its defaults. One
    example's input has shape `input_shape` ((H, W, C) for images, (tokens,) for a
    language model, whose `num_classes` is its vocabulary) and dtype `input_dtype`."""

    build: Callable[[tuple[int, ...], int], nn.Module]
    default_widths: tuple[int, ...]
    input_shape: tuple[int, ...]
    width_divisor: int = 1  # width_multiplier rounds to multiples of this (8 for MobileNets)
    input_dtype: str = "float32"  # "int32": token ids


def _resnet(stage_sizes, streams, bottleneck=False, imagenet=False):
    return ModelSpec(
        build=lambda w, k: resnet.ResNet(stage_sizes=stage_sizes, widths=w, num_classes=k,
                                         bottleneck=bottleneck, imagenet_stem=imagenet),
        default_widths=resnet.default_widths(stage_sizes, streams, bottleneck),
        input_shape=IMAGENET_SHAPE if imagenet else CIFAR_SHAPE)


def _vgg(depth, head):
    return ModelSpec(build=lambda w, k: vgg.VGG(depth=depth, widths=w, num_classes=k, head=head),
                     default_widths=vgg.default_widths(depth, head),
                     input_shape=IMAGENET_SHAPE if head == "imagenet" else CIFAR_SHAPE)


def _mobilenet(cls, widths, small_input):
    return ModelSpec(build=lambda w, k: cls(widths=w, num_classes=k, small_input=small_input),
                     default_widths=widths, input_shape=CIFAR_SHAPE if small_input else IMAGENET_SHAPE,
                     width_divisor=8)


MODELS: dict[str, ModelSpec] = {
    "lenet300_100": ModelSpec(lambda w, k: LeNet300100(widths=w, num_classes=k), (300, 100), MNIST_SHAPE),
    "lenet5": ModelSpec(lambda w, k: LeNet5(widths=w, num_classes=k), (6, 16, 120, 84), MNIST_SHAPE),
    "cnn4": ModelSpec(lambda w, k: CNN4(widths=w, num_classes=k), (32, 64, 256), CIFAR_SHAPE),
    **{f"vgg{d}": _vgg(d, "cifar") for d in (11, 16, 19)},
    **{f"vgg{d}_imagenet": _vgg(d, "imagenet") for d in (11, 16, 19)},
    **{f"resnet{d}": _resnet(resnet.cifar_stage_sizes(d), (16, 32, 64)) for d in (20, 56, 110)},
    "resnet18": _resnet((2, 2, 2, 2), (64, 128, 256, 512), imagenet=True),
    "resnet50": _resnet((3, 4, 6, 3), (256, 512, 1024, 2048), bottleneck=True, imagenet=True),
    "mobilenet_v1": _mobilenet(mobilenet.MobileNetV1, mobilenet.v1_default_widths(), False),
    "mobilenet_v2": _mobilenet(mobilenet.MobileNetV2, mobilenet.v2_default_widths(), False),
    "mobilenet_v1_cifar": _mobilenet(mobilenet.MobileNetV1, mobilenet.v1_default_widths(), True),
    "mobilenet_v2_cifar": _mobilenet(mobilenet.MobileNetV2, mobilenet.v2_default_widths(), True),
    "vit": ModelSpec(lambda w, k: vit.ViT(widths=w, num_classes=k), vit.default_widths(), CIFAR_SHAPE),
    "lm": ModelSpec(lambda w, k: lm.DecoderLM(widths=w, vocab_size=k), lm.default_widths(), (lm.SEQ_LEN,),
                    input_dtype="int32"),
}


class UnknownModelError(ValueError):
    pass


def get_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise UnknownModelError(f"unknown model '{name}'; choose one of: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def scale_widths(widths, multiplier: float, divisor: int = 1) -> tuple[int, ...]:
    """Multiplies widths, rounding to the nearest multiple of `divisor` (at least one)."""
    if multiplier <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {multiplier}")
    return tuple(max(divisor, int(round(w * multiplier / divisor)) * divisor) for w in widths)


def create_model(name: str, num_classes: int, width_multiplier: float = 1.0,
                 widths: tuple[int, ...] | None = None) -> nn.Module:
    """Builds a zoo model by name; `widths` overrides the (scaled) default widths."""
    spec = get_spec(name)
    if widths is None:
        widths = scale_widths(spec.default_widths, width_multiplier, spec.width_divisor)
    elif len(widths) != len(spec.default_widths):
        raise ValueError(f"model '{name}' takes {len(spec.default_widths)} widths, got {len(widths)}")
    bad = [w for w in widths if int(w) != w or int(w) < 1]
    if bad:
        raise ValueError(f"model '{name}': widths must be positive integers, got {bad[0]!r} in {tuple(widths)}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"model '{name}': num_classes must be a positive integer, got {num_classes!r}")
    return spec.build(tuple(int(w) for w in widths), int(num_classes))
