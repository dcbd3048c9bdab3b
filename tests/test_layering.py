"""The library's layers, read from its source with ``ast`` (nothing is imported):

* the lower layers (losses, data, models, sharding, logprobs, storage, flops, host_memory, configs)
  never import a higher one (train, search, reward, eval, online, jobs, repro, main, export), at
  module level or inside a function;
* ``jobs`` is the top layer: only the entry point (``main``), the reproductions (``repro``) and the
  jobs themselves import ``alignjax.jobs``; the library packages below it (the lower layers and
  train, search, reward, eval, online, export) never do;
* nothing in ``alignjax/`` imports ``experiments`` (by an import statement or by
  ``importlib.import_module`` of a literal name) or reads a file under ``experiments/`` (a string
  outside docstrings that names the directory as a path: the reproductions build their configs from
  :mod:`alignjax.recipes`, which the experiment files call too);
* the modules experiment files import at config time (:mod:`alignjax.configs`, :mod:`alignjax.recipes`,
  :mod:`alignjax.repro.params`) load without JAX;
* ``alignjax`` modules are imported at module level: an import inside a function is allowed only where
  :data:`ALLOWED_IN_FUNCTION` names it with its reason (optional heavy dependencies such as torch or
  transformers are not ``alignjax`` modules, so they may stay inside the functions that need them).
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOWER = ("losses", "data", "models", "sharding", "logprobs", "storage", "flops", "host_memory", "configs")
HIGHER = ("train", "search", "reward", "eval", "online", "jobs", "repro", "main", "export", "recipes")
# The layers that may import alignjax.jobs (the top layer).
ABOVE_JOBS = ("main", "repro", "jobs")

# (file, function or "*") -> why its alignjax imports stay inside it.
ALLOWED_IN_FUNCTION = {
    ("alignjax/main.py", "*"): "flag and usage errors (--help, a bad key) answer before etils and JAX load",
    ("alignjax/configs.py", "fill_loss_hyperparameters"): "config files that name no loss load without JAX",
    ("alignjax/recipes.py", "ppo"): "config files load without JAX; PPO's loss keys come from its module",
    ("alignjax/export.py", "main"): (
        "python -m alignjax.main runs that module as __main__: importing it at module level would "
        "define its flags a second time"
    ),
}


class Import(NamedTuple):
    file: str  # relative to the repository root
    line: int
    module: str  # the imported module, absolute and dotted
    function: str  # the enclosing function's qualified name, "" at module level


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(node: ast.ImportFrom, path: pathlib.Path, root: pathlib.Path) -> str:
    """The absolute module of ``from X import ...`` (relative imports resolved against ``path``)."""
    if not node.level:
        return node.module or ""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def literal_prefix(node: ast.expr) -> str | None:
    """The text a string literal or f-string starts with (None for anything else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def imports(path: pathlib.Path, root: pathlib.Path = ROOT) -> Iterator[Import]:
    """Every import in ``path``: statements (``from alignjax import x`` names ``alignjax.x``) and
    ``import_module`` calls on a literal name."""
    file = str(path.relative_to(root))

    def visit(node: ast.AST, function: str) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                name = getattr(child, "name", "<lambda>")
                inner = f"{function}.{name}" if function else name
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(file, child.lineno, alias.name, function)
            elif isinstance(child, ast.ImportFrom):
                module = resolve(child, path, root)
                if module in ("alignjax", "experiments"):
                    for alias in child.names:
                        yield Import(file, child.lineno, f"{module}.{alias.name}", function)
                else:
                    yield Import(file, child.lineno, module, function)
            elif isinstance(child, ast.Call) and child.args:
                callee = child.func
                name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", "")
                prefix = literal_prefix(child.args[0])
                if name == "import_module" and prefix is not None:
                    yield Import(file, child.lineno, prefix, function)
            yield from visit(child, inner)

    yield from visit(ast.parse(path.read_text(), filename=file), "")


def library_imports() -> list[Import]:
    return [i for path in sorted((ROOT / "alignjax").rglob("*.py")) for i in imports(path)]


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if parts[0] == "alignjax" and len(parts) > 1 else ""


def allowed_in_function(i: Import) -> bool:
    return any(
        file == i.file and (function == "*" or i.function.split(".")[0] == function)
        for file, function in ALLOWED_IN_FUNCTION
    )


def test_the_reader_sees_imports_the_way_python_resolves_them(tmp_path):
    """The parser on a file of known imports: relative, aliased, in functions and lambdas, by name."""
    package = tmp_path / "alignjax" / "data"
    package.mkdir(parents=True)
    source = (
        "from . import schema\n"
        "from ..train import loop as l\n"
        "import alignjax.eval.ranking\n"
        "import importlib\n"
        "def f():\n"
        "    from alignjax import search\n"
        "    g = lambda: importlib.import_module(f'experiments.{x}')\n"
    )
    file = package / "probe.py"
    file.write_text(source)
    found = [(i.module, i.function) for i in imports(file, tmp_path)]
    assert found == [
        ("alignjax.data", ""),
        ("alignjax.train", ""),
        ("alignjax.eval.ranking", ""),
        ("importlib", ""),
        ("alignjax.search", "f"),
        ("experiments.", "f.<lambda>"),
    ]


def test_lower_layers_never_import_higher_ones():
    found = library_imports()
    assert any(layer(i.module) == "train" for i in found)  # the reader sees the library's imports
    upward = [
        f"{i.file}:{i.line} imports {i.module}"
        for i in found
        if layer(module_name(ROOT / i.file)) in LOWER and layer(i.module) in HIGHER
    ]
    assert not upward, "a lower layer imports a higher one:\n" + "\n".join(upward)


def test_only_the_entry_point_and_the_reproductions_import_jobs():
    found = library_imports()
    assert any(layer(i.module) == "jobs" for i in found)  # the reader sees main's import of the table
    below = [
        f"{i.file}:{i.line} imports {i.module}"
        for i in found
        if layer(i.module) == "jobs" and layer(module_name(ROOT / i.file)) not in ABOVE_JOBS
    ]
    assert not below, (
        "alignjax.jobs is the top layer (a job strings library pieces together): move the piece this "
        "needs down into the library package that owns it:\n" + "\n".join(below)
    )


def test_the_library_never_imports_experiments():
    found = [
        f"{i.file}:{i.line} imports {i.module}"
        for i in library_imports()
        if i.module.split(".")[0] == "experiments"
    ]
    assert not found, "load an experiment file by path (alignjax.configs.load_config_file):\n" + "\n".join(
        found
    )


def test_alignjax_modules_are_imported_at_module_level():
    found = library_imports()
    inside = [i for i in found if i.function and i.module.split(".")[0] == "alignjax"]
    assert inside  # the allowlist's own entries are seen
    unlisted = [
        f"{i.file}:{i.line} {i.function}() imports {i.module}" for i in inside if not allowed_in_function(i)
    ]
    assert not unlisted, (
        "import these at module level (a cycle: move the shared piece to the lower module that owns "
        "it), or list them in ALLOWED_IN_FUNCTION with the reason:\n" + "\n".join(unlisted)
    )
    stale = [
        (file, function)
        for file, function in ALLOWED_IN_FUNCTION
        if not any(
            i.file == file and (function == "*" or i.function.split(".")[0] == function) for i in inside
        )
    ]
    assert not stale, f"ALLOWED_IN_FUNCTION entries with no function-level import left: {stale}"


# Calls that open, load or join a path: a literal "experiments/..." argument (or "experiments" as a
# path component anywhere) is the library reading a file under experiments/.
PATH_CALLS = (
    "open",
    "join",
    "Path",
    "load_config_file",
    "load_module",
    "sibling",
    "spec_from_file_location",
    "isfile",
    "exists",
    "read_text",
)


def docstrings(tree: ast.AST) -> set[int]:
    """``id`` of every docstring node (module, class, function) in ``tree``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def experiments_paths(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """``file:line`` of each place ``path`` names ``experiments/`` as a path: the string
    ``"experiments"`` (a path component), or a literal starting ``experiments/`` passed to a call
    in :data:`PATH_CALLS`. Docstrings, comments and messages that mention the directory do not count."""
    file = str(path.relative_to(root))
    tree = ast.parse(path.read_text(), filename=file)
    skip = docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and id(node) not in skip and node.value == "experiments":
            found.append(f"{file}:{node.lineno}")
        elif isinstance(node, ast.Call):
            callee = node.func
            name = callee.attr if isinstance(callee, ast.Attribute) else getattr(callee, "id", "")
            if name in PATH_CALLS and any(
                (literal_prefix(arg) or "").startswith(("experiments/", "./experiments/"))
                for arg in node.args
            ):
                found.append(f"{file}:{node.lineno}")
    return sorted(found, key=lambda f: int(f.rsplit(":", 1)[1]))


def test_the_path_reader_sees_experiments_paths(tmp_path):
    """The reader on a file of known uses: a join, an opened literal, an f-string; not a docstring or
    a message."""
    file = tmp_path / "alignjax" / "probe.py"
    file.parent.mkdir()
    file.write_text(
        '"""Loads experiments/quickstart.py."""\n'
        "import os\n"
        "a = os.path.join(root, 'experiments', 'x.py')\n"
        "b = open('experiments/x.py')\n"
        "c = load_config_file(f'experiments/{name}.py')\n"
        "raise ValueError('experiments/reward_model.py: objective=x')\n"
    )
    assert experiments_paths(file, tmp_path) == [
        "alignjax/probe.py:3",
        "alignjax/probe.py:4",
        "alignjax/probe.py:5",
    ]


def test_the_library_never_reads_files_under_experiments():
    found = [f for path in sorted((ROOT / "alignjax").rglob("*.py")) for f in experiments_paths(path)]
    assert not found, (
        "the library reads no experiment file: build the config from alignjax.recipes (which the "
        "experiment file calls too):\n" + "\n".join(found)
    )


def test_the_modules_config_files_import_load_without_jax():
    code = (
        "import sys\n"
        "import alignjax.configs, alignjax.recipes, alignjax.repro.params\n"
        "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'flax', 'optax'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
