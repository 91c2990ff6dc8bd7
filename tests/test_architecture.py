"""The package's shape, checked from its source: data flows one way, with no import cycle, and one
object (layout.Layout) spells every results path."""
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qr_lib"
# Modules both halves use; they import neither half (config is the settings schema, layout the paths).
SHARED = {"errors", "store", "hardware", "progress", "models", "data", "evaluate", "config", "layout"}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _imports(path: Path):
    """(imported qr_lib module, line, inside a function) for every import statement of a file."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for t in targets:
            if t.split(".")[0] == "qr_lib" and t != mod:
                yield t, node.lineno, id(node) in in_function


def _graph():
    return {m: {t for t, _, _ in _imports(p) if t in MODULES} for m, p in MODULES.items()}


def test_no_import_cycle_inside_the_package():
    graph, state, cycles = _graph(), {}, []

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_data_flows_one_way():
    """The shared modules import neither half; the algorithm never imports the workbook."""
    bad = []
    for m, targets in _graph().items():
        name = m.removeprefix("qr_lib.")
        for t in targets:
            inner = t.removeprefix("qr_lib.")
            if name in SHARED and inner.split(".")[0] in ("algorithm", "workbook", "cli"):
                bad.append((m, t))
            if name.startswith("algorithm") and inner.split(".")[0] in ("workbook", "cli"):
                bad.append((m, t))
    assert not bad, f"imports against the flow: {bad}"


def test_no_function_level_import_of_the_package_outside_the_command_line():
    """cli.py imports inside its commands so that `--help` answers at once; nothing else hides an import."""
    hidden = [(str(p.relative_to(ROOT)), line, t) for m, p in MODULES.items() if m != "qr_lib.cli"
              for t, line, nested in _imports(p) if nested]
    assert not hidden, f"function-level imports of qr_lib modules: {hidden}"


# Third-party modules the package may import inside a function, and why: nothing else is imported there.
LAZY = {
    "hqq": "an optional quantizer backend, needed only where chosen",
    "bitsandbytes": "an optional quantizer backend (its CUDA wheel may be missing on a GPU check)",
    "dask": "the parallel runner's, optional", "dask_cuda": "the parallel runner's on GPUs, optional",
    "IPython": "notebooks only", "ipywidgets": "notebooks only", "papermill": "`make reproduce` only",
    "jupyter_client": "`make reproduce` only", "ipykernel": "`make reproduce` only",
    "matplotlib": "figures only (store.save_figure)",
    "torch": "seconds to import: kept off the paths that only read settings or records",
    "transformers": "seconds to import", "peft": "seconds to import", "datasets": "seconds to import",
    "lm_eval": "seconds to import, and only the benchmark paths use it", "skopt": "seconds to import (Phase III only)",
}


def test_no_function_level_import_outside_the_declared_lazy_modules():
    """Anywhere in the package (tasks/ too), an import inside a function is the command line's (so that
    `--help` answers at once) or one of LAZY's, each with its reason."""
    hidden = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                else:
                    continue
                for name in names:
                    if not (m == "qr_lib.cli" and name.startswith(".")) and name.split(".")[0] not in LAZY:
                        hidden.append((str(path.relative_to(ROOT)), node.lineno, name))
    assert not hidden, f"function-level imports outside LAZY: {hidden}"


def test_no_backend_name_outside_quant():
    """Only algorithm/quant/ knows which quantizer backends exist; config.py's schema names the setting's
    values, and store's library list names packages."""
    from qr_lib.algorithm.quant import BACKENDS
    leaks = []
    for m, path in MODULES.items():
        if m.startswith("qr_lib.algorithm.quant") or m == "qr_lib.config":
            continue
        tree = ast.parse(path.read_text())
        packages = {id(c) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", None) == "TRACKED_PACKAGES" for t in n.targets) for c in ast.walk(n.value)}
        leaks += [(str(path.relative_to(ROOT)), n.lineno, n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in BACKENDS and id(n) not in packages]
    assert not leaks, f"backend names outside qr_lib/algorithm/quant/: {leaks}"


def test_every_cached_artifact_depends_on_the_one_version_list():
    """Library versions enter an artifact's fingerprint in one place (store.versions, checked by
    store.fresh): no stage lists versions of its own."""
    own = [(str(p.relative_to(ROOT)), n.lineno) for m, p in MODULES.items() if m != "qr_lib.store"
           for n in ast.walk(ast.parse(p.read_text()))
           if isinstance(n, ast.Name) and n.id in ("package_versions", "TRACKED_PACKAGES")]
    assert not own, f"version lists outside store.py: {own}"


# What only layout.py may spell: artifact file names, results subfolders, run-folder globs, and the
# machine-wide cache's folders.
FOLDERS = "runs|pilot|searches|tables|figures|evaluations|proxy_check|stock|results|models|blocks|speed|data"
RESULT_PATHS = re.compile(r"(setup|sensitivity|nsga|bo|search|result|proxy_check|manifest)\.json"
                          rf"|^({FOLDERS})/|seed\*")
JOINED = re.compile(rf"^({FOLDERS})$")


def _strings(source: str):
    """(line, text) of every string literal in code that names a results path: an artifact's file name,
    a results subfolder with a slash, or one joined onto a path (`x / "runs"`). Docstrings are left out
    (they may name artifacts), and so are dict keys that happen to be a folder's name."""
    tree = ast.parse(source)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    joined = {id(n.right) for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div)}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
            if RESULT_PATHS.search(n.value) or (id(n) in joined and JOINED.match(n.value)):
                yield n.lineno, n.value


def _code_cells(nb: Path) -> str:
    return "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")


def test_only_the_layout_spells_a_results_or_cache_path():
    sources = {str(p.relative_to(ROOT)): p.read_text() for p in PKG.rglob("*.py")
               if p.name != "layout.py" and "tasks" not in p.parts}
    sources |= {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "benchmarks").glob("*.py")}
    sources |= {str(nb.relative_to(ROOT)): _code_cells(nb) for nb in (ROOT / "notebooks").glob("*.ipynb")}
    found = [(name, line, s) for name, text in sources.items() for line, s in _strings(text)]
    assert not found, f"results paths spelled outside qr_lib/layout.py: {found}"


# What a notebook may not do itself: build a table or a figure it saves (its stage module does, so the
# table exists whoever asks for it).
CONSTRUCTION = re.compile(r"\bsave_table\(|\bsave_figure\(|qr_lib\.workbook\.plots|\bplt\.")


def test_notebooks_show_what_the_stage_modules_build():
    found = [(nb.name, m.group(0)) for nb in sorted((ROOT / "notebooks").glob("*.ipynb"))
             for m in CONSTRUCTION.finditer(_code_cells(nb))]
    assert not found, f"tables or figures built in a notebook instead of its stage module: {found}"

