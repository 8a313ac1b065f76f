"""launch/install.sh into an environment that already has a working torch + torchvision keeps that
pair (no second multi-GB torch) and says so; the project's own install does not replace it either."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
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
    r = subprocess.run(["bash", str(repo / "launch" / "install.sh")], env={"PATH": "/usr/bin:/bin", "VENV": str(venv),
                       "HOME": str(tmp_path)}, capture_output=True, text=True, timeout=840)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert f"reusing torch {torch.__version__}" in log and "installing torch==" not in log, log
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import torch, beit; print(torch.__file__); print(beit.__file__)"],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert out[0] == torch.__file__                     # the same torch, not a new copy in the environment
    assert out[1].startswith(str(repo))                 # the project itself was installed (editable) there
    assert not list(Path(site).glob("torch-*.dist-info"))
    assert (repo / ".beit_python").read_text().strip() == str(venv / "bin" / "python")
