"""End to end: a sample of bad overrides and bad config files through
`python -m launch.main` (and one benchmark through `python -m benchmarks.run`) exits
with code 2 and exactly one stderr line, with no traceback and nothing written to the
workdir. The fast, exhaustive per-field check is tests/test_schema.py; each case here
is a short process (about 4 s of CPU: imports, then the schema refuses the config)."""
import concurrent.futures
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--config=configs/quickstart.py", "--config.job=train"]

CASES = {
    # name: (module, arguments, fragments the one line must contain)
    "learning_rate_nan": ("launch.main", QUICK + ["--config.train.learning_rate=nan"],
                          ["train.learning_rate=nan", "positive and finite"]),
    "image_size_3": ("launch.main", QUICK + ["--config.data.image_size=3"], ["data.image_size=3", "8..1024"]),
    "classes_repeated": ("launch.main", QUICK + ["--config.data.classes=(1,1)"], ["data.classes=(1, 1)", "distinct"]),
    "prune_sample_size_0": ("launch.main", QUICK + ["--config.job=prune", "--config.prune.sample_size=0"],
                            ["prune.sample_size=0", ">= 1"]),
    "search_report_budgets_text": ("launch.main", QUICK + ["--config.job=search",
                                                           "--config.search.report_budgets=('a',)"],
                                   ["search.report_budgets=('a',)"]),
    "stamp_num_heads_3": ("launch.main", QUICK + ["--config.job=stamp", "--config.stamp.num_heads=3"],
                          ["stamp.num_heads=3", "stamp.embed_dim=64"]),
    "quant_verify_batch_0": ("launch.main", QUICK + ["--config.job=quantize", "--config.quant.verify_batch=0"],
                             ["quant.verify_batch=0"]),
    "distributed_address_without_count": ("launch.main", QUICK + ["--config.distributed.enabled=True",
                                                                  "--config.distributed.coordinator_address=h:1234"],
                                          ["distributed.num_processes=0", "the number of processes"]),
    "unknown_positional_argument": ("launch.main", QUICK + ["train_it_now"], ["unexpected argument", "train_it_now"]),
    "config_file_syntax_error": ("launch.main", ["--config={tmp}/syntax_error.py"],
                                 ["syntax_error.py", "SyntaxError"]),
    "config_file_raises": ("launch.main", ["--config={tmp}/raises.py"], ["raises.py", "RuntimeError: no config here"]),
    "benchmark_ppo_clip": ("benchmarks.run", ["--config=benchmarks/configs/search_agents.py",
                                              "--config.search.ppo.clip=-1"], ["search.ppo.clip=-1.0"]),
}
FILES = {"syntax_error.py": "def get_config(:\n    pass\n",
         "raises.py": "def get_config():\n    raise RuntimeError('no config here')\n"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"

    def run(name):
        module, args, _ = CASES[name]
        tmp = tmp_path_factory.mktemp(name)
        for file, text in FILES.items():
            (tmp / file).write_text(text)
        workdir = tmp / "workdir"
        args = [a.format(tmp=tmp) for a in args] + [f"--workdir={workdir}"]
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        return proc, workdir

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_exit_code_2(runs, name):
    proc, workdir = runs[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for fragment in CASES[name][2]:
        assert fragment in lines[0], lines[0]
    assert not workdir.exists()  # refused before config.json (or anything else) was written


def test_a_workdir_that_is_a_file_is_one_line_and_the_file_is_kept(tmp_path):
    workdir = tmp_path / "notes.txt"
    workdir.write_text("my notes\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "launch.main", *QUICK, f"--workdir={workdir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: --workdir={workdir}: cannot be used") and "FileExistsError" in lines[0]
    assert workdir.read_text() == "my notes\n"
