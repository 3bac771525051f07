"""Checkpoint integrity: content hash, truncated/tampered/unhashed files, and no code execution on load."""

from __future__ import annotations

import ast
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import anomap
from anomap import cli
from anomap.errors import CheckpointError
from anomap.registry import get_method_class
from anomap.train import checkpoint as ckpt_mod
from anomap.train.checkpoint import FORMAT_VERSION, load_checkpoint, read_metadata, save_checkpoint


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(path: Path, header: dict, data: bytes) -> None:
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    path.write_bytes(len(hb).to_bytes(8, "little") + hb + data)


@pytest.fixture
def saved(tmp_path) -> Path:
    tensors = {"w": torch.randn(16, 16), "b": torch.arange(5), "flag": torch.tensor(True),
               "h": torch.ones(3, dtype=torch.bfloat16)}
    return save_checkpoint(tmp_path / "c.safetensors", tensors, {"kind": "model", "threshold": 0.5})


def _rejects(path: Path, needle: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and needle in msg, msg
    return msg


def test_round_trip_stores_and_checks_a_hash(saved) -> None:
    header, _ = _split(saved)
    meta = header["__metadata__"]
    assert meta["format_version"] == str(FORMAT_VERSION) == "2"
    assert len(meta["sha256"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified file gives no warning
        tensors, got = load_checkpoint(saved)
    assert got == {"kind": "model", "threshold": 0.5} and tensors["h"].dtype == torch.bfloat16
    # Same content -> same hash (canonical: independent of dict order).
    again = save_checkpoint(saved.parent / "d.safetensors", dict(reversed(list(tensors.items()))), got)
    assert _split(again)[0]["__metadata__"]["sha256"] == meta["sha256"]


@pytest.mark.parametrize("where", [0, 100, -1])
def test_a_flipped_byte_in_tensor_data_is_rejected(saved, where) -> None:
    header, data = _split(saved)
    data = bytearray(data)
    data[where] ^= 0x01
    _join(saved, header, bytes(data))
    _rejects(saved, "content hash mismatch")


@pytest.mark.parametrize("edit", ["metadata", "hash", "shape"])
def test_edited_header_is_rejected(saved, edit) -> None:
    header, data = _split(saved)
    meta = header["__metadata__"]
    if edit == "metadata":
        meta["anomap"] = meta["anomap"].replace("0.5", "0.9")
    elif edit == "hash":
        meta["sha256"] = "0" * 64
    else:  # same bytes read as another shape
        header["w"]["shape"] = [8, 32]
    _join(saved, header, data)
    _rejects(saved, "content hash mismatch")


def test_format_2_without_hash_is_rejected(saved) -> None:
    header, data = _split(saved)
    del header["__metadata__"]["sha256"]
    _join(saved, header, data)
    _rejects(saved, "no content hash")


@pytest.mark.parametrize("keep", [0, 7, 8, 60, 0.5, -1])
def test_truncated_files_are_rejected(saved, keep) -> None:
    raw = saved.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(raw) + keep)
    saved.write_bytes(raw[:n])
    _rejects(saved, "truncated")


@pytest.mark.parametrize("version", ["1", None])
def test_a_file_from_before_the_hash_is_refused_with_the_fix(tmp_path, version) -> None:
    legacy = tmp_path / "old.safetensors"
    header = {"anomap": json.dumps({"v": 1}), **({"format_version": version} if version else {})}
    save_file({"w": torch.ones(2)}, str(legacy), metadata=header)
    msg = _rejects(legacy, f"without a content hash (file format {version or 0}); this anomap reads format 2 only")
    assert "Fix: re-train it" in msg and "anomap.load(path).save(path)" in msg
    with pytest.raises(CheckpointError, match="without a content hash"):
        read_metadata(legacy)


def _model_file(tmp_path: Path, tiny_cfg: dict) -> Path:
    det = anomap.create("ssl_ae", **tiny_cfg)
    det.model = get_method_class("ssl_ae")(det.config, 3)
    det.channels = 3
    return det.save(tmp_path / "model.safetensors")


def test_tampered_model_is_rejected_by_load_and_the_cli(tmp_path, tiny_cfg, capsys) -> None:
    path = _model_file(tmp_path, tiny_cfg)
    anomap.load(path)  # intact: fine
    header, data = _split(path)
    header["__metadata__"]["anomap"] = header["__metadata__"]["anomap"].replace('"ssl_ae"', '"gtrans"', 1)
    _join(path, header, data)
    with pytest.raises(CheckpointError, match="content hash mismatch"):
        anomap.load(path)
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    assert cli.main(["predict", "--model", str(path), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "content hash mismatch" in err


def test_a_model_from_before_the_hash_is_refused_by_load_and_the_cli(tmp_path, tiny_cfg, capsys) -> None:
    path = _model_file(tmp_path, tiny_cfg)
    header, data = _split(path)
    del header["__metadata__"]["sha256"]
    header["__metadata__"]["format_version"] = "1"
    _join(path, header, data)
    with pytest.raises(CheckpointError, match="without a content hash"):
        anomap.load(path)
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    assert cli.main(["predict", "--model", str(path), str(img)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"anomap: error: {path}: written by a development version"), err
    assert "Fix: re-train it" in err


def test_loading_never_unpickles(tmp_path, tiny_cfg, monkeypatch) -> None:
    path = _model_file(tmp_path, tiny_cfg)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle/torch.load used while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    det = anomap.load(path)
    assert det.model is not None
    load_checkpoint(path)
    # And statically: the checkpoint module imports no pickle and calls no torch.load.
    tree = ast.parse(Path(ckpt_mod.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any("pickle" in n for n in names), names
        if isinstance(node, ast.Attribute) and node.attr == "load":
            assert not (isinstance(node.value, ast.Name) and node.value.id == "torch")
