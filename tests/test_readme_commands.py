"""The README's two commands are the ones CI and the demo test run: read out of the README, so the
README, .ci/run and the launch scripts cannot drift apart."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def two_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_shows_exactly_two_commands_and_ci_runs_the_test_one():
    demo, test = two_commands()
    assert (demo, test) == ("bash launch/demo.sh", "bash launch/test.sh")
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert any(ln.startswith(test) for ln in ci), ci            # CI runs the README's test command
    for cmd in (demo, test):
        script = ROOT / cmd.split()[1]
        body = script.read_text()
        assert "bash launch/install.sh" in body                 # both install first, as the README says
    assert "beit.demo" in (ROOT / "launch" / "demo.sh").read_text()
    assert "-m pytest" in (ROOT / "launch" / "test.sh").read_text()
