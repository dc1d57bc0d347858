"""Faults during training: a run killed with SIGKILL at seeded random moments resumes onto
the uninterrupted trajectory bit for bit; a full disk during a checkpoint write keeps the
previous checkpoint and says so."""

import errno
import json
import os
import random
import signal
import subprocess
import sys

import numpy as np
import pytest

import sdze
import sdze.solver as solve_module
from sdze import checkpoint
from sdze.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from test_checkpoint import CONFIG, SRC, assert_tree_equal, host_tree, small_run, temp_files
from test_solve import SMALL, run_small

# -- kill -9 at a seeded random moment, then resume ----------------------------------------

#: 12 steps, a checkpoint every 2 and a basis refresh every 5: a resume crosses refreshes.
KILL_RUN = dict(steps=12, eval_every=4, checkpoint_every=2, refresh_every=5, plots=False)

KILLED_RUN = r"""
import json, os, signal, sys
import sdze
import sdze.solver as solve_module
from sdze import checkpoint
from sdze_core.activity import ActivityPerturbation
from sdze_core.perturbers import CRNSPerturber

out, settings, phase, when = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def counted(real, at, where):
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if where == "before" and calls[0] == at:
            die()
        result = real(*args, **kwargs)
        if where == "after" and calls[0] == at:
            die()
        return result

    return wrapped


if phase == "mid-step":  # inside step `when`, between its perturbed evaluations and its update
    CRNSPerturber.estimate = counted(CRNSPerturber.estimate, when, "after")
    ActivityPerturbation.estimate = counted(ActivityPerturbation.estimate, when, "after")
elif phase == "after-save":  # right after the `when`-th checkpoint was renamed into place
    solve_module.save_checkpoint = counted(solve_module.save_checkpoint, when, "after")
else:  # "mid-save": halfway through the first weights of the `when`-th checkpoint
    real_write, saves = checkpoint._write_entry, [0]

    def write(zf, name, array):
        saves[0] += name == checkpoint.HEADER_ENTRY
        if saves[0] == when and name.startswith("params/"):
            with zf.open(name + ".npy", "w", force_zip64=True) as f:
                f.write(array.tobytes()[: array.nbytes // 2])
                zf.fp.flush()
                die()
        return real_write(zf, name, array)

    checkpoint._write_entry = write
sdze.solve("allen-cahn-two-body", 6, out=out, quiet=True, **settings)
print("the run was never killed")
"""


def kill_moments(backend_name):
    """Seeded random moments to die at: (phase, the step or checkpoint it dies in).

    One per phase; on jax one phase drawn by the seed, since a fresh jax process compiles
    each of its ~400 operations again (15 s on 2 idle cores, 45 s on busy ones).
    """
    rng = random.Random(f"kill-9 {backend_name}")
    saves = KILL_RUN["steps"] // KILL_RUN["checkpoint_every"]
    moments = [
        ("mid-step", rng.randint(1, KILL_RUN["steps"])),
        ("mid-save", rng.randint(2, saves)),
        ("after-save", rng.randint(1, saves - 1)),
    ]
    return [rng.choice(moments)] if backend_name == "jax" else moments


def start_killed_run(out, settings, phase, when) -> subprocess.Popen:
    """The child run that kills itself at (phase, when), writing to ``out``."""
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(out), json.dumps(SMALL | settings), phase,
         str(when)],
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL does not exist on Windows")
@pytest.mark.skip_backends(
    "array_api_strict",
    reason="the standard-only backend is not a solver backend users train with; the resume "
    "guarantee is tested on numpy, torch and jax (and cupy on a GPU)",
)
def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_run(tmp_path, backend):
    settings = KILL_RUN | {"backend": backend.name}
    moments = kill_moments(backend.name)
    outs = [tmp_path / f"{phase}-{when}" for phase, when in moments]
    # The children run while this process runs the uninterrupted reference (2 cores in CI).
    children = [start_killed_run(out, settings, *m) for out, m in zip(outs, moments, strict=True)]
    try:
        whole = run_small(tmp_path, "whole", **settings)
        died = [child.communicate(timeout=300) + (child.returncode,) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    for (phase, when), out, (stdout, stderr, code) in zip(moments, outs, died, strict=True):
        assert code == -signal.SIGKILL, stdout + stderr
        ckpt = out / "checkpoint.npz"
        if phase == "mid-save":  # the dead writer's partial file is there
            assert len(temp_files(out)) == 1, (when, temp_files(out))
        if ckpt.exists():
            resumed = sdze.solve(out=out, resume=ckpt, quiet=True, plots=False)
        else:  # killed before the first checkpoint: start again
            resumed = run_small(tmp_path, out.name, **settings)
        where = f"{backend.name}, killed {phase} {when}"
        assert resumed.run.config == whole.run.config, where
        for a, b in zip(whole.params, resumed.params, strict=True):
            for name in ("W", "b"):
                x, y = (np.asarray(sdze.backend_of(v).to_host(v)) for v in (a[name], b[name]))
                np.testing.assert_array_equal(x, y, err_msg=where)
        assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history], where
        assert resumed.rel_l2 == whole.rel_l2, where
        assert temp_files(out) == [], where  # a dead writer's partial file is cleaned up


def test_kill_moments_are_seeded_and_cover_every_phase():
    assert kill_moments("numpy") == kill_moments("numpy")
    assert [phase for phase, _ in kill_moments("torch")] == ["mid-step", "mid-save", "after-save"]


# -- a full disk during a checkpoint write ---------------------------------------------------


def fill_disk_midway(real, at: int = 3):
    """A ``_write_entry`` that writes half of its ``at``-th entry, then fails with ENOSPC."""
    calls = []

    def write(zf, name, array):
        calls.append(name)
        if len(calls) < at:
            return real(zf, name, array)
        with zf.open(name + ".npy", "w", force_zip64=True) as f:
            f.write(array.tobytes()[: array.nbytes // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, backend, monkeypatch):
    params, state = small_run(backend)
    path = save_checkpoint(tmp_path / "run.npz", params=params, state=state, config=CONFIG)
    before = path.read_bytes()
    new_params = [{k: v + 1.0 for k, v in p.items()} for p in params]
    monkeypatch.setattr(checkpoint, "_write_entry", fill_disk_midway(checkpoint._write_entry))
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, params=new_params, state=state, config=CONFIG)
    error = info.value
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC
    assert f"previous checkpoint at {path} is intact" in str(error)
    assert os.strerror(errno.ENOSPC) in str(error)
    assert path.read_bytes() == before and temp_files(tmp_path) == []
    loaded = load_checkpoint(path, backend)
    assert_tree_equal(host_tree(params), host_tree(loaded.params), "params")
    assert_tree_equal(host_tree(state), host_tree(loaded.state), "state")

    with pytest.raises(CheckpointWriteError, match="no file was created at"):
        save_checkpoint(tmp_path / "new.npz", params=new_params, config=CONFIG)
    assert not (tmp_path / "new.npz").exists() and temp_files(tmp_path) == []


def test_full_disk_during_a_run_keeps_the_last_checkpoint(tmp_path, backend, monkeypatch):
    real_save = solve_module.save_checkpoint
    saves = []

    def save(path, **kwargs):
        saves.append(kwargs["state"].step)
        if len(saves) == 2:
            monkeypatch.setattr(checkpoint, "_write_entry", fill_disk_midway(real_write))
        return real_save(path, **kwargs)

    real_write = checkpoint._write_entry
    monkeypatch.setattr(solve_module, "save_checkpoint", save)
    with pytest.raises(CheckpointWriteError, match="previous checkpoint at .* is intact"):
        run_small(tmp_path, steps=6, eval_every=2, plots=False, backend=backend.name)
    assert load_checkpoint(tmp_path / "run" / "checkpoint.npz").state.step == saves[0]
    assert temp_files(tmp_path / "run") == []
