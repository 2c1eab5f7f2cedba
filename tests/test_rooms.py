"""prune/ is built in rooms that import only downwards: a newcomer reading one room never needs a higher one, and
nothing imports in a circle, at module level or inside a function (a lazy import is no way around a cycle).

ROOMS is the one statement of the order, highest first; rooms on one line share a rank and never import each
other. prune/__init__.py, the public API, may import anything. eval/ is a leaf beside prune/: it never imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROOMS: tuple[tuple[str, ...], ...] = (
    ("cli",),
    ("sweep",),
    ("runs",),
    ("recovery",),
    ("tasks", "training"),
    ("methods",),
    ("structural", "calibration"),
    ("masks",),
    ("models", "data"),
    ("core",),
)
RANK = {room: len(ROOMS) - index for index, rooms in enumerate(ROOMS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, Path]:
    return {module_name(path): path for path in sorted((ROOT / package).rglob("*.py"))}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    name = module_name(path)
    return imports_in(path.read_text(), name if path.name == "__init__.py" else name.rpartition(".")[0], known)


def imports_in(source: str, package: str, known: dict[str, Path]) -> set[str]:
    """Every module `source` (a file of `package`) imports, anywhere in it, function bodies included;
    `from a import b` counts as a.b when b is a module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names)
    return found


def room(module: str) -> str | None:
    """prune.<room>.… -> room; the package itself (the public API) has none."""
    parts = module.split(".")
    return parts[1] if parts[0] == "prune" and len(parts) > 1 else None


def graph() -> dict[str, set[str]]:
    known = modules("prune")
    return {name: {target for target in imported(path, known) if target in known} for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A list of modules a -> b -> ... -> a, or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return None


def test_every_room_of_prune_has_a_rank():
    rooms = {room(name) for name in modules("prune")} - {None}
    assert rooms == set(RANK), f"rooms without a rank: {rooms - set(RANK)}; ranked but absent: {set(RANK) - rooms}"


def test_prune_imports_have_no_cycle():
    edges = {name: targets for name, targets in graph().items() if name != "prune"}
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_rooms_import_only_lower_rooms():
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            here, there = room(source), room(target)
            if here is None or there is None or here == there:
                continue  # the public API, the package itself, or inside one room
            if RANK[there] >= RANK[here]:
                kind = "a sibling room of the same rank" if RANK[there] == RANK[here] else "a higher room"
                wrong.append(f"{source} imports {target} ({kind})")
    assert not wrong, "\n".join(sorted(wrong))


def test_eval_never_imports_prune():
    known = modules("eval")
    wrong = [
        f"{name} imports {target}"
        for name, path in known.items()
        for target in imported(path, known)
        if target == "prune" or target.startswith("prune.")
    ]
    assert not wrong, "\n".join(wrong)


def test_the_checks_see_lazy_and_relative_imports_and_cycles():
    source = "def f():\n    from prune.runs import pipeline\n    import prune.cli\n    from ..core import errors\n"
    known = {"prune.runs.pipeline": ROOT, "prune.core.errors": ROOT}
    assert imports_in(source, "prune.masks", known) == {"prune.runs.pipeline", "prune.cli", "prune.core.errors"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
