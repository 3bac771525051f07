import pytest

import anomap
from anomap.config import build_config, load_yaml, parse_overrides
from anomap.errors import ConfigError
from anomap.methods.ssl_ae import SslAeConfig
from anomap.registry import register


def test_defaults_and_paper_preset():
    cpu = build_config(SslAeConfig, {})
    paper = build_config(SslAeConfig, {"preset": "paper"})
    assert (cpu.image_size, cpu.width, cpu.epochs) == (128, 32, 30)
    assert (paper.image_size, paper.width, paper.epochs, paper.lr) == (256, 64, 300, 2e-4)
    # explicit values beat the preset
    assert build_config(SslAeConfig, {"preset": "paper", "image_size": 128}).image_size == 128


def test_overrides_are_parsed_and_typed():
    vals = parse_overrides(["max_steps=500", "ssl_ae.dilations=[1, 2]", "lr=2e-4", "full_middle=true"],
                           prefix="ssl_ae")
    cfg = build_config(SslAeConfig, vals)
    assert cfg.max_steps == 500 and cfg.dilations == [1, 2] and cfg.lr == 2e-4 and cfg.full_middle is True


@pytest.mark.parametrize("items,match", [
    (["nonsense=1"], "unknown config key"),
    (["max_steps=abc"], "max_steps='abc' is not a valid int"),
    (["image_size=100"], "image_size=100"),
    (["gtrans.tr_dim=3"], "belongs to method 'gtrans'"),
    (["noequals"], "key=value"),
])
def test_bad_overrides_raise(items, match):
    with pytest.raises(ConfigError, match=match):
        build_config(SslAeConfig, parse_overrides(items, prefix="ssl_ae"))


def test_yaml_nested_under_method(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: ssl_ae\nseed: 3\nssl_ae:\n  width: 16\n")
    assert load_yaml(p, prefix="ssl_ae") == {"seed": 3, "width": 16}
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_registry():
    assert "ssl_ae" in anomap.list_methods()
    with pytest.raises(ConfigError, match="unknown method 'nope'.*ssl_ae"):
        anomap.create("nope")
    with pytest.raises(ValueError, match="already registered"):
        register("ssl_ae")(type("Other", (), {}))
