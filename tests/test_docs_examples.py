"""The runnable examples of the docs run (each ```python block marked as runnable below)."""

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"

#: (page, a string that identifies the block): blocks that are complete programs.
RUNNABLE = [("sdze.md", "ActivityPerturbation(activity_adafactor")]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize(("page", "marker"), RUNNABLE)
def test_example_runs(page, marker, capsys):
    blocks = [b for b in python_blocks(page) if marker in b]
    assert len(blocks) == 1, f"{page}: expected one block containing {marker!r}"
    exec(compile(blocks[0], f"{page}:example", "exec"), {})
    out = capsys.readouterr().out
    assert "rel_l2" in out
