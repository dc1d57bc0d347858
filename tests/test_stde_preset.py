"""STDE's experimental setting as a preset: its initialisation, radius-uniform points,
the preset's fill rule, and the minimum-over-evaluations metric."""

import math

import numpy as np
import pytest

import sdze
from helpers import host
from sdze.solver import PRESETS, SolverConfig
from sdze_core.keys import key
from sdze_core.models import MLP
from sdze_core.problems import make_problem


def test_stde_initialisation_is_uniform_within_one_over_sqrt_fan(backend):
    params = MLP((300, 200, 1), init_scheme="stde").init(key(0), backend)
    W0, b0 = host(backend, params[0]["W"]), host(backend, params[0]["b"])
    bound_w, bound_b = 1 / math.sqrt(300), 1 / math.sqrt(200)
    assert np.all(np.abs(W0) <= bound_w) and np.all(np.abs(b0) <= bound_b)
    # U(±a) has variance a²/3: 60 000 draws put the sample variance within 2 % (>> 5 se)
    assert abs(W0.var() / (bound_w**2 / 3) - 1) < 0.02
    assert abs(W0.mean()) < 5 * bound_w / math.sqrt(3 * W0.size)
    assert np.all(b0 != 0)


def test_an_unknown_init_scheme_is_refused():
    with pytest.raises(ValueError, match="init_scheme must be one of glorot, stde"):
        MLP((3, 4, 1), init_scheme="he")


def test_radius_sampling_puts_the_radius_uniform_on_0_1(backend):
    b = backend.with_config(dtype="float64")
    problem = make_problem("poisson-two-body", 1000, backend=b, sampling="radius")
    x = host(b, problem.sample_domain(key(3), 4000))
    r = np.sqrt((x**2).sum(axis=1))
    assert r.max() <= 1.0
    # Kolmogorov–Smirnov distance to U[0, 1): the 99.9 % critical value at n = 4000 is 0.031
    r = np.sort(r)
    ks = np.max(np.abs(r - np.arange(1, r.size + 1) / r.size))
    assert ks < 0.031
    volume = host(b, make_problem("poisson-two-body", 1000, backend=b).sample_domain(key(3), 100))
    assert np.sqrt((volume**2).sum(axis=1)).min() > 0.98  # the volume sampler: all near the sphere


def test_radius_sampling_is_refused_on_the_annulus():
    with pytest.raises(ValueError, match="sampling 'radius' is not offered on the annulus"):
        make_problem("biharmonic-three-body", 5, sampling="radius")


def test_the_preset_fills_only_what_is_unset():
    c = SolverConfig("allen-cahn-two-body", 10, method="first-order", preset="stde").resolved()
    for name, value in PRESETS["stde"].items():
        assert getattr(c, name) == value, name
    mine = SolverConfig("allen-cahn-two-body", 10, method="first-order", preset="stde",
                        depth=4, steps=50).resolved()
    assert (mine.depth, mine.steps, mine.init_scheme) == (4, 50, "stde")
    assert mine.resolved() == mine  # resolving again (a resume) changes nothing
    plain = SolverConfig("allen-cahn-two-body", 10).resolved()
    assert (plain.depth, plain.init_scheme, plain.sampling) == (4, "glorot", "volume")
    with pytest.raises(ValueError, match="preset must be one of 'stde'"):
        SolverConfig("allen-cahn-two-body", 10, preset="deepxde").resolved()
    with pytest.raises(ValueError, match="sampling must be one of"):
        SolverConfig("allen-cahn-two-body", 10, sampling="sobol").resolved()


def test_metrics_record_the_minimum_over_evaluations(tmp_path):
    result = sdze.solve("poisson-two-body", 5, preset="stde", steps=6, eval_every=2, width=8,
                        batch_size=4, num_directions=2, test_points=20, out=tmp_path,
                        quiet=True, plots=False)
    config = result.run.config
    assert (config.depth, config.init_scheme, config.sampling) == (3, "stde", "radius")
    assert result.run.model.network.sizes == (5, 8, 8, 8, 1)
    errors = [r["rel_l2"] for r in result.history]
    assert result.metrics["min_rel_l2"] == min(errors)
    best = result.history[errors.index(min(errors))]["step"]
    assert result.metrics["min_rel_l2_step"] == best
