import torch

from centernet_ray.drawing import draw_detections, heatmap_overlay, save_png_grid


def test_draw_detections_marks_box_edges_only():
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    drawn = draw_detections(image, torch.tensor([[5.0, 5.0, 30.0, 30.0]]), [1], ["a", "b"], scores=[0.9], width=1)
    assert drawn.shape == image.shape and drawn.dtype == torch.uint8
    assert drawn[:, 5, 10].sum() > 0  # top edge
    assert drawn[:, 18, 18].sum() == 0  # interior untouched
    assert torch.equal(draw_detections(image, torch.zeros(0, 4), [], ["a"]), image)


def test_heatmap_overlay_reddens_hot_pixels():
    image = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    heat = torch.zeros(2, 2, 2)
    heat[1, 0, 0] = 1.0
    out = heatmap_overlay(image, heat)
    assert out[0, 0, 0] > 100 and out[1, 0, 0] < 100
    assert torch.equal(out[:, 7, 7], image[:, 7, 7])


def test_png_grid_is_written(tmp_path):
    path = save_png_grid([torch.zeros(3, 16, 16, dtype=torch.uint8)] * 3, tmp_path / "new" / "grid.png", columns=2)
    assert path == str(tmp_path / "new" / "grid.png") and (tmp_path / "new" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert save_png_grid([torch.zeros(3, 16, 16, dtype=torch.uint8)], f"file://{tmp_path}/uri/grid.png") == f"file://{tmp_path}/uri/grid.png"
    assert (tmp_path / "uri" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detections_png_is_a_png_of_the_image_size():
    import io

    import torch
    from PIL import Image

    from centernet_ray.drawing import detections_png

    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    data = detections_png(image, torch.tensor([[5.0, 5.0, 30.0, 20.0]]), [1], ["a", "b"], [0.9])
    picture = Image.open(io.BytesIO(data))
    assert picture.format == "PNG" and picture.size == (60, 40)
    assert picture.getpixel((5, 12)) != (0, 0, 0)  # the box's left edge was drawn


def test_png_grid_pads_smaller_images_to_the_largest(tmp_path):
    """Images of any size (a dataset's): each cell is the largest image's size, smaller ones padded
    black on the right and bottom; make_grid adds a 2-pixel white border (pad_value 255)."""
    import numpy as np
    from PIL import Image

    big, small = torch.full((3, 20, 30), 200, dtype=torch.uint8), torch.full((3, 10, 12), 100, dtype=torch.uint8)
    grid = torch.from_numpy(np.array(Image.open(save_png_grid([big, small], tmp_path / "g.png"))))
    assert grid.shape == (2 + 20 + 2, 2 + 30 + 2 + 30 + 2, 3)  # [H, W, C]: one row of two 20x30 cells
    cell = grid[2:22, 34:64]
    assert (cell[:10, :12] == 100).all() and (cell[10:] == 0).all() and (cell[:, 12:] == 0).all()
