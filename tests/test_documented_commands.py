"""Every command the docs tell a user to type runs, as typed, at tiny sizes.

Commands are read from the docs themselves, so a new or edited command is covered the moment it is
written: README.md's commands run in order in one sequence (later ones use what earlier ones wrote,
as a reader would), each experiment docstring's ``runlocal``/``quick`` command runs on its own, and
every other ``alignjax.main`` command in the docs must at least build its config with its overrides.

Tiny sizes: a README command without ``runlocal``/``quick`` gets that flag added to its config
argument; placeholders become real artifacts made here: ```/ckpt/<name>`` a Llama and tokenizer saved
by ``transformers``, ``hf:/data/<name>`` conversational pairs saved by ``datasets``, ``*.jsonl``
TRL-format pairs (RewardBench's format when the name says ``rewardbench``), workdirs and output
folders fresh directories.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from alignjax import configs
from alignjax import main as entry
from tests import hf_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = re.compile(r"(python -m alignjax\.[\w.]+|python launch/[\w.]+)")
SIZE_FLAGS = ("runlocal", "quick")
# Paths a command names that stand for something the user has, replaced by artifacts made here:
# an HF checkpoint, a `datasets` directory, a data file (a RewardBench-format one when its name says
# so), or a fresh output folder (workdir, export directory).
PLACEHOLDER = re.compile(
    r"(?P<checkpoint>/ckpt/[\w.-]+)"
    r"|(?<=hf:)(?P<dataset>/data/[\w.-]+)"
    r"|(?P<data>(?<![\w/])[\w./-]*\.jsonl)"
    r"|(?P<output>(?<![\w/])(?:workdirs|wd|/tmp|out)/[\w./-]+|(?<![\w/])(?:DIR|OUT)(?![\w]))"
)
REWARDBENCH_SUBSETS = ("alpacaeval-easy", "mt-bench-hard", "refusals-dangerous")


def commands_in(text: str, where: str) -> list[tuple[str, str]]:
    """``(file:line, command)`` for each ``python -m alignjax...`` / ``python launch/...`` command in
    ``text``, continuation lines joined, inline-code backticks and trailing comments removed."""
    lines = text.splitlines()
    found = []
    i = 0
    while i < len(lines):
        match = START.search(lines[i])
        if not match:
            i += 1
            continue
        start = i
        inline = match.start() > 0 and lines[i][match.start() - 1] == "`"
        command = lines[i][match.start() :]
        while command.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command.rstrip()[:-1] + " " + lines[i].strip()
        if inline:
            command = command.split("`", 1)[0]
        found.append((f"{where}:{start + 1}", " ".join(shlex.split(command, comments=True))))
        i += 1
    return found


# An inline mention like `python -m alignjax.export --workdir=DIR --out=OUT` is a synopsis: its
# concrete form is in a code block nearby.
SYNOPSIS = re.compile(r"=(?:DIR|OUT|N)\b|\[")


def readme_commands() -> list[tuple[str, str]]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return [(w, c) for w, c in commands_in(f.read(), "README.md") if not SYNOPSIS.search(c)]


def experiment_commands() -> list[tuple[str, str]]:
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        with open(path) as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        out += commands_in(doc, os.path.relpath(path, ROOT))
    return out


def other_doc_commands() -> list[tuple[str, str]]:
    out = []
    for path in ["WORKSPACE.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]:
        with open(os.path.join(ROOT, path)) as f:
            out += commands_in(f.read(), os.path.relpath(os.path.join(ROOT, path), ROOT))
    return out


def config_spec(argv: list[str]) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)


def is_tiny(command: str) -> bool:
    spec = config_spec(shlex.split(command)) or ""
    args = spec.partition(":")[2].split(",")
    return any(a.strip() in SIZE_FLAGS for a in args)


def with_size_flag(spec: str) -> str:
    """``file.py[:args]`` with the experiment's own small-size flag added."""
    path, _, arg = spec.partition(":")
    if any(f in arg.split(",") for f in SIZE_FLAGS):
        return spec
    module = configs.load_module(os.path.join(ROOT, path))
    for flag in SIZE_FLAGS:  # the one the file's get_config (or the recipe it calls) accepts
        sized = f"{arg},{flag}" if arg else flag
        try:
            module.get_config(sized)
        except ValueError:
            continue
        return f"{path}:{sized}"
    return spec


class Placeholders:
    """Maps the paths a command names onto real artifacts in ``root``, the same path to the same
    artifact across a sequence of commands."""

    def __init__(self, root: str):
        self.root = root
        self.made: dict[str, str] = {}

    def replace(self, match: re.Match) -> str:
        name, kind = match.group(0), match.lastgroup
        if name not in self.made:
            path = os.path.join(self.root, kind, name.strip("/").replace("/", "_"))
            if kind == "checkpoint":
                hf_fixtures.save_checkpoint(path, seed=len(self.made))
            elif kind == "dataset":
                hf_fixtures.save_pair_dataset(path, 160, conversational=True)
            elif kind == "data":
                hf_fixtures.write_pairs(path, subsets=REWARDBENCH_SUBSETS if "rewardbench" in name else ())
            self.made[name] = path
        return self.made[name]

    def argv(self, command: str) -> list[str]:
        argv = []
        for token in shlex.split(command):
            if token.startswith("--config="):
                token = "--config=" + with_size_flag(token.split("=", 1)[1])
            argv.append(PLACEHOLDER.sub(self.replace, token))
        return [sys.executable if a == "python" else a for a in argv]


def run_command(where: str, argv: list[str]) -> dict:
    """Runs ``argv`` from the repository root; fails with its output unless it exits 0. Returns the
    JSON summary ``alignjax.main`` prints last ({} for other commands)."""
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{where}: {shlex.join(argv)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if "alignjax.main" not in argv:
        return {}
    starts = [m.start() for m in re.finditer(r"^\{$", proc.stdout, re.M)]
    assert starts, f"{where}: no JSON summary on stdout\n{proc.stdout[-3000:]}"
    summary = json.loads(proc.stdout[starts[-1] :])
    assert summary, f"{where}: empty summary"
    return summary


def test_readme_commands_run_in_order(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 5, commands
    places = Placeholders(str(tmp_path))
    for where, command in commands:
        run_command(where, places.argv(command))


def test_make_demo_is_the_command_the_readme_names():
    with open(os.path.join(ROOT, "Makefile")) as f:
        recipe = re.search(r"^demo:.*\n\t(.+)$", f.read(), re.M).group(1)
    recipe = recipe.replace("$(PY)", "python").replace("$(WORKDIR)", "workdirs/demo")
    assert any(command == recipe for _, command in readme_commands()), recipe


def same_run(a: str, b: str) -> bool:
    """Equal commands but for the workdir (and the size flag a README command gets added)."""

    def key(command):
        argv = [t for t in shlex.split(command) if not t.startswith("--workdir=")]
        return [("--config=" + with_size_flag(t[9:])) if t.startswith("--config=") else t for t in argv]

    return key(a) == key(b)


# Config specs whose documented command a dedicated test already runs through ``alignjax.main.run`` (the
# job dispatch, validation and workdir lock the command line reaches), with checks of its outputs: run
# there once, not twice (each takes minutes on 2 cores).
RUN_BY_THEIR_OWN_TEST = {"experiments/repro_online.py:quick": "tests/repro/test_online_vs_offline.py"}

TINY_EXPERIMENT_COMMANDS = [
    (where, command)
    for where, command in experiment_commands()
    if is_tiny(command)
    and not any(same_run(command, r) for _, r in readme_commands())
    and config_spec(shlex.split(command)) not in RUN_BY_THEIR_OWN_TEST
]


def test_commands_left_to_their_own_tests_are_documented_and_run_there():
    documented = {config_spec(shlex.split(c)) for _, c in experiment_commands()}
    for spec, test_file in RUN_BY_THEIR_OWN_TEST.items():
        assert spec in documented, spec
        with open(os.path.join(ROOT, test_file)) as f:
            source = f.read()
        path, _, arg = spec.partition(":")
        assert os.path.basename(path) in source and f'":{arg}"' in source, (spec, test_file)
        assert "entry.run(" in source, test_file


@pytest.mark.parametrize(
    "where,command", TINY_EXPERIMENT_COMMANDS, ids=[w for w, _ in TINY_EXPERIMENT_COMMANDS]
)
def test_experiment_docstring_runlocal_command(where, command, tmp_path):
    run_command(where, Placeholders(str(tmp_path)).argv(command))


def test_every_experiment_documents_a_tiny_command():
    documented = {os.path.basename(w.split(":")[0]) for w, c in experiment_commands() if is_tiny(c)}
    experiments = {
        os.path.basename(p)
        for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
        if os.path.basename(p) != "__init__.py"
    }
    # gpm_cyclic.py is the reproduction of one paper table: every run of it is the full table.
    assert experiments - documented <= {"gpm_cyclic.py"}, experiments - documented


def test_every_other_documented_config_builds(tmp_path):
    """Full-size commands are not run here, but their config and overrides must be valid."""
    places = Placeholders(str(tmp_path))
    commands = [c for c in experiment_commands() + other_doc_commands() if "alignjax.main" in c[1]]
    assert commands
    for where, command in commands:
        argv = shlex.split(command)
        spec = config_spec(argv)
        if spec is None or "experiments/<" in spec:
            continue
        spec = PLACEHOLDER.sub(places.replace, spec)
        try:
            overrides = [a for a in argv if a.startswith("--config.")]
            entry.check_overrides(["prog", f"--config={spec}", *overrides])
            entry.load_config_file(spec)
        except (SystemExit, Exception) as err:  # noqa: BLE001 - reported with the command's place
            pytest.fail(f"{where}: {command}: {err}")
