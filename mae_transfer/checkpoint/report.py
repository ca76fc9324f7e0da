"""The load report: what happened to every key of an imported checkpoint, in words (logs, convert_checkpoint)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# What an unused checkpoint key is part of, by its name (as in the file, or in our naming after conversion).
_UNUSED_PARTS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), label) for p, label in (
    (r"^(vit\.)?(decoder[._]|mask_token$)", "MAE decoder"),
    (r"^backbone\.(simfp_|fpn_|top_block|bottom_up)", "feature pyramid"),
    (r"^neck\.", "feature pyramid (neck)"),
    (r"^proposal_generator\.", "region proposal network"),
    (r"^roi_heads\.", "box / mask heads"),
    (r"^decode_head\.", "segmentation head"),
    (r"^auxiliary_head\.", "auxiliary segmentation head"),
    (r"^(dist_token$|head_dist\.)", "DeiT distillation token and head"),
    (r"^(fc_norm|head)\.", "classifier (fc_norm / head)"),
    (r"^(vit\.)?pooler\.", "pooler"),
    (r"^norm\.", "final norm"),
))


def _unused_part(key: str) -> str:
    return next((label for pattern, label in _UNUSED_PARTS if pattern.match(key)), "other keys")


def _key_names(keys: list[str], limit: int = 8) -> str:
    """Keys listed compactly: block indices collapsed (`blocks.*.attn.rel_pos_h (12)`), or whole prefixes."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", k), []).append(k)
    if len(groups) > limit:
        groups = {}
        for k in keys:
            groups.setdefault(k.split(".", 1)[0] + ".*" if "." in k else k, []).append(k)
    items = [g[0] if len(g) == 1 else f"{p} ({len(g)})" for p, g in groups.items()]
    return ", ".join(items[:limit]) + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def _count(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


@dataclass
class LoadReport:
    """What happened to every key: shown in logs and by tools/convert_checkpoint.py."""

    format: str
    source: str = "<dict>"
    label: str = ""  # what the file is, in words (the format's label)
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model keys not in the checkpoint: model init kept
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys not used (decoder, heads, ...)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def unused_parts(self) -> dict[str, list[str]]:
        """The checkpoint keys this backbone does not use, by what they are part of (MAE decoder, feature
        pyramid, classifier, ...), in order of first appearance."""
        parts: dict[str, list[str]] = {}
        for key in self.unexpected:
            parts.setdefault(_unused_part(key), []).append(key)
        return parts

    def __str__(self) -> str:
        lines = [f"checkpoint {self.source}: format {self.format}" + (f" ({self.label})" if self.label else ""),
                 f"  loaded: {len(self.loaded)} tensors"]
        if self.resized:
            lines.append("  resized: " + ", ".join(
                f"{k} {tuple(a)} -> {tuple(b)}" for k, (a, b) in list(self.resized.items())[:8])
                + (f", ... (+{len(self.resized) - 8})" if len(self.resized) > 8 else ""))
        if self.missing:
            lines.append(f"  not in the checkpoint, model init kept: {_count(len(self.missing))} "
                         f"({_key_names(self.missing)})")
        for part, keys in self.unused_parts().items():
            names = f" ({_key_names(keys)})" if part == "other keys" else ""
            lines.append(f"  not used by this backbone: {part}, {_count(len(keys))}{names}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
