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
    ("benchmarks.md", 'preset="stde"'),
    ("problems.md", "def loss(self, model"),
]


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize(("page", "marker"), RUNNABLE)
def test_example_runs(page, marker, capsys, monkeypatch):
    isolate_problem_registry(monkeypatch)
    blocks = [b for b in python_blocks(page) if marker in b]
    assert len(blocks) == 1, f"{page}: expected one block containing {marker!r}"
    exec(compile(blocks[0], f"{page}:example", "exec"), {})
    out = capsys.readouterr().out
    assert "rel_l2" in out


@pytest.mark.parametrize("name", ["numpy", "array_api_strict", "torch", "jax"])
def test_backend_hooks_example_runs(name, capsys):
    """sdze.md's backend-hooks example, on each CPU backend that is installed."""
    import sdze

    if name not in sdze.available_backends():
        pytest.skip(f"{name} is not installed here")
    (example,) = [b for b in python_blocks("sdze.md") if "backend.write_columns(" in b]
    previous = sdze.get_backend()
    sdze.use(name)
    try:
        exec(compile(example, "sdze.md:hooks", "exec"), {})
    finally:
        sdze.use(previous)
    assert capsys.readouterr().out.strip() == "x W^T: (3, 4) row norms: (3,)"


def test_inverse_page_runs(capsys):
    """inverse.md: the activity engine recovers the diffusivity a* = 2 from a = 0.5."""
    (example,) = [b for b in python_blocks("inverse.md") if "TrainCoefficients(" in b]
    exec(compile(example, "inverse.md:example", "exec"), {})
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert abs(float(lines["a"]) - 2.0) < 0.2 and float(lines["rel_l2"]) < 0.1


def test_own_pde_page_runs(tmp_path, monkeypatch, capsys):
    """problems.md: its problem file saved as my_problem.py, then its Python example run."""
    isolate_problem_registry(monkeypatch)
    blocks = python_blocks("problems.md")
    (problem,) = [b for b in blocks if "def poisson_sine" in b]
    (script,) = [b for b in blocks if "sdze.register_problem" in b and "def loss" not in b]
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


def test_domains_page_runs(monkeypatch, capsys):
    """domains.md: the hard-constraint example meets its data to round-off, the box's
    missing closed form raises; the user-domain example registers its class."""
    from sdze_core import domains

    monkeypatch.setattr(domains, "DOMAINS", dict(domains.DOMAINS))
    (example,) = [b for b in python_blocks("domains.md") if "HardConstraint(" in b]
    exec(compile(example, "domains.md:example", "exec"), {})
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert float(lines["sphere"].split()[-1]) < 1e-12
    assert float(lines["terminal"].split()[-1]) < 1e-12
    assert lines["laplacian"] == "shape (100,)"
    closed, expected = lines["closed"].split()[1::2]
    assert float(closed) == float(expected)
    assert lines["raised:"].startswith("Box(low=0.0, high=1.0) has no closed form for the Lap")
    (own,) = [b for b in python_blocks("domains.md") if "register_domain" in b]
    namespace = {}
    exec(compile(own, "domains.md:own-domain", "exec"), namespace)
    assert domains.DOMAINS["slab"] is namespace["Slab"]


def test_operator_terms_page_runs(monkeypatch, capsys):
    """operators.md: the HJB sum of terms and the subset Laplacian / mixed partial example
    (its ``sdze.use`` changes the process default: restored after the test)."""
    from sdze_core import registry

    monkeypatch.setattr(registry, "_process_default", registry._process_default)
    (example,) = [b for b in python_blocks("operators.md") if "LinearCombination(" in b]
    exec(compile(example, "operators.md:operator-terms", "exec"), {})
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["hjb"] == "(100,) order 2"
    assert lines["laplacian"] == "(100,) (100,) mixed (100,)"


def test_losses_page_runs(capsys):
    """losses.md: the weighted loss trains with the activity engine (the loss on a fixed ξ
    falls at least fourfold)."""
    (example,) = [b for b in python_blocks("losses.md") if "WeightedLoss(" in b]
    exec(compile(example, "losses.md:example", "exec"), {})
    lines = dict(line.rsplit(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert float(lines["loss after"]) < 0.25 * float(lines["loss before"])
