"""Runs one benchmark (or any library job) from a config in benchmarks/configs/.

    python -m benchmarks.run --config=benchmarks/configs/prune_speedup.py --workdir=workdirs/speedup

Benchmarks are `f(config, workdir) -> summary` functions registered here; the library
(`jaxcompress`) never imports this package. Each writes `<workdir>/summary.json`;
`python -m benchmarks.results` files a run's figures under `benchmarks/results/`.
"""
from jaxcompress import cli, jobs

BENCHMARKS = {
    "bench_quant_mixed": "benchmarks.quant_mixed:run",
    "bench_overhead": "benchmarks.overhead:run",
    "bench_prune_speedup": "benchmarks.speedup:run",
    "bench_single_layer": "benchmarks.single_layer:run",
    "bench_peer_pruning": "benchmarks.peer:run",
    "bench_latency_budget": "benchmarks.hardware:latency_budget",
    "bench_latency_predictor": "benchmarks.hardware:predictor",
    "bench_budget_accuracy": "benchmarks.hardware:budget_accuracy",
    "bench_search_speed": "benchmarks.search_rl:speed",
    "bench_search_agents": "benchmarks.search_rl:agents",
    "bench_bad_input": "benchmarks.bad_input:run",
    "bench_multiprocess": "benchmarks.multiprocess:run",
    "bench_stamp_seeds": "benchmarks.stamp_seeds:run",
    "bench_lm_prune": "benchmarks.lm_prune:run",
    "bench_int8_ops": "benchmarks.int8_ops:run",
    "bench_proxy_fidelity": "benchmarks.proxy_fidelity:run",
}
ALL_JOBS = {**jobs.JOBS, **BENCHMARKS}
DISTILLING = jobs.DISTILLING + ("bench_search_agents", "bench_budget_accuracy")


def run(config, workdir: str) -> dict:
    """`jaxcompress.jobs.run` over the library's jobs and the benchmarks."""
    return jobs.run(config, workdir, ALL_JOBS, DISTILLING)


if __name__ == "__main__":
    import sys

    from absl import app, flags
    from ml_collections import config_flags

    from benchmarks import results

    def main(argv):
        """Runs the job, then files it as benchmarks/results/<config stem>.json (a failed job
        exits before: nothing is filed); `python -m benchmarks.report` regenerates the docs."""
        cli.run_job(ALL_JOBS, DISTILLING)
        name = results.results_name(config_flags.get_config_filename(flags.FLAGS["config"]))
        path = results.file_run(name, flags.FLAGS["workdir"].value, results.run_command(sys.argv))
        print(f"results: {path} (python -m benchmarks.report regenerates docs/RESULTS.md and the README block)")

    app.run(main, flags_parser=cli.parse_flags)
