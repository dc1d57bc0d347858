"""The backend interface every algorithm in sdze is written against.

A :class:`Backend` bundles what the array API standard leaves to the library:

* ``xp``: the array namespace (through array-api-compat where needed),
* the default ``device`` and floating ``dtype``,
* keyed random draws (:mod:`sdze_core.random`: portable Threefry bits,
  optionally a native generator as a fast path),
* ``qr`` for orthonormal bases, a ``jit`` hook, ``synchronize()``,
* ``value_and_grad`` for the first-order baseline (autodiff backends only),
* ``peak_memory()`` for benchmarks.

Concrete backends live in :mod:`sdze_backends`, one module each; their
library is imported only when the backend is instantiated. Third parties
register more through the ``sdze.backends`` entry-point group (see
:mod:`sdze_core.registry`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

from . import random as _random
from .keys import Key

__all__ = ["Backend", "AutodiffNotAvailableError", "host_peak_rss", "reset_host_peak_rss"]

FLOAT_DTYPES = ("float32", "float64")


class AutodiffNotAvailableError(TypeError):
    """The backend's library has no automatic differentiation (NumPy, CuPy, ...)."""


class Backend(ABC):
    """Base class of all backends: an array namespace plus what it lacks.

    Subclasses set the class attributes and implement :meth:`_load`;
    everything else has a standard-only default.

    Parameters
    ----------
    device : str or device object, optional
        Where new arrays are made. ``None`` means the library's default
        (the CPU for NumPy, PyTorch and JAX-on-CPU).
    dtype : {"float32", "float64"}, optional
        Default floating dtype of parameters and draws (default float32).
    rng : {"native", "portable"}
        ``"portable"`` draws every random array from Threefry-2x32 bits
        computed with array-API integer ops: bit-identical on every backend.
        ``"native"`` (default) lets a backend use its own fast generator for
        normal, uniform, Rademacher and integer draws, seeded from the key:
        reproducible on that backend, not across backends.
    """

    #: Registry name (``sdze.use(name)``).
    name: ClassVar[str] = "abstract"
    #: Import name of the library behind the backend.
    library: ClassVar[str] = ""
    #: The ``pip install "sdze[extra]"`` that provides the library.
    extra: ClassVar[str] = ""
    #: True when unsigned 32-bit add/shift wrap natively (False: int64 + mask).
    native_uint32: ClassVar[bool] = True

    def __init__(self, device: Any = None, dtype: Any = None, rng: str = "native"):
        if rng not in ("native", "portable"):
            raise ValueError(f"rng must be 'native' or 'portable', got {rng!r}")
        self.xp = self._load()
        self.device = self._resolve_device(device)
        self.dtype = self._resolve_dtype(dtype)
        self.rng = rng
        self.word_dtype = self.xp.uint32 if self.native_uint32 else self.xp.int64
        self.index_dtype = self._index_dtype()

    # -- what a subclass provides ---------------------------------------------
    @abstractmethod
    def _load(self):
        """Import the library and return its array-API namespace."""

    @classmethod
    @abstractmethod
    def owns(cls, x: Any) -> bool:
        """Whether ``x`` is an array of this backend's library.

        Must not import the library: an array of a library that was never
        imported cannot exist, so check ``sys.modules`` first.
        """

    def _resolve_device(self, device):
        if device is None:
            return None
        raise ValueError(f"backend {self.name!r} has no device {device!r}")

    @classmethod
    def device_of_array(cls, x):
        """The device an array of this backend lives on, as ``device=`` accepts it."""
        return getattr(x, "device", None)

    def with_config(self, **changes) -> Backend:
        """A copy of this backend with some of device/dtype/rng changed."""
        config = {"device": self.device, "dtype": self.dtype, "rng": self.rng}
        config.update(changes)
        return type(self)(**config)

    def _resolve_dtype(self, dtype):
        if dtype is None:
            dtype = "float32"
        if isinstance(dtype, str):
            if dtype not in FLOAT_DTYPES:
                raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
            return getattr(self.xp, dtype)
        for name in FLOAT_DTYPES:
            if dtype == getattr(self.xp, name):
                return dtype
        raise ValueError(f"dtype must be a floating dtype of {self.name}, got {dtype!r}")

    def _index_dtype(self):
        return self.xp.int64

    # -- arrays ---------------------------------------------------------------
    def asarray(self, x, dtype=None):
        """``xp.asarray`` on this backend's device; ``dtype=None`` keeps the input's."""
        return self.xp.asarray(x, dtype=dtype, device=self.device)

    def arange(self, n, dtype=None):
        return self.xp.arange(n, dtype=dtype, device=self.device)

    def zeros(self, shape, dtype=None):
        return self.xp.zeros(shape, dtype=dtype or self.dtype, device=self.device)

    def float_dtype(self, dtype=None):
        """Resolve ``None`` / a name / a dtype to this backend's float dtype."""
        return self.dtype if dtype is None else self._resolve_dtype(dtype)

    def to_host(self, x):
        """Copy an array to a NumPy array on the host (for checkpoints, plots)."""
        import numpy as np

        return np.asarray(x)

    # -- linear algebra, compilation, timing, memory --------------------------
    def qr(self, a):
        """Reduced QR decomposition ``(Q, R)`` of a matrix (array API linalg)."""
        return self.xp.linalg.qr(a)

    def jit(self, fn: Callable, **options) -> Callable:
        """Compile ``fn`` if the backend can; identity otherwise."""
        return fn

    def value_and_grad(self, fn: Callable) -> Callable:
        """``g(params, *args) -> (fn(params, *args), ∇_params fn(params, *args))``.

        ``fn`` returns a scalar (shape ()) array; ``params`` is a tree of
        lists, tuples and dicts of arrays (a model's parameters), and the
        gradient has the same structure. ``args`` are passed through and not
        differentiated. The value and the gradient carry no autodiff state.

        Raises
        ------
        AutodiffNotAvailableError
            On a backend without automatic differentiation (the default).
        """
        raise AutodiffNotAvailableError(
            f"backend {self.name!r} has no automatic differentiation; the first-order "
            "method needs torch or jax (use --method sdze, which needs only forward passes)"
        )

    def hessian_diagonal(self, fn: Callable, x, index) -> tuple:
        """``(fn(x), H)`` with H[v, b] = ∂²fn/∂x_j² at row b of x, j = index[v], by nested
        reverse-mode autodiff (the SDGD baseline, docs/method.md#baselines).

        ``fn`` maps points (B, d) to values (B,), each row independently. The
        result stays differentiable with respect to whatever ``fn`` closes
        over (the parameters), so a first-order method can differentiate
        through it. Unlike the jet oracles, this costs O(V B d) memory: every
        second derivative goes through a (B, d) gradient.

        Raises
        ------
        AutodiffNotAvailableError
            On a backend without automatic differentiation (the default).
        """
        raise AutodiffNotAvailableError(
            f"backend {self.name!r} has no automatic differentiation; nested-autodiff "
            "derivatives (SDGD) need torch or jax (the jet oracles need only forward passes)"
        )

    # -- in-place hooks: writes into a caller's buffer (optional) -------------
    def matmul_into(self, a, b, out):
        """``a @ b`` written into ``out`` (writeable, of the product's shape and dtype)
        and returned. The default forms the product and copies it; backends with an
        ``out=`` product override it, so that a streamed update reuses one buffer."""
        out[...] = a @ b
        return out

    def multiply_into(self, a, b, out):
        """``a * b`` written into ``out`` and returned (see :meth:`matmul_into`)."""
        out[...] = a * b
        return out

    def scale(self, x, factor):
        """``x * factor`` in x's own memory, for arrays of gigabytes (the first
        layer's weights, the batch of points at large d).

        A writeable ``x`` is scaled in place and returned; the default returns a new
        array of an immutable one, and backends with immutable arrays override it to
        reuse x's buffer (JAX: a compiled product with x donated). Either way the
        caller must use the returned array, not ``x``, afterwards.
        """
        import array_api_compat

        if array_api_compat.is_writeable_array(x):
            x *= factor
            return x
        return x * factor

    def write_columns(self, W, start: int, block):
        """``W`` with its columns ``start : start + k`` replaced by ``block`` (m × k).

        A writeable ``W`` is written in place and returned. The default makes a
        new array of an immutable one (a copy of W); backends with immutable
        arrays override it to reuse W's memory (JAX: a compiled update with W's
        buffer donated). Either way the caller must use the returned array, not
        ``W``, afterwards.
        """
        import array_api_compat

        stop = start + block.shape[1]
        if array_api_compat.is_writeable_array(W):
            W[:, start:stop] = block
            return W
        return self.xp.concat([W[:, :start], block, W[:, stop:]], axis=1)

    # -- two large operations, in the form that suits the backend's memory ------
    #: Largest block (elements of W) that :meth:`matmul_transposed` forms at once
    #: where a backend sums the product over column blocks.
    matmul_block_elements: ClassVar[int] = 1 << 20

    def rowwise_squared_norm(self, x):
        """‖x_b‖² = Σ_j x_bj² over the last axis, shape ``x.shape[:-1]``.

        The default is a batched product (x_b x_bᵀ per row): a BLAS dot per row,
        no temporary of x's size, and on PyTorch's CPU build about 3x faster
        than ``vecdot`` at B × d = 100 × 10⁶. Backends whose eager reshapes copy
        override it (JAX: a compiled, fused sum of squares).
        """
        import array_api_compat

        xp = array_api_compat.array_namespace(x)
        return (xp.expand_dims(x, axis=-2) @ xp.expand_dims(x, axis=-1))[..., 0, 0]

    def matmul_transposed(self, x, W):
        """x Wᵀ for x of shape (B, n) and W of shape (m, n), shape (B, m).

        The default multiplies by the transposed view. Backends whose transpose or
        product would copy all of W (JAX: an eager transpose, and XLA's CPU
        product) override it to sum the product over column blocks of at most
        :attr:`matmul_block_elements` elements, so W (P numbers at d = 10⁶) is
        never held twice.
        """
        import array_api_compat

        xp = array_api_compat.array_namespace(x, W)
        return x @ xp.matrix_transpose(W)

    def synchronize(self, *arrays) -> None:
        """Wait until queued device work (and ``arrays``) is done, for timings.

        CPU backends compute eagerly: nothing to wait for.
        """
        return None

    def peak_memory(self) -> int:
        """Peak bytes in use since :meth:`reset_peak_memory` (host RSS on CPU)."""
        return host_peak_rss()

    def reset_peak_memory(self) -> None:
        """Start a new peak-memory measurement."""
        reset_host_peak_rss()

    # -- keyed random draws (see sdze_core.random for the formulas) -----------
    def random_bits(self, key: Key, shape) -> Any:
        """Threefry-2x32 bits, identical on every backend (word dtype)."""
        return _random.portable_bits(self, key, shape)

    def uniform(self, key: Key, shape, dtype=None):
        """U[0, 1) draws of the given shape."""
        if self.rng == "native":
            return self._native_uniform(key, tuple(shape), self.float_dtype(dtype))
        return _random.portable_uniform(self, key, shape, self.float_dtype(dtype))

    def normal(self, key: Key, shape, dtype=None):
        """Standard normal draws of the given shape."""
        if self.rng == "native":
            return self._native_normal(key, tuple(shape), self.float_dtype(dtype))
        return _random.portable_normal(self, key, shape, self.float_dtype(dtype))

    def rademacher(self, key: Key, shape, dtype=None):
        """Draws of +1 or -1 with probability 1/2 each."""
        if self.rng == "native":
            return self._native_rademacher(key, tuple(shape), self.float_dtype(dtype))
        return _random.portable_rademacher(self, key, shape, self.float_dtype(dtype))

    def integers(self, key: Key, shape, low: int, high: int):
        """Uniform integers in ``[low, high)`` (index dtype)."""
        if not high > low:
            raise ValueError(f"integers needs high > low, got low={low}, high={high}")
        if self.rng == "native":
            return self._native_integers(key, tuple(shape), low, high)
        return _random.portable_integers(self, key, shape, low, high)

    def choice(self, key: Key, n: int, k: int):
        """``k`` distinct indices drawn uniformly from ``range(n)``.

        Always exact and portable: Floyd's algorithm on the host, O(k)
        whatever ``n`` is (a device permutation would cost O(n) per call).
        """
        return self.asarray(_random.floyd_sample(key, n, k), dtype=self.index_dtype)

    # Native generators: by default the portable ones. Backends override.
    def _native_uniform(self, key, shape, dtype):
        return _random.portable_uniform(self, key, shape, dtype)

    def _native_normal(self, key, shape, dtype):
        return _random.portable_normal(self, key, shape, dtype)

    def _native_rademacher(self, key, shape, dtype):
        return _random.portable_rademacher(self, key, shape, dtype)

    def _native_integers(self, key, shape, low, high):
        return _random.portable_integers(self, key, shape, low, high)

    # -- identity -------------------------------------------------------------
    def __repr__(self) -> str:
        dtype = getattr(self.dtype, "__name__", None) or str(self.dtype).rsplit(".", 1)[-1]
        device = "" if self.device is None else f", device={self.device!s}"
        return f"<sdze backend {self.name}{device}, dtype={dtype}, rng={self.rng}>"

    def __eq__(self, other) -> bool:
        return (
            type(self) is type(other)
            and str(self.device) == str(other.device)
            and self.dtype == other.dtype
            and self.rng == other.rng
        )

    def __hash__(self) -> int:
        return hash((type(self), str(self.device), str(self.dtype), self.rng))


def tree_flatten(tree) -> tuple[list, Callable[[list], Any]]:
    """The array leaves of a tree of lists, tuples and dicts, and the inverse map
    ``leaves -> tree`` (same structure; ``None`` is an empty subtree)."""
    leaves: list = []

    def build(node):
        if node is None:
            return lambda it: None
        if isinstance(node, dict):
            parts = {name: build(child) for name, child in node.items()}
            return lambda it: {name: part(it) for name, part in parts.items()}
        if isinstance(node, (list, tuple)):
            parts = [build(child) for child in node]
            if isinstance(node, list):
                return lambda it: [part(it) for part in parts]
            kind = type(node)
            if hasattr(node, "_fields"):  # a NamedTuple
                return lambda it: kind(*(part(it) for part in parts))
            return lambda it: kind(part(it) for part in parts)
        leaves.append(node)
        return next

    rebuild = build(tree)
    return leaves, lambda new_leaves: rebuild(iter(new_leaves))


def host_peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_host_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
