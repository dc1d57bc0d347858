"""One dispatch rule where parameters meet points (docs/backends.md, "Mixed inputs").

* Arrays of another library than the parameters' raise the documented mixed-backend
  ``TypeError`` naming both libraries, for every oracle, model and loss, on every backend
  (before: three different errors, or none on jax, depending on the oracle).
* Points of another dtype (integer, or another float) are cast to the parameters' floating
  dtype: the result is bit-for-bit the one for points already in that dtype (before: torch
  raised its matmul dtype error where NumPy promoted).
"""

import numpy as np
import pytest

from helpers import f64, host
from sdze_core.keys import key
from sdze_core.models import MLP, Ansatz
from sdze_core.objectives import ResidualLoss, SpatialSample
from sdze_core.oracles import (
    DenseBiharmonic,
    ExactBiharmonic,
    ExactDiagonal,
    ExactLaplacian,
    FirstDerivative,
    HutchinsonLaplacian,
    NestedAutodiffLaplacian,
    SparseBiharmonic,
    SparseDiagonal,
    SparseGradientNormSquared,
    SparseLaplacian,
    TraceOperator,
    residual,
    squared_residual_loss,
)
from sdze_core.problems import make_problem
from sdze_core.registry import make_backend

D = 3
ORACLES = {
    "SparseLaplacian": lambda b: SparseLaplacian(num_directions=2),
    "NestedAutodiffLaplacian": lambda b: NestedAutodiffLaplacian(num_directions=2),
    "HutchinsonLaplacian": lambda b: HutchinsonLaplacian(num_directions=2),
    "ExactLaplacian": lambda b: ExactLaplacian(),
    "SparseDiagonal": lambda b: SparseDiagonal(k=3, num_directions=2),
    "ExactDiagonal": lambda b: ExactDiagonal(k=3),
    "DenseBiharmonic": lambda b: DenseBiharmonic(num_directions=2, distribution="gaussian"),
    "SparseBiharmonic": lambda b: SparseBiharmonic(num_pairs=2),
    "ExactBiharmonic": lambda b: ExactBiharmonic(),
    "TraceOperator": lambda b: TraceOperator(
        A=b.asarray(np.diag([1.0, -2.0, 0.5]), dtype=b.dtype), num_directions=2
    ),
    "FirstDerivative": lambda b: FirstDerivative((0, -1)),
    "SparseGradientNormSquared": lambda b: SparseGradientNormSquared(num_directions=2),
}
AUTODIFF_ONLY = {"NestedAutodiffLaplacian"}
MODELS = {"mlp": MLP((D, 6, 1)), "ansatz": Ansatz(MLP((D, 6, 1)))}


def other_library(backend):
    """A backend of another library than ``backend``'s (array_api_strict for numpy)."""
    name = "array_api_strict" if backend.name == "numpy" else "numpy"
    return make_backend(name, dtype="float64")


def points(b, dtype=None):
    """Two points in d = 3 with small integer coordinates (exact in every dtype)."""
    return b.asarray(np.array([[0.0, 1.0, -1.0], [1.0, 0.0, 0.0]]), dtype=dtype or b.dtype)


def oracle_for(name, b):
    if name in AUTODIFF_ONLY and b.name not in ("torch", "jax"):
        pytest.skip(f"{name} needs autodiff: the {b.name} backend refuses it by design")
    return ORACLES[name](b)


def assert_same_result(b, a, expected, dtype):
    for u, v in zip(a, expected, strict=True):
        assert u.dtype == dtype
        np.testing.assert_array_equal(host(b, u), host(b, v))


# -- mixed libraries ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORACLES)
def test_mixed_libraries_raise_the_documented_error_for_every_oracle(backend, name):
    b, other = f64(backend), other_library(backend)
    oracle, model = oracle_for(name, b), MODELS["mlp"]
    params = model.init(key(0), b)
    foreign_params = model.init(key(0), other)
    for p, x, first, second in (
        (params, points(other), b.name, other.name),
        (foreign_params, points(b), other.name, b.name),
    ):
        expected = rf"mixed array backends in one call: {first} \(params\), {second} \(x\)"
        with pytest.raises(TypeError, match=expected):
            oracle(model, p, x, key(1))


def test_trace_operator_with_a_matrix_of_another_library(backend):
    b, other = f64(backend), other_library(backend)
    oracle = TraceOperator(A=other.asarray(np.eye(D), dtype=other.dtype))
    model = MLP((D, 6, 1))
    with pytest.raises(TypeError, match=rf"{other.name} \(sigma or A\), {b.name} \(x\)"):
        oracle(model, model.init(key(0), b), points(b), key(1))


@pytest.mark.parametrize("model_name", MODELS)
def test_mixed_libraries_raise_the_documented_error_for_models(backend, model_name):
    b, other = f64(backend), other_library(backend)
    model = MODELS[model_name]
    params = model.init(key(0), b)
    index = b.asarray([0, 2], dtype=b.index_dtype)
    dense = b.asarray(np.eye(D)[:2], dtype=b.dtype)
    calls = {
        "apply": lambda x: model.apply(params, x),
        "jet, index directions": lambda x: model.jet(params, x, index, 2),
        "jet, dense directions": lambda x: model.jet(params, x, dense, 2),
    }
    for call in calls.values():
        with pytest.raises(TypeError, match=rf"{b.name} \(params\), {other.name} \(x\)"):
            call(points(other))
    foreign = other.asarray(np.eye(D)[:2], dtype=other.dtype)
    with pytest.raises(TypeError, match=rf"{b.name} \(params\), {other.name} \(directions\)"):
        model.jet(params, points(b), foreign, 2)


def test_mixed_libraries_raise_the_documented_error_for_losses(backend):
    b, other = f64(backend), other_library(backend)
    model, oracle = Ansatz(MLP((D, 6, 1))), SparseLaplacian(num_directions=2)
    params = model.init(key(0), b)
    x = points(other)
    loss = ResidualLoss(model, oracle, lambda u, x: u, lambda k: x)
    match = rf"{b.name} \(params\), {other.name} \(x\)"
    with pytest.raises(TypeError, match=match):
        loss(params, loss.sample(key(1)))
    with pytest.raises(TypeError, match=match):
        residual(oracle, model, params, x, key(1), lambda u, x: u)
    with pytest.raises(TypeError, match=match):
        squared_residual_loss(oracle, model, params, x, key(1), lambda u, x: u, unbiased=True)


# -- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ORACLES)
def test_points_are_cast_to_the_parameters_dtype_for_every_oracle(backend, name):
    b64 = f64(backend)
    b32 = b64.with_config(dtype="float32")
    oracle, model = oracle_for(name, b64), MODELS["mlp"]
    for b, other_dtypes in ((b64, ("float32", "int")), (b32, ("float64",))):
        params = model.init(key(0), b)
        expected = oracle(model, params, points(b), key(1))
        for dtype in other_dtypes:
            x = points(b, dtype=b.index_dtype if dtype == "int" else getattr(b.xp, dtype))
            assert_same_result(b, oracle(model, params, x, key(1)), expected, b.dtype)


@pytest.mark.parametrize("model_name", MODELS)
def test_points_and_directions_are_cast_for_models(backend, model_name):
    b = f64(backend)
    model = MODELS[model_name]
    params = model.init(key(0), b)
    x64, x32, xint = points(b), points(b, b.xp.float32), points(b, b.index_dtype)
    dense64 = b.asarray(np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]), dtype=b.dtype)
    dense32 = b.xp.astype(dense64, b.xp.float32)
    index = b.asarray([0, 2], dtype=b.index_dtype)
    expected = model.apply(params, x64)
    for x in (x32, xint):
        assert_same_result(b, [model.apply(params, x)], [expected], b.dtype)
    for directions, reference in ((dense32, dense64), (index, index)):
        jet64 = model.jet(params, x64, reference, 2)
        for x in (x64, x32, xint):
            jet = model.jet(params, x, directions, 2)
            assert_same_result(b, [jet.primal, *jet.coeffs], [jet64.primal, *jet64.coeffs], b.dtype)


def test_points_are_cast_for_losses(backend):
    b = f64(backend)
    model, oracle = Ansatz(MLP((D, 6, 1))), SparseLaplacian(num_directions=2)
    params = model.init(key(0), b)
    rhs = lambda u, x: u * u  # noqa: E731 - the loss's F(u, x)
    loss = ResidualLoss(model, oracle, rhs, lambda k: points(b))
    xi = loss.sample(key(1))
    expected = loss(params, xi)
    for x in (points(b, b.xp.float32), points(b, b.index_dtype)):
        got = loss(params, SpatialSample(x, xi.oracle))
        assert_same_result(b, [got], [expected], b.dtype)
        for fn in (residual, squared_residual_loss):
            assert_same_result(
                b,
                [fn(oracle, model, params, x, key(2), rhs)],
                [fn(oracle, model, params, points(b), key(2), rhs)],
                b.dtype,
            )


# -- problems: the coefficients play the parameters' part ------------------------------------


@pytest.mark.parametrize("name", ["allen-cahn-two-body", "biharmonic-three-body"])
def test_problems_follow_the_same_rule(backend, name):
    b, other = f64(backend), other_library(backend)
    problem = make_problem(name, D, backend=b)
    methods = (problem.exact, problem.operator_exact, problem.forcing)
    for method in methods:
        with pytest.raises(TypeError, match=rf"{b.name} \(problem\), {other.name} \(x\)"):
            method(points(other))
        expected = method(points(b))
        for x in (points(b, b.xp.float32), points(b, b.index_dtype)):
            assert_same_result(b, [method(x)], [expected], b.dtype)
