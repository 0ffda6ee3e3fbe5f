"""Sample pictures: image grids and 2-D scatter plots as PNG files (Pillow)."""
import math
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw


def image_grid(x: torch.Tensor, *, padding: int = 2) -> Image.Image:
    """Tiles images x [N, C, H, W] with values in [-1, 1] (C = 1 or 3) into one picture."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(x.shape)}")
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    canvas = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding,
                         dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        canvas[:, top:top + h, left:left + w] = pixels[i]
    array = canvas.permute(1, 2, 0).squeeze(-1).numpy()
    return Image.fromarray(array, mode="L" if c == 1 else "RGB")


def scatter_plot(points: torch.Tensor, *, size: int = 512,
                 extent: Optional[float] = None) -> Image.Image:
    """Draws 2-D points [N, 2] as dots on a white square; `extent` is the half-width shown
    (default: 1.1 x the largest |coordinate|, ignoring the most extreme 0.5%)."""
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape [N, 2], got {tuple(points.shape)}")
    p = points.detach().double().cpu()
    finite = p[torch.isfinite(p).all(1)]
    if extent is None:
        extent = 1.1 * float(finite.abs().max(1).values.quantile(0.995)) if len(finite) else 1.0
        extent = extent if extent > 0 else 1.0
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    pix = ((finite / extent + 1) * 0.5 * (size - 1)).round()
    for x, y in pix.tolist():
        draw.ellipse((x - 1, size - 1 - y - 1, x + 1, size - 1 - y + 1), fill=(31, 83, 160))
    return img


def save_samples_png(x: torch.Tensor, path: Path) -> Optional[Path]:
    """Writes images [N, C, H, W] as a grid or 2-D points [N, 2] as a scatter plot; other
    shapes have no picture and return None."""
    if x.ndim == 4 and x.shape[1] in (1, 3):
        img = image_grid(x)
    elif x.ndim == 2 and x.shape[1] == 2:
        img = scatter_plot(x)
    else:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
