"""The command line: ``sdze list`` and ``sdze version``."""

import pytest

import sdze
from sdze.cli import main


def test_list_shows_every_backend_and_why_one_cannot_run(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name, status in sdze.available_backends().items():
        assert name in out
        if status != "ok":
            assert status in out
    assert "current default" in out


def test_version(capsys):
    assert main(["version"]) == 0
    assert sdze.__version__ in capsys.readouterr().out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as excinfo:
        main(["frobnicate"])
    assert excinfo.value.code == 2
