"""The config system: YAML < command line, type checks, unknown keys, save/load round trip."""
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from beit.config import ConfigError, field, load_yaml, parse_config, save_config


@dataclass
class Toy:
    lr: float = field(1e-3, help="learning rate")
    steps: int = field(10, help="optimizer steps")
    name: str = "run"
    resume: Optional[str] = None
    grid: tuple[int, int] = (14, 14)
    amp: bool = False

    def validate(self):
        if self.steps <= 0:
            raise ValueError("steps must be positive")


def test_precedence_defaults_yaml_cli(tmp_path):
    y = tmp_path / "a.yaml"
    y.write_text("lr: 0.5\nsteps: 3\ngrid: [7, 7]\n")
    cfg = parse_config(Toy, ["--config", str(y), "--steps", "4", "--amp", "true", "--name", "1e-3"])
    assert cfg == Toy(lr=0.5, steps=4, name="1e-3", resume=None, grid=(7, 7), amp=True)


def test_dashes_and_comma_lists():
    cfg = parse_config(Toy, ["--grid", "4,6", "--resume", "null"])
    assert cfg.grid == (4, 6) and cfg.resume is None


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1.5"], "steps: expected an integer"),
    (["--lr", "fast"], "lr: expected a number"),
    (["--amp", "maybe"], "amp: expected true/false"),
    (["--grid", "1,2,3"], "grid: expected 2 values"),
    (["--steps", "0"], "steps must be positive"),
])
def test_bad_values_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(Toy, argv)
    assert message in capsys.readouterr().err


def test_unknown_yaml_key_names_valid_options(tmp_path):
    y = tmp_path / "b.yaml"
    y.write_text("learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match="unknown option.*learning_rate.*Valid options: lr"):
        load_yaml(Toy, y)


def test_save_load_round_trip(tmp_path):
    cfg = Toy(lr=0.25, steps=7, grid=(3, 5), amp=True)
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_yaml(Toy, path) == cfg
    assert not list(Path(path.parent).glob("*.tmp"))


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        parse_config(Toy, ["--help"])
    out = capsys.readouterr().out
    for name in ("--lr", "--steps", "--name", "--resume", "--grid", "--amp", "learning rate"):
        assert name in out


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("launch/accelerate/*.yaml")))
def test_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.num_machines >= 1
