"""The docs: a short front page, and every measured table in docs/ equal to what its results JSON gives."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "docs" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_measured_table_is_its_json():
    tables = _tables()
    checked = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for name, written, generated in tables.blocks(page):
            assert written == generated, f"{page.name}: table {name} differs from its JSON (run python docs/tables.py)"
            checked.append(name)
    # every generator is used by a page, and each block was compared
    assert sorted(set(checked)) == sorted(tables.TABLES)


def test_a_table_that_drifts_from_its_json_is_caught(tmp_path):
    tables = _tables()
    page = tmp_path / "page.md"
    page.write_text("<!-- table: repair -->\n| model | CWE |\n| dense | 0.99 |\n<!-- /table -->\n")
    [(name, written, generated)] = tables.blocks(page)
    assert name == "repair" and written != generated
    assert tables.rewrite(page) and tables.blocks(page)[0][1] == generated  # and the script repairs it


def test_the_readme_is_a_front_page_that_links_each_verbs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in ("sparsify", "grow", "slim", "prune", "repair", "train", "design", "inference", "export"):
        assert f"docs/{page}.md" in readme and (ROOT / "docs" / f"{page}.md").exists()


VERDICT = re.compile(r"\b(not reproduced|reproduced|narrowly)\b", re.I)


def _outside_claim_blocks(text: str, tables) -> str:
    """The page with its claims.json blocks (the claims, one paper's, the legend) taken out."""
    return tables.BLOCK.sub(lambda m: "" if m["name"].startswith("claims") else m.group(0), text)


def test_every_verdict_in_the_docs_is_claims_json():
    # a verdict word may appear only inside a block generated from claims.json (which the test above holds
    # equal to its JSON): hand-typed verdicts, or another benchmark's, would drift from the re-run claims
    tables = _tables()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        loose = [line for line in _outside_claim_blocks(page.read_text(), tables).splitlines() if VERDICT.search(line)]
        assert not loose, f"{page.name}: a verdict outside the claims.json blocks: {loose[0]!r}"
    reproduce = tables.benchmark("reproduce")
    pages = {name.removeprefix("claims.") for name in tables.TABLES if name.startswith("claims.")}
    assert pages == set(reproduce.PARTS)  # every part's claims are on a page


def test_a_hand_typed_verdict_is_caught(tmp_path):
    tables = _tables()
    text = "<!-- table: claims.grow -->\n**reproduced**\n<!-- /table -->\nGrowing wins (**not reproduced**).\n"
    assert [line for line in _outside_claim_blocks(text, tables).splitlines() if VERDICT.search(line)] == [
        "Growing wins (**not reproduced**)."
    ]
