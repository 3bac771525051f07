"""Config and CLI errors name the valid choices or range; missing paths are reported before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

import anomap
from anomap import cli
from anomap.config import build_config, check_device, load_yaml, parse_overrides
from anomap.errors import ConfigError
from anomap.methods.ssl_ae import SslAeConfig


@pytest.mark.parametrize(("item", "words"), [
    ("device=gpu", ["device='gpu'", "auto", "cpu", "cuda", "cuda:N"]),
    ("preset=big", ["preset='big'", "cpu", "paper"]),
    ("widht=16", ["unknown config key", "widht", "did you mean width"]),
    ("max_step=3", ["did you mean max_steps"]),
    ("max_steps=abc", ["max_steps='abc' is not a valid int", "whole number"]),
    ("max_steps=2.5", ["not a valid int"]),
    ("lr=fast", ["lr='fast' is not a valid float", "finite number"]),
    ("val_fraction=nan", ["val_fraction", "finite number"]),
    ("full_middle=maybe", ["full_middle='maybe'", "true or false"]),
    ("dilations=7", ["dilations=7", "list"]),
    ("device=[1, 2]", ["device=[1, 2]", "text"]),
    ("max_steps=-5", ["max_steps=-5", ">= 0"]),
    ("seed=-1", ["seed=-1", "in [0,"]),
    ("target_fpr=1.5", ["target_fpr=1.5", "in (0, 1)", "e.g. target_fpr=0.05"]),
    ("val_fraction=0", ["val_fraction=0", "in (0, 1)"]),
    ("min_heldout=0", ["min_heldout=0", ">= 1"]),
    ("eval_size=8", ["eval_size=8", "in [16, 4096]"]),
    ("num_threads=-1", ["num_threads=-1", ">= 0"]),
    ("checkpoint_every=-1", ["checkpoint_every=-1", ">= 0"]),
    ("image_size=100", ["image_size=100", "multiple of 16"]),
])
def test_bad_values_name_the_valid_choices(item: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(SslAeConfig, parse_overrides([item], prefix="ssl_ae"))
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:1", "mps", " CPU "])
def test_device_names_accepted(name: str) -> None:
    assert check_device(name) == name.strip().lower()


def test_yaml_errors_name_keys_and_types(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("ssl_ae:\n  withd: 16\n")
    with pytest.raises(ConfigError, match="did you mean width instead of withd"):
        build_config(SslAeConfig, load_yaml(p, prefix="ssl_ae"))
    p.write_text("max_steps: [1, 2]\n")
    with pytest.raises(ConfigError, match="max_steps=.* is not a valid int"):
        build_config(SslAeConfig, load_yaml(p, prefix="ssl_ae"))
    p.write_text("max_steps: true\n")
    with pytest.raises(ConfigError, match="max_steps=True is not a valid int"):
        build_config(SslAeConfig, load_yaml(p, prefix="ssl_ae"))
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(p)
    p.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(p)


def _line(argv: list, capsys) -> str:
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("anomap: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a detector is created, loaded or trained."""

    def boom(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(anomap, "create", boom)
    monkeypatch.setattr(anomap, "load", boom)
    monkeypatch.setattr(anomap.Detector, "fit", boom)
    from anomap.runtime import backend

    monkeypatch.setattr(backend, "load_backend", boom)


def test_fit_config_errors_through_the_cli(tmp_path, capsys, monkeypatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(anomap.Detector, "fit", lambda *a, **k: pytest.fail("trained despite a bad config"))
    err = _line(["fit", "--data", data, "--out", tmp_path / "m.safetensors", "--set", "device=gpu"], capsys)
    assert "auto, cpu, cuda" in err
    err = _line(["fit", "--data", data, "--out", tmp_path / "m.safetensors", "--device", "tpu"], capsys)
    assert "device='tpu'" in err
    err = _line(["fit", "--data", data, "--out", tmp_path / "m.safetensors", "--set", "preset=big"], capsys)
    assert "preset=cpu or preset=paper" in err
    err = _line(["fit", "--method", "ssl_ae", "--data", data, "--out", tmp_path / "m.safetensors",
                 "--set", "gtrans.tr_dim=3"], capsys)
    assert "belongs to method 'gtrans'" in err
    err = _line(["fit", "--method", "sslae", "--data", data, "--out", tmp_path / "m.safetensors"], capsys)
    assert "ssl_ae" in err
    err = _line(["fit", "--data", data, "--out", tmp_path / "m.safetensors", "--config", tmp_path / "no.yaml"],
                capsys)
    assert "config file not found" in err


def test_fit_paths_are_checked_before_any_work(tmp_path, capsys, no_work) -> None:
    missing = tmp_path / "no_such_data"
    err = _line(["fit", "--data", missing, "--out", tmp_path / "m.safetensors"], capsys)
    assert str(missing) in err and "folder not found" in err
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    err = _line(["fit", "--data", a_file, "--out", tmp_path / "m.safetensors"], capsys)
    assert "is not a folder" in err
    data = tmp_path / "data"
    data.mkdir()
    out_dir = tmp_path / "existing_dir"
    out_dir.mkdir()
    err = _line(["fit", "--data", data, "--out", out_dir], capsys)
    assert str(out_dir) in err and "is a folder" in err
    err = _line(["fit", "--data", data, "--out", a_file / "m.safetensors"], capsys)
    assert "is a file, not a folder" in err


def test_predict_and_evaluate_paths_are_checked_before_any_work(tmp_path, capsys, no_work) -> None:
    data = tmp_path / "data"
    data.mkdir()
    img = data / "x.png"
    img.write_bytes(b"\x89PNG")
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"")
    missing_model = tmp_path / "nope.safetensors"
    err = _line(["predict", "--model", missing_model, img], capsys)
    assert str(missing_model) in err and "model file not found" in err
    err = _line(["predict", "--model", model, tmp_path / "missing.png"], capsys)
    assert "input not found" in err
    err = _line(["predict", "--model", model, img, "--device", "gpu"], capsys)
    assert "auto, cpu, cuda" in err
    for cmd in ("evaluate", "report"):
        extra = ["--out", tmp_path / "r.html"] if cmd == "report" else []
        err = _line([cmd, "--model", model, "--data", tmp_path / "missing", *extra], capsys)
        assert "folder not found" in err and str(tmp_path / "missing") in err
        err = _line([cmd, "--model", missing_model, "--data", data, *extra], capsys)
        assert "model file not found" in err
        err = _line([cmd, "--model", model, "--data", data, "--device", "gpu", *extra], capsys)
        assert "auto, cpu, cuda" in err
    err = _line(["evaluate", "--model", model, "--data", data, "--out", img / "metrics.json"], capsys)
    assert "is a file, not a folder" in err
