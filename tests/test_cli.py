"""One flag vocabulary across the tools: `--output-dir` (run folder), `--pictures-dir` (picture folder); the earlier
spellings were removed (CHANGELOG.md) and are refused like any unknown flag."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mae_transfer.cli import run_cli
from mae_transfer.errors import MaeTransferError

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tool, common, old, current", [
    ("train_det", ["--config", "c.py", "--infer", "a.jpg"], ["--output", "pics"], ["--pictures-dir", "pics"]),
    ("train_seg", ["--config", "c.py", "--eval-only"], ["--save-pictures", "pics"], ["--pictures-dir", "pics"]),
    ("train_seg", ["--config", "c.py", "--resume"], ["--work-dir", "run"], ["--output-dir", "run"]),
    ("finetune_cls", ["--config", "c.py"], ["--eval", "ft.pth"], ["--eval-only", "ft.pth"]),
])
def test_earlier_spelling_is_refused_the_current_one_parses(tool, common, old, current, capsys):
    parse_args = _tool(tool).parse_args
    parse_args([*common, *current])
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*common, *old])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {old[0]}" in capsys.readouterr().err


def test_earlier_spelling_before_a_user_error(tmp_path, capsys):
    """coco_to_imagefolder's removed `--out`: argparse's usage error (exit 2), before the tool looks at its input;
    with --output-dir, the tool's own one error line (exit 2)."""
    missing = tmp_path / "missing.json"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(_tool("coco_to_imagefolder").main,
                ["--json", str(missing), "--images", str(tmp_path), "--out", str(tmp_path / "crops")])
    assert exit_info.value.code == 2 and "--out" in capsys.readouterr().err
    rc = run_cli(_tool("coco_to_imagefolder").main,
                 ["--json", str(missing), "--images", str(tmp_path), "--output-dir", str(tmp_path / "crops")])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [f"error: annotation file not found: {missing}"]


def test_current_spellings_are_the_documented_ones(capsys):
    """--help shows the current flags and hides the earlier ones."""
    for tool, shown, hidden in (("train_det", "--pictures-dir", "--output "), ("train_seg", "--pictures-dir",
                                                                                "--save-pictures")):
        with pytest.raises(SystemExit):
            _tool(tool).parse_args(["--help"])
        out = capsys.readouterr().out
        assert shown in out and "--output-dir" in out and hidden not in out, out


@pytest.mark.parametrize("tool, common, own, where", [
    ("train_det", ["--config", "c.py"], ["train.init_checkpoint=x.pth"], ("opts", "train.init_checkpoint={}")),
    ("train_seg", ["--config", "c.py"], ["--init-checkpoint", "x.pth"], ("init_checkpoint", "{}")),
    ("train_seg", ["--config", "c.py"], ["--cfg-options", "model.backbone.init_checkpoint=x.pth"], None),
    ("finetune_cls", ["--config", "c.py"], ["--finetune", "x.pth"], ("finetune", "{}")),
    ("finetune_cls", ["--config", "c.py"], ["finetune=x.pth"], None),
])
def test_backbone_is_one_flag_for_the_fine_tuning_tools(tool, common, own, where):
    """`--backbone NAME` lands where each tool itself reads the weights; with the tool's own spelling too, it is one
    error naming both."""
    parse_args = _tool(tool).parse_args
    name = "timm:vit_base_patch14_dinov2.lvd142m"
    if where is not None:
        args = parse_args([*common, "--backbone", name])
        attr, form = where
        value = getattr(args, attr)
        assert (form.format(name) in value) if isinstance(value, list) else value == form.format(name)
    with pytest.raises(MaeTransferError, match=r"--backbone and .* both name the backbone weights"):
        parse_args([*common, "--backbone", name, *own])


REPO = TOOLS.parent


@pytest.mark.parametrize("tool, args", [
    ("train_det", ["--config", str(REPO / "configs/coco_mask_rcnn_vit_tiny_cpu.py")]),
    ("train_seg", ["--config", str(REPO / "configs/camvid_upernet_vit_tiny_cpu.py")]),
    ("pretrain", ["--config", str(REPO / "configs/mae_pretrain_vit_tiny_cpu.py"), "--data", "images"]),
    ("finetune_cls", ["--config", str(REPO / "configs/cls_finetune_vit_tiny_cpu.py"), "--data", "crops"]),
    ("study", ["--spec", str(REPO / "configs/studies/cpu_shared_data.py")]),
    ("coco_to_imagefolder", ["--json", "instances.json", "--images", "images"]),
    ("benchmark", []),
])
@pytest.mark.parametrize("under", [False, True])
def test_output_dir_naming_a_file_is_one_line_before_anything_runs(tool, args, under, tmp_path, capsys):
    """--output-dir FILE (or FILE/sub): one error line naming the file, exit 2, the file untouched."""
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    out = existing / "run" if under else existing
    assert run_cli(_tool(tool).main, [*args, "--output-dir", str(out)]) == 2
    named = "is" if not under else f"lies under {existing}, which is"
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: --output-dir {out}: {named} an existing file; "
                                                        "expected a folder")
    assert existing.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("tool, config, override, message", [
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "lr=abc", "config key 'lr' must be a number or None, got 'abc'"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "mask_ratio=abc",
     "config key 'mask_ratio' must be a number, got 'abc'"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "betas=abc", "config key 'betas' must be a list, got 'abc'"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "betas=(0.9,)",
     "config key 'betas' must be two numbers, e.g. (0.9, 0.95), got (0.9,)"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "betas=(0.9,1.5)",
     "config key 'betas' must be in [0, 1), got (0.9, 1.5)"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "mask_ratio=1.0",
     "config key 'mask_ratio' must be in [0, 1), got 1.0"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "warmup_epochs=-3",
     "config key 'warmup_epochs' must be in [0, inf), got -3"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "lr=0", "config key 'lr' must be in (0, inf), got 0"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "epochs=2.5", "config key 'epochs' must be an integer, got 2.5"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "progress=1", "config key 'progress' must be True or False, got 1"),
    ("pretrain", "mae_pretrain_vit_tiny_cpu.py", "encoder_overrides.depth=abc",
     "config key 'encoder_overrides.depth' must be an integer, got 'abc'"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "encoder_overrides.dpeth=2",
     "encoder_overrides: unknown key(s) 'dpeth'; valid keys: act_layer, class_token, depth, drop_path_rate, "
     "embed_dim, final_norm, global_block_indexes, global_pool, grad_checkpointing, img_size, in_chans, init_values, "
     "mlp_layer, mlp_ratio, norm_eps, num_classes, num_heads, patch_size, pre_norm, qkv_bias, ref_feat_shape, "
     "reg_tokens, rel_pos_input_size, resample_patch_embed, scale_mlp, use_rel_pos, use_rel_pos_bias, "
     "use_rot_pos_emb, window_size"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "lr=abc", "config key 'lr' must be a number or None, got 'abc'"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "layer_decay=abc",
     "config key 'layer_decay' must be a number, got 'abc'"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "mixup=abc", "config key 'mixup' must be a number, got 'abc'"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "smoothing=abc",
     "config key 'smoothing' must be a number, got 'abc'"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "drop_path=abc",
     "config key 'drop_path' must be a number, got 'abc'"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "drop_path=1", "config key 'drop_path' must be in [0, 1), got 1"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "layer_decay=0",
     "config key 'layer_decay' must be in (0, 1], got 0"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "warmup_epochs=-3",
     "config key 'warmup_epochs' must be in [0, inf), got -3"),
    ("finetune_cls", "cls_finetune_vit_tiny_cpu.py", "mixup=-0.5", "config key 'mixup' must be in [0, inf), got -0.5"),
])
def test_plain_config_values_of_the_wrong_kind_or_range_are_one_line(tool, config, override, message, tmp_path,
                                                                     capsys):
    """Every key of the pretraining / classification configs is checked like the detectron2 / mmengine overrides:
    its kind (a float key takes an integer too), and a range where other values make no sense; one line, exit 2,
    nothing written."""
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out"
    rc = run_cli(_tool(tool).main, ["--config", str(REPO / "configs" / config), "--data", str(data),
                                    "--output-dir", str(out), override])
    assert rc == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {message}"
    assert not out.exists()


def test_plain_config_kinds_accept_the_documented_values() -> None:
    """The shipped configs pass, and so do the values a key's comment allows beside its default's kind: an integer
    for a float, None for an optional part, a fraction of a warm-up epoch."""
    from mae_transfer import classification, pretraining
    from mae_transfer.config import load_config

    given = ["data_path='d'", "output_dir='o'"]
    for config in sorted((REPO / "configs").glob("*pretrain_vit_*.py")):
        cfg = pretraining.resolve_config(load_config(config, given))
        assert isinstance(cfg["betas"], tuple)
    cfg = pretraining.resolve_config(load_config(REPO / "configs/mae_pretrain_vit_tiny_cpu.py",
                                                 [*given, "lr=None", "mask_ratio=0", "warmup_epochs=0.5", "blr=1"]))
    assert (cfg["lr"], cfg["mask_ratio"], cfg["warmup_epochs"], cfg["blr"]) == (None, 0, 0.5, 1)
    for config in sorted((REPO / "configs").glob("cls_*_vit_*.py")):
        classification.resolve_config(load_config(config, given))
    cfg = classification.resolve_config(load_config(
        REPO / "configs/cls_finetune_vit_tiny_cpu.py",
        [*given, "auto_augment=None", "cutmix_minmax=(0.2,0.8)", "layer_decay=1", "mixup=0", "smoothing=0"]))
    assert (cfg["auto_augment"], cfg["cutmix_minmax"], cfg["layer_decay"]) == (None, (0.2, 0.8), 1)


@pytest.mark.parametrize("tool, args, message", [
    ("train_det", ["--config", str(REPO / "configs/coco_mask_rcnn_vit_tiny_cpu.py"), "--eval-only"],
     "--eval-only: no weights to use: no checkpoint in {out} (no last_checkpoint file) and train.init_checkpoint is "
     "empty; pass --eval-only CKPT, the --output-dir of a training run, or train.init_checkpoint=CKPT"),
    ("train_det", ["--config", str(REPO / "configs/coco_mask_rcnn_vit_tiny_cpu.py"), "--infer", "a.jpg"],
     "--infer: no weights to use: no checkpoint in {out} (no last_checkpoint file) and train.init_checkpoint is "
     "empty; pass the --output-dir of a training run, or train.init_checkpoint=CKPT"),
    ("train_det", ["--config", str(REPO / "configs/coco_mask_rcnn_vit_tiny_cpu.py"), "--eval-only", "{out}/m.pth"],
     "--eval-only: checkpoint not found: {out}/m.pth"),
    ("train_seg", ["--config", str(REPO / "configs/camvid_upernet_vit_tiny_cpu.py"), "--eval-only"],
     "--eval-only: no checkpoint in {out} (no last_checkpoint file); pass --eval-only CKPT"),
    ("finetune_cls", ["--config", str(REPO / "configs/cls_finetune_vit_tiny_cpu.py"), "--data", "{out}",
                      "--eval-only"],
     "--eval-only: no checkpoint in {out} (checkpoint_last.pth not found); pass --eval-only CKPT"),
    ("finetune_cls", ["--config", str(REPO / "configs/cls_finetune_vit_tiny_cpu.py"), "--data", "{out}",
                      "--eval-only", "{out}/m.pth"],
     "--eval-only: checkpoint not found: {out}/m.pth"),
])
def test_eval_only_without_a_checkpoint_is_one_line_in_every_tool(tool, args, message, tmp_path, capsys):
    """--eval-only in an output folder without a checkpoint (and no initial weights) evaluates nothing: one error
    line, exit 2, nothing written (detection used to evaluate a randomly initialised detector)."""
    out = tmp_path / "run"
    out.mkdir()
    rc = run_cli(_tool(tool).main, [*(a.replace("{out}", str(out)) for a in args), "--output-dir", str(out)])
    assert rc == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: " + message.replace("{out}", str(out))
    assert list(out.iterdir()) == []
