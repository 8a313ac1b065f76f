"""The shape of the code, read from the source (AST only: nothing is imported, no side effects).

* Entry points are the commands: ``beit.cli``, ``beit.pretrain``, ``beit.finetune``, ``beit.distill``,
  ``beit.demo``, every module that ``beit.cli.COMMANDS`` runs and every ``__main__``. The library (every
  other module) imports none of them; a command imports no other command, only ``beit.cli`` (whose ``call``
  is the one exit-code policy) and, for a package's ``__main__``, its own package's command.
* ``accelerate launch beit/pretrain.py`` (and ``python launch/x.py``) put that folder on ``sys.path``: no
  module or sub-package there may be named like a standard-library module or a dependency.
"""
from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"beit": REPO / "beit", "beit.data": REPO / "data", "beit.tokenizers": REPO / "tokenizers"}
ENTRY_POINTS = {"beit.cli", "beit.pretrain", "beit.finetune", "beit.distill", "beit.demo"}
# import names of the declared dependencies (pyproject.toml), whether installed here or not
DEPENDENCIES = {"torch", "torchvision", "timm", "dall_e", "attr", "attrs", "webdataset", "accelerate", "numpy",
                "safetensors", "tqdm", "yaml", "PIL", "sklearn", "skimage", "matplotlib", "tensorboard", "xxhash",
                "transformers", "tokenizers", "onnx", "onnxruntime", "onnxscript", "pytest", "einops", "ruff",
                "wandb", "mlflow"}

# what the code did before the regrouping; emptied as the library takes over (must end empty)
KNOWN = [
]


def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the three import packages."""
    found = {}
    for pkg, root in PACKAGES.items():
        for f in sorted(root.rglob("*.py")):
            parts = [p for p in f.relative_to(root).with_suffix("").parts if p != "__init__"]
            if pkg == "beit" and parts and (REPO / "beit" / parts[0]).resolve() in PACKAGES.values():
                continue
            found[".".join([pkg, *parts])] = f
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports anywhere (top level or inside functions)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out & known


def command_modules() -> set[str]:
    """The modules ``beit.cli.COMMANDS`` runs (read from the dict literal in beit/cli.py)."""
    tree = ast.parse((REPO / "beit" / "cli.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "COMMANDS":
            return {target.partition(":")[0] for target, _ in ast.literal_eval(node.value).values()}
    raise AssertionError("beit/cli.py has no COMMANDS dict")


def test_no_module_imports_an_entry_point():
    mods = modules()
    entries = ENTRY_POINTS | command_modules() | {m for m in mods if m.endswith(".__main__")}
    assert entries - set(mods) == set(), "an entry point named here does not exist"
    bad = []
    for name, path in mods.items():
        for target in sorted(imported(name, path, set(mods)) & entries - {name}):
            if name in entries and (target == "beit.cli" or (
                    name.endswith(".__main__") and target.rpartition(".")[0] == name.rpartition(".")[0])):
                continue
            bad.append(f"{name} imports the entry point {target}")
    assert sorted(bad) == sorted(KNOWN), "the library (and every command) must not import an entry point"


def test_no_name_on_a_script_folder_shadows_a_module():
    taken = set(sys.stdlib_module_names) | DEPENDENCIES | set(importlib.metadata.packages_distributions())
    bad = []
    for folder in (REPO / "beit", REPO / "launch"):
        for p in folder.iterdir():
            name = p.stem if p.suffix == ".py" else p.name if (p / "__init__.py").is_file() else None
            if name in taken and name != "__init__":
                bad.append(f"{p.relative_to(REPO)} shadows the module {name!r}")
    assert bad == [], "\n".join(bad)


def test_the_walk_sees_every_package_and_every_kind_of_import(tmp_path):
    mods = modules()
    assert {"beit.pretrain", "beit.data", "beit.tokenizers", "beit.cli"} <= set(mods)
    assert not any(m.startswith(("beit.beit", "beit.data.tokenizers", "beit.tokenizers.data")) for m in mods)
    probe = tmp_path / "probe.py"
    probe.write_text("import beit.cli\n\ndef f():\n    from ..finetune import main\n    from beit import distill\n")
    known = {"beit.cli", "beit.finetune", "beit.distill", "beit.demo"}
    assert imported("beit.modeling.probe", probe, known) == {"beit.cli", "beit.finetune", "beit.distill"}


def test_ci_runs_the_linter_and_the_tree_passes_it():
    import subprocess
    test_sh = (REPO / "launch" / "test.sh").read_text()
    assert "-m ruff check ." in test_sh and test_sh.index("ruff check") < test_sh.index("-m pytest")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
