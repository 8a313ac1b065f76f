"""The evidence tables in the README and docs are the committed results files' tables, to the digit,
and name the code version that made them (a rerun that changes a number must update both)."""
import json
from pathlib import Path

import pytest

from beit.compare.report import CHANGED_FILES_LISTED, fmt, per_seed

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = "docs/results/"  # outputs, not code: a run may start while earlier results are being copied in
TABLES = [("evidence_digits.json", "README.md"), ("evidence_digits.json", "docs/compare.md"),
          ("evidence_photos.json", "README.md"), ("evidence_photos.json", "docs/compare.md"),
          ("evidence_swin_mobilevit_digits_200ep.json", "README.md")]


def value_cells(results: dict) -> list[tuple[str, str]]:
    """(mean ± std, per-seed values) of each method, formatted as ``compare.md`` writes them."""
    return sorted((fmt(v), per_seed(v)) for v in results["rows"].values())


def doc_tables(text: str) -> list[list[tuple[str, str]]]:
    """The second and third cells of every markdown table's body rows (bold removed), per table."""
    tables, cur = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cur.append([c.strip().strip("*") for c in line.strip().strip("|").split("|")])
        elif cur:
            tables.append(sorted((r[1], r[2]) for r in cur[2:] if len(r) >= 3))
            cur = []
    return tables


@pytest.mark.parametrize("results_file,doc", TABLES)
def test_the_documented_table_is_the_results_file(results_file, doc):
    results = json.loads((ROOT / "docs" / "results" / results_file).read_text())
    check_documented_table(results, results_file, (ROOT / doc).read_text(), doc)


def check_documented_table(results: dict, results_file: str, text: str, doc: str) -> None:
    expect = value_cells(results)
    assert expect in doc_tables(text), f"{doc}: no table with {results_file}'s values:\n" + "\n".join(map(str, expect))
    changed = results["code"]["changed_files"]
    listed_all = len(changed) < CHANGED_FILES_LISTED
    code_changes = [f for f in changed if not f.startswith(RESULTS_DIR)] + ([] if listed_all else ["(files beyond the "
                                                                                                   "list)"])
    assert not code_changes, f"{results_file} was made by uncommitted code: {code_changes}"
    assert f"`{results['code']['commit'][:7]}`" in text, f"{doc} does not name commit {results['code']['commit'][:7]}"


def test_a_run_on_changed_code_is_caught():
    results = json.loads((ROOT / "docs" / "results" / "evidence_photos.json").read_text())
    results["code"].update(dirty=True, changed_files=["docs/results/x.json", "beit/compare/recipe.py"])
    with pytest.raises(AssertionError, match="uncommitted code.*recipe.py"):
        check_documented_table(results, "evidence_photos.json", (ROOT / "README.md").read_text(), "README.md")


def test_a_changed_value_is_caught():
    results = json.loads((ROOT / "docs" / "results" / "evidence_digits.json").read_text())
    text = (ROOT / "README.md").read_text()
    seeds = value_cells(results)[0][1]
    assert seeds in text
    assert value_cells(results) not in doc_tables(text.replace(seeds, seeds + "1"))
