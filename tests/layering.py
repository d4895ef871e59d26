"""The import rules of docs/ARCHITECTURE.md, checked on a source tree by reading its imports (ast).

Every `import` and `from ... import` counts, at module level and inside functions alike (a lazy
import is still an arrow). `check_tree(root)` returns one line per broken rule; an empty list
means the tree keeps them. tests/test_layering.py runs it on the project and on synthetic trees.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PRODUCT = ("parallel", "data_pipeline", "engine", "stages", "slurm", "cli")
"""Top-level packages of the product, lowest layer first."""

MAX_LINES = 450
"""One concept per module: a module above this is two."""

COLLECTIVES = {"all_reduce", "broadcast", "send", "recv", "isend", "irecv", "all_gather", "all_gather_object",
               "all_gather_into_tensor", "all_gather_single", "broadcast_object_list", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "barrier", "monitored_barrier", "all_to_all",
               "all_to_all_single", "batch_isend_irecv", "P2POp", "gather", "scatter", "reduce", "gather_object",
               "scatter_object_list", "send_object_list", "recv_object_list"}
"""torch.distributed communication: only parallel/collectives.py calls these."""

LIFECYCLE = {"init_process_group", "new_group", "destroy_process_group", "abort_process_group", "TCPStore",
             "PrefixStore", "new_subgroups"}
"""torch.distributed process-group life: only parallel/ calls these."""

STAGE_SECTIONS = re.compile(r"\bcfg\.(sft|dpo|grpo|midtrain)\b")
"""A stage's config section read by name: the engine never does."""


def module_name(root: Path, path: Path) -> str:
    """'engine.train.trainer' for ROOT/engine/train/trainer.py ('engine.model' for its __init__.py)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(root: Path, path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports (a `from package import module` names the module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    current, is_package = module_name(root, path), path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(current, is_package, node)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            # the longest known prefix: `import engine.train.trainer` imports that module
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                if ".".join(parts[:end]) in known:
                    found.add(".".join(parts[:end]))
                    break
    found.discard(current)
    return found


def distributed_calls(path: Path) -> set[str]:
    """Names of torch.distributed functions `path` uses (dist.X, torch.distributed.X, or imported by name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = {"torch.distributed"}
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {alias.asname for alias in node.names if alias.name == "torch.distributed" and alias.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            used |= {alias.name for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in aliases:
            used.add(node.attr)
    return used


def _layer(module: str) -> str:
    return module.split(".")[0]


def _stage_of(module: str):
    """'sft' for stages.sft, 'grpo' for stages.grpo.trainer; None for stages/ itself and its registry."""
    parts = module.split(".")
    if parts[0] != "stages" or len(parts) < 2 or parts[1] == "registry":
        return None
    return parts[1]


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def check_tree(root: Path, extra: tuple = ("bench",)) -> list[str]:
    """Every broken rule of the tree at `root` (product packages PRODUCT, plus `extra` folders that must
    not import tests/), one line each."""
    root = Path(root)
    files = {p: module_name(root, p) for top in PRODUCT if (root / top).is_dir()
             for p in sorted((root / top).rglob("*.py"))}
    others = {p: module_name(root, p) for top in extra if (root / top).is_dir() for p in sorted((root / top).rglob("*.py"))}
    tests = {module_name(root, p) for p in (root / "tests").rglob("*.py")} if (root / "tests").is_dir() else set()
    known = set(files.values()) | tests | {"tests"}
    problems, graph = [], {}
    for path, module in {**files, **others}.items():
        imported = imports_of(root, path, known)
        rel = path.relative_to(root)
        top = _layer(module)
        for target in sorted(imported):
            where = f"{rel}: imports {target}"
            if _layer(target) == "tests":
                problems.append(f"{where} (bench/ and the product never import tests/)")
            elif top == "parallel" and _layer(target) != "parallel":
                problems.append(f"{where} (parallel imports nothing of the project outside itself)")
            elif top == "data_pipeline" and _layer(target) in ("engine", "parallel", "stages", "cli", "slurm"):
                problems.append(f"{where} (data_pipeline imports neither engine, parallel nor stages)")
            elif top == "engine" and _layer(target) in ("stages", "cli", "slurm"):
                problems.append(f"{where} (the engine imports no stage and no CLI)")
            elif top in ("stages", "slurm") and _layer(target) == "cli":
                problems.append(f"{where} (only the CLI imports the CLI)")
            elif _stage_of(module) and _stage_of(target) and _stage_of(module) != _stage_of(target):
                problems.append(f"{where} (one stage never imports another)")
        if path in files:
            graph[module] = {t for t in imported if _layer(t) != "tests"}
            calls = distributed_calls(path)
            comm = sorted(calls & COLLECTIVES)
            if comm and module != "parallel.collectives":
                problems.append(f"{rel}: calls torch.distributed {', '.join(comm)} (collectives live in parallel/collectives.py)")
            life = sorted(calls & LIFECYCLE)
            if life and top != "parallel":
                problems.append(f"{rel}: calls torch.distributed {', '.join(life)} (process groups live in parallel/)")
            lines = len(path.read_text().splitlines())
            if lines > MAX_LINES:
                problems.append(f"{rel}: {lines} lines (at most {MAX_LINES}: one concept per module)")
            if top in ("engine", "parallel", "data_pipeline"):
                for number, line in enumerate(path.read_text().splitlines(), 1):
                    code = line.split("#")[0]
                    if STAGE_SECTIONS.search(code) and not code.strip().startswith(('"', "'")):
                        problems.append(f"{rel}:{number}: names a stage's config section ({code.strip()[:60]})")
    cycle = find_cycle(graph)
    if cycle:
        problems.append(f"import cycle: {' -> '.join(cycle)}")
    return problems
