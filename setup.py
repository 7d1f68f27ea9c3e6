"""jaxcompress: structural pruning, mixed-precision quantization and automated
compression search (two-stage PPO, STAMP) for JAX/Flax networks."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.7",
    "flax>=0.10",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11",
    "etils[epath]>=1.5",  # paths a config names (gs:// too), checked before a job starts
    "chex>=0.1.89",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "scikit-learn>=1.3",  # ships the embedded offline default dataset (8x8 digits)
    "numpy>=1.26",
    "tqdm>=4.66",
    "matplotlib>=3.8",  # the jobs' plots (widths.png, reward curves)
    "tensorboardX>=2.6",  # TensorBoard event files of every run's curves, without TensorFlow
    "flatbuffers>=24.3",  # jax.export's serialisation (the StableHLO export, jaxcompress.stablehlo)
    "scipy>=1.11",  # benchmarks' paired t-test (benchmarks/stats.py); also a jax dependency
]
EXTRAS = {
    # tfds:<name> datasets (and mnist / cifar10 without JAXCOMPRESS_DATA_DIR), read with
    # tfds.data_source: no TensorFlow needed
    "tfds": ["tensorflow-datasets>=4.9.7", "array-record>=0.5"],
    # the RL search (jaxcompress.rl): PPO's policy distributions and clipped surrogate loss
    "rl": ["distrax>=0.1.5", "rlax>=0.1.6"],
}
EXTRAS["all"] = sorted({d for deps in EXTRAS.values() for d in deps})
# hypothesis: the property-based config tests (tests/test_schema.py)
EXTRAS["test"] = EXTRAS["all"] + ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"]

setup(
    name="jaxcompress",
    version="0.2.0",
    description=__doc__.replace("\n", " "),
    python_requires=">=3.11",
    packages=find_packages(include=["jaxcompress", "jaxcompress.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["jaxcompress-run = jaxcompress.cli:main"]},
)
