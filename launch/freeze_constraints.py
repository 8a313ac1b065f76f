"""Print launch/constraints.txt: the exact version of every package that ``pip install -e ".[dev]"`` put into the
environment running this script (the project's requirement closure), for launch/install.sh to install by default.
``--versions`` prints what is installed instead (launch/test.sh does, before the tests) and how it compares with
the constraints file.

torch, torchvision and torch's own requirements are left out: install.sh installs a matched torch/torchvision
pair for the machine (x86_64 or aarch64) or keeps a working pair it finds, and an old torch may pin its own
requirements (e.g. sympy) exactly. Run it in the environment that just passed ``bash launch/test.sh``:

    .venv/bin/python launch/freeze_constraints.py > launch/constraints.txt
"""
from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata

PROJECT, EXTRAS = "beit-pipeline", ("dev",)


def requirements(dist: metadata.Distribution, extras: tuple[str, ...] = ()) -> list:
    """``dist``'s requirements that apply here, with ``extras`` requested."""
    from packaging.requirements import Requirement
    out = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def closure(roots: list, skip: set[str]) -> dict[str, str]:
    """Canonical name -> installed version of ``roots`` and everything they require, ``skip`` not entered."""
    from packaging.utils import canonicalize_name
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in skip or name in found:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} (required as {req}) is not installed: run launch/install.sh first")
        found[name] = dist.version
        todo.extend(requirements(dist, tuple(req.extras)))
    return found


KEY = ("torch", "torchvision", "timm", "pillow", "numpy", "accelerate", "webdataset", "safetensors", "dall-e",
       "transformers", "onnxruntime", "scikit-learn", "scikit-image", "pytest")


def report_versions(constraints: str) -> None:
    """The versions about to be tested, and which pins of ``constraints`` they differ from."""
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"
    print(f"python {platform.python_version()} ({platform.machine()}); " +
          ", ".join(f"{n} {version(n)}" for n in KEY))
    try:
        lines = open(constraints).read().splitlines()
    except OSError:
        print(f"{constraints}: not found")
        return
    pins = dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))
    off = [f"{n} {version(n)} (pinned {v})" for n, v in sorted(pins.items()) if version(n) != v]
    print(f"{constraints}: " + (f"all {len(pins)} pinned versions installed" if not off else
                                f"{len(off)} of {len(pins)} pins differ: {', '.join(off)}"))


def main() -> None:
    if sys.argv[1:2] == ["--versions"]:
        return report_versions(sys.argv[2] if len(sys.argv) > 2 else "launch/constraints.txt")
    from packaging.requirements import Requirement
    torch_side = closure([Requirement("torch")], set())
    torch_side["torchvision"] = metadata.version("torchvision")
    pins = closure(requirements(metadata.distribution(PROJECT), EXTRAS), set(torch_side) | {PROJECT})
    py = "%d.%d" % sys.version_info[:2]
    print(f"# Exact versions the test suite passed with, written by launch/freeze_constraints.py on "
          f"{datetime.date.today()}.\n"
          f"# launch/install.sh installs with them by default (BEIT_CONSTRAINTS=none: newest versions instead).\n"
          f"# Not pinned: torch, torchvision and torch's own requirements; install.sh pairs them (tested: "
          f"torch {torch_side['torch']}, torchvision {torch_side['torchvision']}).\n"
          f"# machine: {platform.machine()} {platform.system()}\n# python: {py}")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
