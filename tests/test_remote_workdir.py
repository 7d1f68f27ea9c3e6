"""Remote workdirs (issue 19): a run's writers go through `jaxcompress.files`
(`etils.epath`), so `--workdir=gs://bucket/run` writes into the bucket.

`gs://bucket/...` is mocked onto a local folder with `epath.testing.mock_epath`, with an
object store's limits: no append (opening a gs:// object in "a" mode fails). Orbax's own
gs:// support (tensorstore) cannot be mocked offline; the checksum manifests around it are.
"""
import json
import os

import numpy as np
import pytest
from etils import epath

from jaxcompress import files
from jaxcompress.train.checkpoint import MANIFEST, verify_manifest, write_manifest
from jaxcompress.train.metrics import MetricWriter, read_metrics, write_json

PREFIX = "gs://bucket/"


@pytest.fixture
def bucket(tmp_path):
    """`gs://bucket/<p>` is `<tmp_path>/bucket/<p>`; yields that local folder."""
    root = tmp_path / "bucket"
    root.mkdir()
    opened = []

    def local(p):
        p = os.fspath(p)
        return os.path.join(root, p[len(PREFIX):]) if p.startswith(PREFIX) else p

    def remote(p):
        p = os.fspath(p)
        return PREFIX + os.path.relpath(p, root) if p.startswith(os.fspath(root)) else p

    def one(original, path, *args, **kwargs):
        return original(local(path), *args, **kwargs)

    def two(original, path, dst, **kwargs):
        return original(local(path), local(dst), **kwargs)

    def open_(original, path, mode):
        if os.fspath(path).startswith(PREFIX):
            opened.append((os.fspath(path), mode))
            if "a" in mode:
                raise OSError("an object store has no append")
        return original(local(path), mode)

    def glob(original, pattern):
        return [remote(p) for p in original(local(pattern))]

    def walk(original, top, **kwargs):
        for d, dirs, names in original(local(top), **kwargs):
            yield remote(d), dirs, names

    fns = {n: one for n in ("exists", "isdir", "listdir", "makedirs", "mkdir", "remove", "rmtree", "stat")}
    with epath.testing.mock_epath(open=open_, glob=glob, walk=walk, rename=two, replace=two, copy=two, **fns):
        yield root, opened


def test_json_and_metrics_are_written_into_the_bucket_without_append(bucket, tmp_path, monkeypatch):
    root, opened = bucket
    monkeypatch.chdir(tmp_path)  # a local folder named "gs:" would appear here
    run = PREFIX + "runs/a"
    write_json(run + "/summary.json", {"accuracy": np.float32(0.5), "widths": np.arange(3)})
    assert json.loads((root / "runs/a/summary.json").read_text()) == {"accuracy": 0.5, "widths": [0, 1, 2]}
    writer = MetricWriter(run, tensorboard=False)
    writer.write(1, loss=2.0, val={"accuracy": 0.25})
    writer.write(2, loss=1.5)
    lines = (root / "runs/a/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, 2.0), (2, 1.5)]
    assert read_metrics(run)[0]["val"] == {"accuracy": 0.25}
    assert not any("a" in mode for _, mode in opened)
    assert not os.path.exists(tmp_path / "gs:") and not os.path.exists("gs:")
    assert not (root / "runs/a/summary.json.tmp").exists()  # moved over the target


def test_append_is_a_real_append_on_a_local_disk(tmp_path):
    path = tmp_path / "m.jsonl"
    files.append_text(path, "a\n")
    files.append_text(path, "b\n")
    assert path.read_text() == "a\nb\n"


def test_checksum_manifests_of_a_remote_checkpoint_step(bucket):
    root, _ = bucket
    step = root / "ckpt" / "7"
    (step / "state").mkdir(parents=True)
    (step / "state" / "data.bin").write_bytes(b"\x01\x02\x03")
    (step / "meta.json").write_text("{}")
    remote = PREFIX + "ckpt/7"
    write_manifest(remote)
    doc = json.loads((step / MANIFEST).read_text())
    assert sorted(doc["body"]["files"]) == ["meta.json", "state/data.bin"]
    assert doc["body"]["files"]["state/data.bin"]["bytes"] == 3
    assert verify_manifest(remote) is None
    (step / "state" / "data.bin").write_bytes(b"\x01\x02\x04")
    assert verify_manifest(remote) == "file state/data.bin does not match its checksum"
    (step / "state" / "data.bin").unlink()
    assert verify_manifest(remote) == "file state/data.bin is missing"


def test_policy_file_round_trip_in_the_bucket(bucket, zoo):
    from jaxcompress.quant.policy import read_policy, write_policy
    root, _ = bucket
    table = zoo.table("lenet5")
    bits = {layer.path: 4 for layer in table.layers}
    write_policy(PREFIX + "q/bits_policy.json", bits, model="lenet5")
    assert (root / "q/bits_policy.json").exists()
    assert read_policy(PREFIX + "q/bits_policy.json", table, "lenet5")["bits_w"] == bits


def test_a_remote_workdir_is_not_locked_and_says_so(bucket, caplog):
    from jaxcompress.workdir_lock import workdir_lock
    with workdir_lock(PREFIX + "runs/b") as lock:
        assert lock is None
    assert "is remote: it is not locked" in caplog.text
