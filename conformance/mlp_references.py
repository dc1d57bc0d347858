"""Reference values for the operator-term guarantees: a fixed tanh MLP in float64 and
its derivative tensors [u, ∇u, ..., ∇^k u] by nested ``jax.jacfwd``."""

import numpy as np


def reference_params(sizes, seed: int) -> tuple:
    """Glorot-scaled weights and small biases of an MLP of ``sizes``, from NumPy's ``seed``."""
    rng = np.random.default_rng(seed)
    return tuple(
        {
            "W": rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / (n_in + n_out)),
            "b": 0.1 * rng.standard_normal(n_out),
        }
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    )


def derivative_tensors(jax, params, x, order: int) -> list:
    """[u, ∇u, ..., ∇^order u] of the tanh MLP ``params`` at the rows of ``x`` (NumPy arrays)."""

    def u(point):
        h = point
        for layer, p in enumerate(params):
            h = h @ p["W"].T + p["b"]
            if layer < len(params) - 1:
                h = jax.numpy.tanh(h)
        return h[0]

    fns = [u]
    for _ in range(order):
        fns.append(jax.jacfwd(fns[-1]))
    return [np.asarray(jax.vmap(f)(jax.numpy.asarray(x))) for f in fns]
