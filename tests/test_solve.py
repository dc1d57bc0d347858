"""The solver: outputs, independent evaluation of checkpoints, exact resume, divergence, CLI."""

import json
import shutil

import numpy as np
import pytest

import sdze
import sdze.solver as solve_module
from sdze.cli import main
from sdze_core.training import block_points

SMALL = dict(width=16, depth=2, batch_size=20, num_directions=3, test_points=250)


def run_small(tmp_path, name="run", **settings):
    options = SMALL | dict(steps=40, eval_every=10) | settings
    return sdze.solve("allen-cahn-two-body", 6, out=tmp_path / name, quiet=True, **options)


def test_solve_writes_metrics_checkpoint_and_plots(tmp_path):
    result = run_small(tmp_path)
    out = tmp_path / "run"
    for name in ("metrics.json", "checkpoint.npz", "loss.png", "error.png"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["step"] for r in metrics["history"]] == [10, 20, 30, 40]
    assert metrics["config"]["problem"] == "allen-cahn-two-body"
    default = solve_module.SolverConfig("allen-cahn-two-body", 6).resolved().learning_rate
    assert metrics["config"]["learning_rate"] == default
    assert metrics["rel_l2"] == result.rel_l2
    assert metrics["peak_memory_bytes"] > 0 and metrics["it_per_s"] > 0
    assert metrics["final"]["step"] == 40
    # The error is measured and varies: it is not 1 (zero network) and not 0.
    assert 0.0 < result.rel_l2 < 1.5


def _independent_errors(path):
    """rel-L2 / L∞ of a checkpoint, by NumPy alone: own forward pass, own u*, in float64.

    The pending low-rank update of the subspace sampler is folded in as
    W + U A Vᵀ from the stored bases. The test points are the solver's
    (portable draws, so the same on every backend).
    """
    ckpt = sdze.load_checkpoint(path, "numpy")
    config = ckpt.config["solver"]
    c = np.asarray(ckpt.extra["coefficients"], dtype=np.float64)
    layers = [{k: np.asarray(v, dtype=np.float64) for k, v in p.items()} for p in ckpt.params]
    sampler = getattr(ckpt.state, "sampler", None)  # activity perturbation: nothing pending
    for layer, A in enumerate(sampler.pending if sampler is not None else ()):
        U, V = (np.asarray(a, dtype=np.float64) for a in sampler.bases[layer])
        layers[layer]["W"] = layers[layer]["W"] + U @ np.asarray(A, np.float64) @ V.T

    def u_theta(x):
        h = x
        for i, p in enumerate(layers):
            h = h @ p["W"].T + p["b"]
            if i < len(layers) - 1:
                h = np.tanh(h)
        return (1 - np.sum(x * x, axis=1)) * h[:, 0]

    def u_star(x):
        a, b = x[:, :-1], x[:, 1:]
        return (1 - np.sum(x * x, axis=1)) * (np.sin(a + np.cos(b) + b * np.cos(a)) @ c)

    run = solve_module.build(solve_module.SolverConfig.from_json(config))
    xs = np.concatenate([np.asarray(x, np.float64) for x, _ in run.test.blocks()])
    assert xs.shape == (config["test_points"], config["dim"])
    assert run.test.num_points > block_points(6)  # several blocks
    diff = u_theta(xs) - u_star(xs)
    ref = u_star(xs)
    return (
        np.sqrt(np.sum(diff**2) / np.sum(ref**2)),
        np.max(np.abs(diff)) / np.max(np.abs(ref)),
    )


@pytest.mark.parametrize("perturbation", ["activity", "subspace"])
def test_reported_error_agrees_with_independent_evaluation(tmp_path, perturbation):
    result = run_small(tmp_path, perturbation=perturbation)
    rel_l2, rel_linf = _independent_errors(tmp_path / "run" / "checkpoint.npz")
    # float32 network vs a float64 re-evaluation: agreement to float32 round-off.
    assert result.rel_l2 == pytest.approx(rel_l2, rel=1e-4)
    assert result.rel_linf == pytest.approx(rel_linf, rel=1e-4)
    report = sdze.evaluate_checkpoint(tmp_path / "run" / "checkpoint.npz", backend="numpy")
    assert report["rel_l2"] == pytest.approx(result.rel_l2, rel=1e-6)


def test_checkpoint_evaluates_on_another_backend(tmp_path):
    pytest.importorskip("torch", reason="torch is not installed: cross-backend evaluation")
    result = run_small(tmp_path)
    report = sdze.evaluate_checkpoint(tmp_path / "run" / "checkpoint.npz", backend="torch")
    assert report["backend"] == "torch"
    assert report["rel_l2"] == pytest.approx(result.rel_l2, rel=1e-4)


@pytest.mark.parametrize("method", ["sdze", "sdze-subspace", "first-order"])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, monkeypatch, backend, method):
    backend_name = backend.name
    if method == "first-order" and backend_name not in ("torch", "jax"):
        pytest.skip(f"first-order needs autodiff (torch, jax), not {backend_name}: "
                    "numpy's refusal is tested below")
    # Keep a copy of the checkpoint written at step 20 of a 40-step run.
    real_save = solve_module.save_checkpoint

    def save_and_copy(path, **kwargs):
        written = real_save(path, **kwargs)
        if kwargs["state"].step == 20:
            shutil.copy(written, tmp_path / "step20.npz")
        return written

    monkeypatch.setattr(solve_module, "save_checkpoint", save_and_copy)
    settings = dict(backend=backend_name, method=method, checkpoint_every=10, refresh_every=15)
    if method == "sdze-subspace":
        settings |= dict(method="sdze", perturbation="subspace")
    whole = run_small(tmp_path, "whole", **settings)
    monkeypatch.setattr(solve_module, "save_checkpoint", real_save)
    resumed = sdze.solve(out=tmp_path / "resumed", resume=tmp_path / "step20.npz", quiet=True)
    assert resumed.run.config == whole.run.config
    for a, b in zip(whole.params, resumed.params, strict=True):
        for name in ("W", "b"):
            x, y = (np.asarray(sdze.backend_of(v).to_host(v)) for v in (a[name], b[name]))
            np.testing.assert_array_equal(x, y)
    assert resumed.rel_l2 == whole.rel_l2
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]


def test_resume_refuses_a_different_problem(tmp_path):
    run_small(tmp_path)
    with pytest.raises(ValueError, match="dim: checkpoint has 6, requested 7"):
        sdze.solve("allen-cahn-two-body", 7, resume=tmp_path / "run" / "checkpoint.npz",
                   out=None, quiet=True)


def test_divergence_stops_and_keeps_the_last_good_state(tmp_path):
    # 0.5, not 50: the blow-up is now caught at the step (50 blows up at step 1, before
    # any checkpoint); 0.5 blows up after several records, whose checkpoints are kept.
    result = run_small(tmp_path, learning_rate=0.5, schedule="constant", steps=200, blowup=10.0,
                       perturbation="subspace")
    assert result.status.startswith("diverged: loss blow-up at step ")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == result.status and metrics["divergence"]["step"] < 200
    ckpt = sdze.load_checkpoint(tmp_path / "run" / "checkpoint.npz", "numpy")
    assert ckpt.state.step <= metrics["divergence"]["step"]
    assert all(np.all(np.isfinite(p["W"])) for p in ckpt.params)
    # The saved state is the last one whose loss was not blown up: no saved record
    # broke the rule (loss > blowup x the best earlier one), and the record that
    # did, at the divergence step, is not in the checkpoint.
    good = [r["loss"] for r in ckpt.extra["train"]["history"]]
    assert good and all(good[i] <= 10.0 * min(good[:i]) for i in range(1, len(good)))
    assert ckpt.extra["train"]["history"][-1]["step"] < metrics["divergence"]["step"]


@pytest.mark.parametrize("optimizer", ["adafactor", "adam", "sgd"])
def test_activity_update_that_is_not_finite_is_not_applied(tmp_path, optimizer):
    """A learning rate so large that the update overflows: the run stops, saying so,
    and the checkpoint holds finite parameters."""
    lr = 1e30 if optimizer == "sgd" else 1e36
    result = run_small(tmp_path, learning_rate=lr, schedule="constant", steps=40,
                       optimizer=optimizer)
    assert result.status.startswith("diverged"), result.status
    path = tmp_path / "run" / "checkpoint.npz"
    if path.exists():  # none is written when the run stops before its first checkpoint
        ckpt = sdze.load_checkpoint(path, "numpy")
        assert all(np.all(np.isfinite(p[k])) for p in ckpt.params for k in ("W", "b"))
    host = [{k: np.asarray(sdze.backend_of(v).to_host(v)) for k, v in p.items()}
            for p in result.params]
    assert all(np.all(np.isfinite(p[k])) for p in host for k in ("W", "b"))


def test_first_order_on_numpy_is_a_clear_error(tmp_path, capsys):
    code = main(["solve", "poisson-two-body", "--dim", "4", "--backend", "numpy",
                 "--method", "first-order", "--steps", "2", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "numpy" in err and "automatic differentiation" in err


def test_cli_solve_and_eval(tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["solve", "poisson-three-body", "--dim", "5", "--steps", "20", "--eval-every",
                 "10", "--width", "16", "--depth", "2", "--test-points", "200", "--out",
                 str(out), "--quiet", "--seed", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "relative L2 error" in printed and "step 10" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["seed"] == 3 and metrics["config"]["problem"] == "poisson-three-body"
    assert main(["eval", str(out / "checkpoint.npz")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rel_l2"] == pytest.approx(metrics["rel_l2"], rel=1e-6)


def test_cli_needs_problem_and_dim():
    with pytest.raises(SystemExit):
        main(["solve", "poisson-two-body"])


def test_list_shows_problems_and_operators(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in sdze.PROBLEMS:
        assert name in out
    assert "SparseLaplacian" in out


@pytest.mark.parametrize("perturbation", ["activity", "subspace"])
def test_non_finite_loss_stops_with_the_last_good_state_saved(tmp_path, monkeypatch,
                                                               perturbation):
    """A NaN forcing from step 15 on: the run stops at step 15 and keeps the checkpoint of
    step 10, the last state whose loss was finite (step 15's network had a NaN loss)."""
    from sdze_core.activity import ActivityPerturbation
    from sdze_core.engine import SDZE
    from sdze_core.problems import Problem

    engine = ActivityPerturbation if perturbation == "activity" else SDZE
    real_forcing, real_step = Problem.forcing, engine.step
    nan = {"on": False}

    def forcing(self, x):
        f = real_forcing(self, x)
        return f * float("nan") if nan["on"] else f

    def step(self, loss, params, state):
        nan["on"] = state.step >= 15
        return real_step(self, loss, params, state)

    monkeypatch.setattr(Problem, "forcing", forcing)
    monkeypatch.setattr(engine, "step", step)
    result = run_small(tmp_path, steps=40, eval_every=10, perturbation=perturbation)
    assert result.status == "diverged: non-finite loss at step 15"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["divergence"]["step"] == 15
    assert metrics["final"]["step"] == 10
    ckpt = sdze.load_checkpoint(tmp_path / "run" / "checkpoint.npz", "numpy")
    assert ckpt.state.step == 10
    assert all(np.all(np.isfinite(p["W"])) for p in ckpt.params)
    assert np.isfinite(result.rel_l2)
