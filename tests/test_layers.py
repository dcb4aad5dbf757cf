"""The package's layering: imports flow one way and form no cycle (issue 28).

Every `import` / `from ... import` of a genrec module anywhere in genrec/ counts, at module level or inside a
function (a lazy import is still a dependency, and a cycle through one is still a cycle). A module may import
modules of a lower layer, or of its own group; anything else fails here, naming the file and line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "genrec"

# layer, group, module prefixes (the longest matching prefix places a module). Imports go to lower layers or
# stay inside their group; groups on one layer are peers that do not import each other.
LAYERS: list[tuple[int, str, tuple[str, ...]]] = [
    (0, "base", ("genrec.errors", "genrec.config", "genrec.cpu_time", "genrec.topk")),
    (0, "metrics", ("genrec.evaluation.metrics",)),  # a leaf: harness, training and server import it
    # baselines.py: the sequence models (SASRec, Markov chain, item-kNN) behind both the baselines and the
    # collaborative retrievers
    (1, "data", ("genrec.data", "genrec.retrieval", "genrec.baselines")),
    (2, "ids", ("genrec.ids", "genrec.run")),
    (3, "templates", ("genrec.templates",)),
    (4, "decoding", ("genrec.decoding", "genrec.id_softmax")),
    (5, "engines", ("genrec.engines", "genrec.modeling")),
    (6, "recommender", ("genrec.recommender", "genrec.prep")),
    (7, "train", ("genrec.training", "genrec.task_rows", "genrec.pipeline")),
    (7, "eval", ("genrec.evaluation",)),
    (7, "batch", ("genrec.batch",)),
    (7, "serve", ("genrec.serve",)),
    (
        8,
        "rl",
        ("genrec.rl",),
    ),  # the RL stage after SFT: training's helpers and evaluation's validation ranking
    (9, "cli", ("genrec.cli", "genrec.__main__")),
    (10, "public", ("genrec",)),  # genrec/__init__.py: the lazy public surface
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def place(module: str) -> tuple[int, str] | None:
    best: tuple[int, int, str] | None = None
    for layer, group, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                best is None or len(prefix) > best[0]
            ):
                best = (len(prefix), layer, group)
    if best is None or (best[2] == "public" and module != "genrec"):
        return None
    return best[1], best[2]


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported genrec module, line) for every import in the file, wherever it sits."""
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import genrec.x.y` where y is an attribute: its module
                name = name.rpartition(".")[0]
            if name.startswith("genrec") and name != module:
                out.append((name, node.lineno))
    return out


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if place(m) is None]
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_imports_flow_one_way():
    mods, bad = modules(), []
    for src, targets in graph().items():
        if place(src) is None:
            continue
        src_layer, src_group = place(src)  # type: ignore[misc]
        for dst, line in targets:
            dst_place = place(dst)
            if dst_place is None or src == "genrec":
                continue
            dst_layer, dst_group = dst_place
            if dst_group != src_group and dst_layer >= src_layer:
                rel = mods[src].relative_to(ROOT)
                bad.append(
                    f"{rel}:{line}: {src} ({src_group}, layer {src_layer}) imports {dst} ({dst_group}, layer {dst_layer})"
                )
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle (as a path that returns to its start) in the directed graph, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    edges = {src: {dst for dst, _ in targets if dst != "genrec"} for src, targets in graph().items()}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The checkers themselves: a planted cycle and an import from a higher layer are reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert place("genrec.evaluation.metrics") == (0, "metrics")
    assert place("genrec.evaluation") == (7, "eval")
    assert place("genrec.data.loaders") == (1, "data")
    assert place("genrec.unknown") is None


def test_relative_and_lazy_imports_are_seen(tmp_path):
    src = tmp_path / "genrec" / "batch" / "x.py"
    src.parent.mkdir(parents=True)
    src.write_text("from . import job\n\ndef f():\n    from genrec.serve.app import create_app\n")
    known = {"genrec.batch", "genrec.batch.job", "genrec.serve.app", "genrec.serve"}
    assert imports("genrec.batch.x", src, known) == [("genrec.batch.job", 1), ("genrec.serve.app", 4)]


def test_import_genrec_is_cheap_and_exports_the_public_surface():
    """`import genrec` loads no model stack; each exported name resolves to its defining module's object."""
    code = (
        "import sys, genrec\n"
        "heavy = [m for m in ('torch', 'numpy', 'pandas', 'transformers', 'yaml') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from genrec import RunConfig, RunDir, Recommender\n"
        "import genrec.config, genrec.run, genrec.recommender\n"
        "assert RunConfig is genrec.config.RunConfig and RunDir is genrec.run.RunDir\n"
        "assert Recommender is genrec.recommender.Recommender\n"
        "assert sorted(genrec.__all__) == sorted(genrec._EXPORTS)\n"
        "for name in genrec.__all__: getattr(genrec, name)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import genrec

        genrec.nope  # noqa: B018
