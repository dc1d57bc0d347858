"""Guarantee: the optimizer's memory is O(1) in the number of parameters P
(docs/method.md#subspace-perturbations).

For MLPs (d, 32, 1) with d = 10, 1 000 and 100 000 (P = 385, 32 065 and
3 200 065: P grows 8 300-fold) in float32, an SDZE engine with the low-rank
subspace (rank 4, bases refreshed at every step so that ``rebase`` runs too)
is initialised and run for 2 steps, and the bytes held in arrays by its
state (``SDZEState`` minus the parameters) are counted by walking the state
tree (every array: size × itemsize; keys, counters and ``None`` hold no
array and are O(1) host values). Deterministic, exact checks:

* the optimizer state (``state_nbytes``, equal to the walk) is the same
  for every d: 0 bytes for zo_sgd, 200 bytes for zo_sgd with momentum
  (r × r = 16 plus 1 × 1 = 1 weight coordinates and 32 + 1 bias entries,
  float32) and 400 bytes for zo_adam (two such moments); it never holds a
  P-sized gradient buffer or moment;
* the sampler state minus its stored bases (the pending r × r updates) is
  the same for every d: 68 bytes;
* the stored bases are exactly Σ_l (m_l + n_l) r_l · itemsize, O((m + n) r)
  per layer, not O(m n): 804 B, 16 644 B and 1 600 644 B for the three d
  (the first layer's (32 + d) · 4 + the output layer's (1 + 32) · 1 floats),
  8× less than the weights (m n = 32 d) at d = 100 000;
* with ``store_bases=False`` the whole state is independent of d: 68 bytes
  (zo_sgd), 268 bytes (momentum), 468 bytes (zo_adam) plus the O(1) keys;
* the full-space Gaussian with zo_sgd holds no array at all (0 bytes): its
  directions are regenerated from their keys.

Measured: exactly these values on numpy, array_api_strict, torch and jax
(the state is identical after ``init`` and after each step).
"""

import math
from dataclasses import dataclass
from typing import Any

import pytest
from array_api_compat import array_namespace

from sdze_core.engine import SDZE
from sdze_core.keys import Key, key
from sdze_core.models import MLP
from sdze_core.optimizers import state_nbytes, zo_adam, zo_sgd
from sdze_core.perturbers import CRNSPerturber
from sdze_core.samplers import FullGaussian, LowRankSubspace

DIMS = (10, 1_000, 100_000)
HIDDEN, RANK, Q, B, STEPS = 32, 4, 2, 4, 2
ITEMSIZE = 4  # float32

OPTIMIZERS = {
    "sgd": lambda: zo_sgd(1e-3),
    "momentum": lambda: zo_sgd(1e-3, momentum=0.9),
    "adam": lambda: zo_adam(1e-3),
}
#: Expected optimizer bytes: the moments are r × r per weight and m per bias.
MOMENT_BYTES = ((RANK * RANK + 1 * 1) + (HIDDEN + 1)) * ITEMSIZE  # 200
OPTIMIZER_BYTES = {"sgd": 0, "momentum": MOMENT_BYTES, "adam": 2 * MOMENT_BYTES}
PENDING_BYTES = (RANK * RANK + 1 * 1) * ITEMSIZE  # 68


def array_nbytes(x) -> int:
    xp = array_namespace(x)
    if xp.isdtype(x.dtype, "bool"):
        itemsize = 1
    elif xp.isdtype(x.dtype, "integral"):
        itemsize = xp.iinfo(x.dtype).bits // 8
    elif xp.isdtype(x.dtype, "complex floating"):
        itemsize = 2 * (xp.finfo(x.dtype).bits // 8)
    else:
        itemsize = xp.finfo(x.dtype).bits // 8
    return math.prod(int(n) for n in x.shape) * itemsize


def walk(tree, arrays: list, others: list) -> None:
    """Collect the arrays and the non-array leaves of a state tree."""
    if isinstance(tree, dict):
        for child in tree.values():
            walk(child, arrays, others)
    elif isinstance(tree, (list, tuple)):  # NamedTuples included
        for child in tree:
            walk(child, arrays, others)
    elif hasattr(tree, "shape") and hasattr(tree, "dtype"):
        arrays.append(tree)
    else:
        others.append(tree)


def nbytes(tree) -> int:
    arrays, _ = [], []
    walk(tree, arrays, _)
    return sum(array_nbytes(a) for a in arrays)


def check_scalars(tree) -> None:
    """Everything that is not an array is an O(1) host value: keys, ints, None."""
    arrays, others = [], []
    walk(tree, arrays, others)
    for leaf in others:
        assert leaf is None or isinstance(leaf, (Key, int, float, str)), type(leaf)


@dataclass(frozen=True, eq=False)
class FitLoss:
    """ℓ(θ) = mean over B fixed points x of (u_θ(x) − 1)²: a cheap loss for the engine
    (a dataclass with a ``model`` field, which the perturber replaces)."""

    model: Any
    x: Any

    def sample(self, k):
        return None

    def __call__(self, params, xi):
        u = self.model.apply(params, self.x)
        return array_namespace(u).mean((u - 1.0) ** 2, axis=-1)


def measure(b, d, sampler, optimizer_name):
    """Byte counts of the engine state after init and after each of STEPS steps."""
    model = MLP((d, HIDDEN, 1))
    params = model.init(key(0), b)
    loss = FitLoss(model, b.normal(key(100 + d), (B, d)) / math.sqrt(d))
    engine = SDZE(CRNSPerturber(num_queries=Q), sampler, OPTIMIZERS[optimizer_name]())
    state = engine.init(key(1), params)
    counts = []
    for step in range(STEPS + 1):
        if step:
            params, state, _ = engine.step(loss, params, state)
        check_scalars(state)
        sampler_state = state.sampler
        bases = getattr(sampler_state, "bases", None)
        optimizer_bytes = nbytes(state.optimizer)
        assert state_nbytes(state.optimizer) == optimizer_bytes
        counts.append(
            {
                "optimizer": optimizer_bytes,
                "bases": nbytes(bases),
                "sampler-without-bases": nbytes(sampler_state) - nbytes(bases),
                "total": nbytes((state.step, state.key, state.sampler, state.optimizer)),
            }
        )
    assert all(c == counts[0] for c in counts), counts  # steps add nothing
    return counts[0], params


def parameter_count(params) -> int:
    return sum(math.prod(a.shape) for p in params for a in p.values())


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_state_bytes_do_not_depend_on_p(backend, optimizer_name):
    b = backend.with_config(dtype="float32")
    sampler = LowRankSubspace(rank=RANK, refresh_every=1)
    rows, sizes = [], []
    for d in DIMS:
        counts, params = measure(b, d, sampler, optimizer_name)
        rows.append(counts)
        sizes.append(parameter_count(params))
        expected_bases = (HIDDEN + d) * RANK + (1 + HIDDEN) * 1
        assert counts["bases"] == expected_bases * ITEMSIZE
        assert counts["bases"] < (HIDDEN * d + HIDDEN) * ITEMSIZE  # O((m + n) r), not O(m n)
    assert sizes[-1] / sizes[0] > 8_000
    for row in rows:
        assert row["optimizer"] == OPTIMIZER_BYTES[optimizer_name]
        assert row["sampler-without-bases"] == PENDING_BYTES
        assert row["total"] - row["bases"] == rows[0]["total"] - rows[0]["bases"]
    # At d = 100 000 the bases are (m + n) r = (32 + d) 4 floats vs m n = 32 d.
    assert rows[-1]["bases"] * 7 < sizes[-1] * ITEMSIZE


@pytest.mark.parametrize("optimizer_name", sorted(OPTIMIZERS))
def test_regenerated_bases_make_the_whole_state_independent_of_d(backend, optimizer_name):
    b = backend.with_config(dtype="float32")
    sampler = LowRankSubspace(rank=RANK, refresh_every=1, store_bases=False)
    totals = []
    for d in DIMS:
        counts, _ = measure(b, d, sampler, optimizer_name)
        assert counts["bases"] == 0
        totals.append(counts["total"])
    assert totals == [OPTIMIZER_BYTES[optimizer_name] + PENDING_BYTES] * len(DIMS)


def test_full_gaussian_state_holds_no_array(backend):
    b = backend.with_config(dtype="float32")
    for d in DIMS:
        counts, _ = measure(b, d, FullGaussian(), "sgd")
        assert counts["total"] == 0
