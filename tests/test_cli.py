"""The entry point: a light `--help`, one table of commands, user errors vs bugs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from visae import cli


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


def _parsers(parser, path=()):
    """(command path, parser) for every parser below `parser`, sub-sub-commands included."""
    for action in parser._actions:
        if isinstance(action.choices, dict):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _parsers(child, (*path, name))


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_handlers_are_named_after_their_command(name):
    """Every handler is `cmd_<command>[_<subcommand>]`, and the module registers no help of its own
    for the command: the table's line is the one `visae --help` shows."""
    parser = cli.build_parser(name)
    handlers = {path: p.get_default("func") for path, p in _parsers(parser) if path[0] == name
                and p.get_default("func") is not None}
    assert handlers, f"{name}: no handler"
    for path, func in handlers.items():
        assert func.__name__ == "cmd_" + "_".join(path).replace("-", "_"), (path, func)
        assert func.__module__ == cli.COMMANDS[name][0]
    sub = parser._subparsers._group_actions[0]
    assert name not in {a.dest for a in sub._choices_actions}, f"{name}: its module passes help= too"


def _corrupt_partial_checkpoint(tmp_path):
    from visae.tools.synth import synth_store

    synth_store(tmp_path / "store", d=8, atoms=8, k=2, images=4, tokens_per_image=4)
    (tmp_path / "sae" / "checkpoint").mkdir(parents=True)
    (tmp_path / "sae" / "checkpoint" / "config.json").write_text("{trunc")
    return ["evaluate", "--store", str(tmp_path / "store"), "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "e")]


@pytest.mark.parametrize("argv, message", [
    (lambda t: ["datasets", "show", "fashion-mnist", "--option", "x=["], "--option 'x=[': the value is not valid YAML"),
    (lambda t: ["extract", "--config", str(t / "bad.yaml"), "--model", "m", "--dataset", "d", "--layers", "1",
                "--out", str(t / "o")], "bad.yaml is not valid YAML"),
    (lambda t: ["extract", "--config", str(t / "list.yaml"), "--model", "m", "--dataset", "d", "--layers", "1",
                "--out", str(t / "o")], "list.yaml: models: must map names to entries"),
    (_corrupt_partial_checkpoint, "SAE 'sae' did not finish (interrupted)"),
], ids=["option-yaml", "config-yaml", "config-section", "partial-checkpoint"])
def test_corrupt_user_input_is_one_line(argv, message, tmp_path, capsys):
    """Broken files and values the user gave are their mistakes, not tracebacks."""
    (tmp_path / "bad.yaml").write_text("models: [\n")
    (tmp_path / "list.yaml").write_text("models: [1, 2]\n")
    assert cli.main(argv(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae: error: ") and message in err[0], err
