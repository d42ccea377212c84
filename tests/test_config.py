"""Typed config: defaults <- YAML <- dotted overrides; unknown keys and wrong types are named."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from rag_e2e.config import ConfigError, load_config, save_config


@dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10


@dataclass
class Run:
    name: str = "x"
    kind: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    ckpt: Optional[str] = None
    optim: Optim = field(default_factory=Optim)
    flag: bool = False


def test_defaults_yaml_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\noptim:\n  lr: 0.5\n")
    cfg = load_config(Run, p, ["optim.steps=7", "kind=b", "tags=[u, v]", "flag=true"])
    assert cfg == Run(name="y", kind="b", tags=["u", "v"], optim=Optim(lr=0.5, steps=7), flag=True)
    assert load_config(Run, p, ["optim.lr=2"]).optim.lr == 2.0  # int accepted where a float is expected
    assert load_config(Run, p, ["optim.lr=1e-3"]).optim.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], r"unknown config key optim.lrr"),
    (["nmae=z"], r"unknown config key nmae"),
    (["optim.steps=1.5"], r"optim.steps: expected an integer"),
    (["kind=c"], r"kind: 'c' is not one of \['a', 'b'\]"),
    (["flag=3"], r"flag: expected true/false"),
    (["optim=3"], r"optim: expected a mapping"),
    (["oops"], r"not of the form key.path=value"),
])
def test_errors_name_the_key(tmp_path, overrides, message):
    p = tmp_path / "c.yaml"
    p.write_text("name: y\n")
    with pytest.raises(ConfigError, match=message):
        load_config(Run, p, overrides)


def test_error_names_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"c.yaml: optim.lr: expected a number"):
        load_config(Run, p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Run, tmp_path / "missing.yaml")
