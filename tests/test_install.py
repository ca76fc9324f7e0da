"""Regression tests of the dependency floor: the real detectron2 / MMSeg / mmengine stack works here."""
from __future__ import annotations

import configparser
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tests.conftest import REPO_ROOT

SUPPORTED_PYTHONS = ("3.10", "3.11", "3.12", "3.13")  # newest last; scripts/setup_env.sh, setup.cfg agree
REQUIREMENTS = REPO_ROOT / "requirements"


def _pins(lines: list[str], python: str) -> dict[str, str]:
    """name -> version of the `name==version[; marker]` lines that apply to Python `python` (X.Y)."""
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                (spec,) = req.specifier
                assert spec.operator == "==", line
                assert req.name.lower() not in pins, f"{req.name} pinned twice for Python {python}"
                pins[req.name.lower()] = spec.version
    return pins


def stack_pins(python: str) -> dict[str, str]:
    """The top-level pins of requirements/stack.txt for Python `python` (X.Y)."""
    return _pins((REQUIREMENTS / "stack.txt").read_text().splitlines(), python)


def lock_file_for(python: str) -> Path:
    """The full lock scripts/setup_env.sh uses for Python `python`: lock-pyX.Y.txt where pins differ, else lock.txt."""
    own = REQUIREMENTS / f"lock-py{python}.txt"
    return own if own.is_file() else REQUIREMENTS / "lock.txt"


def test_setup_cfg_pins_match_requirements_for_every_python() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    cfg_lines = cfg["options"]["install_requires"].splitlines()
    for python in SUPPORTED_PYTHONS:
        from_txt = stack_pins(python)
        assert _pins(cfg_lines, python) == from_txt, python
        lock_path = lock_file_for(python)
        lock = _pins(lock_path.read_text().splitlines(), python)
        for name, version in from_txt.items():
            if name != "setuptools":  # pip freeze leaves it out
                found = lock.get(name)
                assert found == version, f"Python {python}: stack.txt {name}=={version}, {lock_path.name}: {found}"
    # A per-version lock exists only for a supported version, and only where some pin differs from lock.txt.
    shared = _pins((REQUIREMENTS / "lock.txt").read_text().splitlines(), "3.11")
    for path in REQUIREMENTS.glob("lock-py*.txt"):
        python = path.stem.removeprefix("lock-py")
        assert python in SUPPORTED_PYTHONS, path
        assert _pins(path.read_text().splitlines(), python) != shared, f"{path.name} is the same as lock.txt"


def test_supported_pythons_agree_everywhere() -> None:
    """setup.cfg's python_requires and classifiers, and scripts/setup_env.sh, name the versions we test."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    requires = SpecifierSet(cfg["options"]["python_requires"])
    candidates = [f"3.{minor}" for minor in range(6, 16)]
    assert [v for v in candidates if f"{v}.0" in requires] == list(SUPPORTED_PYTHONS)
    classifiers = [c.strip() for c in cfg["metadata"]["classifiers"].splitlines()]
    versions = r"Programming Language :: Python :: (3\.\d+)"
    listed = [m.group(1) for m in (re.fullmatch(versions, c) for c in classifiers) if m]
    assert listed == list(SUPPORTED_PYTHONS)
    script = (REPO_ROOT / "scripts" / "setup_env.sh").read_text()
    assert re.search(r"^SUPPORTED=\((.*)\)$", script, re.M).group(1).split() == list(SUPPORTED_PYTHONS)


def installed_versions_not_pinned(python: str) -> dict[str, tuple[str, str]]:
    """name -> (installed, pinned) for every stack.txt pin and lock entry of Python `python` installed otherwise."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "missing"

    lock = _pins(lock_file_for(python).read_text().splitlines(), python)
    wrong = {name: (installed(name), pinned) for name, pinned in {**lock, **stack_pins(python)}.items()
             if installed(name) != pinned}
    if installed("sal-detectron2") != "0.7.2":
        wrong["sal-detectron2"] = (installed("sal-detectron2"), "0.7.2")
    return wrong


def test_installed_versions_match_the_lock_of_this_python() -> None:
    python = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert not installed_versions_not_pinned(python), lock_file_for(python).name


def test_mmcv_ext_stand_in_fails_only_when_called() -> None:
    import mmcv
    import mmseg.models  # noqa: F401  imports mmcv.ops at import time
    from mmcv.ops import point_sample  # noqa: F401

    from backbones.compat import CompiledOpUnavailableError

    ext = sys.modules["mmcv._ext"]
    assert getattr(ext, "MAE_TRANSFER_STAND_IN", False)
    with pytest.raises(AttributeError):
        ext.__wrapped__  # noqa: B018  dunder probes must fail like a normal module
    # a head that needs a compiled op builds, but fails clearly on use
    from mmcv.ops import RoIAlign

    roi_align = RoIAlign(output_size=2)
    with pytest.raises(CompiledOpUnavailableError, match="needs the full compiled mmcv"):
        roi_align(torch.rand(1, 1, 8, 8), torch.tensor([[0.0, 0, 0, 4, 4]]))
    assert mmcv.__version__ == "2.1.0"


def test_detectron2_runs_without_compiled_ops() -> None:
    from mae_transfer.detection.compiled_ops import detectron2_has_compiled_ops

    if detectron2_has_compiled_ops():  # the cp310 wheel on 3.10, where its _C loads: tests/test_smoke.py checks it
        pytest.skip("detectron2._C loads with this Python: no fallback in use")
    from detectron2.evaluation import coco_evaluation
    from pycocotools.cocoeval import COCOeval

    # COCOEvaluator silently uses pycocotools' COCOeval when _C is missing
    assert coco_evaluation.COCOeval_opt is COCOeval
    importlib.import_module("detectron2.modeling.backbone.vit")


def _fruits_nuts_dataset(root: Path, name: str) -> str:
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances

    if name not in DatasetCatalog.list():
        register_coco_instances(name, {}, str(root / "trainval.json"), str(root / "images"))
    return name


def test_detectron2_model_zoo_mask_rcnn_train_and_infer(fruits_nuts: Path) -> None:
    """detectron2's own Mask R-CNN (model-zoo LazyConfig), one CPU train step + inference on a real photo."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data import transforms as T

    torch.manual_seed(0)
    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py")
    cfg.model.roi_heads.num_classes = 3
    cfg.model.roi_heads.batch_size_per_image = 64
    model = instantiate(cfg.model).train()

    name = _fruits_nuts_dataset(fruits_nuts, "fruits_nuts_install_test")
    dicts = DatasetCatalog.get(name)
    assert len(dicts) == 18 and min(d["image_id"] for d in dicts) == 0
    mapper = DatasetMapper(is_train=True, augmentations=[T.ResizeShortestEdge(256, max_size=352)],
                           image_format="BGR", use_instance_mask=True)
    batch = [mapper(dicts[0])]
    assert len(batch[0]["instances"]) > 0

    from detectron2.utils.events import EventStorage

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    with EventStorage(0):  # detectron2's training-time logging context
        losses = model(batch)
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 600, "width": 800}])[0]["instances"]
    assert out.image_size == (600, 800)
    assert out.has("pred_boxes") and out.has("scores")


def test_mmseg_uperhead_train_step_and_iou_metric(ade20k_sample: Path) -> None:
    """An mmseg UPerHead model built through the registry: one train step, then IoUMetric on a real image."""
    from mmengine.config import ConfigDict
    from mmengine.optim import build_optim_wrapper
    from mmseg.datasets import ADE20KDataset
    from mmseg.evaluation import IoUMetric
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    norm_cfg = dict(type="BN", requires_grad=True)
    model = MODELS.build(dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0,
                               seg_pad_val=255, size=(128, 128)),
        backbone=dict(type="VisionTransformer", img_size=(128, 128), embed_dims=64, num_layers=4,
                      num_heads=2, out_indices=(0, 1, 2, 3)),
        neck=dict(type="MultiLevelNeck", in_channels=[64] * 4, out_channels=64, scales=[4, 2, 1, 0.5]),
        decode_head=dict(type="UPerHead", in_channels=[64] * 4, in_index=[0, 1, 2, 3],
                         pool_scales=(1, 2, 3, 6), channels=32, dropout_ratio=0.1, num_classes=150,
                         norm_cfg=norm_cfg, align_corners=False,
                         loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)),
        train_cfg=ConfigDict(), test_cfg=ConfigDict(mode="whole"),
    ))
    root = ade20k_sample / "ADEChallengeData2016"

    def batch(pipeline: list[dict]) -> dict:
        dataset = ADE20KDataset(data_root=str(root), pipeline=pipeline, data_prefix=dict(
            img_path="images/validation", seg_map_path="annotations/validation"))
        assert len(dataset) == 3 and len(dataset.metainfo["classes"]) == 150
        samples = [dataset[0], dataset[1]]  # batch of 2: BatchNorm in the pooling branch needs > 1 value
        return dict(inputs=[s["inputs"] for s in samples], data_samples=[s["data_samples"] for s in samples])

    load = dict(type="LoadAnnotations", reduce_zero_label=True)
    resize = dict(type="Resize", scale=(128, 128), keep_ratio=False)
    train_data = batch([dict(type="LoadImageFromFile"), load, resize, dict(type="PackSegInputs")])
    # test pipeline as in mmseg configs: labels stay at full size, predictions are resized back to them
    test_data = batch([dict(type="LoadImageFromFile"), resize, load, dict(type="PackSegInputs")])

    optim_wrapper = build_optim_wrapper(model, dict(optimizer=dict(type="AdamW", lr=1e-4)))
    model.train()
    log_vars = model.train_step(train_data, optim_wrapper)
    assert torch.isfinite(log_vars["loss"]) and "decode.loss_ce" in log_vars

    model.eval()
    outputs = model.val_step(test_data)
    assert outputs[0].pred_sem_seg.data.shape[-2:] == outputs[0].gt_sem_seg.data.shape[-2:]
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=ADE20KDataset.METAINFO["classes"])
    metric.process(test_data, [o.to_dict() for o in outputs])
    results = metric.compute_metrics(metric.results)
    assert 0.0 <= results["mIoU"] <= 100.0 and "aAcc" in results


def test_mmengine_runner_checkpoint_save_and_resume(tmp_path: Path) -> None:
    """mmengine's Runner saves and resumes under torch 2.14 through our safe reader (as tools/train_seg.py uses it)."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    from mae_transfer.segmentation.checkpoint import read_mmengine_checkpoint, use_safe_mmengine_loading

    use_safe_mmengine_loading()

    class Regressor(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, inputs, targets, mode="loss"):  # noqa: ANN001, ANN201
            pred = self.linear(inputs)  # default_collate already stacked the batch
            if mode == "loss":
                return {"loss": ((pred - targets) ** 2).mean()}
            return pred

    g = torch.Generator().manual_seed(0)
    samples = [dict(inputs=torch.randn(4, generator=g), targets=torch.randn(1, generator=g)) for _ in range(16)]

    def make_runner(max_iters: int, resume: bool) -> Runner:
        return Runner(
            model=Regressor(), work_dir=str(tmp_path),
            train_dataloader=dict(dataset=samples, sampler=dict(type="DefaultSampler", shuffle=False),
                                  batch_size=4, collate_fn=dict(type="default_collate")),
            train_cfg=dict(by_epoch=False, max_iters=max_iters),
            optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=4, by_epoch=False)),
            resume=resume, randomness=dict(seed=0), default_scope="mmengine",
        )

    first = make_runner(4, resume=False)
    first.train()
    assert (tmp_path / "iter_4.pth").is_file()
    saved = first.model.linear.weight.detach().clone()

    second = make_runner(8, resume=True)
    second.train()
    assert second.iter == 8
    resumed = read_mmengine_checkpoint(tmp_path / "iter_4.pth")
    assert torch.equal(resumed["state_dict"]["linear.weight"], saved)
    assert resumed["meta"]["iter"] == 4
