"""Registry, selection and scoping, dispatch by array, and the errors users see."""

import asyncio
import subprocess
import sys
import textwrap
import threading

import pytest

import sdze
from sdze_core.backend import Backend
from sdze_core.registry import NamespaceBackend, backend_of, make_backend

np = pytest.importorskip("numpy")


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    environment = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )


def test_import_sdze_imports_no_heavy_backend():
    result = run_python("""
        import sys, sdze
        sdze.key(0); sdze.split(sdze.key(0))
        heavy = [m for m in ("torch", "jax", "cupy") if m in sys.modules]
        assert not heavy, heavy
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_environment_variable_sets_the_start_default():
    result = run_python(
        "import sdze; print(sdze.get_backend().name)", SDZE_BACKEND="array_api_strict"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "array_api_strict"


def test_builtin_backends_are_registered():
    assert {"numpy", "array_api_strict", "torch", "jax", "cupy"} <= set(sdze.known_backends())


def test_available_backends_explains_what_cannot_run():
    status = sdze.available_backends()
    assert status["numpy"] == "ok"
    for name, reason in status.items():
        assert reason == "ok" or name in reason or "CUDA" in reason


def test_use_sets_the_process_default_and_with_restores(backend):
    previous = sdze.get_backend()
    try:
        sdze.use("numpy")
        assert sdze.get_backend().name == "numpy"
        with sdze.use(backend.name) as inner:
            assert sdze.get_backend() is inner
            assert inner.name == backend.name
            with sdze.use("numpy", dtype="float64"):
                assert sdze.get_backend().dtype == np.float64
            assert sdze.get_backend() is inner
        assert sdze.get_backend().name == "numpy"
        sdze.use(backend.name)
        assert sdze.get_backend().name == backend.name
    finally:
        sdze.use(previous)


def test_use_switches_among_cpu_backends():
    names = [n for n, s in sdze.available_backends().items() if s == "ok"]
    previous = sdze.get_backend()
    try:
        for name in names:
            sdze.use(name)
            assert sdze.get_backend().name == name
            x = sdze.random.normal(sdze.key(0), (3,))
            assert backend_of(x).name == name
    finally:
        sdze.use(previous)


def test_scoped_selection_is_per_thread():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with sdze.use(name):
            barrier.wait()
            seen[name] = sdze.get_backend().name
            barrier.wait()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("numpy", "array_api_strict")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"numpy": "numpy", "array_api_strict": "array_api_strict"}


def test_scoped_selection_is_per_task():
    async def task(name, delay):
        with sdze.use(name):
            await asyncio.sleep(delay)
            return sdze.get_backend().name

    async def main():
        return await asyncio.gather(task("numpy", 0.02), task("array_api_strict", 0.01))

    assert asyncio.run(main()) == ["numpy", "array_api_strict"]


def test_dispatch_follows_the_arrays_not_the_default(backend):
    x = backend.normal(sdze.key(0), (4,))
    for default in ("numpy", "array_api_strict"):
        with sdze.use(default):
            found = backend_of(x, 2.0, None)
            assert found.name == backend.name
            assert found.dtype == backend.dtype
            drawn = sdze.random.normal(sdze.key(1), (2,), backend=found)
            assert backend_of(drawn).name == backend.name


def test_dispatch_keeps_the_array_dtype(backend):
    b64 = backend.with_config(dtype="float64")
    x = b64.normal(sdze.key(0), (4,))
    assert backend_of(x).dtype == b64.dtype


def test_dispatch_without_arrays_uses_the_current_backend():
    with sdze.use("array_api_strict"):
        assert backend_of(1.0, None).name == "array_api_strict"


def test_mixed_backends_raise_a_clear_type_error(backend):
    other = "array_api_strict" if backend.name == "numpy" else "numpy"
    x = backend.zeros((2,))
    y = make_backend(other).zeros((2,))
    with pytest.raises(TypeError, match=r"mixed array backends.*argument 0.*argument 1"):
        backend_of(x, y)


def test_non_arrays_raise_a_clear_type_error():
    class NotAnArray:
        shape = (2,)
        dtype = "float32"

    with pytest.raises(TypeError, match="not an array of any sdze backend"):
        backend_of(NotAnArray())


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(
        sdze.UnknownBackendError, match="unknown backend 'tensorflow'.*numpy.*torch"
    ):
        sdze.use("tensorflow")


def test_missing_library_names_the_extra(monkeypatch):
    sdze.register_backend("fakelib", "sdze_tests_fake:Missing", library="fakelib", extra="fakelib")

    class Missing(Backend):
        name = "fakelib"
        library = "fakelib"

        def _load(self):
            import fakelib_that_does_not_exist  # noqa: F401

        @classmethod
        def owns(cls, x):
            return False

    sdze.register_backend("fakelib", Missing, library="fakelib", extra="fakelib")
    with pytest.raises(
        sdze.BackendNotAvailableError,
        match=r"needs the 'fakelib_that_does_not_exist'.*pip install \"sdze\[fakelib\]\"",
    ):
        sdze.use("fakelib")


def test_cupy_without_a_device_says_so():
    status = sdze.available_backends()["cupy"]
    assert status == "ok" or "sdze[cupy-cuda12]" in status or "no CUDA device" in status


def test_third_party_backend_through_entry_point(tmp_path, monkeypatch):
    """A package declaring the ``sdze.backends`` entry point is found by name."""
    package = tmp_path / "sdze_toy_backend.py"
    package.write_text(
        textwrap.dedent("""
        import sys
        from sdze_backends.numpy import NumpyBackend

        class ToyBackend(NumpyBackend):
            name = "toy"
    """)
    )
    dist = tmp_path / "sdze_toy_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sdze-toy-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sdze.backends]\ntoy = sdze_toy_backend:ToyBackend\n")
    result = run_python(
        """
        import sdze
        assert "toy" in sdze.known_backends(), sdze.known_backends()
        with sdze.use("toy") as b:
            print(type(b).__name__, sdze.get_backend().name)
    """,
        PYTHONPATH=f"{tmp_path}:{sys.path[0]}:" + ":".join(p for p in sys.path if p),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ToyBackend toy"


def test_generic_array_api_namespace_backend():
    """Arrays of a library sdze has no module for still work via __array_namespace__."""
    strict = pytest.importorskip("array_api_strict")
    x = strict.asarray([1.0, 2.0])
    b = NamespaceBackend(strict, dtype=strict.float32)
    bits = b.random_bits(sdze.key(42), (4,))
    assert [int(v) for v in np.from_dlpack(bits)] == [
        2098992034,
        2919706841,
        2646866425,
        2409546199,
    ]
    assert b.owns(x)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="rng must be"):
        sdze.use("numpy", rng="mersenne")
    with pytest.raises(ValueError, match="dtype must be one of"):
        sdze.use("numpy", dtype="float16")
    with pytest.raises(ValueError, match="CPU only"):
        sdze.use("numpy", device="cuda")


def test_dispatch_and_draws_inside_jax_jit():
    """Under jax.jit the arrays are tracers: dispatch and draws must still work
    and give what the eager call gives."""
    jax = pytest.importorskip("jax")

    def f(x):
        b = backend_of(x)
        return (
            x
            + b.normal(sdze.key(0), x.shape)
            + b.with_config(rng="portable").uniform(sdze.key(1), x.shape)
        )

    x = jax.numpy.zeros(5)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), np.asarray(f(x)), rtol=1e-6)
