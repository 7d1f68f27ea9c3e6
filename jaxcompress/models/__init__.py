"""Model zoo built from channel widths, each model's channel groups, the layer table."""
from jaxcompress.models.cnn import CNN4
from jaxcompress.models.lenet import LeNet5, LeNet300100
from jaxcompress.models.lm import DecoderLM
from jaxcompress.models.mobilenet import MobileNetV1, MobileNetV2
from jaxcompress.models.registry import (MODELS, ModelSpec, UnknownModelError, create_model, get_spec,
                                         scale_widths)
from jaxcompress.models.resnet import ResNet
from jaxcompress.models.table import (AttentionInfo, AxisGroup, CostTerm, LayerInfo, ModelTable,
                                      UnsupportedModelError, describe)
from jaxcompress.models.vgg import VGG
from jaxcompress.models.vit import ViT

__all__ = ["CNN4", "DecoderLM", "LeNet5", "LeNet300100", "MobileNetV1", "MobileNetV2", "ResNet", "VGG", "ViT",
           "MODELS", "ModelSpec", "UnknownModelError", "create_model", "get_spec", "scale_widths", "AttentionInfo",
           "AxisGroup", "CostTerm", "LayerInfo", "ModelTable", "UnsupportedModelError", "describe"]
