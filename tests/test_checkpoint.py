"""Checkpoints (sdze.checkpoint): exact round trips of parameters and engine state, across
backends; config checks; refusal of foreign or corrupt files; atomic writes, including a
writer killed with SIGKILL in the middle of a save."""

import json
import math
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from sdze import checkpoint
from sdze.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from sdze_core.engine import SDZE, SDZEState
from sdze_core.keys import Key, key
from sdze_core.models import MLP, Ansatz
from sdze_core.objectives import ResidualLoss
from sdze_core.optimizers import AdamState, SGDState, zo_adam
from sdze_core.oracles import SparseLaplacian
from sdze_core.perturbers import CRNSPerturber
from sdze_core.registry import backend_of, make_backend
from sdze_core.samplers import LowRankState, LowRankSubspace

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"
SIZES = [5, 8, 8, 1]
CONFIG = {"problem": "allen-cahn-two-body", "dim": 5, "model": {"sizes": SIZES}, "lr": 1e-3}


# -- helpers -------------------------------------------------------------------------------


def host_tree(x):
    """The tree with every array brought to NumPy (structure and scalars untouched)."""
    if x is None or isinstance(x, (bool, int, float, str, Key)):
        return x
    if isinstance(x, tuple) and hasattr(type(x), "_fields"):
        return type(x)(*(host_tree(v) for v in x))
    if isinstance(x, tuple):
        return tuple(host_tree(v) for v in x)
    if isinstance(x, list):
        return [host_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: host_tree(v) for k, v in x.items()}
    return np.asarray(backend_of(x).to_host(x))


def assert_tree_equal(a, b, where="tree"):
    """Same structure, same types (tuple vs list, NamedTuple class, Key), arrays bit-exact."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        fields = getattr(type(a), "_fields", range(len(a)))
        for field, u, v in zip(fields, a, b, strict=True):
            assert_tree_equal(u, v, f"{where}.{field}")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def small_run(backend, steps=0):
    """(params, state) of a small low-rank ZO-Adam run after ``steps`` steps (d = 5)."""
    model = Ansatz(MLP(tuple(SIZES)))

    def rhs(u, x):
        return 0.5 * u * u + x[:, 0]

    def points(k):
        return 0.8 * (backend.uniform(k, (4, SIZES[0])) - 0.5)

    loss = ResidualLoss(model, SparseLaplacian(num_directions=2), rhs, points)
    engine = SDZE(
        CRNSPerturber(num_queries=2), LowRankSubspace(rank=2, refresh_every=3), zo_adam(1e-2)
    )
    params = model.init(key(0), backend)
    state = engine.init(key(1), params)
    for _ in range(steps):
        params, state, _ = engine.step(loss, params, state)
    return params, state


def temp_files(directory):
    return sorted(p.name for p in pathlib.Path(directory).iterdir() if ".tmp-" in p.name)


def write_npz(path, header, **arrays):
    """An .npz with a hand-made ``__sdze__`` header (for malformed checkpoints)."""
    np.savez(path, __sdze__=np.array(json.dumps(header)), **arrays)


@pytest.fixture
def numpy64():
    return make_backend("numpy", dtype="float64")


# -- round trips -----------------------------------------------------------------------------


def test_round_trip_after_steps_is_exact(tmp_path, numpy64):
    params, state = small_run(numpy64, steps=4)  # one basis refresh, pending updates non-zero
    assert isinstance(state.sampler.bases, tuple) and state.sampler.epoch == 1
    assert any(np.any(p != 0) for p in state.sampler.pending)
    assert isinstance(state.optimizer, AdamState) and state.optimizer.count > 0
    extra = {"losses": [0.5, 0.25], "wall_s": 1.5}
    path = save_checkpoint(
        tmp_path / "run.npz", params=params, state=state, config=CONFIG, extra=extra
    )
    assert path == tmp_path / "run.npz"

    loaded = load_checkpoint(path, numpy64)
    assert isinstance(loaded, Checkpoint)
    assert_tree_equal(params, loaded.params, "params")
    assert_tree_equal(state, loaded.state, "state")
    assert isinstance(loaded.state, SDZEState) and isinstance(loaded.state.sampler, LowRankState)
    assert isinstance(loaded.state.key, Key) and loaded.state.key == state.key
    assert isinstance(loaded.state.sampler.bases, tuple)  # not a list
    assert isinstance(loaded.state.optimizer.mu, list)  # not a tuple
    assert loaded.config == CONFIG and loaded.extra == extra
    header = read_config(path)
    assert isinstance(header.pop("sdze"), str)
    assert header == {"format": FORMAT_VERSION, "config": CONFIG, "extra": extra}


def test_round_trip_of_odd_values(tmp_path, numpy64):
    params = [{"W": np.arange(6.0).reshape(2, 3), "b": np.array([-0.0, np.nan])}]
    bases = (None, (np.eye(3, dtype=np.float32), np.ones((2, 1), dtype=np.float32)))
    sampler = LowRankState(key(7), np.int64(3), bases, None)
    optimizer = {
        "__key__": [1, 2],  # a plain dict whose key looks like a tag
        "floats": [0.1, 1e-310, -0.0, math.inf, -math.inf, math.nan, np.float32(0.1)],
        "ints": (2**63 + 5, -1, np.uint32(7)),
        "misc": [None, True, False, "text", (), [], {}],
        "arrays": (np.array(2.5), np.arange(4, dtype=np.int32), np.array([True, False])),
        "sgd": SGDState(None),
    }
    state = SDZEState(np.int64(12), key(2**40 + 3), sampler, optimizer)
    path = save_checkpoint(tmp_path / "odd.npz", params=params, state=state, config={})
    loaded = load_checkpoint(path, numpy64).state

    expected = state._replace(
        step=12,
        sampler=sampler._replace(epoch=3),
        optimizer={
            **optimizer,
            "floats": [0.1, 1e-310, -0.0, math.inf, -math.inf, math.nan, float(np.float32(0.1))],
            "ints": (2**63 + 5, -1, 7),
        },
    )
    assert_tree_equal(expected, loaded, "state")
    assert_tree_equal(params, load_checkpoint(path, numpy64).params, "params")


def test_state_none_and_path_kept_as_given(tmp_path, numpy64):
    params, _ = small_run(numpy64)
    target = tmp_path / "new" / "dirs" / "ckpt"  # no .npz suffix: kept as given
    assert save_checkpoint(target, params=params, config=CONFIG) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["ckpt"]
    loaded = load_checkpoint(str(target), "numpy")
    assert loaded.state is None and loaded.extra == {}
    assert_tree_equal(params, loaded.params, "params")


def test_readable_with_plain_numpy_without_pickle(tmp_path, numpy64):
    params, state = small_run(numpy64, steps=1)
    path = save_checkpoint(tmp_path / "run.npz", params=params, state=state, config=CONFIG)
    with zipfile.ZipFile(path) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}
    with np.load(path, allow_pickle=False) as z:
        entries = {name: z[name] for name in z.files}
    assert entries["__sdze__"].dtype.kind == "U" and entries["__sdze__"].shape == ()
    header = json.loads(str(entries["__sdze__"]))
    assert header["format"] == FORMAT_VERSION and header["config"] == CONFIG
    assert header["state"]["__namedtuple__"] == "sdze_core.engine:SDZEState"
    for layer, p in enumerate(params):
        np.testing.assert_array_equal(entries[f"params/{layer}/W"], p["W"])
        np.testing.assert_array_equal(entries[f"params/{layer}/b"], p["b"])
    state_entries = [name for name in entries if name.startswith("state/")]
    assert len(state_entries) > 0
    assert all(a.dtype != object for a in entries.values())


# -- across backends -------------------------------------------------------------------------


def test_torch_to_numpy_and_back(tmp_path):
    torch = pytest.importorskip("torch", reason="the cross-backend test needs PyTorch")
    torch64 = make_backend("torch", dtype="float64")
    numpy64 = make_backend("numpy", dtype="float64")

    params, state = small_run(torch64, steps=4)
    path = save_checkpoint(tmp_path / "torch.npz", params=params, state=state, config=CONFIG)
    on_numpy = load_checkpoint(path, "numpy")
    assert type(on_numpy.params[0]["W"]) is np.ndarray
    assert on_numpy.params[0]["W"].dtype == np.float64
    assert type(on_numpy.state.optimizer.mu[0]["W"]) is np.ndarray
    assert_tree_equal(host_tree(params), on_numpy.params, "params")
    assert_tree_equal(host_tree(state), on_numpy.state, "state")

    params, state = small_run(numpy64, steps=4)
    path = save_checkpoint(tmp_path / "numpy.npz", params=params, state=state, config=CONFIG)
    on_torch = load_checkpoint(path, torch64)
    assert isinstance(on_torch.params[0]["W"], torch.Tensor)
    assert on_torch.params[0]["W"].dtype == torch.float64
    assert isinstance(on_torch.state.sampler.bases[0][0], torch.Tensor)
    assert_tree_equal(params, host_tree(on_torch.params), "params")
    assert_tree_equal(state, host_tree(on_torch.state), "state")


# -- what the caller expects -----------------------------------------------------------------


def test_expect_reports_every_mismatch_at_once(tmp_path, numpy64):
    params, state = small_run(numpy64)
    path = save_checkpoint(tmp_path / "run.npz", params=params, state=state, config=CONFIG)
    ok = {"problem": "allen-cahn-two-body", "dim": 5, "model.sizes": (5, 8, 8, 1), "lr": 1e-3}
    assert load_checkpoint(path, numpy64, expect=ok).config == CONFIG

    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(
            path,
            numpy64,
            expect={"problem": "heat", "dim": 1000, "model.sizes": [1000, 128, 1], "seed": 3},
        )
    message = str(info.value)
    assert str(path) in message
    for text in (
        "problem",
        "'allen-cahn-two-body'",
        "'heat'",
        "dim",
        "5",
        "1000",
        "model.sizes",
        "[5, 8, 8, 1]",
        "[1000, 128, 1]",
        "seed",
    ):
        assert text in message
    assert [m[0] for m in info.value.mismatches] == ["problem", "dim", "model.sizes", "seed"]
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, ValueError)


def test_weight_shapes_are_checked_against_model_sizes(tmp_path, numpy64):
    params, _ = small_run(numpy64)  # sizes 5, 8, 8, 1
    config = {"model": {"sizes": [5, 8, 9, 1]}}
    path = save_checkpoint(tmp_path / "bad.npz", params=params, config=config)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path, numpy64)
    message = str(info.value)
    assert "params[1]['W'].shape" in message and "(8, 8)" in message and "(9, 8)" in message
    assert "params[1]['b'].shape" in message
    assert "params[2]['W'].shape" in message and "(1, 8)" in message and "(1, 9)" in message
    assert read_config(path)["config"] == config  # the config alone still reads

    path = save_checkpoint(tmp_path / "short.npz", params=params[:2], config=CONFIG)
    with pytest.raises(CheckpointMismatchError, match="number of layers"):
        load_checkpoint(path, numpy64)


# -- refused files ---------------------------------------------------------------------------


def test_not_a_checkpoint(tmp_path, numpy64):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(3))
    npz = tmp_path / "plain.npz"
    np.savez(npz, a=np.arange(3))
    for path in (text, empty, npy, npz):
        for read in (load_checkpoint, read_config):
            with pytest.raises(CheckpointError, match=str(path.name)):
                read(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.npz")


def test_corrupt_files(tmp_path, numpy64):
    params, state = small_run(numpy64)
    good = save_checkpoint(tmp_path / "good.npz", params=params, state=state, config=CONFIG)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.npz"):
        load_checkpoint(truncated, numpy64)

    flipped = bytearray(data)  # one bit of the last weight's data: a CRC error
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo(f"params/{len(params) - 1}/W.npy")
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26 :][:4])
    end = info.header_offset + 30 + name_length + extra_length + info.file_size
    flipped[end - 1] ^= 1
    corrupt = tmp_path / "flipped.npz"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="flipped.npz.*CRC"):
        load_checkpoint(corrupt, numpy64)


def test_newer_format_is_refused(tmp_path, numpy64, monkeypatch):
    params, _ = small_run(numpy64)
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION + 1)
        path = save_checkpoint(tmp_path / "future.npz", params=params, config=CONFIG)
    with pytest.raises(CheckpointError, match=f"format {FORMAT_VERSION + 1}.*upgrade"):
        load_checkpoint(path, numpy64)
    with pytest.raises(CheckpointError, match="future.npz"):
        read_config(path)


def test_only_sdze_namedtuples_are_imported(tmp_path, numpy64):
    base = {"format": FORMAT_VERSION, "config": {}, "extra": {}, "params": []}
    cases = {
        "foreign": ("os.path:join", "only sdze modules"),
        "not_a_namedtuple": ("sdze_core.keys:Key", "not a NamedTuple"),
        "absent": ("sdze_core.engine:NoSuchState", "does not exist"),
    }
    for name, (target, match) in cases.items():
        path = tmp_path / f"{name}.npz"
        write_npz(path, {**base, "state": {"__namedtuple__": target, "fields": {}}})
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path, numpy64)

    # and nothing is written that could not be read back
    from collections import namedtuple

    Local = namedtuple("Local", "a")
    for bad in (Local(1), object(), {1: 2}, np.array([object()])):
        with pytest.raises((TypeError, ValueError)):
            save_checkpoint(tmp_path / "never.npz", params=[], state=bad, config={})
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path / "never.npz", params=[], config={"f": lambda: 0})
    assert not (tmp_path / "never.npz").exists() and temp_files(tmp_path) == []


# -- atomic writes ---------------------------------------------------------------------------


def _failing_write_entry(real):
    calls = []

    def write(zf, name, array):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real(zf, name, array)

    return write


@pytest.mark.parametrize("where", ["write", "fsync", "replace", "interrupt"])
def test_failed_save_keeps_the_old_checkpoint(tmp_path, numpy64, monkeypatch, where):
    params, state = small_run(numpy64)
    path = save_checkpoint(tmp_path / "run.npz", params=params, state=state, config=CONFIG)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"{where} failed (simulated)")

    with monkeypatch.context() as m:
        if where == "write":
            m.setattr(checkpoint, "_write_entry", _failing_write_entry(checkpoint._write_entry))
        elif where == "fsync":
            m.setattr(checkpoint.os, "fsync", boom)
        elif where == "replace":
            m.setattr(checkpoint.os, "replace", boom)
        else:

            def interrupt(*args, **kwargs):
                raise KeyboardInterrupt

            m.setattr(checkpoint, "_write_entry", interrupt)
        new_params = [{k: v + 1.0 for k, v in p.items()} for p in params]
        with pytest.raises((OSError, KeyboardInterrupt)):
            save_checkpoint(path, params=new_params, state=state, config={"other": 1})

    assert path.read_bytes() == before
    assert temp_files(tmp_path) == []
    assert_tree_equal(params, load_checkpoint(path, numpy64).params, "params")


KILLED_WRITER = r"""
import os, sys, time
import numpy as np
from sdze import checkpoint

path, marker = sys.argv[1], sys.argv[2]
checkpoint.save_checkpoint(
    path, params=[{"W": np.full((3, 2), 1.5), "b": np.zeros(3)}], config={"name": "A"}
)
real = checkpoint._write_entry

def write_half_then_hang(zf, name, array):
    if not name.startswith("params/"):
        return real(zf, name, array)
    with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(f, np.lib.format.header_data_from_array_1_0(array))
        data = array.tobytes()
        f.write(data[: len(data) // 2])
        zf.fp.flush()
        os.fsync(zf.fp.fileno())
        open(marker, "w").close()
        time.sleep(120)

checkpoint._write_entry = write_half_then_hang
checkpoint.save_checkpoint(
    path, params=[{"W": np.full((500, 400), 2.5), "b": np.ones(500)}], config={"name": "B"}
)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL does not exist on Windows")
def test_writer_killed_mid_save_leaves_the_old_checkpoint(tmp_path, numpy64):
    path = tmp_path / "run.npz"
    marker = tmp_path / "writing"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path), str(marker)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the writer exited early: {child.communicate()[1].decode()}")
            assert time.monotonic() < deadline, "the writer never reached the middle of its save"
            time.sleep(0.02)
        temps = temp_files(tmp_path)
        assert len(temps) == 1 and temps[0].startswith(f".run.npz.tmp-{child.pid}-")
        assert (tmp_path / temps[0]).stat().st_size > 0
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    assert temp_files(tmp_path) == temps  # the dead writer's partial file is still there
    loaded = load_checkpoint(path, numpy64)
    assert loaded.config == {"name": "A"}
    assert_tree_equal([{"W": np.full((3, 2), 1.5), "b": np.zeros(3)}], loaded.params, "params")

    params = [{"W": np.full((3, 2), 3.5), "b": np.ones(3)}]
    save_checkpoint(path, params=params, config={"name": "C"})
    assert temp_files(tmp_path) == []  # the stale file is gone
    assert load_checkpoint(path, numpy64).config == {"name": "C"}


@pytest.mark.skipif(os.name != "posix", reason="writer liveness is checked by pid on POSIX")
def test_temp_files_of_live_writers_are_kept(tmp_path, numpy64):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(finished.stdout)
    live_pid = os.getppid()  # our parent runs as long as we do
    stale = tmp_path / f".run.npz.tmp-{dead_pid}-0123abcd"
    live = tmp_path / f".run.npz.tmp-{live_pid}-4567ef01"
    other = tmp_path / f".other.npz.tmp-{dead_pid}-89abcdef"
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    save_checkpoint(tmp_path / "run.npz", params=[], config={})
    assert temp_files(tmp_path) == sorted([live.name, other.name])
