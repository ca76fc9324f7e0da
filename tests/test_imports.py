"""The import graph of the library, read from the source (no module is run): no import cycle, and no late import
(an import inside a function, or `importlib.import_module`) except the framework-lazy ones listed in
`LAZY_IMPORTS` with their reason. A late import that only breaks a cycle is a layering mistake: move the shared
names down instead."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("mae_transfer", "backbones")

# (importing module, imported module) -> why it is imported inside a function. The one list of late imports:
# a framework (or heavy optional library) is entered only where it is needed, so that the framework-free core,
# the tools' --help / --plan and the cluster launcher never load it. Never a cycle breaker.
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("mae_transfer.task_kinds", "mae_transfer.detection.checks"):
        "detectron2: the det kind's input check, entered when a study checks its inputs",
    ("mae_transfer.task_kinds", "mae_transfer.segmentation.checks"):
        "mmseg: the seg kind's input check, entered when a study checks its inputs",
    ("mae_transfer.task_kinds", "mae_transfer.classification"):
        "torch / timm: the cls kind's input check; the registry is read by light tools (tools/submit.py)",
    ("mae_transfer.hardware", "torch"): "torch: hardware facts (CPU flags) are read by light tools",
    ("mae_transfer.checkpoint.reading", "safetensors.torch"): "safetensors: only for .safetensors files",
    ("mae_transfer.checkpoint.hub", "timm.models"): "timm: a timm:<model> name's hub repository, only for hub names",
    ("mae_transfer.checkpoint.hub", "huggingface_hub"): "huggingface_hub: its cache, only for timm: / hf-hub: names",
    ("mae_transfer.classification", "timm.data"): "timm: transforms built when a dataset is",
    ("mae_transfer.classification", "timm.optim"): "timm: LARS only for linear probing",
    ("mae_transfer.classification", "timm.loss"): "timm: the losses of fine-tuning",
    ("mae_transfer.compat", "timm.data.auto_augment"): "timm: patched only where RandAugment is built",
    ("mae_transfer.detection.compiled_ops", "detectron2._C"): "detectron2: probing its compiled ops (setup_env.sh)",
    ("mae_transfer.detection.compiled_ops", "torch"): "torch: only to name its version when detectron2._C fails",
    ("mae_transfer.cluster", "submitit"): "submitit: only with the Slurm executor",
    ("mae_transfer.cluster", "submitit.helpers"): "submitit: only with the Slurm executor",
    ("mae_transfer.cluster", "submitit.slurm.slurm"): "submitit: only to show the sbatch script (--dry-run)",
    ("mae_transfer.cluster", "importlib.util"): "loads a tool's own parser from its file (tools/ is no package)",
    ("mae_transfer.coco", "pycocotools"): "pycocotools: only for polygon / RLE masks",
    ("mae_transfer.pretraining", "torchvision.utils"): "torchvision: only for the reconstruction picture",
    ("mae_transfer.pretraining", "PIL"): "Pillow: only for the reconstruction picture",
    ("mae_transfer.runtime", "tqdm"): "tqdm: only with a progress bar",
    ("mae_transfer.runtime", "torch.utils.tensorboard"): "tensorboard: only with log_dir",
    ("mae_transfer.study.report", "matplotlib"): "matplotlib: only for plot.png",
    ("mae_transfer.study.report", "matplotlib.pyplot"): "matplotlib: only for plot.png",
    ("mae_transfer.study.stats", "scipy.stats"): "scipy: only for the statistics of a finished study",
    ("mae_transfer.study.stats", "scipy.optimize"): "scipy: only for the detectable effect",
    ("mae_transfer.study.tables", "scipy.stats"): "scipy: only for the t interval of a paired difference",
    ("mae_transfer.segmentation.train", "mmseg.visualization"): "mmseg: its visualizer only for --pictures",
    ("mae_transfer.segmentation.train", "mmcv"): "mmcv: image I/O only for --pictures",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    found = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO_ROOT / pkg).rglob("*.py"))}
    assert "mae_transfer.task_kinds" in found and "backbones.vit" in found  # the walk reads the right tree
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules an import statement loads (a `from package import submodule` names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> the library modules it imports when it is imported, [(module, late import, line)])."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    late: list[tuple[str, str, int]] = []
    names = set(modules)

    def visit(node: ast.AST, module: str, is_package: bool, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, is_package, names):
                    if in_function:
                        late.append((module, target, child.lineno))
                    elif target.split(".")[0] in PACKAGES:
                        graph[module].add(target)
            elif (isinstance(child, ast.Call) and isinstance(child.func, (ast.Attribute, ast.Name))
                  and getattr(child.func, "attr", getattr(child.func, "id", "")) in ("import_module", "__import__")):
                arg = child.args[0] if child.args else None
                late.append((module, arg.value if isinstance(arg, ast.Constant) else "<computed>", child.lineno))
            visit(child, module, is_package, in_function or isinstance(child, (ast.FunctionDef,
                                                                                ast.AsyncFunctionDef, ast.Lambda)))

    for module, path in modules.items():
        visit(ast.parse(path.read_text(), str(path)), module, path.name == "__init__.py", False)
    return graph, late


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph[v]:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_library_has_no_import_cycle() -> None:
    graph, _ = _imports(_sources())
    assert sum(len(t) for t in graph.values()) > 100  # the graph is read
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_late_import_is_a_listed_framework_lazy_one() -> None:
    """Every import inside a function of mae_transfer/ is in LAZY_IMPORTS (with its reason), and every entry there
    is still used; a late import of another library module only enters a framework package or the heavy
    classification / io modules, never one the importer could import at the top (a cycle dodge)."""
    _, late = _imports(_sources())
    ours = [(m, t, line) for m, t, line in late if m.split(".")[0] == "mae_transfer"]
    unlisted = sorted(f"{m}:{line} imports {t}" for m, t, line in ours if (m, t) not in LAZY_IMPORTS)
    assert unlisted == []
    stale = sorted(set(LAZY_IMPORTS) - {(m, t) for m, t, _ in ours})
    assert stale == []
    assert all(reason.strip() for reason in LAZY_IMPORTS.values())
