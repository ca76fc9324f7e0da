"""Issue 35's tiny-scale study: a random-weight ViT file in each backbone family's own format runs a detection,
a segmentation and a classification cell end to end on CPU, with the family's ViT options passed through the
per-backbone `opts` of configs/studies/backbone_families.py (the GPU spec's own option spelling)."""
from __future__ import annotations

import csv
import json
import math
import re
import runpy
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mae_transfer.study.run import prepare_backbone, run_study, subprocess_runner
from mae_transfer.study.spec import DONE, Cell, load_study
from tests.conftest import REPO_ROOT

timm = pytest.importorskip("timm")
pytest.importorskip("detectron2")
pytest.importorskip("mmseg")

WIDTH, DEPTH, HEADS = 192, 4, 3  # the tiny CPU configs' ViT (det / seg / cls)


def _timm_sd(name: str, seed: int, **kw) -> dict[str, torch.Tensor]:
    """A timm model's state dict, every tensor drawn at random (layer scales and tables too)."""
    model = timm.create_model(name, depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS, num_classes=0, **kw)
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.02 if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def _deit3() -> dict:
    """facebookresearch/deit (DeiT III, models_v2): layer scale `gamma_1/2`, no cls row in the position table."""
    sd = _timm_sd("deit3_base_patch16_224", 1)
    return {"model": {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in sd.items()}}


def _dinov2() -> dict:
    """facebookresearch/dinov2: timm's names plus the MIM `mask_token`, 14-px patches, 518-px table."""
    return {**_timm_sd("vit_base_patch14_dinov2", 2, img_size=518), "mask_token": torch.zeros(1, WIDTH)}


def _openai_clip() -> dict:
    """OpenAI CLIP / open_clip: image tower `visual.*` (conv1, ln_pre, in_proj, c_fc), plus a text tower."""
    g = torch.Generator().manual_seed(3)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    d = WIDTH
    sd = {"visual.class_embedding": r(d), "visual.positional_embedding": r(197, d),
          "visual.conv1.weight": r(d, 3, 16, 16), "visual.ln_pre.weight": 1 + r(d), "visual.ln_pre.bias": r(d),
          "visual.ln_post.weight": 1 + r(d),
          "visual.ln_post.bias": r(d), "visual.proj": r(d, 32), "token_embedding.weight": r(100, 32),
          "positional_embedding": r(8, 32), "text_projection": r(32, 32), "logit_scale": r(()),
          "ln_final.weight": r(32), "ln_final.bias": r(32)}
    for i in range(DEPTH):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({p + "ln_1.weight": 1 + r(d), p + "ln_1.bias": r(d), p + "ln_2.weight": 1 + r(d),
                   p + "ln_2.bias": r(d), p + "attn.in_proj_weight": r(3 * d, d), p + "attn.in_proj_bias": r(3 * d),
                   p + "attn.out_proj.weight": r(d, d), p + "attn.out_proj.bias": r(d),
                   p + "mlp.c_fc.weight": r(4 * d, d), p + "mlp.c_fc.bias": r(4 * d),
                   p + "mlp.c_proj.weight": r(d, 4 * d), p + "mlp.c_proj.bias": r(d)})
    return sd


def _beitv2() -> dict:
    """microsoft/unilm BEiTv2 pretraining: one shared `rel_pos_bias` table, `mask_token`, `lm_head`,
    `cls_pt_layers`."""
    sd = _timm_sd("beitv2_base_patch16_224", 4)
    table = sd["blocks.0.attn.relative_position_bias_table"]
    sd = {k: v for k, v in sd.items() if "relative_position_bias_table" not in k and "relative_position_index" not in k}
    return {"model": {**sd, "rel_pos_bias.relative_position_bias_table": table,
                      "mask_token": torch.zeros(1, 1, WIDTH), "lm_head.weight": torch.zeros(8, WIDTH),
                      "cls_pt_layers.0.norm1.weight": torch.ones(WIDTH)}}


def _eva02() -> dict:
    """baaivision EVA-02: `mlp.w1/w2/w3`, `ffn_ln`, `q_bias`/`v_bias`, rope buffers; 14-px patches."""
    sd = _timm_sd("eva02_base_patch14_224", 5)
    out = {(k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.").replace("mlp.fc2.", "mlp.w3.")
            .replace("mlp.norm.", "mlp.ffn_ln.").replace("attn.q_proj.bias", "attn.q_bias")
            .replace("attn.v_proj.bias", "attn.v_bias")): v for k, v in sd.items()}
    return {"module": {**out, "rope.freqs_cos": torch.zeros(256, 64)}}


# family in the GPU spec -> (file in its own format, the format the load report names)
FILES = {"DeiT III": (_deit3, "timm"), "DINOv2": (_dinov2, "dinov2"), "CLIP": (_openai_clip, "openai_clip"),
         "BEiTv2": (_beitv2, "beit"), "EVA-02": (_eva02, "eva02")}
METRIC = {"det": "AP_box", "seg": "mIoU", "cls": "top1"}


def _photos(fruits_nuts: Path, out: Path, n: int) -> Path:
    """A COCO json of the first n fruits_nuts photos."""
    data = json.loads((fruits_nuts / "trainval.json").read_text())
    images = data["images"][:n]
    ids = {im["id"] for im in images}
    data.update(images=images, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    out.write_text(json.dumps(data))
    return out


def _two_at_a_time(pool: ThreadPoolExecutor):
    """A run_study runner: at its first call every cell's tool is queued on `pool` (two slots), in run_study's
    order, and each call hands back its own cell's result. The same subprocess_runner and logs; each tool run is
    mostly start-up on one thread, so two share the 2 cores."""
    futures = {}

    def runner(study, cell, checkpoint, resume):
        if not futures:
            checkpoints = {name: prepare_backbone(study, name) for name in study.backbones}
            futures.update({c: pool.submit(subprocess_runner, study, c, checkpoints[c.backbone], False)
                            for c in study.cells()})
        return futures[cell].result()
    return runner


@pytest.mark.slow
def test_tiny_backbone_families_study_end_to_end(tmp_path: Path, fruits_nuts: Path, camvid_small: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every family x {det, seg, cls}, one freeze setting and one seed, the shortest runs, on in-repo data
    (fruits_nuts photos and object crops, CamVid-layout frames): each cell finishes with a finite metric and its
    log names the family's checkpoint format (the file was read by that format's row, not skipped)."""
    from mae_transfer.coco import coco_crops_to_imagefolder

    gpu_spec = runpy.run_path(str(REPO_ROOT / "configs" / "studies" / "backbone_families.py"))
    backbones = {}
    for name, (make, _) in FILES.items():
        path = tmp_path / f"{re.sub(r'[^a-z0-9]', '', name.lower())}.pth"
        torch.save(make(), path)
        backbones[name] = dict(checkpoint=str(path), opts=gpu_spec["backbones"][name]["opts"])
    two = _photos(fruits_nuts, tmp_path / "two.json", 2)
    coco_crops_to_imagefolder(_photos(fruits_nuts, tmp_path / "four.json", 4), fruits_nuts / "images",
                              tmp_path / "crops", min_size=16, val_fraction=0.5)
    seg_root = [f"{split}_dataloader.dataset.data_root={camvid_small}" for split in ("train", "val", "test")]
    tasks = {
        "det": dict(kind="det", config="configs/coco_mask_rcnn_vit_tiny_cpu.py", iters=1,
                    args=["--train-json", str(two), "--train-images", str(fruits_nuts / "images"),
                          "--val-json", str(two), "--val-images", str(fruits_nuts / "images")],
                    opts=["model.roi_heads.box_predictor.test_topk_per_image=10"]),
        "seg": dict(kind="seg", config="configs/camvid_upernet_vit_tiny_cpu.py", iters=1,
                    opts=[*seg_root, "train_dataloader.batch_size=2", "param_scheduler.0.end=1",
                          "param_scheduler.1.begin=1", "param_scheduler.1.end=2"]),
        "cls": dict(kind="cls", config="configs/cls_finetune_vit_tiny_cpu.py", epochs=1,  # 112 px = 7x16 = 8x14
                    args=["--data", str(tmp_path / "crops")],
                    opts=["warmup_epochs=0", "num_workers=0", "img_size=112"]),
    }
    study = load_study(dict(name="families_tiny", depth=DEPTH, freeze_blocks=[-1], seeds=[0], backbones=backbones,
                            tasks=tasks), tmp_path / "out")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # inherited by the tools; robust when other jobs share the cores
    with ThreadPoolExecutor(2) as pool:
        result = run_study(study, runner=_two_at_a_time(pool))
    assert len(result["ran"]) == len(FILES) * len(tasks) and not result["failed"]

    rows = list(csv.DictReader(open(study.output_dir / "results.csv")))
    assert len(rows) == len(FILES) * len(tasks)
    for name, (_, fmt) in FILES.items():
        for task, metric in METRIC.items():
            cell = study.cell_dir(Cell(name, task, -1, 0))
            done = json.loads((cell / DONE).read_text())
            assert math.isfinite(done["metrics"][metric]), (name, task, done)
            row = [r for r in rows if r["backbone"] == name and r["task"] == task]
            assert len(row) == 1 and math.isfinite(float(row[0][metric])), (name, task, row)
            log = (cell / "run.log").read_text()
            path = re.escape(study.backbones[name]["checkpoint"])
            assert re.search(rf"checkpoint {path}: format {fmt} \(", log), (name, task, log[-2000:])
            # the 14-px families are resampled to 16-px patches in det/seg and keep 14 px in cls
            resampled = "patch_embed.proj.weight (192, 3, 14, 14) -> (192, 3, 16, 16)" in log
            assert resampled == (name in ("DINOv2", "EVA-02") and task != "cls"), (name, task)
