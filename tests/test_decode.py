import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from centernet_ray.decode import boxes_to_original, decode, find_peaks, fuse_flip, max_3x3
from centernet_ray.targets import encode_targets


def reference_peaks(heat, k):
    """The plain formulation: max-pool the whole map, keep maxima, top-K."""
    keep = F.max_pool2d(heat, 3, stride=1, padding=1) == heat
    return (heat * keep).reshape(heat.shape[0], -1).topk(k)


def test_separable_max_equals_max_pool():
    heat = torch.rand(3, 4, 17, 23)
    assert torch.equal(max_3x3(heat), F.max_pool2d(heat, 3, stride=1, padding=1))


@pytest.mark.parametrize("batch", [1, 4])
def test_find_peaks_matches_plain_max_pool_topk(batch):
    heat = torch.rand(batch, 6, 32, 40)
    scores, flat = find_peaks(heat, 50)
    ref_scores, ref_flat = reference_peaks(heat, 50)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    assert torch.equal(flat, ref_flat)


def test_find_peaks_on_smooth_blobs_and_plateaus_matches_plain_max_pool_topk():
    # Gaussian blobs: most large values are not peaks; a flat plateau gives tied peaks.
    ys, xs = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    heat = torch.zeros(2, 3, 40, 40)
    blobs = [(0, 0, 10, 10, 3.0), (0, 2, 30, 5, 5.0), (1, 1, 20, 20, 2.0), (1, 1, 25, 30, 4.0)]
    for i, (b, c, y, x, s) in enumerate(blobs):
        peak = 0.5 + i / 10
        heat[b, c] = torch.maximum(heat[b, c], torch.exp(-((ys - y) ** 2 + (xs - x) ** 2) / (2 * s * s)) * peak)
    heat[0, 1, 2:4, 2:4] = 0.3
    scores, flat = find_peaks(heat, 10)
    ref_scores, ref_flat = reference_peaks(heat, 10)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    assert torch.equal(flat[:, :2], ref_flat[:, :2])  # the blob peaks, in the same order
    assert set(flat[0, 2:6].tolist()) == set(ref_flat[0, 2:6].tolist())  # the 4 tied plateau pixels


def test_decode_recovers_random_boxes_from_perfect_predictions():
    rng = np.random.default_rng(0)
    height, width, classes = 48, 64, 3
    for _ in range(20):
        count = int(rng.integers(1, 8))
        xy = rng.uniform(0, [width - 13, height - 13], size=(count, 2))  # inside [0, W-1]
        wh = rng.uniform(4, 12, size=(count, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        # keep centres on distinct pixels (two objects on one pixel are one detection by design)
        centres = {(int((b[0] + b[2]) / 2), int((b[1] + b[3]) / 2)) for b in boxes}
        if len(centres) < count:
            continue
        labels = rng.integers(0, classes, size=count)
        target = encode_targets(boxes, labels, classes, (height, width), max_objects=16)
        size_map = torch.zeros(1, 2, height * width)
        offset_map = torch.zeros(1, 2, height * width)
        for slot in range(count):
            size_map[0, :, target["index"][slot]] = torch.from_numpy(target["size"][slot])
            offset_map[0, :, target["index"][slot]] = torch.from_numpy(target["offset"][slot])
        heat = torch.from_numpy(target["heatmap"])[None]
        out_boxes, scores, out_classes = decode(heat, size_map.view(1, 2, height, width),
                                                offset_map.view(1, 2, height, width), k=count)
        assert (scores == 1).all()
        found = sorted(zip(out_boxes[0].tolist(), out_classes[0].tolist()))
        expected = sorted(zip(boxes.tolist(), labels.tolist()))
        for (box, cls), (true_box, true_cls) in zip(found, expected):
            assert cls == true_cls
            np.testing.assert_allclose(box, true_box, atol=1e-4)


def test_decode_in_float32_equals_float64():
    gen = torch.Generator().manual_seed(3)
    heat = torch.rand(2, 5, 24, 24, generator=gen)
    size = torch.rand(2, 2, 24, 24, generator=gen) * 10
    offset = torch.rand(2, 2, 24, 24, generator=gen)
    boxes32, scores32, classes32 = decode(heat, size, offset, k=30)
    boxes64, scores64, classes64 = decode(heat.double(), size.double(), offset.double(), k=30)
    assert torch.equal(classes32, classes64)
    torch.testing.assert_close(scores32.double(), scores64, rtol=0, atol=0)
    torch.testing.assert_close(boxes32.double(), boxes64, rtol=0, atol=1e-5)


def test_decode_output_shapes_and_k_capped_at_map_size():
    boxes, scores, classes = decode(torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4), k=100)
    assert boxes.shape == (3, 32, 4) and scores.shape == (3, 32) and classes.shape == (3, 32)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_boxes_to_original_inverts_letterbox_and_clips():
    # input 64x64 made from a 100x50 (w x h) image: scale 100/64, padded 25 px on top
    matrix = torch.tensor([[[100 / 64, 0.0, 0.0], [0.0, 100 / 64, -25.0]]])
    boxes = torch.tensor([[[2.0, 6.0, 4.0, 10.0], [0.0, 0.0, 16.0, 16.0]]])  # output map, stride 4
    mapped = boxes_to_original(boxes, matrix, output_stride=4, image_sizes=torch.tensor([[100, 50]]))
    torch.testing.assert_close(mapped[0, 0], torch.tensor([12.5, 12.5, 25.0, 37.5]))
    torch.testing.assert_close(mapped[0, 1], torch.tensor([0.0, 0.0, 100.0, 50.0]))


def test_boxes_to_original_reorders_mirrored_corners():
    matrix = torch.tensor([[[-1.0, 0.0, 64.0], [0.0, 1.0, 0.0]]])
    mapped = boxes_to_original(torch.tensor([[[1.0, 1.0, 3.0, 2.0]]]), matrix)
    torch.testing.assert_close(mapped[0, 0], torch.tensor([52.0, 4.0, 60.0, 8.0]))


def test_flip_fusion_mirrors_the_flipped_outputs_back_before_averaging():
    """One row of 4 output pixels, hand-computed: the image's peak logit 2 at x=1, the mirrored
    image's peak logit 1 at its x=1, which is x=2 of the image (the official code's
    ``(hm[0:1] + flip_tensor(hm[1:2])) / 2`` on probabilities)."""
    logits = torch.tensor([[[[0.0, 2.0, 0.0, 0.0]]]])
    mirrored_logits = torch.tensor([[[[0.0, 1.0, 0.0, 0.0]]]])
    size = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]], [[10.0, 20.0, 30.0, 40.0]]]])
    mirrored_size = torch.tensor([[[[5.0, 6.0, 7.0, 8.0]], [[50.0, 60.0, 70.0, 80.0]]]])
    offset = torch.rand(1, 2, 1, 4)
    fused = fuse_flip({"heatmap": logits, "size": size, "offset": offset},
                      {"heatmap": mirrored_logits, "size": mirrored_size, "offset": torch.rand(1, 2, 1, 4)})
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected_heat = [0.5, (sigmoid(2) + 0.5) / 2, (0.5 + sigmoid(1)) / 2, 0.5]
    torch.testing.assert_close(fused["heatmap"], torch.tensor([[[expected_heat]]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(fused["size"], torch.tensor([[[[4.5, 4.5, 4.5, 4.5]], [[45.0, 45.0, 45.0, 45.0]]]]))
    assert fused["offset"] is offset  # the mirrored image's offsets are not mirrored offsets: not used
