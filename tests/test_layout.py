"""The package layout: the library never imports the benchmarks (or the checkout's
configs/ and launch/), and every registered job and benchmark resolves to a function."""
import ast
import os
import subprocess
import sys

import pytest

import benchmarks.run
from jaxcompress import jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTSIDE = ("benchmarks", "configs", "launch", "tests")


def _library_files():
    for d, _, names in os.walk(os.path.join(ROOT, "jaxcompress")):
        yield from (os.path.join(d, n) for n in names if n.endswith(".py"))


def _imported_modules(path):
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_no_library_module_imports_the_benchmarks_or_the_checkout():
    offenders = [(os.path.relpath(p, ROOT), m) for p in _library_files() for m in _imported_modules(p)
                 if m.split(".")[0] in OUTSIDE]
    assert offenders == []


def test_importing_every_library_module_loads_no_benchmark_module():
    code = ("import pkgutil, importlib, sys, jaxcompress\n"
            "names = [m.name for m in pkgutil.walk_packages(jaxcompress.__path__, 'jaxcompress.')]\n"
            "for n in names: importlib.import_module(n)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r)\n"
            "print(len(names), bad)" % (OUTSIDE,))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, bad = proc.stdout.strip().split(" ", 1)
    assert int(count) > 40 and bad == "[]"


@pytest.mark.parametrize("name, target", sorted(benchmarks.run.ALL_JOBS.items()))
def test_every_registered_job_resolves_to_a_function(name, target):
    assert callable(jobs.resolve(target))
    assert (name in jobs.JOBS) == target.startswith("jaxcompress.")


def test_library_jobs_are_not_benchmarks_and_the_base_config_names_every_job():
    assert not any(name.startswith("bench") for name in jobs.JOBS)
    with open(os.path.join(ROOT, "jaxcompress", "config.py")) as f:
        head = f.read().split("c.seed")[0]
    assert all(name in head for name in jobs.JOBS)
