"""A user's problem brings its own loss: a soft boundary condition as a loss term.

The problem file (not in src/) defines Poisson's equation Δu = f on the unit ball with
u = u* on the sphere enforced by a :class:`~sdze_core.loss_terms.DirichletTerm`, not by
the model, through the protocol's optional ``loss`` member. The solver trains it with
every method, from the command line, and resumes it exactly.
"""

import json

import numpy as np
import pytest

import sdze
from helpers import isolate_problem_registry
from sdze.cli import main
from sdze.solver import SolverConfig, build
from sdze_core.loss_terms import WeightedLoss
from sdze_core.objectives import ResidualLoss
from sdze_core.problem_protocol import missing_members
from sdze_core.problem_registry import make_problem

SOURCE = '''
"""Poisson on the unit ball, u* = sin(x_1) + x_2^2 (so Δu* = 2 - sin(x_1)), soft boundary."""
from dataclasses import dataclass
from typing import Any

from array_api_compat import array_namespace

from sdze_core.domains import Ball
from sdze_core.loss_terms import DirichletTerm, InteriorTerm, WeightedLoss, domain_points
from sdze_core.models import MLP
from sdze_core.oracles import SparseLaplacian


def exact(x):
    xp = array_namespace(x)
    return xp.sin(x[:, 0]) + x[:, 1] ** 2


def forcing(x):
    xp = array_namespace(x)
    return 2.0 - xp.sin(x[:, 0])


def no_reaction(u, x):
    return 0.0 * u


@dataclass(frozen=True)
class SoftPoisson:
    dim: int
    backend: Any
    boundary_weight: float = 10.0

    def sample_domain(self, key, num_points, backend=None):
        return Ball().sample(backend or self.backend, key, num_points, self.dim)

    def model(self, width=128, depth=4, activation="tanh"):
        return MLP((self.dim,) + (width,) * depth + (1,), activation)

    def exact(self, x):
        return exact(x)

    def loss(self, model, *, num_directions, batch_size, unbiased):
        ball = Ball()
        return WeightedLoss(model, (
            InteriorTerm(SparseLaplacian(min(num_directions, self.dim)), no_reaction,
                         domain_points(ball, self.backend, batch_size, self.dim), forcing,
                         unbiased=unbiased),
            DirichletTerm(exact, domain_points(ball, self.backend, batch_size, self.dim,
                                               "boundary"), weight=self.boundary_weight),
        ))


def soft_poisson(dim, seed=0, backend=None):
    return SoftPoisson(dim, backend)


class NoLossObject(SoftPoisson):
    def loss(self, model, *, num_directions, batch_size, unbiased):
        return lambda params, xi: 0.0


def bad_loss(dim, seed=0, backend=None):
    return NoLossObject(dim, backend)
'''

SETTINGS = dict(width=16, depth=2, batch_size=32, test_points=500, eval_every=100)


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    isolate_problem_registry(monkeypatch)


@pytest.fixture
def problem_file(tmp_path):
    path = tmp_path / "soft_poisson.py"
    path.write_text(SOURCE)
    return path


def test_a_problem_with_a_loss_needs_no_oracle(problem_file):
    problem = make_problem(f"{problem_file}:soft_poisson", 3)
    assert not hasattr(problem, "oracle") and missing_members(problem) == []
    run = build(SolverConfig(f"{problem_file}:soft_poisson", 3, **SETTINGS))
    assert isinstance(run.loss, WeightedLoss) and run.loss.model is run.model
    assert [t.weight for t in run.loss.terms] == [1.0, 10.0]
    assert run.loss.terms[0].oracle.num_directions == 3  # the solver's num_directions, capped


def test_a_problem_without_a_loss_still_trains_on_its_residual():
    run = build(SolverConfig("poisson-two-body", 4, **SETTINGS))
    assert isinstance(run.loss, ResidualLoss)


def test_activity_training_on_the_problems_loss_learns_the_boundary_data(problem_file, backend):
    """Without the boundary term the solution is not determined; with it, the zeroth-order
    default (activity perturbation) brings the error from ~0.9 after one step below 0.15."""
    spec, name = f"{problem_file}:soft_poisson", backend.name
    first = sdze.solve(spec, 3, out=None, quiet=True, steps=1, backend=name,
                       **{**SETTINGS, "eval_every": 1})
    result = sdze.solve(spec, 3, out=None, quiet=True, steps=800, learning_rate=1e-2,
                        backend=name, **SETTINGS)
    assert result.status == "completed"
    assert result.rel_l2 < 0.15 and result.rel_l2 < 0.2 * first.rel_l2, (first.rel_l2,
                                                                         result.rel_l2)


def test_first_order_training_on_the_problems_loss(problem_file, backend):
    if backend.name not in ("torch", "jax"):
        pytest.skip(f"first-order training differentiates with torch or jax, not {backend.name}")
    result = sdze.solve(f"{problem_file}:soft_poisson", 3, out=None, quiet=True, steps=600,
                        method="first-order", learning_rate=1e-2, backend=backend.name,
                        **SETTINGS)
    assert result.status == "completed" and result.rel_l2 < 0.04, result.rel_l2


def test_cli_solve_and_resume_with_the_problems_loss(problem_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = ["--dim", "3", "--width", "8", "--depth", "2", "--batch-size", "4",
            "--test-points", "10", "--eval-every", "1", "--schedule", "constant"]
    assert main(["solve", "soft_poisson.py:soft_poisson", *tiny, "--steps", "3", "--quiet",
                 "--out", "run"]) == 0
    assert main(["solve", "--resume", "run/checkpoint.npz", "--steps", "6", "--quiet",
                 "--out", "run"]) == 0
    resumed = json.loads((tmp_path / "run" / "metrics.json").read_text())
    straight = sdze.solve("soft_poisson.py:soft_poisson", 3, out=None, quiet=True, steps=6,
                          eval_every=1, schedule="constant", width=8, depth=2, batch_size=4,
                          test_points=10)
    assert resumed["final"]["step"] == 6 and np.isfinite(resumed["rel_l2"])
    assert straight.rel_l2 == resumed["rel_l2"]


def test_a_loss_that_is_not_a_loss_object_is_one_clear_error(problem_file, tmp_path, capsys):
    code = main(["solve", f"{problem_file}:bad_loss", "--dim", "3", "--steps", "1",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "NoLossObject.loss" in err and "dataclass with a `model` field" in err


def test_sdgd_refuses_a_problems_own_loss(problem_file):
    with pytest.raises(ValueError, match="sdgd estimates Laplacians only.*WeightedLoss"):
        build(SolverConfig(f"{problem_file}:soft_poisson", 3, method="sdgd"))
