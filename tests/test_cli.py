"""The entry point: a light `--help`, one table of commands, user errors vs bugs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from visae import cli
from visae.errors import VisaeError


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from visae.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")
    for name, (_, help_line) in cli.COMMANDS.items():
        assert f"    {name}" in out
        assert help_line.split()[0] in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_is_registered_by_its_module(name):
    """The table and the modules agree: building the parser for a command gives that command's
    real sub-parser (with options and a handler), not the help-only stub."""
    parser = cli.build_parser(name)
    sub = parser._subparsers._group_actions[0]
    assert set(sub.choices) == set(cli.COMMANDS)
    real = sub.choices[name]
    assert "-h" in real._option_string_actions, f"{name}: still the stub"


def test_user_error_is_one_line(capsys):
    assert cli.main(["datasets", "show", "imagefolder:/nonexistent"]) == 1
    assert capsys.readouterr().err == "visae: error: dataset root not found: /nonexistent is not a folder\n"


def test_missing_file_is_a_user_error(capsys, monkeypatch):
    def missing(args):
        raise FileNotFoundError(2, "No such file or directory", "/nowhere/meta.json")

    monkeypatch.setattr("visae.store.cli.verify_store", lambda root: missing(None))
    assert cli.main(["verify", "/nowhere"]) == 1
    assert capsys.readouterr().err == "visae: error: [Errno 2] No such file or directory: '/nowhere/meta.json'\n"


def test_a_bug_shows_its_traceback_and_says_so(capsys, monkeypatch):
    def buggy(root):
        return {}["no such key"]

    monkeypatch.setattr("visae.store.cli.verify_store", buggy)
    assert cli.main(["verify", "/x"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError" in err
    assert err.rstrip().splitlines()[-1].startswith("visae: internal error (KeyError): this is a bug in visae")


def test_debug_reraises(monkeypatch):
    monkeypatch.setattr("visae.store.cli.verify_store", lambda root: {}["k"])
    with pytest.raises(KeyError):
        cli.main(["--debug", "verify", "/x"])


def test_unknown_command_is_refused(capsys):
    assert cli.main(["no-such-command"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'no-such-command'" in err
