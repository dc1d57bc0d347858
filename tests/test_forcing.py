"""Closed-form forcings per domain and operator (docs/domains.md#closed-form-forcings).

A manufactured solution u* = φ s (φ the domain's boundary factor, s a term sum)
has its forcing L u* = L(φ s) from the domain's closed form
(:meth:`Domain.factor_product`). Every (domain, operator) pair the registry
offers (:func:`product_closed_forms`) is checked against nested ``jax.hessian``
of φ s in float64, φ evaluated by the domain's own primal formula and s
written out independently; every pair it does not offer must refuse to build
a problem, naming the domain and the operator.
"""

import functools
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close, f64, host
from sdze_core import jets
from sdze_core.domains import (
    DOMAINS,
    PRODUCT_OPERATORS,
    Annulus,
    Ball,
    Box,
    Diffusion,
    HardConstraint,
    MissingClosedFormError,
    SpaceTime,
    WholeSpace,
    product_closed_forms,
)
from sdze_core.keys import key
from sdze_core.models import Ansatz
from sdze_core.problems import EQUATIONS, PROBLEMS, make_problem

jax.config.update("jax_enable_x64", True)

#: Instances of every registered domain (a new domain must add its own here).
EXAMPLES = {
    "ball": (Ball(), Ball(1.5)),
    "annulus": (Annulus(), Annulus(0.5, 1.5)),
    "box": (Box(), Box(-1.0, 2.0)),
    "whole-space": (WholeSpace(),),
    "space-time": (SpaceTime(Ball(), hard_space=True), SpaceTime(WholeSpace())),
    "diffusion": (Diffusion(), Diffusion(t0=0.0, t1=0.3, diffusivity=2.0)),
}
OFFERED = [
    (domain, op)
    for name, domains in EXAMPLES.items()
    for domain in domains
    for op in PRODUCT_OPERATORS
    if op in product_closed_forms().get(name, ())
]
NOT_OFFERED = [
    (domain, op)
    for name, domains in EXAMPLES.items()
    for domain in domains
    for op in PRODUCT_OPERATORS
    if op not in product_closed_forms().get(name, ())
]
#: The problems whose equation's operator is ``op``.
PROBLEMS_OF = {
    op: [name for name, (eq, _) in PROBLEMS.items() if EQUATIONS[eq].operator == op]
    for op in PRODUCT_OPERATORS
}
DIMS = (3, 5)


def test_every_registered_domain_has_examples():
    assert set(EXAMPLES) == set(DOMAINS)


def test_the_radial_domains_offer_both_operators():
    """Guards the enumeration: an empty OFFERED list would test nothing."""
    assert {(type(d).__name__, op) for d, op in OFFERED} >= {
        ("Ball", "laplacian"),
        ("Ball", "biharmonic"),
        ("Annulus", "laplacian"),
        ("Annulus", "biharmonic"),
    }
    assert all(PROBLEMS_OF[op] for op in PRODUCT_OPERATORS)


def _s(solution, c, y):
    """s(y) for one point y (d,), written out independently of the library."""
    if solution == "two-body":
        return jnp.sum(c * jnp.sin(y[:-1] + jnp.cos(y[1:]) + y[1:] * jnp.cos(y[:-1])))
    return jnp.sum(c * jnp.exp(y[:-2] * y[1:-1] * y[2:]))


@functools.cache
def _reference(domain, solution, operator, dim, c_bytes, x_bytes):
    """(u*, L u*) at the points by nested jax.hessian of φ s; cached across backends."""
    c = np.frombuffer(c_bytes)
    x = np.frombuffer(x_bytes).reshape(-1, dim)

    def u(y):
        phi = domain.boundary_factor(jets.Jet(y[None], ())).primal[0]
        return phi * _s(solution, c, y)

    def lap(f):
        return lambda y: jnp.trace(jax.hessian(f)(y))

    op = lap(lap(u)) if operator == "biharmonic" else lap(u)
    return np.asarray(jax.vmap(u)(x)), np.asarray(jax.jit(jax.vmap(op))(x))


def _points(problem, b, count=4):
    """Points of the problem's domain, the same on every backend (portable draws)."""
    return problem.sample_domain(key(5), count, b.with_config(rng="portable"))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize(
    "domain, name",
    [(domain, name) for domain, op in OFFERED for name in PROBLEMS_OF[op]],
    ids=str,
)
def test_closed_form_forcing_matches_autodiff(backend, domain, name, dim):
    b = f64(backend)
    problem = make_problem(name, dim, seed=2, backend=b, domain=domain, chunk=2)
    x = _points(problem, b)
    xs, c = host(b, x), host(b, problem.coefficients)
    assert np.all(host(b, domain.contains(x, 1e-12)))
    u_star, operator = _reference(
        domain, PROBLEMS[name][1], problem.equation.operator, dim, c.tobytes(), xs.tobytes()
    )
    assert_close(host(b, problem.operator_exact(x)), operator, 1e-10)
    assert_close(host(b, problem.exact(x)), u_star, 1e-12)
    nonlinear = {"allen-cahn": u_star - u_star**3, "sine-gordon": np.sin(u_star)}
    expected = operator + nonlinear.get(problem.equation.nonlinearity, 0.0)
    assert_close(host(b, problem.forcing(x)), expected, 1e-10)


@pytest.mark.parametrize(
    "domain, name",
    [(domain, name) for domain, op in NOT_OFFERED for name in PROBLEMS_OF[op]],
    ids=str,
)
def test_a_pair_without_a_closed_form_refuses_to_build(backend, domain, name):
    operator = EQUATIONS[PROBLEMS[name][0]].operator
    with pytest.raises(MissingClosedFormError) as info:
        make_problem(name, 3, backend=f64(backend), domain=domain)
    message = str(info.value)
    assert type(domain).__name__ in message and operator in message
    assert "offers" in message


@pytest.mark.parametrize("domain, operator", NOT_OFFERED, ids=str)
def test_the_domain_itself_refuses_a_missing_product(domain, operator):
    x = np.zeros((2, domain.input_dim(3)))
    with pytest.raises(MissingClosedFormError) as info:
        domain.factor_product(operator, x, {})
    assert type(domain).__name__ in str(info.value) and operator in str(info.value)


def test_an_unknown_operator_is_named():
    with pytest.raises(ValueError, match="operator must be one of laplacian, biharmonic.*'heat'"):
        Ball().factor_product("heat", np.zeros((1, 3)), {})
    with pytest.raises(TypeError, match="domain must be a Domain, got str"):
        make_problem("poisson-two-body", 3, domain="annulus")


#: forcing and u* of the built-ins at fixed points, d = 5, seed 3, from main before the
#: forcing moved to the domains (commit 7758ed2): the benchmarks must not change.
BEFORE = {
    "poisson-two-body": (
        (5.132369231454594, 0.36952761253704597, -0.8552904628319065),
        (-0.18578747846113527, -0.0660908844990015, 0.038704766944991476),
    ),
    "poisson-three-body": (
        (16.018306177093294, 16.057683844784314, 15.461448020074393),
        (-1.126816342345905, -0.9704458183327956, -1.1613439884356678),
    ),
    "allen-cahn-two-body": (
        (4.9529945770006805, 0.3037254133529066, -0.8166436779107709),
        (-0.18578747846113527, -0.0660908844990015, 0.038704766944991476),
    ),
    "allen-cahn-three-body": (
        (16.322225525045162, 16.00117001632221, 15.866431732524585),
        (-1.126816342345905, -0.9704458183327956, -1.1613439884356678),
    ),
    "sine-gordon-two-body": (
        (4.947648713915186, 0.3034848317501234, -0.816595358833746),
        (-0.18578747846113527, -0.0660908844990015, 0.038704766944991476),
    ),
    "sine-gordon-three-body": (
        (15.115256907593682, 15.232546192534361, 14.544109031767631),
        (-1.126816342345905, -0.9704458183327956, -1.1613439884356678),
    ),
    "biharmonic-three-body": (
        (128.42878780456235, 98.30948133344933, -135.56046564077386),
        (1.7441798838635716, 1.6898532495336245, 2.860469165426449),
    ),
}
FIXED_POINTS = {
    "ball": [[0.1, -0.2, 0.3, 0.05, -0.4], [0.5, 0.1, -0.1, 0.2, 0.3], [-0.3, 0.3, 0.2, -0.2, 0.1]],
    "annulus": [
        [0.6, -0.8, 0.7, 0.3, -0.4],
        [1.0, 0.5, -0.5, 0.2, 0.3],
        [-0.9, 0.9, 0.2, -0.6, 0.4],
    ],
}


def test_before_covers_every_builtin():
    assert set(BEFORE) == set(PROBLEMS)


@pytest.mark.parametrize("name", list(BEFORE))
def test_builtin_benchmarks_are_unchanged(backend, name):
    """Equal to the values before the change up to rounding (the annulus' g is now −(9/4) φ)."""
    b = f64(backend)
    problem = make_problem(name, 5, seed=3, backend=b)
    x = b.asarray(np.array(FIXED_POINTS[problem.boundary]), dtype=b.dtype)
    forcing, exact = BEFORE[name]
    np.testing.assert_allclose(host(b, problem.forcing(x)), forcing, rtol=1e-13)
    np.testing.assert_allclose(host(b, problem.exact(x)), exact, rtol=1e-13)


def test_builtins_keep_their_ansatz_and_other_domains_get_a_hard_constraint(backend):
    b = f64(backend)
    for name in ("poisson-two-body", "biharmonic-three-body"):
        model = make_problem(name, 4, backend=b).model(width=8, depth=1)
        assert isinstance(model, Ansatz) and model.boundary == EQUATIONS[PROBLEMS[name][0]].boundary
    domain = Annulus(0.5, 1.5)
    problem = make_problem("poisson-three-body", 4, backend=b, domain=domain)
    model = problem.model(width=8, depth=1)
    assert isinstance(model, HardConstraint) and model.domain == domain
    params = model.init(key(0), b)
    on_boundary = domain.sample_boundary(b, key(1), 8, 4)
    assert np.max(np.abs(host(b, model.apply(params, on_boundary)))) < 1e-12
    assert np.max(np.abs(host(b, problem.exact(on_boundary)))) < 1e-12


def test_radius_sampling_scales_with_the_ball(backend):
    b = f64(backend)
    problem = make_problem("poisson-two-body", 4, backend=b, domain=Ball(2.0), sampling="radius")
    r = np.sqrt(np.sum(host(b, problem.sample_domain(key(3), 2000)) ** 2, axis=1))
    assert r.max() <= 2.0 + 1e-12 and abs(np.mean(r <= 1.0) - 0.5) < 0.04
    with pytest.raises(ValueError, match="'radius' is not offered on the annulus.*volume"):
        make_problem("poisson-two-body", 4, backend=b, domain=Annulus(), sampling="radius")


def _docs_table() -> dict[str, tuple[str, ...]]:
    """The "closed-form forcings" table of docs/domains.md: domain -> operators marked yes."""
    text = (Path(__file__).parents[1] / "docs" / "domains.md").read_text()
    section = text.split("## Closed-form forcings", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    header = next(line for line in section.splitlines() if line.startswith("| domain"))
    operators = [cell.strip() for cell in header.strip("|").split("|")][1:]
    table = {}
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        name = re.fullmatch(r"`(.+)`", cells[0]).group(1)
        table[name] = tuple(
            op for op, cell in zip(operators, cells[1:], strict=True) if cell == "yes"
        )
    return table


def test_docs_table_matches_the_registry():
    assert _docs_table() == product_closed_forms()


def test_problems_page_table_matches_the_registry():
    """docs/problems.md: per operator, the domains offering its closed form."""
    text = (Path(__file__).parents[1] / "docs" / "problems.md").read_text()
    section = text.split("## A built-in on another domain", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in section.splitlines():
        if row.startswith("| Δ"):
            operator_cell, domains_cell = row.strip("|").split("|")
            operator = re.search(r"`(\w+)`", operator_cell).group(1)
            table[operator] = set(re.findall(r"`([\w-]+)`", domains_cell))
    offered = product_closed_forms()
    assert table == {
        op: {name for name, ops in offered.items() if op in ops} for op in PRODUCT_OPERATORS
    }


def test_problems_page_example_runs():
    text = (Path(__file__).parents[1] / "docs" / "problems.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "domain=" in b]
    scope = {}
    exec(compile(block, "problems.md:another-domain", "exec"), scope)
    problem = scope["problem"]
    assert problem.domain == Annulus(0.5, 1.5) and problem.boundary == "annulus"
