"""The ``beit`` console script: every subcommand reaches its module's options."""
import subprocess
import sys

import pytest

from beit.cli import COMMANDS, EXAMPLES, main


def test_usage_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"beit {name}" in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    try:
        code = main([*name.split(), "--help"])
    except SystemExit as e:
        code = e.code
    assert code == 0
    out = capsys.readouterr().out
    assert "--" in out
    assert f"example: {EXAMPLES[name]}" in out  # one example each, shown first
    assert "default" in out, "the options' defaults are not shown: use beit.config's parser or DefaultsHelpFormatter"


def test_unknown_command_suggests(capsys):
    assert main(["pretrian"]) == 2
    assert "did you mean 'beit pretrain'" in capsys.readouterr().err


def test_group_without_subcommand_lists_choices(capsys):
    assert main(["tokenizer"]) == 2
    assert "train" in capsys.readouterr().err


def test_console_script_installed():
    """The installed ``beit`` script (pyproject [project.scripts]) runs."""
    import shutil
    from pathlib import Path

    exe = Path(sys.executable).with_name("beit")
    script = str(exe) if exe.exists() else shutil.which("beit")
    assert script, "the beit console script is not installed: pip install -e ."
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "beit pretrain" in out.stdout


def test_module_help_exits_zero():
    for mod in ("beit.data.shards", "beit.tokenizers.train"):
        out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (mod, out.stderr)
        assert "usage" in out.stdout
