"""Sample pictures: image grids and 2-D scatter plots (with axes) as PNG files (Pillow)."""
import math
import numbers
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image, ImageDraw, ImageFont

# Scatter plot margins in pixels: room for the tick labels (left, bottom) and the title (top).
_LEFT, _BOTTOM, _TOP, _RIGHT = 56, 36, 30, 16
_DOT, _AXES, _TEXT = (31, 83, 160), (90, 90, 90), (0, 0, 0)


def image_grid(x: torch.Tensor, *, padding: int = 2, cols: Optional[int] = None,
               value_range: Tuple[float, float] = (-1.0, 1.0)) -> Image.Image:
    """Tiles images x [N, C, H, W] (C = 1 or 3) into one picture, row by row, `cols` to a row
    (default: a near-square grid); `value_range` (lo, hi) maps to black and white, values
    outside it are clipped."""
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images must have shape [N >= 1, 1 or 3, H, W], got "
                         f"{tuple(x.shape)}")
    n, c, h, w = x.shape
    if cols is not None and not (isinstance(cols, numbers.Integral)
                                 and not isinstance(cols, bool) and cols >= 1):
        raise ValueError(f"cols must be an integer >= 1 or None, got {cols!r}")
    cols = math.ceil(math.sqrt(n)) if cols is None else int(cols)
    lo, hi = (float(v) for v in value_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be finite (lo, hi) with lo < hi, got {value_range}")
    rows = math.ceil(n / cols)
    unit = ((x.double() - lo) / (hi - lo)).clamp(0, 1)
    pixels = (unit * 255).round().to(torch.uint8)
    canvas = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding,
                         dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        canvas[:, top:top + h, left:left + w] = pixels[i]
    array = canvas.permute(1, 2, 0).squeeze(-1).numpy()
    return Image.fromarray(array, mode="L" if c == 1 else "RGB")


def nice_ticks(extent: float, *, max_ticks: int = 7) -> List[float]:
    """Tick values in [-extent, extent]: multiples of 1, 2 or 5 x 10^k, at most `max_ticks`,
    always including 0."""
    if not extent > 0:
        raise ValueError(f"extent must be > 0, got {extent}")
    base = 10.0 ** math.floor(math.log10(2 * extent / (max_ticks - 1)))
    for mult in (1, 2, 5, 10):
        step = mult * base
        count = 2 * math.floor(extent / step) + 1
        if count <= max_ticks:
            break
    k = math.floor(extent / step + 1e-9)
    return [i * step for i in range(-k, k + 1)]


def scatter_plot(points: torch.Tensor, *, size: int = 512, extent: Optional[float] = None,
                 title: Optional[str] = None) -> Image.Image:
    """Draws 2-D points [N, 2] as dots in a square plot with labelled axes and a title.

    Args:
        points: [N, 2]; non-finite rows are left out.
        size: width of the square plotting area in pixels (the picture adds margins).
        extent: half-width shown on both axes; default 1.1 x the largest |coordinate|,
            ignoring the most extreme 0.5%.
        title: text above the plot, e.g. the training step.
    """
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape [N, 2], got {tuple(points.shape)}")
    p = points.detach().double().cpu()
    finite = p[torch.isfinite(p).all(1)]
    if extent is None:
        extent = 1.1 * float(finite.abs().max(1).values.quantile(0.995)) if len(finite) else 1.0
        extent = extent if extent > 0 else 1.0
    img = Image.new("RGB", (_LEFT + size + _RIGHT, _TOP + size + _BOTTOM), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def to_pixel(u: float, v: float):
        return (round(_LEFT + (u / extent + 1) * 0.5 * (size - 1)),
                round(_TOP + (1 - (v / extent + 1) * 0.5) * (size - 1)))

    for x, y in finite.tolist():
        if abs(x) <= extent and abs(y) <= extent:
            px, py = to_pixel(x, y)
            draw.ellipse((px - 1, py - 1, px + 1, py + 1), fill=_DOT)
    draw.rectangle((_LEFT, _TOP, _LEFT + size - 1, _TOP + size - 1), outline=_AXES)
    for tick in nice_ticks(extent):
        label = f"{tick:g}"
        px, _ = to_pixel(tick, 0.0)  # x axis: marks below the frame
        draw.line((px, _TOP + size - 1, px, _TOP + size + 4), fill=_AXES)
        draw.text((px, _TOP + size + 6), label, fill=_TEXT, font=font, anchor="mt")
        _, py = to_pixel(0.0, tick)  # y axis: marks left of the frame
        draw.line((_LEFT - 5, py, _LEFT, py), fill=_AXES)
        draw.text((_LEFT - 7, py), label, fill=_TEXT, font=font, anchor="rm")
    if title:
        draw.text((_LEFT + size / 2, _TOP / 2), title, fill=_TEXT, font=font, anchor="mm")
    return img


def has_picture(sample_shape) -> bool:
    """Whether samples of this per-sample shape have a picture: images [C, H, W] with 1 or 3
    channels, or 2-D points [2]."""
    shape = tuple(sample_shape)
    return (len(shape) == 3 and shape[0] in (1, 3)) or shape == (2,)


def samples_picture(x: torch.Tensor, *, title: Optional[str] = None,
                    cols: Optional[int] = None,
                    value_range: Tuple[float, float] = (-1.0, 1.0)) -> Optional[Image.Image]:
    """A grid of images [N, C, H, W] (`value_range` from black to white, `cols` per row, see
    `image_grid`) or a scatter plot of 2-D points [N, 2] titled `title`; None for other
    shapes, which have no picture (`has_picture`)."""
    if not has_picture(x.shape[1:]):
        return None
    if x.ndim == 4:
        return image_grid(x, cols=cols, value_range=value_range)
    return scatter_plot(x, title=title)


def save_samples_png(x: torch.Tensor, path: Path, *, title: Optional[str] = None,
                     cols: Optional[int] = None) -> Optional[Path]:
    """Writes `samples_picture(x, title=title, cols=cols)` as a PNG; returns None (and writes
    nothing) for shapes without a picture."""
    img = samples_picture(x, title=title, cols=cols)
    if img is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
