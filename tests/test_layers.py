"""Modules import downward only: no cycles, no import of a higher layer (docs/architecture.md).

Every ``import`` / ``from ... import`` in every statemap module counts, at module level or inside
a function (a function-level import is a lazy import, still a dependency). Imports under
``if TYPE_CHECKING:`` are for type checkers only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

# bottom to top; a module may import its own layer or a lower one (and never in a cycle)
LAYERS: list[tuple[str, list[str]]] = [
    ("foundation", ["statemap", "statemap.errors", "statemap.textsafe", "statemap.process", "statemap.gcpause"]),
    (
        "values",
        [
            "statemap.dtypes",
            "statemap.fsutil",
            "statemap.keymatch",
            "statemap.axes",
            "statemap.progress",
            "statemap.buffers",
            "statemap.xpose",
            "statemap.kernel_copy",
        ],
    ),
    ("keys and tensors", ["statemap.template", "statemap.meta", "statemap.torch_adapter"]),
    ("rules", ["statemap.guards", "statemap.rules", "statemap.inputs", "statemap.vardefs"]),
    ("reading", ["statemap.load.*", "statemap.report"]),
    ("ops", ["statemap.ops.fields", "statemap.ops.keymap", "statemap.ops.base"]),
    (
        "op modules",
        [
            "statemap.ops.rename",
            "statemap.ops.drop",
            "statemap.ops.copy",
            "statemap.ops.inject",
            "statemap.ops.split_merge",
            "statemap.ops.transforms",
            "statemap.ops.rearrange",
        ],
    ),
    ("op registry", ["statemap.ops.parse", "statemap.ops"]),
    ("derived specs", ["statemap.invert"]),
    ("specs", ["statemap.catalog", "statemap.spec", "statemap.schema", "statemap.diagnose"]),
    ("planning", ["statemap.source", "statemap.plan", "statemap.lint", "statemap.apply", "statemap.torch_apply"]),
    (
        "checking and writing",
        ["statemap.verify", "statemap.stream_formats", "statemap.write", "statemap.correspond", "statemap.inspect"],
    ),
    ("api", ["statemap.api", "statemap.diff", "statemap.iterate"]),
    ("tools", ["statemap.suggest", "statemap.suggest_values"]),
    ("cli", ["statemap.cli", "statemap.__main__"]),
]

ROOT = Path(__file__).resolve().parent.parent / "statemap"


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skip.update(id(n) for n in ast.walk(inner))
    return skip


def imports() -> dict[str, set[str]]:
    """Module -> the statemap modules it imports (resolved; ``from . import x`` names submodules)."""
    mods = {_module(p): p for p in sorted(ROOT.rglob("*.py"))}
    out: dict[str, set[str]] = {}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_only(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.split(".")[0] == "statemap")
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "statemap":
                    continue
                names = [f"{target}.{a.name}" for a in node.names]
                found = [n for n in names if n in mods]
                deps.update(found or [target])  # `from . import sub` names a module; else the module itself
        out[mod] = {d if d in mods else d.rpartition(".")[0] if d.rpartition(".")[0] in mods else d for d in deps} - {mod}
    return out


def layer_of(mod: str) -> int:
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            if mod == m or (m.endswith(".*") and (mod == m[:-2] or mod.startswith(m[:-1]))):
                return i
    raise KeyError(mod)


GRAPH = imports()


def test_every_module_has_a_layer():
    missing = sorted(
        m for m in GRAPH if not any(m == x or (x.endswith(".*") and m.startswith(x[:-2])) for _, ms in LAYERS for x in ms)
    )
    assert not missing, f"add these modules to LAYERS in tests/test_layers.py and docs/architecture.md: {missing}"


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_go_down(mod):
    up = sorted(d for d in GRAPH[mod] if layer_of(d) > layer_of(mod))
    assert not up, f"{mod} (layer {LAYERS[layer_of(mod)][0]!r}) imports higher layers: " + ", ".join(
        f"{d} ({LAYERS[layer_of(d)][0]!r})" for d in up
    )


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_cycles():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_can_fail():
    """An upward import and a cycle are found (the checks are not vacuous)."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer_of("statemap.cli") > layer_of("statemap.spec") > layer_of("statemap.ops")
    assert "statemap.ops" in GRAPH["statemap.spec"]  # function-level imports are seen
    assert "statemap.spec" not in GRAPH["statemap.invert"]  # ...and TYPE_CHECKING ones are not


def test_the_package_root_imports_nothing_at_run_time():
    """``statemap/__init__.py`` loads names lazily (PEP 562), so it can sit in the lowest layer."""
    assert GRAPH["statemap"] == set()


def test_docs_list_the_same_layers(root):
    text = (root / "docs" / "architecture.md").read_text()
    for name, members in LAYERS:
        assert f"| {name} |" in text, f"docs/architecture.md has no row for layer {name!r}"
        for m in members:
            assert f"`{m}`" in text, f"docs/architecture.md does not list {m}"
