import numpy as np
import pytest
import torch

from centernet_ray.data.images import ImageDecodeError, decode_image
from centernet_ray.data.transforms import TrainTransform, ValTransform, normalize_images


def to_original(pre):
    corners = pre.boxes.reshape(-1, 2)
    matrix = pre.input_to_original
    mapped = (corners @ matrix[:, :2].T + matrix[:, 2]).reshape(-1, 4)
    return torch.cat([torch.minimum(mapped[:, :2], mapped[:, 2:]), torch.maximum(mapped[:, :2], mapped[:, 2:])], 1)


def test_val_letterbox_keeps_aspect_and_inverts_exactly():
    image = torch.randint(0, 255, (3, 100, 60), dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 40.0, 90.0]])
    pre = ValTransform((64, 64))(image, boxes, torch.tensor([1]))
    assert pre.image.shape == (3, 64, 64) and pre.image.dtype == torch.uint8
    w, h = pre.boxes[0, 2] - pre.boxes[0, 0], pre.boxes[0, 3] - pre.boxes[0, 1]
    assert (w / h).item() == pytest.approx(30 / 70, rel=1e-4)
    torch.testing.assert_close(to_original(pre), boxes, atol=1e-4, rtol=0)


def test_train_augmentation_is_reproducible_from_a_seed_and_varies_across_seeds():
    image = torch.randint(0, 255, (3, 80, 120), dtype=torch.uint8)
    boxes, labels = torch.tensor([[30.0, 20.0, 70.0, 60.0]]), torch.tensor([0])
    transform = TrainTransform((64, 64))
    a, b, c = transform(image, boxes, labels, seed=5), transform(image, boxes, labels, seed=5), transform(image, boxes, labels, seed=6)
    assert torch.equal(a.image, b.image) and torch.equal(a.boxes, b.boxes)
    assert not torch.equal(a.image, c.image)


def test_train_boxes_follow_the_image_through_crop_and_flip():
    # a white square on black: after augmentation the box must still frame the white pixels
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    image[:, 40:60, 20:50] = 255
    transform = TrainTransform((64, 64), color_jitter=0.0, scale_range=(0.9, 1.1), flip_prob=0.5)
    for seed in range(8):
        pre = transform(image, torch.tensor([[20.0, 40.0, 50.0, 60.0]]), torch.tensor([0]), seed=seed)
        ys, xs = torch.nonzero(pre.image[0] > 127, as_tuple=True)
        box = pre.boxes[0]
        assert abs(xs.min().item() - box[0].item()) <= 1.5 and abs(xs.max().item() + 1 - box[2].item()) <= 1.5
        assert abs(ys.min().item() - box[1].item()) <= 1.5 and abs(ys.max().item() + 1 - box[3].item()) <= 1.5
        torch.testing.assert_close(to_original(pre)[0], torch.tensor([20.0, 40.0, 50.0, 60.0]), atol=0.5, rtol=0)


def test_boxes_cropped_away_are_removed_with_their_labels():
    image = torch.zeros(3, 100, 100, dtype=torch.uint8)
    boxes = torch.tensor([[0.0, 0.0, 5.0, 5.0], [40.0, 40.0, 60.0, 60.0]])
    transform = TrainTransform((64, 64), scale_range=(0.6, 0.6), flip_prob=0.0, color_jitter=0.0)
    removed = [len(transform(image, boxes, torch.tensor([3, 4]), seed=s).labels) < 2 for s in range(10)]
    assert any(removed)
    pre = next(transform(image, boxes, torch.tensor([3, 4]), seed=s) for s in range(10) if removed[s])
    assert pre.labels.tolist() == [4]


def test_normalize_images_uses_channel_statistics():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_images(images, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "RGB"])
def test_decode_image_converts_any_mode_to_rgb(mode, tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(np.full((5, 7, 3), 100, dtype=np.uint8)).convert(mode).save(path)
    decoded = decode_image(path)
    assert decoded.shape == (3, 5, 7) and decoded.dtype == torch.uint8


def test_decode_image_rejects_garbage_truncation_and_bombs(tmp_path):
    from PIL import Image

    with pytest.raises(ImageDecodeError):
        decode_image(b"definitely not an image")
    path = tmp_path / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ImageDecodeError):
        decode_image(path.read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(path, max_pixels=100)


def test_fused_color_jitter_matches_torchvision_adjust_functions():
    from torchvision.transforms.v2 import functional as F

    from centernet_ray.data.transforms import jitter_colors

    # mid-range pixels so that no step saturates: then only torchvision's per-step uint8 rounding
    # (and truncation) differs, by at most 3 grey levels of 255
    image = torch.randint(60, 190, (3, 32, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    reference = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(image, 1.2), 0.7), 1.2)
    assert (reference.int() - jitter_colors(image, 1.2, 0.7, 1.2).int()).abs().max() <= 3
    dark = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(image, 0.7), 1.3), 0.6)
    assert (dark.int() - jitter_colors(image, 0.7, 1.3, 0.6).int()).abs().max() <= 3
    assert torch.equal(jitter_colors(image, 1.0, 1.0, 1.0), image)
