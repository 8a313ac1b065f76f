"""launch/install.sh into an environment that already has a working torch + torchvision keeps that
pair (no second multi-GB torch) and says so; the project's own install does not replace it either. It
installs the tested versions of launch/constraints.txt (and says so), and BEIT_CONSTRAINTS / another Python
leave them out."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_install(repo: Path, venv: Path, home: Path, **env) -> tuple[int, str]:
    r = subprocess.run(["bash", str(repo / "launch" / "install.sh")], env={"PATH": "/usr/bin:/bin", "VENV": str(venv),
                       "HOME": str(home), **env}, capture_output=True, text=True, timeout=840)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_install_sh_reuses_the_torch_it_finds(tmp_path):
    import torch

    repo = tmp_path / "repo"  # a copy, so the run does not rewrite this checkout's .beit_python
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                              "__pycache__", ".beit_python"))
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the new environment sees this one's packages (torch included), as a user's conda/venv with torch would
    site = subprocess.run([str(venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    import torchvision
    seen = [str(Path(m.__file__).resolve().parents[1]) for m in (torch, torchvision)]
    seen += [p for p in sys.path if p.endswith("site-packages") and p not in seen]  # the project's other dependencies
    Path(site, "_outer_packages.pth").write_text("\n".join(seen) + "\n")
    rc, log = run_install(repo, venv, tmp_path)
    assert rc == 0, log[-4000:]
    assert f"reusing torch {torch.__version__}" in log and "installing torch==" not in log, log
    assert "versions: as tested, from launch/constraints.txt" in log, log
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import torch, beit; print(torch.__file__); print(beit.__file__)"],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert out[0] == torch.__file__                     # the same torch, not a new copy in the environment
    assert out[1].startswith(str(repo))                 # the project itself was installed (editable) there
    assert not list(Path(site).glob("torch-*.dist-info"))
    assert (repo / ".beit_python").read_text().strip() == str(venv / "bin" / "python")

    versions = subprocess.run([str(venv / "bin" / "python"), "launch/freeze_constraints.py", "--versions"], cwd=repo,
                              capture_output=True, text=True, check=True).stdout
    assert "launch/constraints.txt: all" in versions and "pinned versions installed" in versions, versions

    # the file really goes to pip: an impossible pin stops the install, with the way out
    bad = tmp_path / "bad.txt"
    bad.write_text("pillow==0.0.0\n")
    rc, log = run_install(repo, venv, tmp_path, BEIT_CONSTRAINTS=str(bad))
    assert rc != 0 and f"could not install the tested versions of {bad}" in log, log[-3000:]
    assert "BEIT_CONSTRAINTS=none installs the newest" in log
    # opting out, and a Python the pins were not tested on, install without them
    rc, log = run_install(repo, venv, tmp_path, BEIT_CONSTRAINTS="none")
    assert rc == 0 and "BEIT_CONSTRAINTS=none: the newest versions" in log, log[-3000:]
    pins = repo / "launch" / "constraints.txt"
    pins.write_text(pins.read_text().replace("# python: ", "# python: 2.") + "pillow==0.0.0\n")
    rc, log = run_install(repo, venv, tmp_path)
    assert rc == 0 and "was tested on Python 2." in log and "installing the newest versions instead" in log, log[-3000:]


def test_readme_names_the_tested_versions_of_the_constraints_file():
    import re
    pins_text = (ROOT / "launch" / "constraints.txt").read_text()
    pins = dict(line.split("==", 1) for line in pins_text.splitlines() if "==" in line and not line.startswith("#"))
    readme = " ".join((ROOT / "README.md").read_text().split())
    said = re.search(r"`launch/constraints.txt` \((\d+) exact pins.*?tested on Python ([\d.]+), (\w+), with (.*?)\)\.",
                     readme)
    assert said, "the README's install paragraph no longer names the tested versions"
    assert int(said.group(1)) == len(pins)
    assert f"# python: {said.group(2)}" in pins_text and f"# machine: {said.group(3)} " in pins_text
    named = dict(re.findall(r"([A-Za-z][\w.-]*) (\d[\w.]*)", said.group(4)))
    assert {"torch", "torchvision", "timm", "Pillow", "numpy"} <= set(named), named
    install = (ROOT / "launch" / "install.sh").read_text()
    assert f'PAIR="torch=={named.pop("torch")} torchvision=={named.pop("torchvision")}"' in install
    assert all(pins[name.lower()] == version for name, version in named.items()), (named, pins)
