"""Divergence loses nothing: a non-finite update is never applied, a blow-up is caught at the
step, every saved state had a finite, not blown-up loss, and NaN networks report NaN errors."""

import json
import math

import numpy as np
import pytest

import sdze
from helpers import host, host_params
from sdze.cli import main
from sdze.solver import SolverConfig, build
from sdze_core.engine import SDZE
from sdze_core.first_order import FirstOrderAdam
from sdze_core.keys import fold_in, key
from sdze_core.optimizers import zo_adam
from sdze_core.perturbers import CRNSPerturber, NonFiniteLossError, NonFiniteUpdateError
from sdze_core.samplers import LowRankSubspace
from sdze_core.training import TrainState, train

SMALL = dict(width=8, depth=2, batch_size=10, num_directions=3, num_queries=2, test_points=100)


def small_run(backend, method="sdze", **settings):
    config = SolverConfig("allen-cahn-two-body", 4, method=method, backend=backend.name,
                          **(SMALL | settings))
    run = build(config, backend=backend)
    return run, run.model.init(fold_in(key(0), "params"), backend)


def nan_after(step, rate=1e-2):
    return lambda t: rate if t < step else math.nan


def test_nan_learning_rate_update_is_not_applied(backend):
    run, params = small_run(backend)
    engine = SDZE(CRNSPerturber(num_queries=2), LowRankSubspace(rank=2, refresh_every=10),
                  zo_adam(nan_after(2)))
    state = engine.init(key(1), params)
    for _ in range(2):
        params, state, _ = engine.step(run.loss, params, state)
    saved = host_params(backend, params)
    pending = [host(backend, A) for A in state.sampler.pending]
    with pytest.raises(NonFiniteUpdateError, match=r"^step 2: the update is not finite") as err:
        engine.step(run.loss, params, state)
    assert err.value.reason == "non-finite update" and err.value.step == 2
    assert np.all(np.isfinite(err.value.losses))
    assert err.value.state.step == 2
    for p, q in zip(host_params(backend, err.value.params), saved, strict=True):
        for name in ("W", "b"):
            np.testing.assert_array_equal(p[name], q[name])
    for A, saved_A in zip(err.value.state.sampler.pending, pending, strict=True):
        np.testing.assert_array_equal(host(backend, A), saved_A)
        assert np.all(np.isfinite(saved_A))


@pytest.mark.skip_backends("numpy", "array_api_strict", "cupy",
                           reason="first-order needs the backend's autodiff (torch, jax)")
def test_first_order_nan_learning_rate_update_is_not_applied(backend):
    run, params = small_run(backend, method="first-order")
    method = FirstOrderAdam(nan_after(1, 1e-3))
    state = method.init(key(1), params)
    params, state, _ = method.step(run.loss, params, state)
    saved = host_params(backend, params)
    with pytest.raises(NonFiniteUpdateError, match=r"^step 1: the update is not finite"):
        method.step(run.loss, params, state)
    for p, q in zip(host_params(backend, params), saved, strict=True):
        for name in ("W", "b"):
            np.testing.assert_array_equal(p[name], q[name])


def test_every_checkpoint_of_a_nan_schedule_run_is_finite(backend, tmp_path):
    """The rate turns NaN at step 7: the run stops there, says why, and every state handed
    to on_checkpoint (written and read back) is finite, the last one the network before."""
    run, params = small_run(backend)
    method = SDZE(CRNSPerturber(num_queries=2), LowRankSubspace(rank=2, refresh_every=5),
                  zo_adam(nan_after(7)))
    saved = []

    def on_checkpoint(params, state):
        path = sdze.save_checkpoint(tmp_path / f"step{state.step}.npz", params=params,
                                    state=state.method, config={})
        saved.append(sdze.load_checkpoint(path, "numpy"))

    result = train(method, run.loss, params, TrainState(method.init(key(0), params)), 20,
                   model=run.model, eval_every=3, on_checkpoint=on_checkpoint)
    assert result.divergence.reason == "non-finite update" and result.divergence.step == 7
    assert result.good and result.state.step == 7
    assert [c.state.step for c in saved] == [3, 6]
    for c in saved:
        assert all(np.all(np.isfinite(p[n])) for p in c.params for n in ("W", "b"))
        assert all(np.all(np.isfinite(A)) for A in c.state.sampler.pending)
    for p in host_params(backend, result.params):
        assert np.all(np.isfinite(p["W"])) and np.all(np.isfinite(p["b"]))


def test_blow_up_is_caught_at_the_step_and_never_saved(backend):
    """Learning rate 1e4 (the issue's case): the loss jumps by orders of magnitude at once;
    the run stops at that step, long before its first record, and with a checkpoint due
    at every step, the blown-up network is checked and not saved."""
    # the subspace estimator: activity perturbation's step overflows at this rate and is
    # refused as a non-finite update (tests/test_solve.py), before any loss can blow up
    run, params = small_run(backend, learning_rate=1e4, schedule="constant",
                            perturbation="subspace")

    def go(checkpoint_every):
        losses, saved = [], []
        params = run.model.init(fold_in(key(0), "params"), backend)
        result = train(run.method, run.loss, params,
                       TrainState(run.method.init(key(0), params)), 100, model=run.model,
                       eval_every=50, checkpoint_every=checkpoint_every,
                       on_step=lambda t, value: losses.append(value),
                       on_checkpoint=lambda p, s: saved.append(s.step))
        assert result.divergence.reason == "loss blow-up" and not result.good
        assert result.state.history == []
        return result.divergence, losses, saved

    divergence, losses, _ = go(checkpoint_every=50)
    t = divergence.step
    assert 0 < t < 10 and divergence.message.startswith(f"step {t}: the loss ")
    assert losses[t] > 1e4 * losses[0] and max(losses[:t]) <= 1e4 * losses[0]
    divergence, _, saved = go(checkpoint_every=1)
    assert divergence.step == t and "it was not saved" in divergence.message
    assert saved == list(range(1, t))


def test_cli_reports_the_blow_up_not_completed(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["solve", "allen-cahn-two-body", "--dim", "4", "--width", "8", "--depth", "2",
                 "--test-points", "100", "--steps", "200", "--learning-rate", "1e4",
                 "--schedule", "constant", "--perturbation", "subspace", "--quiet", "--no-plots",
                 "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 2
    last = printed.out.strip().splitlines()
    assert last[-2].startswith("diverged: loss blow-up at step ")
    assert last[-1] == f"wrote {out}/metrics.json"  # no checkpoint: none was good
    assert "no good state was saved" in printed.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"].startswith("diverged: loss blow-up at step ")
    assert not (out / "checkpoint.npz").exists()


def test_errors_of_a_nan_network_are_nan(backend):
    run, params = small_run(backend)
    xp = backend.xp
    params[-1]["b"] = xp.full_like(params[-1]["b"], math.nan)
    errors = run.test.errors(run.model, params)
    assert math.isnan(errors["rel_l2"]) and math.isnan(errors["rel_linf"])  # not 0.000


def test_non_finite_loss_is_still_a_non_finite_loss():
    assert issubclass(NonFiniteUpdateError, NonFiniteLossError)
    assert NonFiniteLossError.reason == "non-finite loss"
