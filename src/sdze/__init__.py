"""sdze: back-propagation-free training of PINNs in very high dimension.

Stochastic Taylor derivative estimators (jet oracles) for the spatial
operator, CRNS zeroth-order gradient estimates and low-rank subspace
perturbations for the parameters; every step is a forward computation, on
any array-API backend (NumPy, PyTorch, JAX, CuPy, ...).

>>> import sdze
>>> sdze.use("numpy")               # process default; SDZE_BACKEND at start
>>> with sdze.use("torch"):         # scoped to the block
...     sdze.get_backend().name
'torch'
"""

from sdze_backends import register_builtin_backends as _register_builtin_backends
from sdze_core.backend import Backend
from sdze_core.engine import SDZE, SDZEState, StepInfo
from sdze_core.keys import Key, as_key, fold_in, key, split
from sdze_core.objectives import ResidualLoss
from sdze_core.optimizers import constant, cosine_decay, linear_decay, zo_adam, zo_sgd
from sdze_core.perturbers import CRNSPerturber, NonFiniteLossError
from sdze_core.problem_protocol import PDEProblem
from sdze_core.problem_registry import known_problems, register_problem
from sdze_core.problems import PROBLEMS, Problem, make_problem
from sdze_core.registry import (
    BackendNotAvailableError,
    UnknownBackendError,
    available_backends,
    backend_of,
    get_backend,
    known_backends,
    register_backend,
    use,
)
from sdze_core.samplers import FullGaussian, LowRankSubspace

from . import random
from ._version import __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .solver import SolverConfig, SolveResult, evaluate_checkpoint, solve

_register_builtin_backends()

__all__ = [
    "__version__",
    "Backend",
    "BackendNotAvailableError",
    "CRNSPerturber",
    "FullGaussian",
    "Key",
    "LowRankSubspace",
    "NonFiniteLossError",
    "PDEProblem",
    "PROBLEMS",
    "Problem",
    "ResidualLoss",
    "SDZE",
    "SDZEState",
    "SolveResult",
    "SolverConfig",
    "StepInfo",
    "UnknownBackendError",
    "as_key",
    "available_backends",
    "backend_of",
    "constant",
    "cosine_decay",
    "evaluate_checkpoint",
    "fold_in",
    "get_backend",
    "key",
    "known_backends",
    "known_problems",
    "linear_decay",
    "load_checkpoint",
    "make_problem",
    "random",
    "register_backend",
    "register_problem",
    "save_checkpoint",
    "solve",
    "split",
    "use",
    "zo_adam",
    "zo_sgd",
]
