"""The runnable examples of the docs run (each ```python block marked as runnable below)."""

import pathlib
import re
import sys

import pytest

from helpers import isolate_problem_registry

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

#: (page, a string that identifies the block): blocks that are complete programs.
RUNNABLE = [
    ("sdze.md", "ActivityPerturbation(activity_adafactor"),
    ("sdze.md", "engine.evaluation_model(run.model"),
]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize(("page", "marker"), RUNNABLE)
def test_example_runs(page, marker, capsys):
    blocks = [b for b in python_blocks(page) if marker in b]
    assert len(blocks) == 1, f"{page}: expected one block containing {marker!r}"
    exec(compile(blocks[0], f"{page}:example", "exec"), {})
    out = capsys.readouterr().out
    assert "rel_l2" in out


def test_own_pde_page_runs(tmp_path, monkeypatch, capsys):
    """problems.md: its problem file saved as my_problem.py, then its Python example run."""
    isolate_problem_registry(monkeypatch)
    blocks = python_blocks("problems.md")
    (problem,) = [b for b in blocks if "def poisson_sine" in b]
    (script,) = [b for b in blocks if "sdze.register_problem" in b]
    (tmp_path / "my_problem.py").write_text(problem)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_problem", raising=False)
    try:
        exec(compile(script, "problems.md:example", "exec"), {})
    finally:
        sys.modules.pop("my_problem", None)
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed.startswith("rel_l2 ") and float(printed.split()[1]) < 0.3
