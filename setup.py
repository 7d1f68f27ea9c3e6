"""jaxcompress: structural pruning, mixed-precision quantization and automated
compression search (two-stage PPO, STAMP) for JAX/Flax networks."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.89",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "tensorflow-datasets>=4.9.7",  # used via tfds.data_source: no TensorFlow needed
    "array-record>=0.5",  # tfds.data_source's random-access file format
    "scikit-learn>=1.3",  # ships the embedded offline default dataset (8x8 digits)
    "numpy>=1.26",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "distrax>=0.1.5",  # PPO's policy distributions (jaxcompress.rl)
    "rlax>=0.1.6",  # PPO's clipped surrogate loss (jaxcompress.rl)
]

setup(
    name="jaxcompress",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=find_packages(include=["jaxcompress", "jaxcompress.*", "launch", "configs", "configs.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
    },
)
