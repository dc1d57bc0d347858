"""One error style in the CLI: a user's mistake is one line on stderr and exit status 2."""

import os
import subprocess
import sys

import numpy as np
import pytest

import sdze
from sdze.checkpoint import CheckpointError
from sdze.cli import main

SOLVE = ["solve", "allen-cahn-two-body", "--dim", "4", "--width", "8", "--depth", "2",
         "--steps", "2", "--test-points", "100", "--quiet", "--no-plots"]


def one_line_error(capsys, argv, command="solve") -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"sdze {command}: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a checkpoint\n")
    return path


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.npz"
    line = one_line_error(capsys, ["solve", "--resume", str(missing)])
    assert line.endswith(f"{missing}: No such file or directory")
    line = one_line_error(capsys, ["eval", str(missing)], "eval")
    assert line.endswith(f"{missing}: No such file or directory")


def test_text_file_is_not_an_sdze_checkpoint(text_file, capsys):
    for argv, command in ((["solve", "--resume", str(text_file)], "solve"),
                          (["eval", str(text_file)], "eval")):
        line = one_line_error(capsys, argv, command)
        assert f"{text_file} is not an sdze checkpoint" in line
        assert "pickle" not in line
    with pytest.raises(CheckpointError, match="not an sdze checkpoint") as raised:
        sdze.load_checkpoint(text_file)
    assert "pickle" not in str(raised.value)


def test_out_naming_an_existing_file(text_file, capsys):
    line = one_line_error(capsys, [*SOLVE, "--out", str(text_file)])
    assert line.endswith(f"out must be a folder; {text_file} is an existing file")
    assert text_file.read_text().startswith("these are my notes")


def test_eval_every_zero(tmp_path, capsys):
    line = one_line_error(capsys, [*SOLVE, "--eval-every", "0", "--out", str(tmp_path / "r")])
    assert line.endswith("--eval-every must be an int >= 1, got 0")


def test_device_that_is_not_here(tmp_path, capsys):
    line = one_line_error(capsys, [*SOLVE, "--backend", "numpy", "--device", "cuda",
                                   "--out", str(tmp_path / "r")])
    assert "runs on the CPU only" in line


def test_torch_cuda_without_a_gpu(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the run would start")
    line = one_line_error(capsys, [*SOLVE, "--backend", "torch", "--device", "cuda",
                                   "--out", str(tmp_path / "r")])
    assert "no CUDA device" in line


def test_backend_that_cannot_run_here(tmp_path, capsys):
    status = sdze.available_backends().get("cupy")
    if status == "ok":
        pytest.skip("cupy runs here: the run would start")
    line = one_line_error(capsys, [*SOLVE, "--backend", "cupy", "--out", str(tmp_path / "r")])
    assert "cupy" in line.lower()  # "CuPy is installed but finds no CUDA device"


def test_unknown_backend(tmp_path, capsys):
    line = one_line_error(capsys, [*SOLVE, "--backend", "nonesuch", "--out", str(tmp_path / "r")])
    assert "nonesuch" in line


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError):
        main(["--debug", "eval", missing])
    with pytest.raises(FileNotFoundError):
        main(["eval", missing, "--debug"])
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(CheckpointError, match="a single .npy array"):
        main(["solve", "--resume", str(npy), "--debug"])


def test_the_installed_command_prints_one_line(tmp_path):
    """The real entry point (python -m sdze), not main() in-process: no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-m", "sdze", "eval", str(tmp_path / "nope.npz")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
