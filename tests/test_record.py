"""The record is the run: settings as used, the rng mode, honest messages, the network as it is."""

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import sdze
from sdze.checkpoint import load_network
from sdze.cli import main
from sdze.solver import SolverConfig, build
from sdze_core.engine import SDZE
from sdze_core.keys import fold_in, key
from sdze_core.objectives import with_model
from sdze_core.optimizers import zo_adam
from sdze_core.perturbers import CRNSPerturber
from sdze_core.samplers import LowRankSubspace

SMALL = dict(width=8, depth=2, batch_size=10, num_directions=3, num_queries=2, test_points=100)


def small(tmp_path, name="run", **settings):
    options = SMALL | dict(steps=6, eval_every=3) | settings
    return sdze.solve("allen-cahn-two-body", 4, out=tmp_path / name, quiet=True, **options)


# -- settings as used -----------------------------------------------------------------------


@pytest.mark.parametrize("problem, dim, asked, used", [
    ("allen-cahn-two-body", 10, 50, 10),            # d coordinates for Δ
    ("biharmonic-three-body", 4, 16, 6),            # d (d - 1) / 2 pairs for Δ²
    ("poisson-two-body", 10, 7, 7),                 # below the cap: as asked
])
def test_num_directions_is_recorded_as_used(problem, dim, asked, used):
    config = SolverConfig(problem, dim, num_directions=asked, backend="numpy").resolved()
    assert config.num_directions == used
    run = build(config)
    oracle = run.loss.oracle
    assert getattr(oracle, "num_directions", getattr(oracle, "num_pairs", None)) == used


def test_cli_records_and_says_the_capped_num_directions(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["solve", "allen-cahn-two-body", "--dim", "4", "--num-directions", "50",
                 "--width", "8", "--depth", "2", "--steps", "2", "--test-points", "100",
                 "--quiet", "--no-plots", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "--num-directions 50 is more than the 4 directions" in err
    assert json.loads((out / "metrics.json").read_text())["config"]["num_directions"] == 4


# -- the rng mode ------------------------------------------------------------------------------


def test_rng_mode_is_a_config_field_for_the_whole_run(tmp_path):
    with sdze.use("numpy", rng="portable"):
        scoped = small(tmp_path, "scoped")
    explicit = small(tmp_path, "explicit", backend="numpy", rng="portable")
    native = small(tmp_path, "native", backend="numpy")
    for result, mode in ((scoped, "portable"), (explicit, "portable"), (native, "native")):
        assert result.run.config.rng == mode and result.run.backend.rng == mode
        assert result.metrics["config"]["rng"] == mode
        assert f"rng={mode}" in result.metrics["backend"]
    # Inside the scope or by the setting: the same run, draw for draw.
    assert [r["loss"] for r in scoped.history] == [r["loss"] for r in explicit.history]
    assert [r["loss"] for r in scoped.history] != [r["loss"] for r in native.history]
    # A resume keeps the recorded mode, whatever the scope.
    resumed = sdze.solve(resume=explicit.checkpoint, out=None, quiet=True, steps=9)
    assert resumed.run.config.rng == "portable"


def test_configs_written_before_the_rng_field_read_as_native():
    data = SolverConfig("allen-cahn-two-body", 4).to_json()
    del data["rng"]
    assert SolverConfig.from_json(data).rng == "native"


# -- messages say what happened --------------------------------------------------------------


def test_no_plots_line_names_only_what_was_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["solve", "allen-cahn-two-body", "--dim", "4", "--width", "8", "--depth", "2",
                 "--steps", "2", "--test-points", "100", "--quiet", "--no-plots",
                 "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"wrote {out}/metrics.json, checkpoint.npz"
    assert not (out / "loss.png").exists() and not (out / "error.png").exists()


# -- the network in a checkpoint --------------------------------------------------------------


def test_load_network_merges_the_pending_update(tmp_path):
    result = small(tmp_path, steps=8, refresh_every=100,  # no refresh: A holds every step
                   perturbation="subspace")
    path = result.checkpoint
    ckpt = sdze.load_checkpoint(path, "numpy")
    assert any(np.any(A != 0) for A in ckpt.state.sampler.pending)
    network = load_network(path)
    run, b = result.run, result.run.backend
    as_backend = [{k: b.asarray(v) for k, v in p.items()} for p in network]
    errors = run.test.errors(run.model, as_backend)
    assert errors["rel_l2"] == pytest.approx(result.rel_l2, rel=1e-5)
    raw = run.test.errors(run.model, ckpt.params)  # params/<l>/W alone: another network
    assert raw["rel_l2"] != pytest.approx(result.rel_l2, rel=1e-5)
    # The NumPy-only recipe of sdze.checkpoint's docstring gives the same first layer.
    import json as json_module

    with np.load(path, allow_pickle=False) as z:
        header = json_module.loads(str(z["__sdze__"]))
        sampler = header["state"]["fields"]["sampler"]["fields"]
        W0 = z["params/0/W"]
        A = z[sampler["pending"]["__tuple__"][0]["__array__"]]
        U, V = (z[a["__array__"]] for a in sampler["bases"]["__tuple__"][0]["__tuple__"])
        W0 = W0 + U @ A @ V.T
    np.testing.assert_allclose(W0, network[0]["W"], rtol=1e-5, atol=1e-6)


def test_load_network_of_a_merged_state_is_the_stored_one(tmp_path):
    result = small(tmp_path, method="zo-full", learning_rate=1e-12)
    ckpt = sdze.load_checkpoint(result.checkpoint, "numpy")
    for p, q in zip(load_network(result.checkpoint), ckpt.params, strict=True):
        np.testing.assert_array_equal(p["W"], q["W"])


# -- what a loss must be -----------------------------------------------------------------------


@dataclass(frozen=True)
class _IgnoresItsModel:
    """A loss that evaluates the plain network whatever model it is given: shape ()."""

    model: Any
    loss: Any

    def sample(self, k):
        return self.loss.sample(k)

    def __call__(self, params, xi):
        return self.loss(params, xi)


@dataclass(frozen=True)
class _NoResiduals(_IgnoresItsModel):
    """A loss that evaluates its model but has no residuals."""

    def __call__(self, params, xi):
        return with_model(self.loss, self.model)(params, xi)


class _NoModelField:
    """A loss with no `model` field for the perturbed model."""

    def __init__(self, loss):
        self.loss = loss

    def sample(self, k):
        return self.loss.sample(k)

    def __call__(self, params, xi):
        return self.loss(params, xi)


def _engine_and_params(backend, residual_aligned=False):
    run = build(SolverConfig("allen-cahn-two-body", 4, backend=backend.name, **SMALL),
                backend=backend)
    params = run.model.init(fold_in(key(0), "params"), backend)
    engine = SDZE(CRNSPerturber(num_queries=2),
                  LowRankSubspace(rank=2, residual_aligned=residual_aligned), zo_adam(1e-3))
    return run, engine, params, engine.init(key(1), params)


def test_a_loss_that_ignores_its_model_is_a_clear_error(backend):
    run, engine, params, state = _engine_and_params(backend)
    with pytest.raises(ValueError, match=r"the loss returned shape \(\) for a batch of 4 "
                                         r"perturbed networks"):
        engine.step(_IgnoresItsModel(run.model, run.loss), params, state)


def test_the_perturbed_model_needs_a_place_in_the_loss(backend):
    run, engine, params, state = _engine_and_params(backend)
    with pytest.raises(TypeError, match=r"subspace perturbation \(CRNSPerturber\) needs a loss "
                                        r"that is a dataclass with a `model` field.*_NoModelField"):
        engine.step(_NoModelField(run.loss), params, state)
    with pytest.raises(TypeError, match=r"needs an MLP or a model dataclass.*got str"):
        engine.step(_IgnoresItsModel("not a model", run.loss), params, state)


def test_residual_aligned_needs_residuals(backend):
    run, engine, params, state = _engine_and_params(backend, residual_aligned=True)
    with pytest.raises(TypeError, match=r"residual_aligned=True.*_NoResiduals has none"):
        engine.step(_NoResiduals(run.model, run.loss), params, state)
    engine.step(run.loss, params, state)  # a ResidualLoss is fine
