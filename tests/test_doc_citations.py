"""Docstrings and docs cite pages a user has: no citation of the project-internal specification.

The method is described in docs/method.md; the specification file the project was written
from is not shipped, so a citation of it ("SPEC.md", "SPEC section 4") is a dead end for a
reader of the package or its docs.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["src", "docs", "tests", "conformance", "benchmarks", "README.md", "noxfile.py"]
SUFFIXES = {".py", ".md", ".sh", ".yml", ".toml", ".txt"}
# The uppercase word SPEC ("SPEC.md", "SPEC section 5", "SPEC's"); _SPECS and BackendSpec
# are identifiers, not citations, and do not match.
CITATION = re.compile(r"\bSPEC\b")


def scanned_files():
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            yield path
        elif path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.suffix in SUFFIXES)


def test_no_citation_of_the_internal_specification():
    this = Path(__file__).resolve()
    found = []
    for path in scanned_files():
        if path.resolve() == this:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if CITATION.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "cite docs/method.md instead of SPEC:\n" + "\n".join(found)


def test_method_page_has_the_cited_sections():
    """Every section of docs/method.md cited by its anchor (``method.md#crns``) exists."""
    page = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", title.lower()).strip().replace(" ", "-")
        for title in re.findall(r"^#+ (.+)$", page, flags=re.MULTILINE)
    }
    cited = set()
    for path in scanned_files():
        text = path.read_text(encoding="utf-8")
        # "docs/method.md#crns, #subspace-perturbations" cites two sections
        for chain in re.findall(r"method\.md((?:#[a-z0-9-]+(?:, )?)+)", text):
            cited.update(re.findall(r"#([a-z0-9-]+)", chain))
    assert cited, "no citation of docs/method.md found"
    assert cited <= anchors, f"cited sections missing from docs/method.md: {cited - anchors}"
