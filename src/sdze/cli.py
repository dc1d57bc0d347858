"""The ``sdze`` command line.

* ``sdze solve PROBLEM --dim D [options]`` trains a PINN for a benchmark
  problem, a registered one, or the user's own given as ``module:factory``
  or ``path/to/file.py:factory`` (see :func:`sdze.solve`, docs/problems.md)
  with a progress bar, and writes ``metrics.json``, ``checkpoint.npz``,
  ``loss.png`` and ``error.png``;
* ``sdze eval CHECKPOINT`` evaluates a saved network against the exact solution;
* ``sdze list`` shows the problems (built-in and registered), operators and
  backends available here;
* ``sdze version`` prints the version.

A user's error (a bad setting, a missing or foreign file, a backend or
device that is not here) is one line on stderr, ``sdze COMMAND: error:
...``, and exit status 2; ``--debug`` shows the traceback instead. A run
that diverges also exits with 2, after its report.
"""

from __future__ import annotations

import argparse
import json
import sys

import sdze
from sdze_core.validation import SettingError


def _list(args) -> int:
    from sdze_core import oracles
    from sdze_core.problem_registry import describe_problem, known_problems
    from sdze_core.problems import EQUATIONS, PROBLEMS

    print("problems (sdze solve NAME --dim D):")
    for name, (equation, solution) in PROBLEMS.items():
        eq = EQUATIONS[equation]
        operator = "Δ²" if eq.order == 4 else "Δ"
        print(f"  {name:<24} {operator}u ... on the {eq.boundary}, {solution} solution")
    for name in known_problems():
        if name not in PROBLEMS:
            print(f"  {name:<24} {describe_problem(name)}")
    print("  your own: sdze solve MODULE:FACTORY --dim D, or FILE.py:FACTORY (docs/problems.md)")
    print("operators (jet oracles, sdze_core.oracles):")
    for name in oracles.__all__:
        obj = getattr(oracles, name)
        if isinstance(obj, type) and issubclass(obj, oracles.Oracle) and obj is not oracles.Oracle:
            doc = (obj.__doc__ or "").strip().splitlines()[0]
            print(f"  {name:<24} {doc}")
    status = sdze.available_backends()
    width = max(map(len, status))
    print("backends (--backend NAME; sdze.use(NAME); SDZE_BACKEND sets the default):")
    for name, reason in status.items():
        mark = "ok " if reason == "ok" else "-- "
        print(f"  {mark}{name:<{width}}  {'' if reason == 'ok' else reason}".rstrip())
    print(f"current default: {sdze.get_backend()!r}")
    return 0


def _version(args) -> int:
    print(f"sdze {sdze.__version__}")
    return 0


def _solve(args) -> int:
    from .solver import SolverConfig

    settings = {}
    for field in SolverConfig.__dataclass_fields__:
        value = getattr(args, field, None)
        if value is not None and field not in ("problem", "dim"):
            settings[field] = value
    result = sdze.solve(
        args.problem, args.dim, out=args.out or "auto", resume=args.resume, quiet=args.quiet,
        plots=not args.no_plots, **settings,
    )
    used = result.run.config.num_directions
    if args.num_directions is not None and args.num_directions != used:
        print(f"note: --num-directions {args.num_directions} is more than the {used} directions "
              f"of {result.run.config.problem} at d = {result.run.config.dim}; used and recorded "
              f"{used} (all of them)", file=sys.stderr)
    m = result.metrics
    errors = (
        "no errors (the problem has no exact solution)" if result.rel_l2 is None
        else f"relative L2 error {result.rel_l2:.3e}, relative L∞ error {result.rel_linf:.3e}"
    )
    print(
        f"{result.status}: step {m['final']['step']}, {errors}, {m['it_per_s']:.1f} it/s, "
        f"peak memory {m['peak_memory_bytes'] / 2**20:.0f} MiB"
    )
    if result.files:
        print(f"wrote {result.out}/{', '.join(result.files)}")
    return 0 if result.status == "completed" else 2


def _eval(args) -> int:
    from .solver import evaluate_checkpoint

    report = evaluate_checkpoint(args.checkpoint, backend=args.backend,
                                 test_points=args.test_points)
    print(json.dumps(report, indent=2))
    return 0


def _add_solve(commands) -> None:
    from sdze_core.problems import PROBLEMS

    from .solver import ESTIMATORS, METHODS, SCHEDULES

    p = commands.add_parser(
        "solve",
        help="train a PINN for a benchmark problem or your own",
        description="Train a PINN for a PDE and report its error against the exact "
        "solution. Writes metrics.json, checkpoint.npz, loss.png and error.png into --out.",
    )
    p.add_argument("problem", nargs="?", metavar="PROBLEM",
                   help=f"a built-in ({', '.join(PROBLEMS)}), a registered name (sdze list), "
                   "or your own factory as MODULE:FACTORY or FILE.py:FACTORY "
                   "(optional with --resume)")
    p.add_argument("--dim", type=int, help="the dimension d")
    p.add_argument("--backend", help="numpy, torch, jax, cupy, ... (default: SDZE_BACKEND, numpy)")
    p.add_argument("--device", help="the backend's device, e.g. cuda:0")
    p.add_argument("--dtype", choices=("float32", "float64"))
    p.add_argument("--rng", choices=("native", "portable"),
                   help="the backend's random generator for the whole run (default native)")
    p.add_argument("--steps", type=int, help="training steps (default: per method)")
    p.add_argument("--method", choices=METHODS, help="default sdze")
    p.add_argument("--seed", type=int, help="seed of the problem, the network and the run")
    p.add_argument("--out", help="output folder (default sdze-runs/PROBLEM-dD-METHOD)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint")
    p.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--no-plots", action="store_true", help="do not write loss.png, error.png")
    p.add_argument("--preset", choices=("stde",),
                   help="a named set of defaults; stde: STDE's experimental setting (3 hidden "
                   "layers, its initialisation, radius-uniform points, 10k steps, b2 0.999)")
    g = p.add_argument_group("model, estimator and optimizer")
    g.add_argument("--width", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--init-scheme", choices=("glorot", "stde"),
                   help="weights N(0, 2/(fan_in+fan_out)), biases 0 (default) or STDE's U(±1/√fan)")
    g.add_argument("--sampling", choices=("volume", "radius"),
                   help="training and test points uniform in volume (default) or in radius")
    g.add_argument("--batch-size", type=int, help="collocation points per step (default 100)")
    g.add_argument("--num-directions", type=int, help="sampled dimensions V (default 16)")
    g.add_argument("--unbiased", action="store_true", default=None,
                   help="unbiased residual loss r̂₁ r̂₂")
    g.add_argument("--learning-rate", type=float)
    g.add_argument("--schedule", choices=SCHEDULES)
    g.add_argument("--adam-b2", type=float, help="Adam's (and ZO-Adam's) second-moment decay")
    g.add_argument("--perturbation", choices=("activity", "subspace"),
                   help="SDZE: perturb activities (default) or weights in low-rank subspaces")
    g.add_argument("--optimizer", choices=("adafactor", "adam", "sgd"),
                   help="SDZE with activity perturbations: the optimizer (default adafactor; "
                   "adam keeps 2 P moments)")
    g.add_argument("--num-queries", type=int,
                   help="SDZE: perturbations per step q (activity: per layer, default 1; "
                   "subspace: default 5)")
    g.add_argument("--eps", type=float, help="SDZE: finite-difference step ε")
    g.add_argument("--estimator", choices=ESTIMATORS, help="SDZE: central difference or forward")
    g.add_argument("--rank", type=int, help="SDZE: subspace rank r")
    g.add_argument("--refresh-every", type=int, help="SDZE: basis refresh period T")
    g.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=None,
                   help="SDZE: perturb one layer per query (default on)")
    g.add_argument("--residual-aligned", action=argparse.BooleanOptionalAction, default=None,
                   help="SDZE: align the first layer's input basis with the residual-weighted "
                   "inputs (default on)")
    g.add_argument("--eval-every", type=int)
    g.add_argument("--test-points", type=int)
    g.add_argument("--checkpoint-every", type=int)
    p.set_defaults(run=_solve)


def _add_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, show the traceback instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdze", description=sdze.__doc__.splitlines()[0])
    _add_debug(parser, False)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_solve(commands)
    e = commands.add_parser("eval", help="evaluate a checkpoint against the exact solution")
    e.add_argument("checkpoint")
    e.add_argument("--backend", help="backend to evaluate on (default: the current default)")
    e.add_argument("--test-points", type=int)
    e.set_defaults(run=_eval)
    commands.add_parser("list", help="problems, operators and backends").set_defaults(run=_list)
    commands.add_parser("version", help="print the version").set_defaults(run=_version)
    for sub in commands.choices.values():
        _add_debug(sub, argparse.SUPPRESS)  # also after the command; keeps an earlier --debug
    return parser


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of the parser and its subcommands."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
    return found


def _message(error: BaseException, options: set[str]) -> str:
    """One line: a setting named as its option (``--learning-rate``), lines joined."""
    if isinstance(error, SettingError):
        option = "--" + error.name.replace("_", "-")
        if option in options:
            return f"{option} must be {error.rule}, got {error.value!r}"
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or repr(error)


#: What a user's mistake raises: bad values and files (ValueError, OSError), a backend
#: or library that is not installed (ImportError), a device that is not here (RuntimeError).
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "solve" and args.resume is None and (args.problem is None or
                                                           args.dim is None):
        parser.error("solve needs PROBLEM and --dim (or --resume CKPT)")
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"sdze {args.command}: error: {_message(error, _options(parser))}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
