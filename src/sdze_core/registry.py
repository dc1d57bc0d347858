"""Backend registry, runtime selection and dispatch by array.

* ``register_backend(name, "module:Class", library=..., extra=...)`` records
  a backend lazily: nothing is imported until it is used. Third-party
  packages register through the ``sdze.backends`` entry-point group, whose
  entries point at a :class:`~sdze_core.backend.Backend` subclass.
* ``use(name, device=, dtype=, rng=)`` sets the process default; used as a
  context manager (``with use("jax"): ...``) it only scopes the choice, in a
  :class:`contextvars.ContextVar` (thread- and asyncio-safe).
* ``get_backend()`` returns the backend in force; ``SDZE_BACKEND`` names the
  default at start (``numpy`` otherwise).
* ``backend_of(*arrays)`` follows the arrays: whatever the default, arrays of
  one library get that library's backend (on their device, in their float
  dtype); arrays of two libraries raise ``TypeError``; arrays of an unknown
  library with ``__array_namespace__`` get a :class:`NamespaceBackend`.
"""

from __future__ import annotations

import contextvars
import importlib
import os
import sys
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .backend import Backend

__all__ = [
    "BackendNotAvailableError",
    "UnknownBackendError",
    "NamespaceBackend",
    "register_backend",
    "known_backends",
    "available_backends",
    "load_backend_class",
    "make_backend",
    "use",
    "get_backend",
    "backend_of",
    "resolve_backend",
    "check_one_library",
]

ENTRY_POINT_GROUP = "sdze.backends"


class UnknownBackendError(ValueError):
    """The name is not a registered backend."""


class BackendNotAvailableError(ImportError):
    """The backend is registered, but its library is missing or finds no device."""


@dataclass(frozen=True)
class BackendSpec:
    """A lazily loaded backend: where its class is and what it needs."""

    name: str
    target: str | type  # "module:Class" or the class itself
    library: str | None = None
    extra: str | None = None


_SPECS: dict[str, BackendSpec] = {}
_CLASSES: dict[str, type[Backend]] = {}
_entry_points_loaded = False
_lock = threading.RLock()


def register_backend(
    name: str, target: str | type, *, library: str | None = None, extra: str | None = None
) -> None:
    """Register a backend under ``name`` without importing anything.

    Parameters
    ----------
    name : str
        What users pass to ``sdze.use``.
    target : str or type
        ``"package.module:ClassName"`` of a :class:`Backend` subclass, or the
        class itself.
    library : str, optional
        Import name of the array library (lets dispatch skip backends whose
        library is not imported).
    extra : str, optional
        The pip extra that installs the library, named in error messages.
    """
    with _lock:
        _SPECS[name] = BackendSpec(name, target, library, extra)
        _CLASSES.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name not in _SPECS:
                _SPECS[entry.name] = BackendSpec(entry.name, entry.value)


def known_backends() -> list[str]:
    """Names of every registered backend (installed or not)."""
    _load_entry_points()
    return sorted(_SPECS)


def _unknown(name: str) -> UnknownBackendError:
    return UnknownBackendError(
        f"unknown backend {name!r}; known backends: {', '.join(known_backends())}"
    )


def load_backend_class(name: str) -> type[Backend]:
    """Import and return the class of a registered backend (not its library)."""
    _load_entry_points()
    with _lock:
        if name in _CLASSES:
            return _CLASSES[name]
        spec = _SPECS.get(name)
    if spec is None:
        raise _unknown(name)
    cls = spec.target
    if isinstance(cls, str):
        module_name, _, attr = cls.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise TypeError(f"backend {name!r} points at {cls!r}, not an sdze Backend subclass")
    with _lock:
        _CLASSES[name] = cls
    return cls


def _install_hint(name: str, cls: type[Backend] | None) -> str:
    spec = _SPECS.get(name)
    extra = (spec and spec.extra) or (cls and cls.extra) or name
    if extra.startswith("pip "):
        return extra
    return f'pip install "sdze[{extra}]"'


def make_backend(name: str, *, device: Any = None, dtype: Any = None, rng: str = "native"):
    """Instantiate backend ``name``; a missing library names the extra to install."""
    cls = load_backend_class(name)
    try:
        return cls(device=device, dtype=dtype, rng=rng)
    except ModuleNotFoundError as exc:
        raise BackendNotAvailableError(
            f"backend {name!r} needs the {exc.name or cls.library!r} library, which is not "
            f"installed; install it with: {_install_hint(name, cls)}"
        ) from exc


def available_backends() -> dict[str, str]:
    """Every known backend with ``"ok"`` or the reason it cannot be used here."""
    status = {}
    for name in known_backends():
        try:
            make_backend(name)
            status[name] = "ok"
        except (BackendNotAvailableError, ImportError, RuntimeError, ValueError) as exc:
            status[name] = str(exc)
    return status


# -- selection -------------------------------------------------------------

_process_default: Backend | None = None
_scoped: contextvars.ContextVar[Backend | None] = contextvars.ContextVar(
    "sdze_backend", default=None
)


def _as_backend(backend: str | Backend, device, dtype, rng) -> Backend:
    if isinstance(backend, Backend):
        if device is None and dtype is None and rng is None:
            return backend
        changes = {k: v for k, v in (("device", device), ("dtype", dtype), ("rng", rng)) if v}
        return backend.with_config(**changes)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(backend).__name__}")
    return make_backend(backend, device=device, dtype=dtype, rng=rng or "native")


class use:  # noqa: N801 - reads as a verb: sdze.use("torch")
    """Select the backend: for the process, or (as a context manager) a scope.

    ``sdze.use("torch", device="cuda")`` makes torch the process default.
    ``with sdze.use("jax"): ...`` makes jax current inside the block only,
    for this thread or task, and restores what was current before.

    Parameters
    ----------
    backend : str or Backend
        A registered name (see :func:`known_backends`) or a backend instance.
    device, dtype, rng
        Passed to the backend (see :class:`~sdze_core.backend.Backend`).
    """

    def __init__(self, backend: str | Backend, *, device=None, dtype=None, rng=None):
        global _process_default
        self.backend = _as_backend(backend, device, dtype, rng)
        with _lock:
            self._previous_default = _process_default
            _process_default = self.backend
        self._token = None

    def __enter__(self) -> Backend:
        global _process_default
        # The with-form is scoped: undo the process-wide change made above.
        with _lock:
            if _process_default is self.backend:
                _process_default = self._previous_default
        self._token = _scoped.set(self.backend)
        return self.backend

    def __exit__(self, *exc_info) -> None:
        _scoped.reset(self._token)

    def __repr__(self) -> str:
        return f"sdze.use({self.backend!r})"


def get_backend() -> Backend:
    """The backend in force: the innermost ``with use(...)``, else the default."""
    global _process_default
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    with _lock:
        if _process_default is None:
            _process_default = make_backend(os.environ.get("SDZE_BACKEND", "numpy") or "numpy")
        return _process_default


# -- dispatch by array -----------------------------------------------------


class NamespaceBackend(Backend):
    """A backend made from any array-API namespace (``x.__array_namespace__()``).

    Lets sdze run on arrays of libraries it has no module for; random draws
    use the portable generator.
    """

    name = "namespace"

    def __init__(self, namespace, device=None, dtype=None, rng="portable"):
        self._namespace = namespace
        super().__init__(device=device, dtype=dtype, rng="portable")
        self.name = getattr(namespace, "__name__", "namespace")

    def _load(self):
        return self._namespace

    @classmethod
    def owns(cls, x) -> bool:
        return hasattr(x, "__array_namespace__")

    def _resolve_device(self, device):
        return device

    def with_config(self, **changes) -> Backend:
        config = {"device": self.device, "dtype": self.dtype}
        config.update({k: v for k, v in changes.items() if k != "rng"})
        return NamespaceBackend(self._namespace, **config)


def _is_array(x) -> bool:
    return hasattr(x, "__array_namespace__") or hasattr(x, "shape") and hasattr(x, "dtype")


def _owner(x) -> str | None:
    """Name of the registered backend whose library made ``x``, if any."""
    for name in known_backends():
        spec = _SPECS[name]
        if spec.library is not None and spec.library not in sys.modules:
            continue
        try:
            cls = load_backend_class(name)
        except ImportError:
            continue
        if cls.library and cls.library not in sys.modules:
            continue
        if cls.owns(x):
            return name
    return None


def _owners(labelled) -> tuple[dict[str, str], Any]:
    """``({backend name: label of its first array}, first array)`` of ``(label, x)`` pairs.

    Non-arrays (``None``, Python scalars, lists) are skipped. Arrays of two
    libraries raise the one mixed-backend ``TypeError``, naming each library
    and the argument it came from.
    """
    owners: dict[str, str] = {}
    first = None
    for label, x in labelled:
        if x is None or isinstance(x, (bool, int, float, complex)) or not _is_array(x):
            continue
        name = _owner(x) or ("namespace" if hasattr(x, "__array_namespace__") else None)
        if name is None:
            raise TypeError(
                f"{label} is a {type(x).__module__}.{type(x).__name__}, "
                "not an array of any sdze backend"
            )
        owners.setdefault(name, label)
        if first is None:
            first = x
    if len(owners) > 1:
        found = ", ".join(f"{name} ({label})" for name, label in owners.items())
        raise TypeError(
            f"mixed array backends in one call: {found}; convert them to one library first"
        )
    return owners, first


def check_one_library(**arrays) -> None:
    """Raise the mixed-backend ``TypeError`` of :func:`backend_of` if the named
    arrays come from more than one library (the names label the message)."""
    _owners(arrays.items())


def backend_of(*arrays, default: Backend | None = None) -> Backend:
    """The backend of the arrays among ``arrays`` (others, e.g. floats, ignored).

    The result is on the arrays' device and, if they are floating point, in
    their dtype; the rng mode is the current backend's. With no arrays,
    ``default`` (or :func:`get_backend`) is returned.

    Raises
    ------
    TypeError
        If the arrays come from more than one library.
    """
    owners, first = _owners((f"argument {i}", x) for i, x in enumerate(arrays))
    current = default or get_backend()
    if first is None:
        return current
    (name,) = owners
    dtype = first.dtype if _is_float(first) else None
    if name == "namespace":
        return NamespaceBackend(first.__array_namespace__(), device=first.device, dtype=dtype)
    cls = load_backend_class(name)
    if type(current) is cls:
        device = cls.device_of_array(first)
        if current.device == device and (dtype is None or current.dtype == dtype):
            return current
        return current.with_config(device=device, dtype=dtype or current.dtype)
    return make_backend(name, device=cls.device_of_array(first), dtype=dtype, rng=current.rng)


def _is_float(x) -> bool:
    return "float" in str(x.dtype)


def resolve_backend(*arrays, backend: str | Backend | None = None) -> Backend:
    """What a public function uses: the arrays' backend, else ``backend``, else current."""
    if isinstance(backend, str):
        backend = make_backend(backend)
    return backend_of(*arrays, default=backend)
