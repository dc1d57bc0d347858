"""NumPy backend: the CPU default (array-api-compat's NumPy namespace)."""

from __future__ import annotations

import sys

from sdze_core.backend import Backend


class NumpyBackend(Backend):
    """NumPy on the CPU. Native draws: ``numpy.random.Generator(Philox(key))``."""

    name = "numpy"
    library = "numpy"
    extra = "numpy"

    def _load(self):
        import array_api_compat.numpy as xp

        return xp

    @classmethod
    def owns(cls, x) -> bool:
        if "numpy" not in sys.modules:
            return False
        import array_api_compat

        return array_api_compat.is_numpy_array(x)

    def _resolve_device(self, device):
        if device in (None, "cpu"):
            return "cpu"
        raise ValueError(f"the numpy backend runs on the CPU only, not on {device!r}")

    @classmethod
    def device_of_array(cls, x):
        return "cpu"

    def _generator(self, key):
        import numpy as np

        return np.random.Generator(np.random.Philox(key=key.hi << 32 | key.lo))

    def _native_uniform(self, key, shape, dtype):
        return self._generator(key).random(shape, dtype=dtype)

    def _native_normal(self, key, shape, dtype):
        return self._generator(key).standard_normal(shape, dtype=dtype)

    def _native_rademacher(self, key, shape, dtype):
        signs = self._generator(key).integers(0, 2, shape, dtype="int8")
        return (1 - 2 * signs).astype(dtype)

    def _native_integers(self, key, shape, low, high):
        return self._generator(key).integers(low, high, shape, dtype=self.index_dtype)

    def matmul_into(self, a, b, out):
        import numpy as np

        return np.matmul(a, b, out=out)

    def multiply_into(self, a, b, out):
        import numpy as np

        return np.multiply(a, b, out=out)
