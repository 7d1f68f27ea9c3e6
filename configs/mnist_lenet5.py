"""LeNet-5 on MNIST (../shared/data/mnist.npz or tfds:mnist)."""
from configs import default


def get_config():
    return default.get_config()
