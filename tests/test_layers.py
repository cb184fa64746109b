"""The package's layers: every import goes to its own layer or one below, and no two modules import each other
round a circle. Read from the source (every import, those inside functions included), so a lazy import that
climbs back up is caught as surely as a top-level one."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wanlora"

# Lowest first: a module may import from its own layer and the ones above it in this list, never below.
LAYERS = [
    ("foundation", r"wanlora\.(errors|logs|messages|settings|paths|staging|identity|net|hub)"),
    ("catalogue", r"wanlora\.(models|pairs|accelerators)"),
    ("weights", r"wanlora\.weights(\..+)?"),
    ("lora", r"wanlora\.lora(\..+)?"),
    ("runtime", r"wanlora\.runtime(\..+)?"),
    ("parallel", r"wanlora\.parallel(\..+)?"),
    ("core", r"wanlora\.(options|request|images|video|grid|sweep|tiny|experts|pipeline)"),
    ("resident", r"wanlora\.resident"),
    ("front ends", r"wanlora\.(frontends(\..+)?|__main__)"),
    ("package", r"wanlora"),  # __init__: the public names, imported lazily
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The wanlora modules `path` imports, as dotted names (a name imported from a package counts as it)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join([*base, node.module] if node.module else base)
            found |= {f"{target}.{alias.name}" for alias in node.names} if node.module is None else {target}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("wanlora"):
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("wanlora")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}

    def existing(target: str) -> str:  # `from .x import name`: the module x, not the name
        while target not in modules and "." in target:
            target = target.rpartition(".")[0]
        return target

    return {name: {existing(t) for t in imports(path)} - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    for index, (_, pattern) in enumerate(LAYERS):
        if re.fullmatch(pattern, module):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS where it belongs")


def test_every_import_goes_to_its_own_layer_or_below():
    climbs = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for module, targets in graph().items()
        for target in targets
        if target != "wanlora" and layer(target) > layer(module)  # `from . import __version__` is a constant
    ]
    assert not climbs, "\n".join(climbs)


def test_no_modules_import_each_other_round_a_circle():
    edges = {module: {t for t in targets if t != "wanlora"} for module, targets in graph().items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("an import circle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_only_predict_py_imports_cog():
    users = [module for module, path in ((module_name(p), p) for p in PACKAGE.rglob("*.py")) if "cog" in _roots(path)]
    assert users == []


def _roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    return names | {
        (node.module or "").split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and not node.level
    }
