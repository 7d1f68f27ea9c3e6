"""The published results are generated from benchmarks/results/*.json: docs/RESULTS.md and
README.md's results block equal what `python -m benchmarks.report` writes from them, so a
figure in the docs is always one a results file holds."""
import datetime
import json
import os

import pytest

from benchmarks import report, results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


def _read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def _files():
    return sorted(n for n in os.listdir(RESULTS_DIR) if n.endswith(".json"))


def test_results_md_is_generated_from_the_results_files():
    expected = report.render_results_md(results.load_results(RESULTS_DIR))
    assert _read("docs", "RESULTS.md") == expected, "docs/RESULTS.md is stale: run python -m benchmarks.report"


def test_readme_results_block_is_generated_from_the_results_files():
    readme = _read("README.md")
    expected = report.render_readme_block(results.load_results(RESULTS_DIR))
    assert report.readme_block(readme) == expected, \
        "README.md's results block is stale: run python -m benchmarks.report"
    assert report.replace_block(readme, expected) == readme  # what the report writes is what is committed


def test_readme_links_every_result_to_its_section():
    readme, results_md = _read("README.md"), _read("docs", "RESULTS.md")
    for r in results.load_results(RESULTS_DIR):
        assert f"](docs/RESULTS.md#{report.slug(r['title'])})" in readme
        assert f"\n## {r['title']}\n" in results_md


@pytest.mark.parametrize("name", _files())
def test_every_results_file_has_the_schema_fields_and_a_date(name):
    with open(os.path.join(RESULTS_DIR, name)) as f:
        record = json.load(f)
    assert list(record) == list(results.FIELDS)
    results.validate(record)
    assert record["name"] + ".json" == name
    assert datetime.date.fromisoformat(record["date"]) <= datetime.date.today() + datetime.timedelta(days=1)
    if record["source"] != "measured":  # migrated: dated by the commit that first wrote the figure
        assert record["source"].endswith(f"first written {record['date']}")


def test_validate_rejects_a_record_without_a_date_or_with_a_bad_outcome():
    good = results.make_record(name="x", title="X", command="python -m benchmarks.run", machine="m",
                               date="2026-12-04", targets=[dict(what="a", target=">= 1", measured="2", met=True)])
    with pytest.raises(ValueError, match="lacks date"):
        results.validate({k: v for k, v in good.items() if k != "date"})
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        results.validate({**good, "date": "04/12/2026"})
    with pytest.raises(ValueError, match="met"):
        results.validate({**good, "targets": [dict(what="a", target=">= 1", measured="2", met="yes")]})
    with pytest.raises(ValueError, match="source"):
        results.validate({**good, "source": "from memory"})


def test_from_summary_keeps_numbers_and_tabulates_scalars():
    summary = {"job": "bench_x", "accuracy": 0.9912, "steps": 120, "ok": True, "nan": float("nan"),
               "latency_ms": {"dense": 12.5, "pruned": 7.25, "note": "batch 128"},
               "widths": [4, 12], "rows": [{"a": 1}], "empty": {}}
    record = results.from_summary("bench_x", summary, "python -m benchmarks.run --config=x.py --workdir=w",
                                  machine="test machine", date="2026-12-04")
    assert record == {
        "name": "bench_x", "title": "bench_x", "command": "python -m benchmarks.run --config=x.py --workdir=w",
        "machine": "test machine", "date": "2026-12-04", "source": "measured", "targets": [],
        "table": ("| figure | value |\n|---|---|\n| accuracy | 0.9912 |\n| steps | 120 |\n"
                  "| latency_ms.dense | 12.5 |\n| latency_ms.pruned | 7.25 |"),
        "notes": "",
        "figures": {"accuracy": 0.9912, "steps": 120, "latency_ms": {"dense": 12.5, "pruned": 7.25},
                    "widths": [4, 12], "rows": [{"a": 1}]},  # per-row figures kept, not tabulated
    }


def test_from_summary_uses_the_benchmarks_own_table_and_files_a_run(tmp_path):
    summary = {"job": "bench_peer_pruning", "table": "| a | b |\n|---|---|\n| 1 | 2 |", "ratio": 1.5}
    record = results.from_summary("peer", summary, "cmd", machine="m", date="2026-12-04")
    assert record["table"] == summary["table"] and record["figures"] == {"ratio": 1.5}

    workdir, out = tmp_path / "run", tmp_path / "results"
    workdir.mkdir()
    (workdir / "summary.json").write_text(json.dumps({"accuracy": 0.5}))
    (workdir / "results.md").write_text("| row | acc |\n|---|---|\n| x | 50% |\n")
    path = results.file_run("lenet", str(workdir), "python -m benchmarks.run --config=lenet.py", out)
    filed = results.load_results(out)
    assert path == out / "lenet.json" and [r["name"] for r in filed] == ["lenet"]
    assert filed[0]["table"] == "| row | acc |\n|---|---|\n| x | 50% |" and filed[0]["source"] == "measured"
    assert results.results_name("benchmarks/configs/stamp_cifar10.py:small") == "stamp_cifar10_small"
    assert results.results_name("benchmarks/configs/lenet5_mnist.py") == "lenet5_mnist"


def test_report_output_is_sorted_and_deterministic(tmp_path):
    base = dict(command="c", machine="m", date="2026-12-04", table="| a |\n|---|\n| 1 |",
                targets=[dict(what="speed-up", target=">= 2x", measured="1.5x", met=False)])
    for name, title in (("b_bench", "B bench"), ("a_bench", "A bench")):
        results.write_result(tmp_path, name=name, title=title, **base)
    records = results.load_results(tmp_path)
    md = report.render_results_md(records)
    assert md.index("## A bench") < md.index("## B bench")
    assert md == report.render_results_md(list(reversed(records)))
    block = report.render_readme_block(records)
    assert block.splitlines()[0] == ("- [A bench](docs/RESULTS.md#a-bench): speed-up: 1.5x (>= 2x: **missed**)")
    text = f"intro\n{report.BEGIN}\nold\n{report.END}\nrest\n"
    assert report.replace_block(text, block) == f"intro\n{report.BEGIN}\n{block}\n{report.END}\nrest\n"


def test_targets_are_judged_from_the_summary_and_a_replaced_record_is_kept(tmp_path):
    """A filed run carries the targets its judge computes (met and missed alike), and the
    record it replaces moves to history/."""
    from benchmarks import targets
    summary = dict(rows=[dict(model="lenet5", plain_step_ms=10.0, compressed_step_ms=10.5, ratio=1.05,
                              max_logit_diff=0.0),
                         dict(model="resnet20", plain_step_ms=100.0, compressed_step_ms=115.0, ratio=1.15,
                              max_logit_diff=1e-7)])
    got, table = targets.judge("layer_overhead", summary)
    assert [(t["measured"], t["met"]) for t in got] == [("1.050x", True), ("1.150x", False)]
    assert "| LeNet-5 | 10.50 ms | 10.00 ms | 1.050x |" in table
    assert targets.judge("no_such_benchmark", summary) == ([], None)
    inc = targets.prune_lenet5_mnist(dict(accuracy_dense=0.9928, accuracy_pruned=0.9912, params_removed=0.907,
                                          flops_left=0.193, widths_pruned=[4, 12, 60, 42]))[0]
    assert [t["met"] for t in inc] == [True, True, False] and inc[2]["measured"] == "+0.16"
    integer = dict(model="resnet20", accuracy_float=0.70, accuracy_quantized=0.6990, accuracy_integer=0.6989,
                   bytes_original_float32=1089896.0, bytes_quantized=280472.0, latency_batch=128,
                   latency_s=dict(original=0.200, exported=0.210), latency_integer_s=dict(fake_quant=0.25, integer=0.4))
    got, table = targets.judge("quant_integer_resnet20", integer)
    assert [(t["measured"], t["met"]) for t in got] == [("-0.01 points", False), ("0.50x", None)]
    assert "| ResNet-20 | 70.00% | 69.90% | 69.89% | 1,089,896 -> 280,472 | 200.0 / 250.0 / 400.0 ms | 0.50x" in table
    integer.update(accuracy_integer_auto=0.6989, latency_integer_s=dict(fake_quant=0.25, integer=0.4, integer_auto=0.16))
    got, _ = targets.judge("quant_integer_resnet20", integer)
    assert got[2]["measured"] == "1.25x (160.0 ms; accuracy the same)" and got[2]["met"] is None

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "results"
    first = results.file_run("layer_overhead", str(workdir), "python -m benchmarks.run x", out)
    record = json.loads(first.read_text())
    assert [t["met"] for t in record["targets"]] == [True, False] and record["figures"]["rows"][1]["ratio"] == 1.15
    results.file_run("layer_overhead", str(workdir), "python -m benchmarks.run y", out)
    history = list((out / "history").glob("layer_overhead-*.json"))
    assert len(history) == 1 and json.loads(history[0].read_text())["command"] == "python -m benchmarks.run x"
