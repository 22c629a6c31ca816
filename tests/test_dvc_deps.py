"""Each dvc.yaml stage depends on every file of code its jobs run, read from the import graph.

A stage's jobs are the Snakemake rules it allows (`--allowed-rules`); each rule's shell line runs
`visae <command>`; the command's handler module and everything it imports from visae (module-level
or inside functions, followed transitively) must lie under one of the stage's deps, together with
the rule files and what the workflow itself imports. A stage that forgets one would not rerun when
that code changes (its outputs are `persist`, so DVC would keep them).
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest
import yaml

from visae.cli import COMMANDS, build_parser

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
RULES = REPO / "workflow" / "rules"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """visae modules that the module `name` (at `path`) imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names if module_file(f"{base}.{alias.name}")}
    return {m for m in found if m.split(".")[0] == "visae" and module_file(m)}


def closure(roots: set[str]) -> set[Path]:
    """Files of the given modules, what they import, transitively, and their parent packages."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += imported_modules(module_file(name), name)
    return {module_file(name) for name in seen}


def rule_blocks() -> dict[str, tuple[Path, str]]:
    blocks = {}
    for path in sorted(RULES.glob("*.smk")):
        for block in re.split(r"\n(?=rule )", path.read_text()):
            if m := re.match(r"rule (\w+):", block):
                blocks[m.group(1)] = (path, block)
    return blocks


def command_modules() -> dict[str, set[str]]:
    """`visae <command>` -> the modules of its handlers (sub-commands included). Each command's own
    parser is built: without a command, the CLI has only help stubs, which have no handlers."""
    out = {}
    for name in COMMANDS:
        sub = next(a for a in build_parser(name)._actions if a.dest == "command")
        parsers, modules = [sub.choices[name]], set()
        while parsers:
            p = parsers.pop()
            if p.get_default("func") is not None:
                modules.add(p.get_default("func").__module__)
            parsers += [c for a in p._actions if a.choices and isinstance(a.choices, dict) for c in a.choices.values()]
        out[name] = modules
    return out


def workflow_imports() -> set[str]:
    text = (REPO / "workflow" / "Snakefile").read_text() + (RULES / "common.smk").read_text()
    return set(re.findall(r"^from (visae[\w.]*) import", text, re.M))


def stage_needs(stage: dict) -> set[Path]:
    args = shlex.split(stage["cmd"])
    allowed = args[args.index("--allowed-rules") + 1: args.index("--")]
    blocks, commands = rule_blocks(), command_modules()
    # the workflow's own files: every stage's plan (and the defaults the schema fills into its
    # commands) comes from them
    files = {RULES / "common.smk", REPO / "Snakefile", REPO / "workflow" / "Snakefile",
             REPO / "workflow" / "schemas" / "config.schema.yaml", SRC / "visae" / "cli.py"}
    modules = set(workflow_imports())
    for rule in allowed:
        path, block = blocks[rule]
        files.add(path)
        for command in re.findall(r"\bvisae ([a-z][\w-]*)", block.split("shell:", 1)[-1] if "shell:" in block else ""):
            modules |= commands[command]
    return files | closure(modules)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(name):
    deps = [REPO / d for d in STAGES[name].get("deps", [])]
    missing = sorted(str(f.relative_to(REPO)) for f in stage_needs(STAGES[name])
                     if not any(f == d or d in f.parents for d in deps))
    assert not missing, f"dvc.yaml stage {name!r} lacks deps: {', '.join(missing)}"


def test_every_command_has_its_handler_modules():
    """The handlers come from the command modules, not the help stubs (which would check nothing)."""
    modules = command_modules()
    assert set(modules) == set(COMMANDS)
    for name, (module, _) in COMMANDS.items():
        assert modules[name] == {module}, name


def test_the_graph_is_followed():
    """Lazy imports inside functions count, and so do parent packages."""
    needs = {str(f.relative_to(SRC)) for f in closure({"visae.analysis.evaluate"})}
    assert {"visae/analysis/evaluate.py", "visae/analysis/on_store.py", "visae/analysis/__init__.py",
            "visae/__init__.py", "visae/sae/__init__.py", "visae/sae/checkpoint.py",
            "visae/store/__init__.py", "visae/layout.py"} <= needs
    assert "visae/report/collect.py" not in needs
