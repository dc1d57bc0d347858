"""nox sessions: tests and conformance per backend (CPU and GPU), lint, docs.

    nox -l                              # list sessions
    nox -s tests                        # every backend, CPU
    nox -s "tests(backend='torch')"     # one backend
    nox -t gpu                          # GPU sessions (skip without a CUDA device)

Sessions use the interpreter nox runs under (CI has only Python 3.11 and no
interpreter downloads). On machines without a CUDA device, PyTorch is pinned
to its CPU wheel (``SDZE_TORCH_CPU``, default ``torch==2.13.0``) so no CUDA
packages are pulled in.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
nox.options.sessions = ["tests", "conformance", "all_backends", "lint"]

PYPROJECT = nox.project.load_toml("pyproject.toml")
BACKENDS = ["numpy", "array_api_strict", "torch", "jax", "cupy"]
GPU_BACKENDS = ["torch", "jax", "cupy"]
TORCH_CPU = os.environ.get("SDZE_TORCH_CPU", "torch==2.13.0")


#: Delete each session's virtual environment when the session ends. On by default
#: under CI: every test session holds its own ~1.6 GB environment (PyTorch and JAX
#: are references for every backend), and thirteen of them exceed a small disk.
_DISCARD = os.environ.get(
    "SDZE_NOX_DISCARD_VENVS", "1" if os.environ.get("CI", "").lower() in ("1", "true") else "0"
)
if _DISCARD not in ("0", "1"):
    raise SystemExit(f"SDZE_NOX_DISCARD_VENVS must be 0 or 1, got {_DISCARD!r}")
DISCARD_VENVS = _DISCARD == "1"


def discards_venv(run: Callable[..., None]) -> Callable[..., None]:
    """Run the session, then remove its virtual environment when ``DISCARD_VENVS``."""

    @functools.wraps(run)
    def session_then_discard(session: nox.Session, **params: str) -> None:
        try:
            run(session, **params)
        finally:
            location = getattr(session.virtualenv, "location", None)
            if DISCARD_VENVS and location and os.path.isdir(location):
                shutil.rmtree(location, ignore_errors=True)
                session.log(f"removed {location} (SDZE_NOX_DISCARD_VENVS=1)")

    return session_then_discard


def has_cuda_device() -> bool:
    """True when ``nvidia-smi -L`` lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
    return listing.returncode == 0 and "GPU" in listing.stdout


def backend_requirements(backend: str, gpu: bool) -> list[str]:
    if backend == "torch":
        return ["numpy", "torch" if gpu else TORCH_CPU]
    if backend == "jax":
        return ["numpy", "jax[cuda12]" if gpu else "jax"]
    if backend == "cupy":
        return ["numpy", "cupy-cuda12x"]
    if backend == "array_api_strict":
        return ["numpy", "array-api-strict"]
    return ["numpy"]


def skip_cupy_without_device(session: nox.Session, backend: str) -> None:
    """CuPy runs only on a CUDA device: without one, every CuPy test would skip after
    minutes of installs, so the session skips at once, saying so."""
    if backend == "cupy" and not has_cuda_device():
        session.skip(
            "cupy needs a CUDA device and nvidia-smi lists none here; "
            "tests_gpu / conformance_gpu run it where there is one"
        )


def install(session: nox.Session, backend: str, gpu: bool = False) -> None:
    """sdze, the backend's library, and the test tools.

    The jet and oracle tests compare every backend with references computed
    by ``jax.experimental.jet``, JAX autodiff and ``torch.func``, so JAX
    (in the ``test`` group) and PyTorch are installed whatever the backend.
    """
    session.install(*nox.project.dependency_groups(PYPROJECT, "test"))
    session.install(*backend_requirements("torch", gpu))
    session.install(*backend_requirements(backend, gpu))
    session.install("-e", ".")


def parallel_args(device: str | None) -> list[str]:
    """pytest-xdist workers for a CPU run: one per core (at most 4), each single-threaded
    so that workers do not oversubscribe the cores; a GPU run stays in one process."""
    if device:
        return []
    return ["-n", str(min(4, os.cpu_count() or 1))]


#: One thread per pytest worker (PyTorch, NumPy's BLAS and XLA would each take every core).
SINGLE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def run_pytest(session: nox.Session, suite: str, backend: str, device: str | None) -> None:
    args = ["pytest", suite, "--backend", backend, "--durations=15", *parallel_args(device),
            *session.posargs]
    if device:
        args += ["--device", device]
    # Exit 5 means nothing was collected for this selection: say so, don't fail.
    code = session.run(*args, success_codes=[0, 5], env=None if device else SINGLE_THREAD)
    if code == 5:
        session.warn(f"pytest collected no tests in {suite} for backend {backend}")


@nox.session
@nox.parametrize("backend", BACKENDS)
@discards_venv
def tests(session: nox.Session, backend: str) -> None:
    """Unit tests on one backend (CPU). CuPy's session skips, saying why, without a GPU."""
    skip_cupy_without_device(session, backend)
    install(session, backend)
    run_pytest(session, "tests", backend, None)


@nox.session
@nox.parametrize("backend", BACKENDS)
@discards_venv
def conformance(session: nox.Session, backend: str) -> None:
    """The conformance suite (docs/conformance.md), checked on one backend (CPU)."""
    skip_cupy_without_device(session, backend)
    install(session, backend)
    run_pytest(session, "conformance", backend, None)


@nox.session
@discards_venv
def all_backends(session: nox.Session) -> None:
    """numpy, array_api_strict, torch and jax in one environment: switching
    among them with ``sdze.use`` and the cross-backend agreement tests. The rest
    of the conformance suite runs once per backend in ``conformance``."""
    install(session, "numpy")
    for backend in ("array_api_strict", "torch", "jax"):
        session.install(*backend_requirements(backend, gpu=False))
    session.run(
        "pytest", "tests/test_backends.py", "conformance/test_cross_backend.py",
        *parallel_args(None), *session.posargs, env=SINGLE_THREAD,
    )


@nox.session(tags=["gpu"], default=False)
@nox.parametrize("backend", GPU_BACKENDS)
@discards_venv
def tests_gpu(session: nox.Session, backend: str) -> None:
    """Unit tests on a CUDA device; skipped (a success) when there is none."""
    if not has_cuda_device():
        session.skip("no CUDA device on this machine (nvidia-smi lists no GPU)")
    install(session, backend, gpu=True)
    run_pytest(session, "tests", backend, "cuda")


@nox.session(tags=["gpu"], default=False)
@nox.parametrize("backend", GPU_BACKENDS)
@discards_venv
def conformance_gpu(session: nox.Session, backend: str) -> None:
    """The conformance suite on a CUDA device; skipped when there is none."""
    if not has_cuda_device():
        session.skip("no CUDA device on this machine (nvidia-smi lists no GPU)")
    install(session, backend, gpu=True)
    run_pytest(session, "conformance", backend, "cuda")


@nox.session
@discards_venv
def lint(session: nox.Session) -> None:
    """ruff over the sources, tests, conformance suite and benchmarks."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", "src", "tests", "conformance", "benchmarks", "noxfile.py")


@nox.session
@discards_venv
def docs(session: nox.Session) -> None:
    """Build the MkDocs site into site/ (warnings are errors)."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "docs"))
    session.run("mkdocs", "build", "--strict", "--site-dir", "site")


@nox.session(default=False)
@discards_venv
def bench(session: nox.Session) -> None:
    """The benchmarks of docs/benchmarks.md (CPU torch): speed and memory sweep, then the
    convergence study; JSON and plots under benchmarks/results/ (long: about an hour on
    2 cores). ``nox -s bench -- sweep|convergence|ablation|1e7`` runs one of them."""
    install(session, "jax")
    scripts = {
        "sweep": ["benchmarks/bench_sweep.py"],
        "1e7": ["benchmarks/bench_solve_1e7.py"],
        "convergence": ["benchmarks/bench_convergence.py"],
        "ablation": ["benchmarks/bench_convergence.py", "--grid", "ablation"],
    }
    for name in session.posargs or ["sweep", "convergence", "ablation"]:
        if name not in scripts:
            session.error(f"unknown benchmark {name!r}; known: {', '.join(scripts)}")
        session.run("python", *scripts[name])
