"""A user's own PDE gets what a built-in gets: solve, progress, metrics, plots, resume, eval.

The problem lives in a file of the test's folder (not in src/), as a user's would, and
is named by ``FILE.py:FACTORY``, by ``MODULE:FACTORY``, by ``sdze.register_problem``
or by an entry point of the ``sdze.problems`` group.
"""

import json
import os
import re
import sys
import warnings
from importlib import metadata

import numpy as np
import pytest

import sdze
from helpers import isolate_problem_registry
from sdze.cli import main
from sdze.solver import SolverConfig, default_out
from sdze_core import problem_registry
from sdze_core.problem_protocol import PDEProblem, missing_members
from sdze_core.problem_registry import ProblemSpecError, UnknownProblemError, make_problem

#: Poisson on the unit ball, u* = (1 − ‖x‖²) sin(w·x), written with sdze's public pieces;
#: the same problem without its exact solution; and factories that are wrong.
SOURCE = '''
"""A user's problems."""
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from array_api_compat import array_namespace

import sdze
from sdze_core.models import MLP, Ansatz
from sdze_core.oracles import SparseLaplacian
from sdze_core.problems import sample_ball


@dataclass(frozen=True)
class PoissonNoExact:
    dim: int
    w: Any
    backend: Any

    def sample_domain(self, key, num_points, backend=None):
        return sample_ball(backend or self.backend, key, num_points, self.dim)

    def model(self, width=128, depth=4, activation="tanh"):
        return Ansatz(MLP((self.dim,) + (width,) * depth + (1,), activation), "ball")

    def oracle(self, num_directions=16):
        return SparseLaplacian(min(num_directions, self.dim))

    def forcing(self, x):
        xp = array_namespace(x)
        rho, wx = xp.sum(x * x, axis=1), x @ self.w
        w2 = float(xp.sum(self.w * self.w))
        s = xp.sin(wx)
        return -2 * self.dim * s - 4 * wx * xp.cos(wx) - (1 - rho) * w2 * s


class PoissonSine(PoissonNoExact):
    def exact(self, x):
        xp = array_namespace(x)
        return (1 - xp.sum(x * x, axis=1)) * xp.sin(x @ self.w)


def _w(dim, seed, backend):
    portable = backend.with_config(rng="portable")
    return portable.normal(sdze.fold_in(sdze.key(seed), "w"), (dim,)) * 0.5


def poisson_sine(dim, seed=0, backend=None):
    """Poisson on the unit ball, u* = (1 - |x|^2) sin(w.x)."""
    return PoissonSine(dim, _w(dim, seed, backend), backend)


def no_exact(dim, seed=0, backend=None):
    return PoissonNoExact(dim, _w(dim, seed, backend), backend)


def not_a_problem(dim, seed=0, backend=None):
    return SimpleNamespace(dim=dim, oracle=lambda num_directions=16: None)


NOT_CALLABLE = 3
'''

TINY = ["--dim", "3", "--width", "8", "--depth", "2", "--batch-size", "4", "--test-points", "10"]
TINY_SETTINGS = dict(width=8, depth=2, batch_size=4, test_points=10)


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    isolate_problem_registry(monkeypatch)


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "my_problem.py"
    path.write_text(SOURCE)
    return path


@pytest.fixture
def problem_module(tmp_path, monkeypatch):
    """The same source as an importable module ``user_pde_module`` (never imported yet)."""
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "user_pde_module.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "user_pde_module", raising=False)
    yield "user_pde_module"
    sys.modules.pop("user_pde_module", None)


def one_line_error(capsys, argv, command="solve") -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"sdze {command}: error: ")
    return err.strip()


# -- the protocol -----------------------------------------------------------------------


def test_builtin_and_user_problems_satisfy_the_protocol(problem_file):
    assert isinstance(make_problem("poisson-two-body", 4), PDEProblem)
    mine = make_problem(f"{problem_file}:poisson_sine", 3, seed=1)
    assert isinstance(mine, PDEProblem) and mine.dim == 3
    x = mine.sample_domain(sdze.key(0), 5)
    assert x.shape == (5, 3) and mine.exact(x).shape == (5,) and mine.forcing(x).shape == (5,)
    assert missing_members(object()) == ["dim", "sample_domain", "model", "oracle"]


# -- a problem file from the command line ---------------------------------------------------


def test_cli_solve_resume_eval_of_a_problem_file(problem_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["solve", "my_problem.py:poisson_sine", *TINY, "--steps", "3", "--eval-every",
                 "1", "--schedule", "constant", "--out", "run"])
    assert code == 0
    captured = capsys.readouterr()
    assert "my_problem.poisson_sine d=3 sdze" in captured.err  # the progress bar
    assert "3/3" in captured.err and "rel_l2=" in captured.err
    assert "relative L2 error" in captured.out
    run = tmp_path / "run"
    for name in ("metrics.json", "checkpoint.npz", "loss.png", "error.png"):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    spec = f"{problem_file.resolve()}:poisson_sine"
    assert metrics["config"]["problem"] == spec  # recorded with its absolute path
    assert metrics["exact_solution"] is True and np.isfinite(metrics["rel_l2"])
    assert [r["step"] for r in metrics["history"]] == [1, 2, 3]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resume and eval re-import the file from its recorded path
    assert main(["solve", "--resume", str(run / "checkpoint.npz"), "--steps", "6", "--quiet",
                 "--out", str(run)]) == 0
    assert "step 6" in capsys.readouterr().out
    resumed = json.loads((run / "metrics.json").read_text())
    assert resumed["final"]["step"] == 6 and resumed["config"]["problem"] == spec

    assert main(["eval", str(run / "checkpoint.npz")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 6 and report["rel_l2"] == pytest.approx(resumed["rel_l2"], rel=1e-6)

    # The resumed run is the uninterrupted one (from Python, the spec relative to here).
    straight = sdze.solve("../my_problem.py:poisson_sine", 3, out=None, quiet=True, steps=6,
                          eval_every=1, schedule="constant", **TINY_SETTINGS)
    assert straight.rel_l2 == resumed["rel_l2"]
    assert straight.metrics["config"]["problem"] == spec


def test_default_out_names_a_spec_by_file_and_factory(problem_file):
    config = SolverConfig(f"{problem_file}:poisson_sine", 3).resolved()
    assert str(default_out(config)) == "sdze-runs/my_problem.poisson_sine-d3-sdze"


def test_builtin_only_settings_are_refused_for_a_user_problem(problem_file):
    """Its own sample_domain and model decide the points and the initialisation."""
    with pytest.raises(ValueError, match="sampling must be 'volume' for a user problem"):
        sdze.solve(f"{problem_file}:poisson_sine", 3, preset="stde", out=None, quiet=True,
                   plots=False, steps=1, **TINY_SETTINGS)
    with pytest.raises(ValueError, match="init_scheme must be 'glorot' for a user problem"):
        sdze.solve(f"{problem_file}:poisson_sine", 3, init_scheme="stde", out=None, quiet=True,
                   plots=False, steps=1, **TINY_SETTINGS)


def test_resume_with_another_problem_is_refused(problem_file, tmp_path):
    sdze.solve(f"{problem_file}:poisson_sine", 3, out=tmp_path / "run", quiet=True, plots=False,
               steps=2, **TINY_SETTINGS)
    with pytest.raises(ValueError, match="problem: checkpoint has"):
        sdze.solve("poisson-two-body", 3, resume=tmp_path / "run" / "checkpoint.npz")
    again = sdze.solve(f"{problem_file}:poisson_sine", 3, steps=3, out=tmp_path / "run",
                       resume=tmp_path / "run" / "checkpoint.npz", quiet=True, plots=False)
    assert again.metrics["final"]["step"] == 3


def test_a_changed_file_is_imported_again(problem_file):
    spec = f"{problem_file}:poisson_sine"
    first = problem_registry.problem_factory(spec)
    assert problem_registry.problem_factory(spec) is first  # once per process
    problem_file.write_text(SOURCE + "\n# edited\n")
    stat = problem_file.stat()
    os.utime(problem_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert problem_registry.problem_factory(spec) is not first


# -- a problem without an exact solution ----------------------------------------------------


def test_without_exact_no_errors_are_measured_and_metrics_say_so(problem_file, tmp_path,
                                                                 capsys):
    out = tmp_path / "run"
    assert main(["solve", f"{problem_file}:no_exact", *TINY, "--steps", "3", "--eval-every", "1",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no errors (the problem has no exact solution)" in printed
    assert "loss" in printed and "rel_l2" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exact_solution"] is False and "no exact solution" in metrics["errors"]
    assert metrics["rel_l2"] is None and metrics["rel_linf"] is None
    assert all("rel_l2" not in r for r in metrics["history"])
    assert (out / "loss.png").exists() and not (out / "error.png").exists()
    assert (out / "checkpoint.npz").exists()
    assert main(["solve", "--resume", str(out / "checkpoint.npz"), "--steps", "4", "--quiet",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    line = one_line_error(capsys, ["eval", str(out / "checkpoint.npz")], "eval")
    assert "has no exact solution" in line


# -- register_problem and entry points ------------------------------------------------------


def test_register_problem_then_solve_list_and_make(problem_file, tmp_path, capsys):
    factory = problem_registry.problem_factory(f"{problem_file}:poisson_sine")
    sdze.register_problem("poisson-sine", factory)
    assert "poisson-sine" in sdze.known_problems()
    assert sdze.make_problem("poisson-sine", 3).dim == 3
    result = sdze.solve("poisson-sine", 3, out=tmp_path / "run", quiet=True, steps=2,
                        **TINY_SETTINGS)
    assert result.metrics["config"]["problem"] == "poisson-sine"
    assert sorted(result.files) == ["checkpoint.npz", "error.png", "loss.png", "metrics.json"]
    assert main(["eval", str(tmp_path / "run" / "checkpoint.npz")]) == 0
    capsys.readouterr()
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "poisson-sine" in listed and "Poisson on the unit ball" in listed
    assert "MODULE:FACTORY" in listed


def test_register_problem_refuses_duplicates_and_bad_names(problem_file):
    factory = problem_registry.problem_factory(f"{problem_file}:poisson_sine")
    sdze.register_problem("mine", factory)
    with pytest.raises(ValueError, match="'mine' is already registered.*replace=True"):
        sdze.register_problem("mine", factory)
    other = problem_registry.problem_factory(f"{problem_file}:no_exact")
    sdze.register_problem("mine", other, replace=True)
    assert problem_registry.problem_factory("mine") is other
    with pytest.raises(ValueError, match="built-in"):
        sdze.register_problem("poisson-two-body", factory, replace=True)
    for bad in ("a:b", "", " mine2"):
        with pytest.raises(ValueError, match="without ':'"):
            sdze.register_problem(bad, factory)
    with pytest.raises(TypeError, match="callable"):
        sdze.register_problem("mine3", 3)


def test_a_factory_given_as_a_string_is_imported_on_first_use(problem_module):
    sdze.register_problem("lazy", f"{problem_module}:poisson_sine")
    assert problem_module not in sys.modules
    assert make_problem("lazy", 3).dim == 3
    assert problem_module in sys.modules


def test_module_spec(problem_module, tmp_path):
    result = sdze.solve(f"{problem_module}:poisson_sine", 3, out=tmp_path / "run", quiet=True,
                        plots=False, steps=2, **TINY_SETTINGS)
    assert result.metrics["config"]["problem"] == "user_pde_module:poisson_sine"
    assert np.isfinite(result.rel_l2)


def test_entry_points_are_listed_without_import_and_loaded_on_use(problem_module, monkeypatch,
                                                                  capsys):
    entries = [
        metadata.EntryPoint("ep-poisson", f"{problem_module}:poisson_sine", "sdze.problems"),
        metadata.EntryPoint("poisson-two-body", f"{problem_module}:no_exact", "sdze.problems"),
        metadata.EntryPoint("ep-broken", "no_such_module_here:f", "sdze.problems"),
    ]

    def entry_points(group=None):
        return [e for e in entries if e.group == group]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    monkeypatch.setattr(problem_registry, "_entry_points_loaded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = sdze.known_problems()
    assert "ep-poisson" in names and "ep-broken" in names
    assert any("'poisson-two-body'" in str(w.message) and "taken" in str(w.message)
               for w in caught)  # an entry point never shadows a built-in
    assert problem_module not in sys.modules  # listed, not imported
    assert main(["list"]) == 0
    assert f"entry point {problem_module}:poisson_sine" in capsys.readouterr().out
    assert make_problem("ep-poisson", 3).dim == 3
    assert make_problem("poisson-two-body", 3).__class__.__name__ == "Problem"
    with pytest.raises(ProblemSpecError, match="ep-broken.*cannot be loaded"):
        make_problem("ep-broken", 3)


# -- errors -------------------------------------------------------------------------------


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownProblemError, match="unknown problem 'heat'; known: poisson-two"):
        make_problem("heat", 3)
    with pytest.raises(ValueError, match="unknown problem 'heat'.*MODULE:FACTORY"):
        SolverConfig("heat", 3).resolved()


def test_a_factory_returning_no_problem_names_the_missing_members(problem_file):
    with pytest.raises(TypeError, match="a SimpleNamespace that lacks sample_domain, model:"):
        make_problem(f"{problem_file}:not_a_problem", 3)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("{folder}/missing.py:poisson_sine", "missing.py does not exist"),
        ("{file}:nope", "has no 'nope'.*it defines.*poisson_sine"),
        ("{file}:NOT_CALLABLE", "'NOT_CALLABLE'.*is a int, not a problem factory"),
        ("{file}:not_a_problem", "lacks sample_domain, model: a problem needs"),
        ("{folder}:poisson_sine", "is a folder, not a Python file"),
        ("no_such_module_here:make", "no module named 'no_such_module_here'"),
        ("{file}", "unknown problem.*needs its factory"),
        ("nonesuch", "unknown problem 'nonesuch'; known: poisson-two-body"),
    ],
)
def test_cli_bad_spec_is_one_line(problem_file, tmp_path, capsys, spec, words):
    spec = spec.format(file=problem_file, folder=tmp_path)
    line = one_line_error(capsys, ["solve", spec, *TINY, "--steps", "1", "--out",
                                   str(tmp_path / "run")])
    assert re.search(words, line), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["sdze", "first-order", "sdgd"])
def test_a_problem_file_on_torch_with_every_kind_of_method(problem_file, method):
    pytest.importorskip("torch", reason="torch is not installed")
    result = sdze.solve(f"{problem_file}:poisson_sine", 3, out=None, quiet=True, steps=2,
                        backend="torch", method=method, **TINY_SETTINGS)
    assert result.status == "completed" and np.isfinite(result.rel_l2)


def test_sdgd_needs_a_laplacian_oracle():
    with pytest.raises(ValueError, match="sdgd estimates Laplacians only.*SparseBiharmonic"):
        from sdze.solver import build

        build(SolverConfig("biharmonic-three-body", 4, method="sdgd"))

