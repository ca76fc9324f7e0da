"""Pictures a person reads: panels side by side under titles, and row labels beside a grid of images.

Only PIL and numpy (the MAE core uses it for its reconstruction grid). Text is drawn with PIL's built-in
scalable font, so it has the requested pixel size on any machine.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def wrap(text: str, width: int, face: ImageFont.ImageFont) -> list[str]:
    """Greedy word wrap of `text` into lines at most `width` pixels wide (a longer single word keeps its line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and face.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def _as_image(panel: np.ndarray | Image.Image) -> Image.Image:
    return panel.convert("RGB") if isinstance(panel, Image.Image) else Image.fromarray(np.asarray(panel)).convert("RGB")


def side_by_side(panels: Sequence[np.ndarray | Image.Image], titles: Sequence[str], font_size: int = 20,
                 gap: int = 16, margin: int = 8) -> Image.Image:
    """Panels (RGB arrays or images) in one row on white, each under its title (wrapped to the panel's width)."""
    images = [_as_image(p) for p in panels]
    face = font(font_size)
    line_h = int(font_size * 1.3)
    wrapped = [wrap(t, im.width, face) for t, im in zip(titles, images, strict=False)]
    title_h = max(len(lines) for lines in wrapped) * line_h + margin
    width = sum(im.width for im in images) + gap * (len(images) - 1) + 2 * margin
    height = title_h + max(im.height for im in images) + 2 * margin
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = margin
    for im, lines in zip(images, wrapped, strict=False):
        for i, line in enumerate(lines):
            draw.text((x, margin + i * line_h), line, fill=TEXT, font=face)
        canvas.paste(im, (x, margin + title_h))
        x += im.width + gap
    return canvas


def label_rows(image: Image.Image, labels: Sequence[str], row_height: int, padding: int = 0,
               font_size: int = 16) -> Image.Image:
    """`image` (a grid of rows `row_height` high, `padding` before each row) with `labels` in a white margin on
    the left, each label vertically centred on its row."""
    face = font(font_size)
    margin = int(max(face.getlength(label) for label in labels)) + 2 * max(6, font_size // 2)
    canvas = Image.new("RGB", (image.width + margin, image.height), BACKGROUND)
    canvas.paste(image.convert("RGB"), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, label in enumerate(labels):
        centre = padding + i * (row_height + padding) + row_height / 2
        draw.text((max(6, font_size // 2), centre), label, fill=TEXT, font=face, anchor="lm")
    return canvas


def with_legend(image: Image.Image, entries: Sequence[tuple[str, Sequence[int]]], font_size: int = 18,
                margin: int = 8) -> Image.Image:
    """`image` above a legend: one colour swatch + name per entry, in rows that wrap at the image's width."""
    if not entries:
        return image
    face = font(font_size)
    box, space = font_size, font_size
    items = [(name, tuple(int(c) for c in color), box + 6 + int(face.getlength(name))) for name, color in entries]
    rows: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    used = 0
    for item in items:
        if rows[-1] and used + item[2] > image.width - 2 * margin:
            rows.append([])
            used = 0
        rows[-1].append(item)
        used += item[2] + space
    line_h = int(font_size * 1.4)
    canvas = Image.new("RGB", (image.width, image.height + len(rows) * line_h + margin), BACKGROUND)
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        x, y = margin, image.height + r * line_h + margin // 2
        for name, color, width in row:
            draw.rectangle((x, y + 2, x + box, y + 2 + box), fill=color, outline=TEXT)
            draw.text((x + box + 6, y + 2 + box / 2), name, fill=TEXT, font=face, anchor="lm")
            x += width + space
    return canvas
