"""The problem registry: where a problem's name leads (docs/problems.md).

A *factory* makes a problem (:class:`~sdze_core.problem_protocol.PDEProblem`)
in a given dimension::

    factory(dim, seed=0, backend=None) -> problem

(``backend`` is always given a :class:`~sdze_core.backend.Backend` by
:func:`make_problem`; ``seed`` is an int or a :class:`~sdze_core.keys.Key`).
A problem is named in one of three ways:

* a registered name: the built-in benchmarks (``"poisson-two-body"``, ...),
  names registered with :func:`register_problem`, and the entries of the
  ``sdze.problems`` entry-point group of installed packages (each entry
  ``name = "package.module:factory"``, imported only when it is used);
* ``"package.module:factory"``: a factory of an importable module;
* ``"path/to/file.py:factory"``: a factory of a Python file (imported once
  per process, again if the file changes).

Names never contain ``":"``, so the two cannot be confused. A solver run
records the name (a file's path made absolute), so that resuming it or
evaluating its checkpoint finds the same factory; a name registered by a
script must be registered again in the process that resumes.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import pathlib
import re
import sys
import threading
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

from .problem_protocol import check_problem
from .registry import get_backend

__all__ = [
    "ENTRY_POINT_GROUP",
    "UnknownProblemError",
    "ProblemSpecError",
    "register_problem",
    "known_problems",
    "builtin_problems",
    "describe_problem",
    "problem_factory",
    "canonical_problem",
    "problem_label",
    "is_builtin",
    "make_problem",
]

ENTRY_POINT_GROUP = "sdze.problems"
#: The modules whose import registers the built-in problems (:func:`_register_builtin`).
BUILTIN_MODULES = (".problems", ".hjb_kdv_problems", ".parabolic")

_FACTORIES: dict[str, Any] = {}  # name -> callable, "module:factory" or an EntryPoint
_BUILTIN: set[str] = set()
_FILE_MODULES: dict[str, tuple[int, Any]] = {}  # absolute path -> (mtime_ns, module)
_entry_points_loaded = False
_lock = threading.RLock()


class UnknownProblemError(ValueError):
    """The name is neither a registered problem nor a ``module:factory`` spec."""


class ProblemSpecError(ValueError):
    """A ``module:factory`` or ``file.py:factory`` spec that does not lead to a factory."""


# -- registration ---------------------------------------------------------------------------


def _register_builtin(name: str, factory: Callable) -> None:
    """Register a benchmark of :mod:`sdze_core.problems` (at its import)."""
    with _lock:
        _FACTORIES[name] = factory
        _BUILTIN.add(name)


def _ensure_loaded() -> None:
    """The built-ins, then the entry points (which never shadow a registered name)."""
    global _entry_points_loaded
    for module in BUILTIN_MODULES:  # their import registers the built-ins, in this order
        importlib.import_module(module, __package__)

    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ":" in entry.name or entry.name in _FACTORIES:
                why = "contains ':'" if ":" in entry.name else "is taken"
                warnings.warn(
                    f"ignored the {ENTRY_POINT_GROUP} entry point {entry.name!r} = "
                    f"{entry.value!r}: the name {why}",
                    stacklevel=3,
                )
                continue
            _FACTORIES[entry.name] = entry


def register_problem(name: str, factory: Callable | str, *, replace: bool = False) -> None:
    """Register a problem factory under ``name``, for ``sdze solve NAME`` and :func:`sdze.solve`.

    Parameters
    ----------
    name : str
        What users pass as the problem. Not empty, no ``":"`` (reserved for
        ``module:factory`` specs), no surrounding spaces.
    factory : callable or str
        ``factory(dim, seed=0, backend=None)`` returning a problem with the
        members of :class:`~sdze_core.problem_protocol.PDEProblem` (checked
        each time a problem is made), or ``"package.module:factory"``,
        imported when first used.
    replace : bool
        Replace a problem already registered under ``name`` (never a built-in).

    Raises
    ------
    ValueError
        If ``name`` is taken (a built-in, or registered without ``replace``)
        or malformed.
    TypeError
        If ``factory`` is neither callable nor a string.
    """
    if not isinstance(name, str) or not name or ":" in name or name != name.strip():
        raise ValueError(
            "a problem name is a non-empty string without ':' (reserved for MODULE:FACTORY "
            f"specs) or surrounding spaces, got {name!r}"
        )
    if not (callable(factory) or isinstance(factory, str)):
        raise TypeError(
            f"a problem factory is callable (or a 'module:factory' string), got "
            f"{type(factory).__name__}"
        )
    _ensure_loaded()
    with _lock:
        if name in _BUILTIN:
            raise ValueError(f"{name!r} is a built-in problem; register yours under another name")
        if name in _FACTORIES and not replace:
            raise ValueError(
                f"a problem named {name!r} is already registered ({describe_problem(name)}); "
                "pass replace=True to replace it"
            )
        _FACTORIES[name] = factory


def known_problems() -> list[str]:
    """Every registered name: the built-ins first, then in registration order."""
    _ensure_loaded()
    with _lock:
        return list(_FACTORIES)


def builtin_problems() -> list[str]:
    """The built-in benchmark names (:data:`sdze_core.problems.PROBLEMS`)."""
    _ensure_loaded()
    return [name for name in known_problems() if name in _BUILTIN]


def is_builtin(name: str) -> bool:
    """Whether ``name`` is a built-in benchmark."""
    _ensure_loaded()
    return name in _BUILTIN


def describe_problem(name: str) -> str:
    """One line on where a registered name's factory is, without importing it."""
    _ensure_loaded()
    with _lock:
        target = _FACTORIES.get(name)
    if target is None:
        raise _unknown(name)
    if isinstance(target, metadata.EntryPoint):
        return f"entry point {target.value}"
    if isinstance(target, str):
        return target
    target = getattr(target, "func", target)  # a functools.partial: its function's words
    doc = (getattr(target, "__doc__", None) or "").strip().splitlines()
    where = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
    return doc[0] if doc else where


def _unknown(name: str) -> UnknownProblemError:
    hint = ""
    if isinstance(name, str) and name.endswith(".py"):
        hint = f"; a problem file needs its factory: {name}:FACTORY"
    return UnknownProblemError(
        f"unknown problem {name!r}; known: {', '.join(known_problems())}; or your own as "
        f"MODULE:FACTORY or FILE.py:FACTORY (docs/problems.md){hint}"
    )


# -- finding a factory ----------------------------------------------------------------------


def problem_factory(name: str) -> Callable:
    """The factory of a registered name or of a ``module:factory`` / ``file.py:factory`` spec.

    Raises
    ------
    UnknownProblemError
        For a name that is not registered (the message lists the known ones).
    ProblemSpecError
        For a spec whose module or file is missing, lacks the attribute, or
        whose attribute is not callable.
    """
    if not isinstance(name, str):
        raise _unknown(name)
    _ensure_loaded()
    with _lock:
        target = _FACTORIES.get(name)
    if target is None:
        if ":" in name:
            return _load_spec(name)
        raise _unknown(name)
    if isinstance(target, metadata.EntryPoint):
        factory = _load_entry_point(name, target)
    elif isinstance(target, str):
        factory = _load_spec(target)
    else:
        return target
    with _lock:
        if _FACTORIES.get(name) is target:
            _FACTORIES[name] = factory  # loaded once
    return factory


def _load_entry_point(name: str, entry) -> Callable:
    try:
        factory = entry.load()
    except (ImportError, AttributeError) as error:
        raise ProblemSpecError(
            f"problem {name!r} (entry point {entry.value!r} of {ENTRY_POINT_GROUP}) cannot be "
            f"loaded: {error}"
        ) from error
    if not callable(factory):
        raise ProblemSpecError(
            f"problem {name!r}: entry point {entry.value!r} is a {type(factory).__name__}, "
            "not a callable problem factory"
        )
    return factory


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _split_spec(spec: str) -> tuple[str, str]:
    target, _, attr = spec.rpartition(":")
    if not target or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ProblemSpecError(
            f"a problem spec is MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}"
        )
    return target, attr


def _load_spec(spec: str) -> Callable:
    target, attr = _split_spec(spec)
    if _is_file(target):
        module, where = _import_file(target, spec), f"problem file {target}"
    else:
        module, where = _import_module(target, attr, spec), f"module {target!r}"
    try:
        factory = functools.reduce(getattr, attr.split("."), module)
    except AttributeError:
        names = sorted(
            n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
            and getattr(v, "__module__", None) == module.__name__
        )
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        defined = f"; it defines {shown}" if names else ""
        raise ProblemSpecError(
            f"{where} has no {attr!r} (problem spec {spec!r}){defined}"
        ) from None
    if not callable(factory):
        raise ProblemSpecError(
            f"{attr!r} of {where} is a {type(factory).__name__}, not a problem factory: it must "
            f"be callable as {attr}(dim, seed=..., backend=...) (problem spec {spec!r})"
        )
    return factory


def _import_module(target: str, attr: str, spec: str):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as error:
        if error.name and (target == error.name or target.startswith(error.name + ".")):
            raise ProblemSpecError(
                f"no module named {error.name!r} (problem spec {spec!r}): install it, put its "
                f"folder on PYTHONPATH, or name the file: path/to/file.py:{attr}"
            ) from None
        raise


def _import_file(target: str, spec: str):
    """The module of a problem file, executed once per (path, modification time)."""
    path = pathlib.Path(target).expanduser()
    if not path.is_file():
        what = "is a folder, not a Python file" if path.is_dir() else "does not exist"
        raise ProblemSpecError(f"problem file {target} {what} (problem spec {spec!r})")
    path = path.resolve()
    stamp = path.stat().st_mtime_ns
    with _lock:
        cached = _FILE_MODULES.get(str(path))
        if cached is not None and cached[0] == stamp:
            return cached[1]
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        stem = re.sub(r"\W", "_", path.stem)
        module_name = f"sdze_user_problem_{stem}_{digest}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ProblemSpecError(f"problem file {target} is not a Python file (.py) "
                                   f"(problem spec {spec!r})")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look the module up
        try:
            loader_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(module_name, None)
            raise
        _FILE_MODULES[str(path)] = (stamp, module)
        return module


def canonical_problem(name: str) -> str:
    """The name as a run records it, after checking that it leads to a factory.

    Registered names and module specs are kept; a file spec gets the file's
    absolute path, so that a resume or an evaluation from another folder
    finds it.
    """
    problem_factory(name)
    if ":" not in name:
        return name
    target, attr = _split_spec(name)
    if not _is_file(target):
        return name
    return f"{pathlib.Path(target).expanduser().resolve()}:{attr}"


def problem_label(name: str) -> str:
    """A short name fit for a folder: the name itself, ``module.factory`` or ``file.factory``."""
    if ":" not in name:
        return name
    target, _, attr = name.rpartition(":")
    return f"{pathlib.Path(target).stem if _is_file(target) else target}.{attr}"


# -- making a problem -----------------------------------------------------------------------


def make_problem(name: str, dim: int, seed=0, backend=None, **options):
    """The problem ``name`` (a registered name or a spec) in dimension ``dim``.

    Calls ``factory(dim, seed=seed, backend=backend, **options)`` with
    ``backend`` defaulting to the current one (:func:`sdze.get_backend`), and
    checks the result against :class:`~sdze_core.problem_protocol.PDEProblem`.
    The built-in benchmarks also take ``chunk`` (columns per block of their
    closed-form sums) and draw their coefficients c ~ N(0, I) with portable
    draws from ``fold_in(key(seed), "coefficients")``, so that a seed names
    the same problem on every backend.

    Raises
    ------
    ValueError
        For an unknown name (:class:`UnknownProblemError`, whose message lists
        the known ones), a spec that leads nowhere (:class:`ProblemSpecError`),
        or what the factory raises (e.g. a dimension too small for a
        benchmark's terms).
    TypeError
        If the factory returns an object without the protocol's members (the
        message names the missing ones).
    """
    factory = problem_factory(name)
    problem = factory(dim, seed=seed, backend=backend or get_backend(), **options)
    return check_problem(problem, f"problem factory {name!r}")
