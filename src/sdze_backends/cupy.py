"""CuPy backend (CUDA GPUs): no autodiff, which sdze's forward-only training needs none of.

The peak-memory reading counts the bytes CuPy's memory pool hands out,
through a :class:`cupy.cuda.MemoryHook` installed by ``reset_peak_memory``.
"""

from __future__ import annotations

import sys

from sdze_core.backend import Backend


class CupyBackend(Backend):
    """CuPy on one CUDA device. Native draws: ``cupy.random.default_rng(key)``."""

    name = "cupy"
    library = "cupy"
    extra = "cupy-cuda12"

    def _load(self):
        import cupy

        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError:
            count = 0
        if count == 0:
            raise RuntimeError("CuPy is installed but finds no CUDA device")
        import array_api_compat.cupy as xp

        self._hook = None
        return xp

    @classmethod
    def owns(cls, x) -> bool:
        if "cupy" not in sys.modules:
            return False
        import array_api_compat

        return array_api_compat.is_cupy_array(x)

    def _resolve_device(self, device):
        import cupy

        if device is None or device in ("gpu", "cuda"):
            return cupy.cuda.Device()
        if isinstance(device, str):
            platform, _, index = device.partition(":")
            if platform not in ("gpu", "cuda"):
                raise ValueError(f"the cupy backend runs on CUDA devices, not on {device!r}")
            return cupy.cuda.Device(int(index or 0))
        if isinstance(device, int):
            return cupy.cuda.Device(device)
        return device

    def asarray(self, x, dtype=None):
        with self.device:
            return self.xp.asarray(x, dtype=dtype)

    def arange(self, n, dtype=None):
        with self.device:
            return self.xp.arange(n, dtype=dtype)

    def zeros(self, shape, dtype=None):
        with self.device:
            return self.xp.zeros(shape, dtype=dtype or self.dtype)

    def _generator(self, key):
        import cupy

        return cupy.random.default_rng(key.hi << 32 | key.lo)

    def _native_uniform(self, key, shape, dtype):
        with self.device:
            return self._generator(key).random(shape, dtype=dtype)

    def _native_normal(self, key, shape, dtype):
        with self.device:
            return self._generator(key).standard_normal(shape, dtype=dtype)

    def _native_rademacher(self, key, shape, dtype):
        with self.device:
            signs = self._generator(key).integers(0, 2, shape)
            return (1 - 2 * signs).astype(dtype)

    def _native_integers(self, key, shape, low, high):
        with self.device:
            return self._generator(key).integers(low, high, shape, dtype=self.index_dtype)

    def to_host(self, x):
        import cupy

        return cupy.asnumpy(x)

    def synchronize(self, *arrays) -> None:
        self.device.synchronize()

    def reset_peak_memory(self) -> None:
        import cupy

        if self._hook is None:
            self._hook = _peak_hook_class(cupy)()
            self._hook.__enter__()
        self._hook.reset(cupy.get_default_memory_pool().used_bytes())

    def peak_memory(self) -> int:
        import cupy

        if self._hook is None:
            return cupy.get_default_memory_pool().used_bytes()
        return self._hook.peak


def _peak_hook_class(cupy):
    class PeakMemoryHook(cupy.cuda.MemoryHook):
        """Tracks bytes handed out by the pool and their high-water mark."""

        name = "sdze-peak"

        def reset(self, in_use: int) -> None:
            self.in_use = self.peak = in_use

        def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
            self.in_use += mem_size
            self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
            self.in_use -= mem_size

    return PeakMemoryHook
