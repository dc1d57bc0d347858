"""Settings are checked where they enter: one message naming the setting and its range."""

import math

import pytest

import sdze
from sdze.cli import main
from sdze.solver import SolverConfig
from sdze_core.first_order import FirstOrderAdam
from sdze_core.optimizers import constant, cosine_decay, linear_decay, zo_adam, zo_sgd
from sdze_core.perturbers import CRNSPerturber
from sdze_core.validation import SettingError

NAN, INF = math.nan, math.inf

BAD_SETTINGS = [
    ("learning_rate", NAN, "a finite number > 0"),
    ("learning_rate", INF, "a finite number > 0"),
    ("learning_rate", 0.0, "a finite number > 0"),
    ("learning_rate", -1e-3, "a finite number > 0"),
    ("learning_rate", "fast", "a finite number > 0"),
    ("steps", 0, "an int >= 1"),
    ("steps", -5, "an int >= 1"),
    ("steps", 2.5, "an int >= 1"),
    ("eval_every", 0, "an int >= 1"),
    ("checkpoint_every", 0, "an int >= 1"),
    ("test_points", 0, "an int >= 1"),
    ("eps", 0.0, "a finite number > 0"),
    ("eps", NAN, "a finite number > 0"),
    ("eps", INF, "a finite number > 0"),
    ("num_queries", 0, "an int >= 1"),
    ("num_directions", 0, "an int >= 1"),
    ("batch_size", 0, "an int >= 1"),
    ("width", 0, "an int >= 1"),
    ("depth", True, "an int >= 1"),
    ("rank", 0, "an int >= 1"),
    ("refresh_every", -1, "an int >= 1"),
    ("seed", -1, "an int >= 0"),
    ("adam_b2", 1.0, r"in \[0, 1\)"),
    ("adam_b2", NAN, r"in \[0, 1\)"),
    ("input_memory", 0.0, "a finite number > 0"),
    ("blowup", 1.0, r"a number > 1 \(inf disables the test\)"),
    ("blowup", NAN, r"a number > 0 \(inf allowed\)"),
    ("dtype", "float16", "one of 'float32', 'float64'"),
    ("rng", "random", "one of 'native', 'portable'"),
]


@pytest.mark.parametrize("name, value, rule", BAD_SETTINGS,
                         ids=[f"{n}={v!r}" for n, v, _ in BAD_SETTINGS])
def test_solver_config_names_the_setting_and_its_range(name, value, rule):
    config = SolverConfig("allen-cahn-two-body", 6, **{name: value})
    with pytest.raises(SettingError, match=rf"^{name} must be {rule}, got ") as raised:
        config.resolved()
    assert raised.value.name == name


@pytest.mark.parametrize("problem, dim, smallest", [("allen-cahn-two-body", 1, 2),
                                                    ("poisson-three-body", 2, 3)])
def test_dimension_rule_of_each_problem(problem, dim, smallest):
    with pytest.raises(SettingError, match=rf"^dim must be an int >= {smallest}, got {dim}$"):
        SolverConfig(problem, dim).resolved()


def test_solve_refuses_before_running(tmp_path):
    with pytest.raises(SettingError, match="learning_rate must be a finite number > 0, got nan"):
        sdze.solve("allen-cahn-two-body", 6, out=tmp_path / "run", learning_rate=NAN)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be an int >= 1, got 0"),
    (["--steps", "-5", "--schedule", "constant"], "--steps must be an int >= 1, got -5"),
    (["--eval-every", "0"], "--eval-every must be an int >= 1, got 0"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be an int >= 1, got 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
    (["--learning-rate", "-0.1"], "--learning-rate must be a finite number > 0, got -0.1"),
    (["--eps", "inf"], "--eps must be a finite number > 0, got inf"),
    (["--num-queries", "0"], "--num-queries must be an int >= 1, got 0"),
])
def test_cli_names_the_option(tmp_path, capsys, argv, message):
    code = main(["solve", "allen-cahn-two-body", "--dim", "4", "--quiet",
                 "--out", str(tmp_path / "run"), *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err == f"sdze solve: error: {message}\n"
    assert "decay_steps" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make, name", [
    (lambda: CRNSPerturber(eps=INF), "eps"),
    (lambda: zo_adam(1e-3, eps=0.0), "eps"),
    (lambda: zo_adam(1e-3, b2=NAN), "b2"),
    (lambda: zo_adam(INF), "learning_rate"),
    (lambda: zo_sgd(NAN), "learning_rate"),
    (lambda: zo_sgd(1e-3, momentum=NAN), "momentum"),
    (lambda: constant(-1.0), "learning_rate"),
    (lambda: constant(NAN), "learning_rate"),
    (lambda: linear_decay(NAN, 10), "init_value"),
    (lambda: linear_decay(1.0, 10, end_value=-1.0), "end_value"),
    (lambda: cosine_decay(1.0, 10, alpha=2.0), "alpha"),
    (lambda: cosine_decay(1.0, 1.5), "decay_steps"),
    (lambda: FirstOrderAdam(NAN), "learning_rate"),
    (lambda: FirstOrderAdam(1e-3, eps=INF), "eps"),
    (lambda: FirstOrderAdam(1e-3, b1=-0.1), "b1"),
])
def test_constructors_refuse_bad_values(make, name):
    with pytest.raises(SettingError, match=rf"^{name} must be ") as raised:
        make()
    assert raised.value.name == name


def test_constant_zero_still_freezes_the_parameters():
    assert constant(0.0)(5) == 0.0
