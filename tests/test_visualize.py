"""Sample pictures (score_sde/visualize.py): image grids and 2-D scatter plots with axes."""
import dataclasses

import numpy as np
import pytest
import torch

from score_sde.visualize import (image_grid, nice_ticks, samples_picture, save_samples_png,
                                 scatter_plot)


@pytest.mark.parametrize("extent, ticks", [
    (5.3, [-4, -2, 0, 2, 4]),
    (1.0, [-1, -0.5, 0, 0.5, 1]),
    (0.37, [-0.3, -0.2, -0.1, 0, 0.1, 0.2, 0.3]),
    (120, [-100, -50, 0, 50, 100]),
    (3.0, [-3, -2, -1, 0, 1, 2, 3]),
])
def test_nice_ticks(extent, ticks):
    assert nice_ticks(extent) == pytest.approx(ticks)


def test_nice_ticks_rejects_an_empty_range():
    with pytest.raises(ValueError, match="extent must be > 0"):
        nice_ticks(0.0)


def test_image_grid_tiles_the_images_in_rows():
    x = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])  # black, gray, white
    img = image_grid(x, padding=2)
    assert img.size == (2 + 2 * 6, 2 + 2 * 6) and img.mode == "L"  # 2 x 2 cells
    assert [img.getpixel((2 + 6 * c, 2 + 6 * r)) for r, c in ((0, 0), (0, 1), (1, 0))] == \
        [0, 128, 255]
    assert img.getpixel((8, 8)) == 0  # the empty fourth cell
    with pytest.raises(ValueError, match="images must have shape"):
        image_grid(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"images must have shape \[N >= 1.*got \(0, 1, 4, 4\)"):
        image_grid(torch.zeros(0, 1, 4, 4))


def test_image_grid_maps_its_value_range_to_black_and_white():
    # Arrays of images in their own units, e.g. [0, 1] or [0, 255]: lo black, hi white.
    for lo, hi in ((0.0, 1.0), (0.0, 255.0), (-3.0, 5.0)):
        x = torch.stack([torch.full((1, 4, 4), v) for v in (lo, (lo + hi) / 2, hi, hi + 1)])
        img = image_grid(x, padding=2, value_range=(lo, hi))
        assert [img.getpixel((2 + 6 * c, 2 + 6 * r)) for r, c in ((0, 0), (0, 1), (1, 0),
                                                                  (1, 1))] == [0, 128, 255, 255]
    for bad in ((1.0, 1.0), (2.0, 1.0), (0.0, float("inf"))):
        with pytest.raises(ValueError, match=r"value_range must be finite \(lo, hi\) with lo < hi"):
            image_grid(x, value_range=bad)


def test_sample_grids_of_unscaled_image_arrays_span_the_training_data(tmp_path):
    from score_sde.trainer import Trainer
    from tests.test_train import _toy_cfg

    trainer = Trainer(_toy_cfg(), str(tmp_path))
    assert trainer.info.data_range is None  # data used as is: its own range
    trainer.train_x = torch.tensor([[0.0, 2.0], [255.0, 7.0]])
    assert trainer.picture_range() == (0.0, 255.0)
    trainer.train_x = torch.full((3, 2), 4.0)  # constant data: a range around it
    assert trainer.picture_range() == (3.0, 5.0)
    trainer.info = dataclasses.replace(trainer.info, data_range=(0.0, 1.0))  # 8-bit data
    assert trainer.picture_range() == (0.0, 1.0)


def test_image_grid_columns():
    x = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    assert image_grid(x, padding=2, cols=np.int64(3)).size == (2 + 3 * 6, 2 + 6)  # one row
    assert image_grid(x, padding=2, cols=1).size == (2 + 6, 2 + 3 * 6)  # one column
    for bad in (0, True, 1.5, "2"):
        with pytest.raises(ValueError, match="cols must be an integer >= 1 or None"):
            image_grid(x, cols=bad)


def test_scatter_plot_has_a_frame_ticks_title_and_the_points_where_they_belong():
    size = 200
    points = torch.tensor([[1.0, 1.0], [-1.0, -0.5], [float("nan"), 0.0]])
    img = scatter_plot(points, size=size, extent=2.0, title="step 4000")
    left, top = 56, 30  # the margins for tick labels and title
    assert img.size == (left + size + 16, top + size + 36)

    def pixel_of(u, v):  # data coordinates -> picture, as the plot maps them
        return (round(left + (u / 2.0 + 1) * 0.5 * (size - 1)),
                round(top + (1 - (v / 2.0 + 1) * 0.5) * (size - 1)))

    dot = (31, 83, 160)
    assert img.getpixel(pixel_of(1.0, 1.0)) == dot and img.getpixel(pixel_of(-1.0, -0.5)) == dot
    assert img.getpixel(pixel_of(0.5, 0.5)) == (255, 255, 255)
    axes = (90, 90, 90)
    assert img.getpixel((left, top + size // 3)) == axes  # the frame
    assert img.getpixel((left - 3, pixel_of(0, 1.0)[1])) == axes  # a y tick mark at 1
    assert img.getpixel((pixel_of(-2.0, 0)[0], top + size + 2)) == axes  # an x tick at -2

    def dark(box):
        return int((np.asarray(img.crop(box)).astype(int).sum(-1) < 200).sum())

    assert dark((0, 0, img.size[0], top - 8)) > 20  # the title
    assert dark((0, top + 10, left - 8, top + size - 10)) > 20  # y tick labels
    assert dark((left + 10, top + size + 6, left + size - 10, img.size[1])) > 20  # x labels
    untitled = scatter_plot(points, size=size, extent=2.0)
    assert untitled.crop((0, 0, untitled.size[0], top - 8)).getextrema() == ((255, 255),) * 3


def test_samples_picture_and_png(tmp_path):
    assert samples_picture(torch.zeros(4, 3)) is None
    assert save_samples_png(torch.zeros(4, 3), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    path = save_samples_png(torch.randn(10, 2), tmp_path / "sub" / "pts.png", title="step 1")
    assert path.is_file()
    assert samples_picture(torch.zeros(4, 1, 8, 8)).mode == "L"
