"""Read ViT checkpoints from many sources into our `VisionTransformer`, and write them for detectron2 / mmseg.

Reading is timm-style, one module per job:
  reading   the file is loaded safely (`torch.load(weights_only=True)`; safetensors and Hugging Face folders
            too) and the state dict unwrapped (`model` / `state_dict` / `module.`);
  formats   its format is detected from the keys (`Format` records with priorities) and a small per-format
            filter maps the keys to ours;
  fitting   `fit_state_dict` adapts the result to the target model (pos-embed resampling, cls row, rel-pos
            tables) and `load_backbone(source, model)` / `load_backbone_state_dict(source, model)` load it;
  report    the `LoadReport`: loaded / kept / resized keys and the unused ones by what they are part of;
  writing   `save_backbone`, `to_detectron2`, `to_mmseg`, `convert_checkpoint`.

Supported formats (`LoadReport.format`; `formats.registered_formats()` lists them with their labels):
  mae_transfer_pretrain   our `MaskedAutoencoder` checkpoint (`encoder.*` + decoder)
  mae_transfer_backbone   our encoder-only export (`save_backbone`)
  mae_official_pretrain   facebookresearch/mae pretraining (`decoder_*`, `mask_token` dropped)
  mae_official_finetune   facebookresearch/mae fine-tuned (`fc_norm`, `head`)
  timm / deit             timm ViT state dicts; DeiT (`dist_token`, `head_dist` dropped)
  detectron2_vit          detectron2's `ViT` module state dict (no cls token, final norm or head)
  hf_vitmae / hf_vit      Hugging Face `ViTMAEForPreTraining` / `ViTModel` / `ViTFor...` (hub and v5 layouts)
  detectron2_vitdet       detectron2 ViTDet (`backbone.net.*`, rel-pos tables; also our detectron2 files)
  mae_transfer_mmseg      our backbone inside an mmseg model (`backbone.<our keys>`, `to_mmseg` files)
  prefixed_vit            our / timm keys under any other prefix (e.g. an adapter's `backbone.net.vit.`)
  mmseg_mae               mmseg `MAE` / `BEiT` (`layers.i.ln1`, `ffn`; layer scale, BEiT rel-pos bias tables)
  mmseg_vit               mmseg `VisionTransformer` (`attn.attn.in_proj_weight`)
Backbone families (`checkpoint.families`; timm files of every family go through `timm`):
  dinov2 / hf_dinov2      facebookresearch/dinov2 (registers, `ls1.gamma`, `w12`), transformers Dinov2Model
  openai_clip / hf_clip   OpenAI CLIP / open_clip `visual.*`, transformers CLIPVisionModel / CLIPModel (text unused)
  clip_text_only          a CLIP text tower alone: an error
  beit / eva02            unilm BEiT / BEiTv2 and timm Beit; baaivision EVA-02 and timm Eva
`hub` resolves `timm:<model>` / `hf-hub:<repo>` names through huggingface_hub's cache.
"""
from mae_transfer.checkpoint.fitting import Source, fit_state_dict, load_backbone, load_backbone_state_dict
from mae_transfer.checkpoint.formats import (
                                             BACKBONE_FORMAT,
                                             DETECTRON2_PREFIX,
                                             MMSEG_PREFIX,
                                             Format,
                                             StateDict,
                                             convert_state_dict,
                                             detect_format,
                                             match_format,
                                             register_format,
                                             registered_formats,
                                             unregister_format,
)
from mae_transfer.checkpoint.reading import needs_pickle_error, read_checkpoint, unwrap_state_dict
from mae_transfer.checkpoint.report import LoadReport
from mae_transfer.checkpoint.writing import WRITERS, convert_checkpoint, save_backbone, to_detectron2, to_mmseg

__all__ = [
    "BACKBONE_FORMAT", "DETECTRON2_PREFIX", "MMSEG_PREFIX", "WRITERS", "Format", "LoadReport", "Source", "StateDict",
    "convert_checkpoint", "convert_state_dict", "detect_format", "fit_state_dict", "load_backbone",
    "load_backbone_state_dict", "match_format", "needs_pickle_error", "read_checkpoint", "register_format",
    "registered_formats", "save_backbone", "to_detectron2", "to_mmseg", "unregister_format", "unwrap_state_dict",
]
