"""Layering: backbones/ never loads mae_transfer; neither loads the harnesses; the core loads no framework and
installs no import hooks; framework workarounds are applied by whoever enters the framework. Each runtime check
runs in a fresh interpreter, since this test session has already imported everything."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT

FRAMEWORKS = ("detectron2", "mmseg", "mmengine", "mmcv")


def run_fresh(code: str) -> dict:
    """Run `code` in a new interpreter at the repo root; it prints one json object as its last line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_backbone_vit_does_not_load_mae_transfer() -> None:
    # The acceptance one-liner, verbatim.
    proc = subprocess.run([sys.executable, "-c", "import backbones.vit, sys; assert 'mae_transfer' not in sys.modules"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_no_backbones_module_loads_mae_transfer() -> None:
    result = run_fresh("""
        import json, sys
        import backbones.vit, backbones.kernels, backbones.lr_decay, backbones.errors, backbones.compat
        core = sorted(m for m in sys.modules if m.split('.')[0] == 'mae_transfer')
        import backbones.detectron2, backbones.mmseg
        adapters = sorted(m for m in sys.modules if m.split('.')[0] == 'mae_transfer')
        print(json.dumps({"core": core, "adapters": adapters}))
    """)
    assert result == {"core": [], "adapters": []}


def test_backbones_sources_never_name_mae_transfer() -> None:
    """Static: no file in backbones/ mentions the toolkit at all (no import, no lazy import inside a function,
    no import_module string), so nothing can reach it at run time either; what the mmseg adapter needs from
    above (its checkpoint reader) is handed in."""
    sources = sorted((REPO_ROOT / "backbones").rglob("*.py"))
    assert len(sources) >= 6
    naming = [str(p.relative_to(REPO_ROOT)) for p in sources if "mae_transfer" in p.read_text()]
    assert naming == []


def test_mmseg_backbone_gets_its_checkpoint_loader_handed_in() -> None:
    """Without a loader, init_checkpoint is one clear error; the config's custom_imports hand the toolkit's in,
    and loading it then goes through mae_transfer.checkpoint with its report."""
    result = run_fresh("""
        import json, sys
        import backbones.mmseg
        from backbones.errors import BackboneError
        vit = backbones.mmseg.MAEViT(img_size=32, embed_dim=32, depth=2, num_heads=2, out_indices=(1,),
                                     init_checkpoint="nowhere.pth")
        try:
            vit.init_weights()
            error = ""
        except BackboneError as err:
            error = str(err)
        loaded_before = "mae_transfer" in sys.modules
        from mmengine.config import Config
        Config.fromfile("configs/ade20k_upernet_vit_tiny_cpu.py")  # runs custom_imports
        after = "no error"
        try:
            vit.init_weights()
        except Exception as err:
            after = type(err).__module__ + ": " + str(err)
        print(json.dumps({"error": error, "loaded_before": loaded_before, "after": after,
                          "loader": backbones.mmseg._checkpoint_loader.__module__}))
    """)
    assert "no checkpoint loader" in result["error"] and "custom_imports" in result["error"], result
    assert not result["loaded_before"] and result["loader"] == "mae_transfer.segmentation.checkpoint", result
    assert result["after"].startswith("mae_transfer.errors: ") and "nowhere.pth" in result["after"], result


def test_library_never_imports_the_harnesses() -> None:
    """harnesses/ (demo, benchmark, GPU acceptance) sits above the library: no module of mae_transfer/ or
    backbones/ imports it, at the top or inside a function, nor starts it as `python -m harnesses...`."""
    found = []
    for path in sorted([*(REPO_ROOT / "mae_transfer").rglob("*.py"), *(REPO_ROOT / "backbones").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else
                     [node.value] if isinstance(node, ast.Constant) and isinstance(node.value, str) else [])
            if any(name == "harnesses" or name.startswith("harnesses.") for name in names):
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert (REPO_ROOT / "harnesses" / "gpu_acceptance.py").is_file()  # the check looks at the right tree
    assert found == []


def test_core_loads_no_framework_and_installs_no_import_hook() -> None:
    result = run_fresh(f"""
        import json, sys
        hooks_before = list(sys.meta_path)
        import mae_transfer
        after_package = list(sys.meta_path)
        import mae_transfer.mae
        after_mae = list(sys.meta_path)
        mae_frameworks = sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})
        import mae_transfer.checkpoint, mae_transfer.runtime
        import mae_transfer.pretraining, mae_transfer.classification, mae_transfer.recipe
        import mae_transfer.task_kinds, mae_transfer.metrics, mae_transfer.input_checks, mae_transfer.cluster
        import mae_transfer.study.spec, mae_transfer.study.inputs, mae_transfer.study.run, mae_transfer.study.report
        import mae_transfer.study.claims, mae_transfer.study.stats, mae_transfer.study.cluster
        import mae_transfer.detection, mae_transfer.segmentation  # the framework packages' faces import nothing
        import mae_transfer.data, mae_transfer.coco, mae_transfer.compat, mae_transfer.cli, mae_transfer.hardware
        print(json.dumps({{
            "package_hooks": after_package == hooks_before, "mae_hooks": after_mae == hooks_before,
            "all_hooks": list(sys.meta_path) == hooks_before, "mae_frameworks": mae_frameworks,
            "core_frameworks": sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}),
            "stand_in": "mmcv._ext" in sys.modules,
        }}))
    """)
    assert result == {"package_hooks": True, "mae_hooks": True, "all_hooks": True, "mae_frameworks": [],
                      "core_frameworks": [], "stand_in": False}


def test_mmseg_adapter_applies_its_workaround_and_registers_its_hooks() -> None:
    """Importing only the adapter (what a config's custom_imports does) is enough for mmseg on mmcv-lite,
    and registers the LLRD constructor; with no import hook of ours left behind (mmseg's own imports, e.g.
    transformers, add finders of their own)."""
    result = run_fresh("""
        import json, sys
        import backbones.mmseg
        from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
        from mmseg.registry import MODELS
        print(json.dumps({
            "stand_in": getattr(sys.modules.get("mmcv._ext"), "MAE_TRANSFER_STAND_IN", False),
            "constructor": OPTIM_WRAPPER_CONSTRUCTORS.get("MaeLayerDecayOptimizerConstructor").__module__,
            "backbone": MODELS.get("MAEViT").__module__,
            "our_hooks": [type(h).__module__ for h in sys.meta_path
                          if type(h).__module__.split(".")[0] in ("backbones", "mae_transfer")],
        }))
    """)
    assert result == {"stand_in": True, "constructor": "backbones.mmseg", "backbone": "backbones.mmseg",
                      "our_hooks": []}


def test_timm_posterize_is_patched_only_where_randaugment_is_built() -> None:
    result = run_fresh("""
        import json
        import timm.data.auto_augment as aa
        import mae_transfer.classification as cls
        before = getattr(aa.NAME_TO_OP["PosterizeIncreasing"], "_mae_transfer_patched", False)
        cfg = dict(cls.CLS_DEFAULTS, img_size=32)
        transform = cls.train_transform(cfg)
        after = getattr(aa.NAME_TO_OP["PosterizeIncreasing"], "_mae_transfer_patched", False)
        from PIL import Image
        black = aa.NAME_TO_OP["PosterizeIncreasing"](Image.new("RGB", (4, 4), (200, 100, 50)), 0)
        print(json.dumps({"before": before, "after": after, "zero_bits": list(black.getpixel((0, 0)))}))
    """)
    # Pillow 13 refuses 0 bits; the patched op returns what older Pillow did: an all-black image.
    assert result == {"before": False, "after": True, "zero_bits": [0, 0, 0]}


def test_llrd_rule_has_one_implementation() -> None:
    import backbones.lr_decay as lr_decay
    import mae_transfer.classification as classification
    import mae_transfer.pretraining as pretraining

    assert pretraining.param_groups is lr_decay.param_groups and classification.param_groups is lr_decay.param_groups
    assert pretraining.no_weight_decay is lr_decay.no_weight_decay


def test_only_the_framework_packages_import_a_framework() -> None:
    """Static: every module that imports detectron2 / mmseg / mmengine / mmcv (or the backbones' framework adapters),
    at the top or inside a function, lives in mae_transfer/detection/ or mae_transfer/segmentation/."""
    adapters = ("backbones.detectron2", "backbones.mmseg")
    found = []
    for path in sorted((REPO_ROOT / "mae_transfer").rglob("*.py")):
        place = path.relative_to(REPO_ROOT / "mae_transfer").parts
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in FRAMEWORKS or n.startswith(adapters) for n in names) and \
                    place[0] not in ("detection", "segmentation"):
                found.append(f"mae_transfer/{'/'.join(place)}:{node.lineno}")
    assert found == []
