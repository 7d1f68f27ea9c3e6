"""LeNet-300-100 and LeNet-5 (LeCun et al. 1998), the MNIST networks of the
pruning literature (Han et al. 2015; the two-stage paper's Table 1, LeNet-5)."""
from __future__ import annotations

import flax.linen as nn

from jaxcompress.layers import Conv, Dense


class LeNet300100(nn.Module):
    """MLP 784-300-100-10 (266,610 parameters on 28x28 inputs). widths = (fc1, fc2)."""

    widths: tuple[int, ...] = (300, 100)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.widths[0], signed_input=True, name="fc1")(x))
        x = nn.relu(Dense(self.widths[1], name="fc2")(x))
        return Dense(self.num_classes, name="fc3")(x)


class LeNet5(nn.Module):
    """conv6-conv16-fc120-fc84-fc10 with ReLU and max pooling (61,706 parameters on
    28x28 inputs: conv1 pads to keep 28x28, as MNIST is the 32x32 original cropped).
    widths = (conv1, conv2, fc1, fc2)."""

    widths: tuple[int, ...] = (6, 16, 120, 84)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(Conv(self.widths[0], (5, 5), padding="SAME", signed_input=True, name="conv1")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(Conv(self.widths[1], (5, 5), padding="VALID", name="conv2")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Dense(self.widths[2], name="fc1")(x))
        x = nn.relu(Dense(self.widths[3], name="fc2")(x))
        return Dense(self.num_classes, name="fc3")(x)
