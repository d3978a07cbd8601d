"""The package's import structure: layers from the bottom up, no upward import, no cycle.

Layers (a module may import from its own layer or below; the README's Layout section lists
them)::

    0  dsv3.errors, dsv3.fileio, dsv3.hardware, dsv3.collectives
    1  dsv3.config, dsv3.config_schedules, dsv3.tokenizer, dsv3.hf_tokenizer, dsv3.tokenizer_files
    2  dsv3.model.*, dsv3.chat_format, dsv3.chat_template
    3  dsv3.checkpoint.*
    4  data_pipeline.*
    5  dsv3.parallel.*
    6  dsv3.training.*
    7  dsv3.plan, dsv3.bench, dsv3.generation, dsv3.chat, dsv3.evaluation
    8  dsv3.cli, dsv3.__main__, dsv3 (the package's face)

Every import counts, also one inside a function. Also: ``dsv3.model`` and ``dsv3.checkpoint``
never import DeepSpeed, and no module takes a private name (``_x``) from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dsv3", "data_pipeline")

LAYERS: list[tuple[str, int]] = [  # (module or package prefix, layer); the longest match wins
    ("dsv3.errors", 0),
    ("dsv3.fileio", 0),
    ("dsv3.hardware", 0),
    ("dsv3.collectives", 0),
    ("dsv3.config", 1),
    ("dsv3.config_schedules", 1),
    ("dsv3.tokenizer", 1),
    ("dsv3.hf_tokenizer", 1),
    ("dsv3.tokenizer_files", 1),
    ("dsv3.model", 2),
    ("dsv3.chat_format", 2),
    ("dsv3.chat_template", 2),
    ("dsv3.checkpoint", 3),
    ("data_pipeline", 4),
    ("dsv3.parallel", 5),
    ("dsv3.training", 6),
    ("dsv3.plan", 7),
    ("dsv3.bench", 7),
    ("dsv3.generation", 7),
    ("dsv3.chat", 7),
    ("dsv3.evaluation", 7),
    ("dsv3.cli", 8),
    ("dsv3.__main__", 8),
    ("dsv3", 8),
]
NO_DEEPSPEED = ("dsv3.model", "dsv3.checkpoint")


def layer_of(module: str) -> int:
    """The layer of a module of this project (KeyError for one that no entry covers)."""
    best = None
    for prefix, layer in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    if best is None:
        raise KeyError(module)
    return best[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[str, list[str], int]]:
    """Every import in ``path``: ``[(imported module, names taken from it, line), ...]``,
    relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file of every module of the project's packages under ``root``."""
    found = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            found[module_name(f, root)] = f
    return found


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """(module -> project modules it imports, problems: upward imports, DeepSpeed in the
    model or the checkpoint formats, private names taken from another module)."""
    modules = project_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    problems = []
    for mod, path in modules.items():
        for target, names, line in imports_of(path, root):
            where = f"{path.relative_to(root)}:{line}"
            if target.split(".")[0] == "deepspeed" and mod.startswith(NO_DEEPSPEED):
                problems.append(
                    f"{where}: {mod} imports {target}; the model and the checkpoint formats never import DeepSpeed"
                )
            # `from pkg import sub` names a module: the edge goes to the submodule
            candidates = [f"{target}.{n}" if f"{target}.{n}" in modules else target for n in names] or [target]
            for dep in candidates:
                if dep not in modules:
                    continue
                if dep != mod:
                    graph[mod].add(dep)
                if layer_of(dep) > layer_of(mod):
                    problems.append(
                        f"{where}: {mod} (layer {layer_of(mod)}) imports {dep} (layer {layer_of(dep)}), a higher layer"
                    )
            private = [
                n for n in names if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in modules
            ]
            if private and target in modules and target != mod:
                problems.append(f"{where}: {mod} takes the private name(s) {', '.join(private)} from {target}")
    return graph, problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_every_module_has_a_layer():
    missing = [m for m in project_modules(ROOT) if not any(m == p or m.startswith(p + ".") for p, _ in LAYERS)]
    assert not missing, f"modules without a layer (add them to LAYERS and to the README's Layout): {missing}"


def test_imports_go_down_the_layers_and_take_no_private_names():
    _, problems = import_graph(ROOT)
    assert not problems, "\n".join(problems)


def test_no_import_cycle():
    graph, _ = import_graph(ROOT)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text, encoding="utf-8")


@pytest.fixture()
def small_tree(tmp_path):
    """A copy of the project's shape with a few modules that follow the rules."""
    _write(
        tmp_path,
        {
            "dsv3/__init__.py": "",
            "dsv3/errors.py": "class DsvError(Exception):\n    pass\n",
            "dsv3/config.py": "from dsv3.errors import DsvError\n",
            "dsv3/model/__init__.py": "from dsv3.model.norm import RMSNorm\n",
            "dsv3/model/norm.py": "from dsv3.config import DsvError\nRMSNorm = 1\n",
            "dsv3/checkpoint/__init__.py": "",
            "dsv3/checkpoint/files.py": "from dsv3.model import RMSNorm\n",
            "dsv3/training/__init__.py": "",
            "dsv3/training/trainer.py": "from dsv3.checkpoint import files\nfrom . import helpers\n",
            "dsv3/training/helpers.py": "def _private():\n    pass\n",
            "data_pipeline/__init__.py": "",
        },
    )
    return tmp_path


def test_checker_passes_a_clean_tree_and_names_each_broken_rule(small_tree):
    graph, problems = import_graph(small_tree)
    assert problems == [] and find_cycle(graph) is None
    assert graph["dsv3.training.trainer"] == {"dsv3.checkpoint.files", "dsv3.training.helpers"}  # relative import
    # an upward import inside a function, DeepSpeed in the model, a private name across modules
    _write(
        small_tree,
        {
            "dsv3/model/norm.py": "import deepspeed\nRMSNorm = 1\n\ndef f():\n    from dsv3.training import trainer\n",
            "dsv3/checkpoint/files.py": "from dsv3.training.helpers import _private\n",
        },
    )
    _, problems = import_graph(small_tree)
    assert any("dsv3/model/norm.py:1: dsv3.model.norm imports deepspeed" in p for p in problems)
    assert any(
        "dsv3/model/norm.py:5: dsv3.model.norm (layer 2) imports dsv3.training.trainer (layer 6)" in p for p in problems
    )
    assert any("takes the private name(s) _private from dsv3.training.helpers" in p for p in problems)


def test_checker_finds_a_cycle_within_a_layer(small_tree):
    _write(small_tree, {"dsv3/training/helpers.py": "from dsv3.training import trainer\n"})
    graph, problems = import_graph(small_tree)
    assert problems == []
    assert find_cycle(graph) == ["dsv3.training.helpers", "dsv3.training.trainer", "dsv3.training.helpers"]
