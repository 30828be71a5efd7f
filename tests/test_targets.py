import math

import numpy as np
import pytest

from centernet_ray.targets import draw_gaussian, encode_targets, gaussian_kernel, gaussian_radius


@pytest.mark.parametrize("formula, expected", [("cornernet", 8.7462), ("exact", 2.6134)])
def test_radius_matches_hand_computed_value_for_32x32_at_overlap_07(formula, expected):
    # By hand (DESIGN.md formulas, h = w = 32, o = 0.7), sqrt(11468.8) = 107.0925:
    # cornernet: r3 = (-89.6 + 107.0925) / 2 = 8.7462 (< r1 = 61.04, r2 = 117.55);
    # exact:     r2 = (128 - 107.0925) / 8 = 2.6134 (< r1 = 2.96, r3 = 3.12).
    assert gaussian_radius(32, 32, 0.7, formula) == pytest.approx(expected, abs=1e-4)


def test_exact_radius_keeps_the_shifted_box_at_min_overlap():
    # Shifting a box by the exact radius diagonally (case 2 corners move inwards) stays >= min_overlap:
    # the radius solves the quadratic, so the IoU at that shift equals min_overlap for the binding case.
    h, w, o = 20.0, 50.0, 0.5
    r = gaussian_radius(h, w, o, "exact")
    inner_iou = (h - 2 * r) * (w - 2 * r) / (h * w)
    outer_iou = h * w / ((h + 2 * r) * (w + 2 * r))
    shift_iou = (h - r) * (w - r) / (2 * h * w - (h - r) * (w - r))
    assert min(inner_iou, outer_iou, shift_iou) == pytest.approx(o, abs=1e-6)


def test_radius_rounds_sides_up_and_rejects_bad_overlap():
    assert gaussian_radius(31.2, 31.9) == gaussian_radius(32, 32)
    with pytest.raises(ValueError, match="min_overlap"):
        gaussian_radius(10, 10, 1.0)
    with pytest.raises(ValueError, match="formula"):
        gaussian_radius(10, 10, 0.7, "other")


def test_kernel_values_follow_sigma_of_diameter_over_six():
    kernel = gaussian_kernel(2)  # d = 5, sigma = 5/6
    sigma = 5 / 6
    assert kernel.shape == (5, 5)
    assert kernel[2, 2] == 1.0
    assert kernel[2, 3] == pytest.approx(math.exp(-1 / (2 * sigma**2)), rel=1e-6)
    assert kernel[0, 0] == pytest.approx(math.exp(-8 / (2 * sigma**2)), rel=1e-5)
    assert gaussian_kernel(0).tolist() == [[1.0]]


def test_kernel_corners_are_the_hand_value_and_no_tail_is_cut():
    """A corner is at distance^2 2r^2: exp(-2r^2 / (2 sigma^2)) = exp(-36 r^2 / (2r+1)^2), which tends
    to e^-9 = 1.2e-4, far above the eps (2.2e-16) below which the official code zeroes values."""
    for radius in (1, 40, 500):
        kernel = gaussian_kernel(radius)
        corner = math.exp(-36 * radius**2 / (2 * radius + 1) ** 2)
        assert kernel[0, 0] == pytest.approx(corner, rel=1e-6) and kernel[-1, -1] == kernel[0, 0]
        assert kernel.min() == kernel[0, 0] > math.exp(-9)


def test_gaussian_is_clipped_at_the_borders():
    heatmap = np.zeros((6, 8), dtype=np.float32)
    draw_gaussian(heatmap, (0, 5), 2)  # bottom-left corner
    kernel = gaussian_kernel(2)
    np.testing.assert_array_equal(heatmap[3:6, 0:3], kernel[0:3, 2:5])
    assert heatmap[:3].sum() == 0 and heatmap[:, 3:].sum() == 0


def test_overlapping_objects_of_one_class_merge_by_maximum():
    heatmap = np.zeros((20, 20), dtype=np.float32)
    draw_gaussian(heatmap, (8, 10), 3)
    first = heatmap.copy()
    draw_gaussian(heatmap, (10, 10), 3)
    second = np.zeros_like(heatmap)
    draw_gaussian(second, (10, 10), 3)
    np.testing.assert_array_equal(heatmap, np.maximum(first, second))
    assert heatmap[10, 8] == 1.0 and heatmap[10, 10] == 1.0


def test_encode_targets_places_peak_size_offset_and_index():
    boxes = np.array([[4.0, 6.0, 14.5, 11.0]])
    out = encode_targets(boxes, np.array([2]), num_classes=3, output_size=(16, 20), max_objects=4)
    cx, cy = 9.25, 8.5
    assert out["heatmap"].shape == (3, 16, 20) and out["heatmap"].dtype == np.float32
    assert out["heatmap"][2, 8, 9] == 1.0 and out["heatmap"][:2].sum() == 0
    assert out["index"][0] == 8 * 20 + 9
    np.testing.assert_allclose(out["size"][0], [10.5, 5.0])
    np.testing.assert_allclose(out["offset"][0], [cx - 9, cy - 8])
    assert out["mask"].tolist() == [1, 0, 0, 0]
    assert out["num_objects"] == 1 and out["num_degenerate"] == 0 and out["num_overflow"] == 0


def test_encode_targets_skips_degenerate_boxes_and_counts_them():
    boxes = np.array([[1, 1, 1, 5], [3, 3, 2, 8], [np.nan, 0, 4, 4], [2, 2, 6, 6]], dtype=np.float64)
    out = encode_targets(boxes, np.array([0, 0, 0, 0]), 1, (10, 10))
    assert out["num_objects"] == 1 and out["num_degenerate"] == 3
    assert out["mask"].sum() == 1


def test_encode_targets_drops_objects_beyond_max_objects_but_keeps_their_peaks():
    boxes = np.array([[x, 0, x + 3, 3] for x in range(0, 40, 4)], dtype=np.float64)
    out = encode_targets(boxes, np.zeros(10, dtype=np.int64), 1, (8, 48), max_objects=6)
    assert out["num_objects"] == 6 and out["num_overflow"] == 4
    assert out["mask"].sum() == 6
    assert (out["heatmap"][0] == 1.0).sum() == 10


def test_encode_targets_rejects_out_of_range_classes():
    with pytest.raises(ValueError, match="class indices"):
        encode_targets(np.array([[0, 0, 2, 2]]), np.array([3]), 3, (8, 8))


def test_encode_targets_with_no_objects_is_all_zero():
    out = encode_targets(np.zeros((0, 4)), np.zeros(0), 2, (8, 8), max_objects=5)
    assert out["heatmap"].sum() == 0 and out["mask"].sum() == 0 and out["num_objects"] == 0


def _random_sparse_batch(seed: int, batch: int, slots: int, num_classes: int, size: tuple[int, int]):
    """Boxes of every kind encode_targets meets: tiny to whole-map, across the borders, overlapping
    (same class), degenerate and NaN ones between good ones, and padding slots full of garbage."""
    rng = np.random.default_rng(seed)
    height, width = size
    boxes = np.zeros((batch, slots, 4), dtype=np.float32)
    for b in range(batch):
        for m in range(slots):
            kind = rng.integers(0, 6)
            if kind == 0:  # the whole map and beyond
                boxes[b, m] = [-5, -3, width + 4, height + 7]
            elif kind == 1:  # degenerate (zero width after clipping) or not finite
                boxes[b, m] = [width + 1, 2, width + 9, 6] if rng.random() < 0.5 else [np.nan, 1, 4, 4]
            else:
                w, h = np.exp(rng.uniform(np.log(0.3), np.log(width), size=2))
                x, y = rng.uniform(-w / 2, width - w / 2), rng.uniform(-h / 2, height - h / 2)
                boxes[b, m] = [x, y, x + w, y + h]
    classes = rng.integers(0, num_classes, (batch, slots)).astype(np.int32)
    num_boxes = rng.integers(0, slots + 1, batch).astype(np.int32)
    num_boxes[0] = slots
    return boxes, classes, num_boxes


@pytest.mark.parametrize("formula, min_overlap", [("cornernet", 0.7), ("exact", 0.7), ("cornernet", 0.3),
                                                  ("exact", 0.3)])
def test_render_targets_is_bit_for_bit_encode_targets_per_image(formula, min_overlap):
    """The vectorised renderer (all images and objects at once, no host reads: the accelerator path,
    run here on the CPU) against the per-image reference, exactly (rtol = atol = 0): every output,
    padding slots and odd boxes included."""
    import torch

    from centernet_ray.targets import render_targets

    for seed, size in ((0, (32, 32)), (1, (24, 40)), (2, (128, 128))):
        boxes, classes, num_boxes = _random_sparse_batch(seed, batch=6, slots=12, num_classes=3, size=size)
        rendered = render_targets(torch.from_numpy(boxes), torch.from_numpy(classes), torch.from_numpy(num_boxes),
                                  3, size, max_objects=10, min_overlap=min_overlap, formula=formula,
                                  method="vectorised")
        for b in range(len(boxes)):
            reference = encode_targets(boxes[b, :num_boxes[b]], classes[b, :num_boxes[b]], 3, size, 10,
                                       min_overlap, formula)
            for key in ("heatmap", "index", "mask", "size", "offset"):
                np.testing.assert_array_equal(rendered[key][b].numpy(), reference[key], err_msg=f"{seed} {b} {key}")


def test_a_32_px_box_draws_the_official_radius_8_gaussian():
    """Worked by hand from the official gaussian_radius (min_overlap 0.7, h = w = 32): the third root,
    (-2*0.7*64 + sqrt((2*0.7*64)^2 + 4*4*0.7*0.3*1024)) / 2 = (-89.6 + 107.09) / 2 = 8.746, is the
    smallest and truncates to 8; sigma = 17/6."""
    out = encode_targets(np.array([[0.0, 0.0, 32.0, 32.0]]), np.array([0]), num_classes=1, output_size=(40, 40))
    heat, sigma = out["heatmap"][0], 17 / 6
    assert heat[16, 16] == 1.0
    assert heat[16, 24] == pytest.approx(math.exp(-64 / (2 * sigma**2)), rel=1e-6)  # 8 px right: the edge
    assert heat[24, 24] == pytest.approx(math.exp(-128 / (2 * sigma**2)), rel=1e-6)  # the corner
    assert heat[16, 25] == 0.0 and heat[25, 16] == 0.0  # 9 px away: outside the radius
    assert (heat > 0).sum() == 17 * 17
