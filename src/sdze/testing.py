"""pytest plugin: run a test body once per sdze backend.

Enable it with ``pytest_plugins = ["sdze.testing"]`` (sdze's own ``tests/`` and
``conformance/`` do). A test that takes the ``backend`` fixture (or ``xp``)
is parametrized over every registered backend, built-in or registered by a
third party through the ``sdze.backends`` entry point:

* ``--backend NAME`` (repeatable, or ``SDZE_TEST_BACKENDS=a,b``) restricts
  the run, e.g. ``pytest conformance --backend mylib``;
* ``--device cuda`` runs the backends under test on a GPU (tests that build a
  backend by name ask :func:`device_for` which device that backend gets);
* a backend that cannot run here is skipped with the reason (library not
  installed, no CUDA device), never silently;
* ``@pytest.mark.skip_backends("cupy", reason="...")`` skips named backends
  for one test, with a reason (like SciPy's ``skip_xp_backends``).
"""

from __future__ import annotations

import os

import pytest

from sdze_core.models import PLAIN_LAYERS
from sdze_core.registry import BackendNotAvailableError, known_backends, make_backend

_cache: dict = {}
_session: dict = {"device": None, "backends": ()}


def pytest_addoption(parser):
    group = parser.getgroup("sdze")
    group.addoption(
        "--backend",
        action="append",
        default=None,
        help="run backend-parametrized tests on this sdze backend only (repeatable)",
    )
    group.addoption("--device", default=None, help="device for the backends under test (e.g. cuda)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "skip_backends(*names, reason): skip these sdze backends, saying why"
    )
    _session["device"] = config.getoption("--device")
    _session["backends"] = tuple(selected_backends(config))


def selected_backends(config) -> list[str]:
    names = config.getoption("--backend")
    if not names and os.environ.get("SDZE_TEST_BACKENDS"):
        names = os.environ["SDZE_TEST_BACKENDS"].split(",")
    return [n.strip() for n in names] if names else known_backends()


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        names = selected_backends(metafunc.config)
        metafunc.parametrize("backend", names, indirect=True, ids=names)


def device_for(name: str):
    """The ``--device`` of this run if backend ``name`` is under test, else ``None``.

    For tests parametrized over backend names rather than the ``backend``
    fixture: ``get_test_backend(name, device=device_for(name))`` puts the
    backends under test on the device asked for and leaves the others (a
    reference, say) on their default device.
    """
    return _session["device"] if name in _session["backends"] else None


def get_test_backend(name: str, device=None, dtype=None):
    """Build (once) the backend under test, or skip the test saying why
    (library missing, no such device: a NumPy backend asked for ``cuda``)."""
    cache_key = (name, device, dtype)
    if cache_key not in _cache:
        try:
            _cache[cache_key] = make_backend(name, device=device, dtype=dtype)
        except (BackendNotAvailableError, RuntimeError) as exc:
            _cache[cache_key] = exc
        except ValueError as exc:  # the backend has no such device
            if device is None:
                raise
            _cache[cache_key] = exc
    found = _cache[cache_key]
    if isinstance(found, Exception):
        pytest.skip(f"backend {name!r} cannot run here: {found}")
    return found


def get_backend_under_test(name: str, dtype=None):
    """:func:`get_test_backend` for a test parametrized over backend names (say torch and
    jax, which have autodiff) that tests ``name`` itself: skipped, saying so, unless
    ``name`` is a backend under test (``--backend``), so that each backend's session runs
    its own cases once instead of every session running all of them."""
    if name not in _session["backends"]:
        chosen = ", ".join(_session["backends"]) or "none"
        pytest.skip(f"{name} is not under test in this run (--backend {chosen}); "
                    f"its own session runs this case")
    return get_test_backend(name, device=device_for(name), dtype=dtype)


@pytest.fixture
def backend(request):
    """The sdze backend under test (float32 default; ``with_config`` for others)."""
    name = request.param
    marker = request.node.get_closest_marker("skip_backends")
    if marker is not None and name in marker.args:
        reason = marker.kwargs.get("reason")
        if not reason:
            raise pytest.UsageError("skip_backends needs a reason=")
        pytest.skip(f"{name}: {reason}")
    return get_test_backend(name, device=request.config.getoption("--device"))


@pytest.fixture
def xp(backend):
    """The array namespace of the backend under test."""
    return backend.xp


class SpyLayers:
    """A :class:`~sdze_core.models.LayerMap` that records its calls and otherwise
    changes nothing: a model given it (``with_layer_map(model, spy)``) lets a
    test see which layer maps (and which column gathers) a computation performs."""

    def __init__(self):
        self.calls, self.column_calls = [], []

    def affine(self, layer, p, x, is_primal):
        self.calls.append((layer, is_primal, tuple(x.shape)))
        return PLAIN_LAYERS.affine(layer, p, x, is_primal)

    def columns(self, layer, p, index):
        self.column_calls.append((layer, tuple(index.shape)))
        return PLAIN_LAYERS.columns(layer, p, index)
