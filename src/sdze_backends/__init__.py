"""Concrete sdze backends, one module per array library, same shape each.

Each module defines one :class:`sdze_core.backend.Backend` subclass. Importing
a module here imports nothing heavy: the library itself is imported when the
backend is instantiated (``sdze.use(name)`` or dispatch on its arrays).

``BUILTIN`` lists them for :func:`sdze_core.registry.register_backend`; third
parties add theirs through the ``sdze.backends`` entry-point group.
"""

BUILTIN = {
    # name: (target, library, pip extra)
    "numpy": ("sdze_backends.numpy:NumpyBackend", "numpy", "numpy"),
    "array_api_strict": (
        "sdze_backends.array_api_strict:ArrayAPIStrictBackend",
        "array_api_strict",
        "pip install array-api-strict",
    ),
    "torch": ("sdze_backends.torch:TorchBackend", "torch", "torch"),
    "jax": ("sdze_backends.jax:JaxBackend", "jax", "jax"),
    "cupy": ("sdze_backends.cupy:CupyBackend", "cupy", "cupy-cuda12"),
}


def register_builtin_backends() -> None:
    """Register the backends above with the core registry (idempotent)."""
    from sdze_core.registry import register_backend

    for name, (target, library, extra) in BUILTIN.items():
        register_backend(name, target, library=library, extra=extra)
