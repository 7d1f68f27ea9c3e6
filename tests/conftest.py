"""Shared pytest fixtures for the jaxcompress test-suite."""
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.models import create_model, describe, get_spec

# One persistent XLA compilation cache for the whole run: the pytest workers and every
# subprocess a test launches (they inherit these variables) reuse each other's compiled
# programs (the same executables, so the same numbers); the suite's CPU time drops by about
# a third. A fresh machine starts with it empty.
_XLA_CACHE = {"JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(),
                                                         f"jaxcompress-tests-xla-cache-{os.getuid()}"),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1"}
for _name, _value in _XLA_CACHE.items():
    os.environ.setdefault(_name, _value)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

def fast_jit(fun, **kwargs):
    """`jax.jit` with XLA's backend optimisations off: whole-model compiles take about half
    the CPU time, and tests run tiny batches where the slower code does not matter."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


class Zoo:
    """Zoo models, their layer tables, variables and jitted forward passes, built once per session.

    Tracing and compiling a deep model costs seconds on CPU, so every test file shares
    these caches instead of calling `describe` / `init` / `jit` again.
    """

    jit = staticmethod(fast_jit)

    def __init__(self):
        self._tables = {}
        self._abstract = {}
        self._variables = {}
        self._forward = {}

    @staticmethod
    def num_classes(name):
        return 1000 if get_spec(name).input_shape[0] == 224 else 10

    def input_shape(self, name, input_shape=None):
        return tuple(input_shape or get_spec(name).input_shape)

    def table(self, name, input_shape=None):
        """`describe(create_model(name), input_shape)`, cached."""
        key = (name, self.input_shape(name, input_shape))
        if key not in self._tables:
            model = create_model(name, self.num_classes(name))
            self._tables[key] = describe(model, key[1], get_spec(name).input_dtype)
        return self._tables[key]

    def abstract_variables(self, name, input_shape=None):
        """Shapes of `model.init` variables (`jax.eval_shape`: no memory, no FLOPs), cached."""
        key = (name, self.input_shape(name, input_shape))
        if key not in self._abstract:
            model = self.table(name, input_shape).model
            x = jnp.zeros((1, *key[1]), get_spec(name).input_dtype)
            self._abstract[key] = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
        return self._abstract[key]

    def variables(self, name, input_shape=None, seed=0):
        """Random variables with the shapes of `model.init`, drawn with numpy (no XLA compiles).

        Unlike a fresh init every leaf is non-trivial: kernels He-normal, biases and BatchNorm
        shifts N(0, 0.1), BatchNorm scales U(0.5, 1.5), running means N(0, 0.1), running
        variances U(0.5, 1.5); channel masks all ones.
        """
        key = (name, self.input_shape(name, input_shape), seed)
        if key not in self._variables:
            rng = np.random.default_rng(seed)

            def draw(path, leaf):
                kind = path[-1].key
                if kind == "kernel":
                    std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
                    value = rng.normal(0.0, std, leaf.shape)
                elif kind in ("scale", "var"):
                    value = rng.uniform(0.5, 1.5, leaf.shape)
                elif kind == "channel":
                    value = np.ones(leaf.shape)
                else:  # bias, mean
                    value = rng.normal(0.0, 0.1, leaf.shape)
                return jnp.asarray(value, leaf.dtype)

            abstract = self.abstract_variables(name, input_shape)
            self._variables[key] = jax.tree_util.tree_map_with_path(draw, abstract)
        return self._variables[key]

    def forward(self, name, input_shape=None):
        """Jitted `model.apply(variables, x, train=False)` of the full-width model, cached.

        Variables with the same structure (e.g. other channel masks) reuse the compilation.
        """
        key = (name, self.input_shape(name, input_shape))
        if key not in self._forward:
            model = self.table(name, input_shape).model
            self._forward[key] = fast_jit(lambda v, x: model.apply(v, x, train=False))
        return self._forward[key]


@pytest.fixture(scope="session")
def zoo():
    return Zoo()


@pytest.fixture(scope="session")
def eight_devices():
    """`run(script, timeout=900) -> dict`: runs the Python `script` in a subprocess on 8
    simulated CPU devices (XLA_FLAGS must be set before JAX starts, so not in this
    process), from the repository root; returns the JSON it printed after `RESULT `."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}

    def run(script: str, timeout: int = 900) -> dict:
        proc = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
        return json.loads(lines[-1][len("RESULT "):])

    return run
