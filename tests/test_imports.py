"""The project's modules import one another without a cycle, the command line keeps every command, and the commands
that only read the store load no model code.

The import graph is read from the source (every `import` and `from ... import`, inside functions too, since a
lazy import is still a dependency). `from a.b import c` counts as importing the module `a.b.c` when there is one,
else `a.b`; the implicit import of a module's parent package (Python runs `a/__init__.py` before `a.b`) is not an
edge, or every package that imports its own modules would be a cycle.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import vheads
from vheads.cli import app
from vheads.cli.common import INTERRUPTED, USER_ERRORS
from vheads.store import Store

COMMANDS = ("run", "runs", "heads", "query", "export", "merge", "train-demo", "version", "ablate", "compare", "report",
            "demo", "sweep", "data", "predict")
DATA_COMMANDS = ("shapes", "list")
TERMINAL_PACKAGES = {"typer", "rich", "click"}
# The layers of the package, lowest first (DESIGN.md): a module imports only modules of its own layer or below.
LAYERS = (
    ("vheads.metrics", "vheads.figures", "vheads.heads", "vheads.compat"),
    ("vheads.models", "vheads.data", "vheads.store"),
    ("vheads.capture",),
    ("vheads.pipeline",),
    ("vheads.analysis", "vheads.sweep", "vheads.report"),
    ("vheads.demo",),
    ("vheads.cli", "vheads.__main__"),
)


def layer_of(module: str) -> int | None:
    """The index in `LAYERS` of the package or module that holds `module` (None: the package root itself)."""
    for index, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    return None


def project_modules() -> dict[str, Path]:
    """Every module of `vheads`, by dotted name, with its source file."""
    names = ["vheads"] + [info.name for info in pkgutil.walk_packages(vheads.__path__, "vheads.")]
    return {name: Path(importlib.util.find_spec(name).origin) for name in names}


def imported_modules(module: str, source: Path, modules: set[str]) -> set[str]:
    """The project modules that `module`'s source imports, at any depth (relative imports resolved)."""
    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    found = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found.update(known(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if source.name == "__init__.py" else module.rpartition(".")[0]
                package = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{package}.{base}" if base else package
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else known(base)
                         for alias in node.names)
    return found - {"", module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules()
    return {name: imported_modules(name, source, set(modules)) for name, source in modules.items()}


def top_level_imports(source: Path) -> set[str]:
    """The top-level names of the packages a source file imports (absolute imports only)."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_modules_of_vheads_import_one_another_without_a_cycle():
    graph = import_graph()
    assert {"vheads.cli", "vheads.cli.common", "vheads.store.write", "vheads.pipeline"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_only_its_own_layer_or_lower_ones():
    graph = import_graph()
    assert [name for name in graph if name != "vheads" and layer_of(name) is None] == []
    upward = sorted(f"{name} -> {target}" for name, targets in graph.items() for target in targets
                    if name != "vheads" and target != "vheads" and layer_of(target) > layer_of(name))
    assert upward == [], "imports that point up the layers:\n" + "\n".join(upward)


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("vheads.store.merge") < layer_of("vheads.pipeline.config")
    assert layer_of("vheads.models.layers") < layer_of("vheads.capture.session")
    assert layer_of("vheads.demo.study") < layer_of("vheads.cli.run")


def test_the_cycle_check_sees_a_cycle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_of_the_command_line_imports_the_package_that_builds_the_app():
    graph = import_graph()
    command_line = [name for name in graph if name.startswith("vheads.cli.")]
    assert len(command_line) >= 8
    assert [name for name in command_line if "vheads.cli" in graph[name]] == []


def test_only_the_command_line_uses_the_terminal_libraries():
    modules = project_modules()
    users = sorted(name for name, source in modules.items() if not name.startswith("vheads.cli")
                   and TERMINAL_PACKAGES & set(top_level_imports(source)))
    assert users == []


def test_the_vheads_script_is_the_command_line_app():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    module, _, attribute = re.search(r'^vheads = "(.+)"$', pyproject, re.M).group(1).partition(":")
    assert getattr(importlib.import_module(module), attribute) is app


def test_every_command_is_still_listed():
    group = typer.main.get_command(app)
    with group.make_context("vheads", ["--help"], resilient_parsing=True) as ctx:
        listed = group.list_commands(ctx)
        data = group.get_command(ctx, "data")
        with data.make_context("data", [], resilient_parsing=True) as data_ctx:
            data_listed = data.list_commands(data_ctx)
    assert [name for name in listed if name in COMMANDS] == list(COMMANDS)
    assert set(DATA_COMMANDS) <= set(data_listed)


@pytest.mark.parametrize("command", [[name] for name in COMMANDS] + [["data", name] for name in DATA_COMMANDS])
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_the_errors_the_command_line_catches_are_where_it_looks_for_them():
    for module, name in (*USER_ERRORS, INTERRUPTED):
        assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)


READ_COMMAND = """
import json, sys
from vheads.cli import app

try:
    app(sys.argv[1:], prog_name="vheads")
except SystemExit as done:
    code = done.code
print(json.dumps({"code": code, "loaded": [m for m in ("torch", "transformers") if m in sys.modules]}))
"""


def test_the_run_settings_load_no_model_code():
    """`merge` compares runs' settings and a study file's paths are resolved with `pipeline.config`: importing it
    (and comparing two runs' settings) leaves torch and transformers unloaded."""
    code = ("import json, sys\nfrom vheads.pipeline.config import RunConfig, differences\n"
            "differences(RunConfig(limit=2).settings(), RunConfig(limit=3).settings())\n"
            "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stdout + done.stderr


@pytest.mark.parametrize("command,code", [(["query", "select 1"], 0), (["runs"], 0), (["heads"], 0),
                                          (["heads", "--run", "nope"], 2)])
def test_commands_that_only_read_the_store_load_no_model_code(tmp_path, command, code):
    """`query`, `runs` and `heads` (and their one-line errors) answer without importing torch or transformers, which
    take seconds to load: only commands that run a model import them."""
    path = tmp_path / "vheads.duckdb"
    with Store(path) as store:
        run = store.start_run("r", model="tiny", family="llava", dataset="shapes", split="test", layers=2, heads=2,
                              readout="prompt", ablation="none", config={})
        figures = np.full((1, 2, 2), 0.25, dtype=np.float32)
        store.add_batch(run, [{"sample_id": "s0", "correct": True}], figures, figures, None, None, None)
        store.finish_run(run)
    done = subprocess.run([sys.executable, "-c", READ_COMMAND, *command, "--store", str(path)],
                          capture_output=True, text=True, timeout=120)
    verdict = json.loads(done.stdout.strip().splitlines()[-1])
    assert verdict == {"code": code, "loaded": []}, done.stdout + done.stderr
