"""array-api-strict backend: the standard and nothing else, for testing.

Code that runs here uses only the Python array API standard; it is how the
test suite proves that ``sdze_core`` does.
"""

from __future__ import annotations

import sys

from sdze_core.backend import Backend


class ArrayAPIStrictBackend(Backend):
    """The strict reference namespace on its CPU device. Draws are portable."""

    name = "array_api_strict"
    library = "array_api_strict"
    extra = "pip install array-api-strict"

    def _load(self):
        import array_api_strict as xp

        return xp

    @classmethod
    def owns(cls, x) -> bool:
        return "array_api_strict" in sys.modules and type(x).__module__.startswith(
            "array_api_strict"
        )

    def _resolve_device(self, device):
        if device is None or device == "cpu":
            return self.xp.Device()
        if isinstance(device, self.xp.Device):
            return device
        return self.xp.Device(device)

    def to_host(self, x):
        import numpy as np

        return np.from_dlpack(x)
