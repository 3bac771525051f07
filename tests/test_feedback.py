"""The operator-feedback store: round trip, idempotent retries, bounds, threads, and kill -9 at every point
of a write (the record is whole once ``add`` returned, and never half-visible before)."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomap.data.images import load_image
from anomap.errors import AnomapError, ConfigError, DataError
from anomap.feedback import VERDICTS, FeedbackFull, FeedbackStore, model_hash
from anomap.train.checkpoint import save_checkpoint, stored_hash


def png(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _visible(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".lock")


def test_add_and_records_round_trip(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    a, b, c = png(0), png(1), png(2)
    ra = store.add(a, "normal", label="line1/part.PNG", model_sha256="m1", score=0.7)
    rb = store.add(b, "anomalous", label="scratch.jpg")
    rc = store.add(c, "normal", label="../../evil.exe", score=float("nan"))
    assert VERDICTS == ("normal", "anomalous")
    fresh = FeedbackStore(tmp_path / "fb")  # what a new process sees
    assert fresh.records() == [ra, rb, rc] and len(fresh) == 3  # oldest first
    assert fresh.records("normal") == [ra, rc] and fresh.records("anomalous") == [rb]
    assert (ra.verdict, ra.model_sha256, ra.label, ra.score, ra.sha256) == ("normal", "m1", "line1/part.PNG", 0.7,
                                                                             _sha(a))
    assert ra.image_path.parent == tmp_path / "fb" and ra.image_path.suffix == ".png"
    assert rb.image_path.suffix == ".jpg" and rc.image_path.suffix == ".bin"  # the label is never a path
    assert rc.score is None and rc.model_sha256 is None and rc.label == "../../evil.exe"
    for rec, data in ((ra, a), (rb, b), (rc, c)):
        assert rec.image_path.read_bytes() == data
        assert load_image(rec.image_path).shape == (8, 8, 3)  # anomap's loader reads every stored image
        assert rec.id.endswith(rec.verdict) and "/" not in rec.id
    assert fresh.size_bytes() == sum(p.stat().st_size for p in (tmp_path / "fb").iterdir() if p.name != ".lock")
    assert rc.to_dict()["image_path"] == str(rc.image_path)
    with pytest.raises(ConfigError, match="normal, anomalous"):
        fresh.records("defect")


def test_a_retry_gives_back_the_stored_record(tmp_path):
    store = FeedbackStore(tmp_path)
    first = store.add(png(0), "normal", label="a.png", score=1.0)
    again = store.add(png(0), "normal", label="renamed.png", score=2.0)  # a client retrying after a timeout
    assert again == first and len(store) == 1
    other = store.add(png(0), "anomalous", label="a.png")  # the other verdict on the same image is a new record
    assert other.id != first.id and other.sha256 == first.sha256 and len(store) == 2


def test_bounds_raise_feedback_full_and_keep_what_is_stored(tmp_path):
    store = FeedbackStore(tmp_path / "fb", max_items=2)
    kept = [store.add(png(i), "normal") for i in range(2)]
    with pytest.raises(FeedbackFull) as err:
        store.add(png(9), "normal")
    msg = str(err.value)
    assert isinstance(err.value, AnomapError) and "\n" not in msg
    assert str(tmp_path / "fb") in msg and "full" in msg and "Fix:" in msg and "anomap update" in msg
    assert store.records() == kept
    assert store.add(png(0), "normal") == kept[0]  # a retry of a stored record is answered even when full

    small = FeedbackStore(tmp_path / "small", max_bytes=len(png(0)) + 1500)
    small.add(png(0), "normal")
    with pytest.raises(FeedbackFull, match="MB"):
        small.add(png(1), "normal")
    assert len(small) == 1 and len(_visible(tmp_path / "small")) == 2
    with pytest.raises(ConfigError, match="positive"):
        FeedbackStore(tmp_path / "x", max_items=0)


def test_bad_inputs_are_one_line_errors(tmp_path):
    store = FeedbackStore(tmp_path)
    with pytest.raises(ConfigError) as err:
        store.add(png(0), "ok")
    assert "\n" not in str(err.value) and "normal, anomalous" in str(err.value) and "Fix:" in str(err.value)
    with pytest.raises(DataError, match="empty"):
        store.add(b"", "normal")
    with pytest.raises(DataError, match="not found"):
        FeedbackStore(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists() and len(store) == 0


def test_damaged_records_are_not_listed(tmp_path):
    store = FeedbackStore(tmp_path)
    ok = store.add(png(0), "normal")
    cut = store.add(png(1), "normal")
    cut.image_path.write_bytes(cut.image_path.read_bytes()[:10])  # an image cut short after the commit
    (tmp_path / "garbage.json").write_text("{not json")
    assert store.records() == [ok]
    assert store.add(png(1), "normal").image_path.read_bytes() == png(1)  # sending it again repairs it


def test_threads_and_two_stores_lose_nothing(tmp_path):
    stores = [FeedbackStore(tmp_path), FeedbackStore(tmp_path)]  # two objects: the file lock, not only threads
    images = [png(i) for i in range(24)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(k % 3, len(images), 3):  # every image is sent by two threads
                stores[k % 2].add(images[i], "normal", label=f"{i}.png")
                stores[k % 2].add(images[i], "anomalous", label=f"{i}.png")
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    recs = FeedbackStore(tmp_path).records()
    assert len(recs) == 2 * len(images) == len({r.id for r in recs})
    assert all(_sha(r.image_path.read_bytes()) == r.sha256 for r in recs)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


_CHILD = """
import os, signal, sys, time
from anomap.feedback import FeedbackStore
root, hang_at = sys.argv[1], int(sys.argv[3])
with open(sys.argv[2], "rb") as f:
    data = f.read()
if hang_at:  # stop inside the write: the fsync of the image's temp file (1) or of the record's (3)
    real, calls = os.fsync, [0]
    def fsync(fd):
        calls[0] += 1
        if calls[0] == hang_at:
            print("writing", flush=True)
            time.sleep(600)
        real(fd)
    os.fsync = fsync
store = FeedbackStore(root)
store.add(data, "normal", label="part.png", model_sha256="abc", score=0.5)
os.kill(os.getpid(), signal.SIGKILL)  # after the write, before the acknowledgement
"""


def _child(root: Path, data: bytes, hang_at: int) -> subprocess.Popen:
    src = root.parent / "upload.bin"
    src.write_bytes(data)
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(src), str(hang_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_feedback_survives_a_kill_9_between_write_and_acknowledgement(tmp_path):
    data = png(5, size=32)
    proc = _child(tmp_path / "fb", data, 0)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-800:]
    recs = FeedbackStore(tmp_path / "fb").records()
    assert len(recs) == 1
    assert recs[0].image_path.read_bytes() == data and recs[0].sha256 == _sha(data)
    assert (recs[0].verdict, recs[0].model_sha256, recs[0].score) == ("normal", "abc", 0.5)


@pytest.mark.parametrize("hang_at", [1, 3], ids=["image-temp", "record-temp"])
def test_a_kill_9_mid_write_leaves_no_visible_half_record(tmp_path, hang_at):
    root, data = tmp_path / "fb", png(6, size=32)
    proc = _child(root, data, hang_at)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"writing\n", proc.stderr.read().decode()[-800:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    left = _visible(root)
    assert any(n.endswith(".tmp") for n in left)  # the crash left a temp file (and, at 3, the image)
    store = FeedbackStore(root)  # a fresh store: nothing half-written is listed, and the debris is gone
    assert store.records() == [] and len(store) == 0 and store.size_bytes() == 0
    assert _visible(root) == []
    rec = store.add(data, "normal", label="part.png")  # the client's retry stores it whole
    assert store.records() == [rec] and rec.image_path.read_bytes() == data


def test_model_hash_reads_the_stored_content_hash(tmp_path):
    path = save_checkpoint(tmp_path / "m.safetensors", {"w": torch.arange(4.0)}, {"kind": "model"})
    assert model_hash(path) == stored_hash(path) and len(model_hash(path)) == 64
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    assert model_hash(copy) == model_hash(path)
    other = save_checkpoint(tmp_path / "o.safetensors", {"w": torch.arange(5.0)}, {"kind": "model"})
    assert model_hash(other) != model_hash(path)
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really onnx")
    assert model_hash(onnx) == _sha(b"not really onnx")
