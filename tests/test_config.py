"""resampler.config: dataclass <-> YAML with overrides; errors name the field."""

from dataclasses import dataclass, field

import pytest

from resampler.config import from_dict, load_config, parse_cli, save_config, to_dict


@dataclass
class Inner:
    lr: float = 1e-3
    sizes: tuple[int, int] = (2, 3)
    name: str | None = None


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_yaml_round_trip_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    save_config(Outer(steps=5, inner=Inner(lr=0.5, name="x")), path)
    cfg = load_config(Outer, path, ["inner.lr=1e-4", "flag=true", "inner.sizes=[4, 5]"])
    assert cfg == Outer(steps=5, flag=True, inner=Inner(lr=1e-4, sizes=(4, 5), name="x"))
    assert isinstance(cfg.inner.lr, float)  # YAML 1.1 reads 1e-4 as a string
    assert parse_cli(Outer, ["inner.name=null", "steps=3"]) == Outer(steps=3)
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"stepz": 1}, r"unknown config field\(s\) \['stepz'\]"),
        ({"inner": {"lrr": 1}}, r"inner\.lrr"),
        ({"steps": "many"}, r"steps: expected an int"),
        ({"flag": "yes"}, r"flag: expected true/false"),
        ({"inner": {"lr": "fast"}}, r"inner\.lr"),
        ({"inner": {"sizes": [1, 2, 3]}}, r"inner\.sizes: expected 2 items"),
        ({"inner": 3}, r"inner: expected a mapping"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises((TypeError, ValueError), match=message):
        from_dict(Outer, data)


def test_bad_override_syntax():
    with pytest.raises(ValueError, match="section.field=value"):
        parse_cli(Outer, ["steps"])
