"""JAX backend (CPU, GPU or TPU); ``jax.numpy`` is itself an array-API namespace.

Asking for ``dtype="float64"`` turns on ``jax_enable_x64`` (JAX computes in
32 bits otherwise). Keys are JAX's own Threefry keys, so ``random_bits`` is
``jax.random.bits`` and native draws are ``jax.random.*``.
"""

from __future__ import annotations

import sys
from functools import lru_cache

from sdze_core.backend import Backend, host_peak_rss

#: Native draws of more numbers than this are made in column blocks (:meth:`JaxBackend._drawn`).
BLOCKED_DRAW = 1 << 24
#: About this many numbers per block of a blocked draw.
DRAW_BLOCK = 1 << 22


class JaxBackend(Backend):
    """JAX arrays on one device; ``jit`` is ``jax.jit``."""

    name = "jax"
    library = "jax"
    extra = "jax"

    def _load(self):
        import jax.numpy as xp

        return xp

    @classmethod
    def owns(cls, x) -> bool:
        if "jax" not in sys.modules:
            return False
        import array_api_compat

        return array_api_compat.is_jax_array(x)

    def _resolve_dtype(self, dtype):
        if dtype is not None and str(getattr(dtype, "name", dtype)) == "float64":
            import jax

            jax.config.update("jax_enable_x64", True)
        return super()._resolve_dtype(dtype)

    def _index_dtype(self):
        import jax

        return self.xp.int64 if jax.config.jax_enable_x64 else self.xp.int32

    def _resolve_device(self, device):
        import jax

        if device is None:
            return jax.devices()[0]
        if not isinstance(device, str):
            return device
        platform, _, index = device.partition(":")
        platform = {"cuda": "gpu"}.get(platform, platform)
        try:
            devices = jax.devices(platform)
        except RuntimeError as exc:
            raise RuntimeError(f"the jax backend finds no {platform!r} device") from exc
        return devices[int(index or 0)]

    @classmethod
    def device_of_array(cls, x):
        """The array's device; ``None`` (the default) for tracers inside ``jax.jit``."""
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
        (device,) = x.devices()
        return device

    def _key_data(self, key):
        import jax

        return jax.random.wrap_key_data(self.xp.asarray(key.words, dtype=self.xp.uint32))

    def random_bits(self, key, shape):
        import jax

        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return self._place(jax.random.bits(self._key_data(key), shape, self.xp.uint32))

    def _place(self, x):
        import jax

        if isinstance(x, jax.core.Tracer):
            return x
        return jax.device_put(x, self.device)

    def _native_uniform(self, key, shape, dtype):
        import jax

        return self._drawn(jax.random.uniform, key, shape, dtype)

    def _native_normal(self, key, shape, dtype):
        import jax

        return self._drawn(jax.random.normal, key, shape, dtype)

    def _drawn(self, draw, key, shape, dtype):
        """``draw(key, shape, dtype)``; a (rows, cols) array of more than
        :data:`BLOCKED_DRAW` numbers is drawn in column blocks of about
        :data:`DRAW_BLOCK` numbers, block i from ``fold_in(key, i)``, each written
        into one preallocated array (:meth:`write_columns`): ``jax.random`` holds
        ~3 temporaries of its output's size, 1.2 GB beside a 400 MB batch at
        d = 10⁶."""
        import jax
        import jax.numpy as jnp

        data = self._key_data(key)
        if len(shape) != 2 or shape[0] * shape[1] <= BLOCKED_DRAW:
            return self._place(draw(data, shape, dtype))
        rows, cols = shape
        width = max(1, DRAW_BLOCK // rows)
        out = self._place(jnp.zeros(shape, dtype))
        for i, start in enumerate(range(0, cols, width)):
            block = draw(jax.random.fold_in(data, i), (rows, min(width, cols - start)), dtype)
            out = self.write_columns(out, start, self._place(block))
        return out

    def _native_rademacher(self, key, shape, dtype):
        import jax

        return self._place(jax.random.rademacher(self._key_data(key), shape, dtype))

    def _native_integers(self, key, shape, low, high):
        import jax

        ints = jax.random.randint(self._key_data(key), shape, low, high, self.index_dtype)
        return self._place(ints)

    def jit(self, fn, **options):
        import jax

        return jax.jit(fn, **options)

    def scale(self, x, factor):
        """``x * factor`` written into x's own buffer: a compiled product with x
        donated (x is consumed)."""
        return _scaled()(x, factor)

    def write_columns(self, W, start, block):
        """W with columns ``start : start + k`` replaced by ``block``, written into W's
        own buffer: a compiled ``dynamic_update_slice`` with W donated (one compilation
        per block shape), so that a streamed update never holds W twice. W is consumed."""
        import jax.numpy as jnp

        return _write_columns()(W, block, jnp.asarray(start, dtype=jnp.int32))

    def rowwise_squared_norm(self, x):
        """Σ_j x_bj², compiled: the square and the sum are fused, where the eager
        batched product would copy x twice (``expand_dims``) and ``x * x`` once more."""
        return _sum_of_squares()(x)

    def matmul_transposed(self, x, W):
        """x Wᵀ summed over column blocks of W: the eager transpose, and XLA's CPU
        product as well, would hold a transposed copy of all of W."""
        step = max(1, self.matmul_block_elements // max(W.shape[0], 1))
        out = None
        for start in range(0, W.shape[1], step):
            term = x[:, start:start + step] @ W[:, start:start + step].T
            out = term if out is None else out + term
        return out

    def value_and_grad(self, fn):
        """``jax.value_and_grad`` with respect to the first argument, under ``jax.jit``.

        The compiled function is cached per ``fn`` (when hashable, e.g. a
        :class:`~sdze_core.objectives.ResidualLoss`), so a training loop that
        asks for it every step traces once per input shape. As always with
        ``jax.jit``, Python state that ``fn`` reads is frozen at trace time.
        A ``fn`` that branches in Python on array values (which cannot be
        traced) runs without ``jit``, every call.
        """
        try:
            return _value_and_grad(fn)
        except TypeError:  # an unhashable fn: compile for this call only
            return _value_and_grad.__wrapped__(fn)

    def hessian_diagonal(self, fn, x, index):
        """Forward-over-reverse ``jvp(grad(fn))`` along e_j, vmapped over the points
        and the sampled coordinates (each tangent a dense d-vector)."""
        import jax
        import jax.numpy as jnp

        def one_point(row):
            return fn(row[None, :])[0]

        grad = jax.grad(one_point)

        def second(row, j):
            tangent = jnp.zeros_like(row).at[j].set(1)
            return jax.jvp(grad, (row,), (tangent,))[1][j]

        per_coordinate = jax.vmap(lambda j: jax.vmap(lambda row: second(row, j))(x))
        return fn(x), per_coordinate(index)

    def synchronize(self, *arrays) -> None:
        import jax

        if arrays:
            jax.block_until_ready(arrays)
        jax.effects_barrier()

    def _gpu_stats(self):
        if self.device.platform == "cpu":
            return None
        return self.device.memory_stats()

    def peak_memory(self) -> int:
        """Device peak since the process started (XLA cannot reset it) on GPU;
        host peak RSS on CPU."""
        stats = self._gpu_stats()
        if stats is None:
            return host_peak_rss()
        return int(stats.get("peak_bytes_in_use", 0))


@lru_cache(maxsize=32)
def _value_and_grad(fn):
    import jax

    eager = jax.value_and_grad(fn)
    compiled = jax.jit(eager)
    state = {"jit": True}

    def value_and_grad(params, *args):
        if state["jit"]:
            try:
                return compiled(params, *args)
            except (
                jax.errors.ConcretizationTypeError,
                jax.errors.TracerArrayConversionError,
                jax.errors.TracerIntegerConversionError,
            ):
                state["jit"] = False  # Python control flow on values: run eagerly
        return eager(params, *args)

    return value_and_grad


@lru_cache(maxsize=1)
def _write_columns():
    import jax
    from jax import lax

    def write(W, block, start):
        return lax.dynamic_update_slice(W, block.astype(W.dtype), (start * 0, start))

    return jax.jit(write, donate_argnums=0)


@lru_cache(maxsize=1)
def _scaled():
    import jax

    def scaled(x, factor):
        return (x * factor).astype(x.dtype)

    return jax.jit(scaled, donate_argnums=0)


@lru_cache(maxsize=1)
def _sum_of_squares():
    import jax

    def sum_of_squares(x):
        return (x * x).sum(axis=-1)

    return jax.jit(sum_of_squares)
