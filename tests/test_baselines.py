"""The baselines the benchmarks compare against (docs/method.md#baselines): SDGD's nested-autodiff
Laplacian and the solver's methods that use it or the full-space ZO sampler."""

import numpy as np
import pytest

from helpers import host, host_params
from sdze.solver import DEFAULT_ADAM_B2, SolverConfig, build, solve
from sdze.testing import device_for, get_backend_under_test
from sdze_core.backend import AutodiffNotAvailableError
from sdze_core.first_order import FirstOrderAdam
from sdze_core.keys import key
from sdze_core.models import MLP, Ansatz, with_layer_map
from sdze_core.objectives import ResidualLoss
from sdze_core.oracles import NestedAutodiffLaplacian, SparseLaplacian
from sdze_core.samplers import FullGaussian, LowRankSubspace

AUTODIFF = ["torch", "jax"]
D = 7


def setup(name, dtype="float64"):
    b = get_backend_under_test(name, dtype=dtype)
    model = Ansatz(MLP((D, 16, 16, 1)), "ball")
    params = model.init(key(1), b)
    x = 0.8 * (b.uniform(key(2), (9, D)) - 0.5)
    return b, model, params, x


def plain(b, a):
    a = a.detach() if hasattr(a, "detach") else a
    return host(b, a)


@pytest.mark.parametrize("name", AUTODIFF)
def test_nested_autodiff_laplacian_equals_the_jet_estimate(name):
    """Same key, same sampled coordinates: SDGD's numbers are the jet oracle's."""
    b, model, params, x = setup(name)
    for k in range(3):
        jet = SparseLaplacian(num_directions=3)(model, params, x, key(10 + k))
        nested = NestedAutodiffLaplacian(num_directions=3)(model, params, x, key(10 + k))
        np.testing.assert_allclose(plain(b, nested.u), plain(b, jet.u), rtol=1e-13, atol=0)
        scale = np.max(np.abs(plain(b, jet.value)))
        np.testing.assert_allclose(plain(b, nested.value), plain(b, jet.value),
                                   rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("name", AUTODIFF)
def test_sdgd_gradients_equal_the_first_order_gradients(name):
    """Differentiating through the nested autodiff gives the jet loss's gradient."""
    b, model, params, x = setup(name)

    def rhs(u, y):
        return u * u * u - u

    def loss_with(oracle):
        return ResidualLoss(model, oracle, rhs, lambda k: x)

    jet_loss = loss_with(SparseLaplacian(num_directions=4))
    nested_loss = loss_with(NestedAutodiffLaplacian(num_directions=4))
    xi = jet_loss.sample(key(3))
    v1, g1 = b.value_and_grad(jet_loss)(params, xi)
    v2, g2 = b.value_and_grad(nested_loss)(params, xi)
    assert abs(float(v1) - float(v2)) <= 1e-12 * abs(float(v1))
    for p1, p2 in zip(host_params(b, g1), host_params(b, g2), strict=True):
        for k in p1:
            scale = np.max(np.abs(p1[k])) + 1e-300
            np.testing.assert_allclose(p2[k], p1[k], rtol=0, atol=1e-11 * scale)


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_nested_autodiff_needs_an_autodiff_backend(name):
    b, model, params, x = setup(name)
    with pytest.raises(AutodiffNotAvailableError, match="SDGD"):
        NestedAutodiffLaplacian(num_directions=2)(model, params, x, key(0))


@pytest.mark.parametrize("name", AUTODIFF)
def test_nested_autodiff_refuses_a_perturbed_model(name):
    """SDZE's perturbed copies (output (Q, B)) would be differentiated as their sum."""
    b, model, params, x = setup(name)
    sampler = LowRankSubspace(rank=2)
    state = sampler.init(key(3), params)
    directions = sampler.draw(state, params, key(4), 2)
    perturbed = with_layer_map(model, sampler.layer_map(state, directions, [0, 1], [1e-3, -1e-3]))
    with pytest.raises(TypeError, match="SparseLaplacian"):
        NestedAutodiffLaplacian(num_directions=2)(perturbed, params, x, key(0))


def test_solver_builds_every_method():
    from sdze_core.activity import ActivityPerturbation

    for method in ("sdze", "sdze-naive"):
        run = build(SolverConfig("poisson-two-body", 6, method=method, backend="numpy"))
        assert isinstance(run.method, ActivityPerturbation)
        assert run.method.crns == (method != "sdze-naive")
    cases = {"sdze": "LowRankSubspace", "sdze-naive": "LowRankSubspace", "zo-full": "FullGaussian"}
    for method, sampler in cases.items():
        run = build(SolverConfig("poisson-two-body", 6, method=method, backend="numpy",
                                 perturbation="subspace"))
        assert type(run.method.sampler).__name__ == sampler
        assert run.method.perturber.crns == (method != "sdze-naive")
    run = build(SolverConfig("poisson-two-body", 6, method="zo-full", backend="numpy"))
    assert isinstance(run.method.sampler, FullGaussian)
    for method, oracle in (("first-order", SparseLaplacian), ("sdgd", NestedAutodiffLaplacian)):
        run = build(SolverConfig("poisson-two-body", 6, method=method, backend="numpy"))
        assert isinstance(run.method, FirstOrderAdam)
        assert run.method.b2 == DEFAULT_ADAM_B2[method] == 0.99
        assert isinstance(run.loss.oracle, oracle)


def test_sdgd_refuses_a_fourth_order_problem():
    with pytest.raises(ValueError, match="Laplacians only"):
        build(SolverConfig("biharmonic-three-body", 4, method="sdgd", backend="numpy"))


@pytest.mark.parametrize("value", [1.0, -0.1])
def test_adam_b2_is_checked(value):
    with pytest.raises(ValueError, match="adam_b2"):
        SolverConfig("poisson-two-body", 6, adam_b2=value).resolved()


@pytest.mark.parametrize("name", AUTODIFF)
def test_sdgd_and_first_order_train_identically(name):
    """Same seed, same points and coordinates, same gradients: the same run (float64)."""
    get_backend_under_test(name)  # skips, saying why, if it cannot run or is not under test
    common = dict(backend=name, device=device_for(name), dtype="float64", steps=6,
                  test_points=50, out=None, quiet=True)
    a = solve("poisson-two-body", 8, method="first-order", **common)
    c = solve("poisson-two-body", 8, method="sdgd", **common)
    assert a.status == c.status == "completed"
    np.testing.assert_allclose(c.rel_l2, a.rel_l2, rtol=1e-9)
    np.testing.assert_allclose([r["loss"] for r in c.history], [r["loss"] for r in a.history],
                               rtol=1e-9)


def test_full_space_zo_trains_without_moments():
    result = solve("poisson-two-body", 8, method="zo-full", backend="numpy", steps=4,
                   test_points=50, out=None, quiet=True)
    assert result.status == "completed" and np.isfinite(result.rel_l2)
