"""The shape rules of issue 14, checked from the source: module and class sizes, import cycles, private
names reached across modules. `python tools/archcheck.py` prints every breach; tests/test_architecture.py
asserts there are none, so a newcomer who grows a module past the limit hears it from the suite.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("device", "convert")
PRIVATE_SCAN = PACKAGES + ("bench",)  # bench/ is not held to the sizes, but may not reach private names either
MAX_MODULE_LINES = 350
MAX_CLASS_LINES = 250


@dataclass(frozen=True)
class Breach:
    rule: str
    where: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.rule}: {self.detail}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path = ROOT, packages: tuple[str, ...] = PRIVATE_SCAN) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in packages for p in sorted((root / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_pkg: bool) -> list[tuple[ast.stmt, str, list[str]]]:
    """(node, imported module, names) for every import that runs, TYPE_CHECKING blocks left out."""
    out: list[tuple[ast.stmt, str, list[str]]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    out.append((child, a.name, []))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                out.append((child, base, [a.name for a in child.names]))
            visit(child)

    visit(tree)
    return out


def check(root: Path = ROOT) -> list[Breach]:
    mods = modules(root)
    breaches: list[Breach] = []
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        rel = str(path.relative_to(root))
        text = path.read_text(encoding="utf-8")
        n = len(text.splitlines())
        held = mod.split(".")[0] in PACKAGES
        if held and n > MAX_MODULE_LINES:
            breaches.append(Breach("module over %d lines" % MAX_MODULE_LINES, rel, f"{n} lines"))
        tree = ast.parse(text, filename=rel)
        for node in ast.walk(tree):
            if held and isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    breaches.append(Breach("class over %d lines" % MAX_CLASS_LINES, f"{rel}:{node.lineno}",
                                           f"class {node.name} is {size} lines"))
        imported_modules: dict[str, str] = {}
        for node, target, names in _imports(tree, mod, path.name == "__init__.py"):
            for cand in [target] + [f"{target}.{x}" for x in names]:
                if cand in mods and cand != mod:
                    graph[mod].add(cand)
            if target.split(".")[0] in PRIVATE_SCAN:
                for x in names:
                    if x.startswith("_") and not x.startswith("__") and f"{target}.{x}" not in mods:
                        breaches.append(Breach("private name imported", f"{rel}:{node.lineno}",
                                               f"{x} from {target}"))
            if isinstance(node, ast.Import):
                for a in node.names:
                    imported_modules[a.asname or a.name] = a.name
            else:
                for a in node.names:
                    if f"{target}.{a.name}" in mods:
                        imported_modules[a.asname or a.name] = f"{target}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in imported_modules and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and imported_modules[node.value.id].split(".")[0] in PRIVATE_SCAN):
                breaches.append(Breach("private name reached", f"{rel}:{node.lineno}",
                                       f"{node.value.id}.{node.attr}"))
    for cycle in cycles(graph):
        breaches.append(Breach("import cycle", cycle[0], " -> ".join(cycle + [cycle[0]])))
    return breaches


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One representative cycle per strongly connected component (Tarjan), a package importing its own
    submodules from its __init__ left out: that is how a package names its parts, not a cycle."""
    def edges(m: str) -> set[str]:
        return {t for t in graph[m] if not t.startswith(m + ".")}

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges(v)):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def main() -> int:
    found = check()
    for b in found:
        print(b)
    print(f"{len(found)} breach(es) of the module rules in {', '.join(PRIVATE_SCAN)}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
