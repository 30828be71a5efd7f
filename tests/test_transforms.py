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


@pytest.mark.parametrize("preset", ["flip", "none"])
def test_letterbox_presets_flip_boxes_as_torchvision_does_and_map_back_exactly(preset):
    """``flip`` and ``none`` take ``finish``'s own flip (plain tensor ops, not torchvision's dispatch):
    the same boxes as torchvision's horizontal_flip, the white pixels still framed, the original
    box recovered; a box left under 1 px wide by the letterbox is dropped with its label."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    image = torch.zeros(3, 100, 60, dtype=torch.uint8)
    image[:, 40:60, 10:40] = 255
    boxes = torch.tensor([[10.0, 40.0, 40.0, 60.0], [5.0, 5.0, 5.5, 30.0]])
    transform = TrainTransform((64, 64), preset, flip_prob=1.0 if preset == "flip" else 0.5)
    prepared = transform.prepare(image, boxes, torch.tensor([2, 3]))
    kept = prepared.boxes[:1]
    pre = transform.finish(prepared, seed=0)
    assert pre.labels.tolist() == [2]
    if preset == "flip":
        expected = F.horizontal_flip(tv_tensors.BoundingBoxes(kept, format="XYXY", canvas_size=(64, 64)))
        assert torch.equal(pre.boxes, expected.as_subclass(torch.Tensor))
        assert torch.equal(pre.image, prepared.image.flip(-1))
    else:
        assert torch.equal(pre.boxes, kept) and torch.equal(pre.image, prepared.image)
    ys, xs = torch.nonzero(pre.image[0] > 127, as_tuple=True)
    assert abs(xs.min().item() - pre.boxes[0, 0].item()) <= 1.0 and abs(xs.max().item() + 1 - pre.boxes[0, 2].item()) <= 1.0
    torch.testing.assert_close(to_original(pre)[0], boxes[0], atol=1e-4, rtol=0)
    assert torch.equal(prepared.boxes[0], kept[0])  # finish leaves what it was given (the cache's rows) alone


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
    assert (decoded.int() - 100).abs().max() <= 2  # grey 100 in every channel ("P": the web palette's 102)


def test_decode_image_rejects_garbage_truncation_and_bombs(tmp_path):
    from PIL import Image

    with pytest.raises(ImageDecodeError) as caught:
        decode_image(b"definitely not an image")
    # what the endpoint's 400 and the ingest report say: the bytes, not PIL's name of its stream object
    assert str(caught.value) == "not a readable image: 23 bytes in no format PIL reads (JPEG, PNG, WebP, BMP, TIFF, ...)"
    (tmp_path / "notes.jpg").write_text("a text file named .jpg")
    with pytest.raises(ImageDecodeError, match=f"{tmp_path / 'notes.jpg'} in no format PIL reads"):
        decode_image(tmp_path / "notes.jpg")
    path = tmp_path / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    with pytest.raises(ImageDecodeError):
        decode_image(path.read_bytes()[:300])
    with pytest.raises(ImageDecodeError, match="exceeds"):
        decode_image(path, max_pixels=100)


def test_decode_image_turns_a_plugin_s_own_exception_into_a_decode_error():
    """Pillow's format plugins raise what they like: a DDS with unknown pixel-format flags raises
    NotImplementedError, which the endpoint answered with a 500."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="DDS")
    data = bytearray(buffer.getvalue())
    data[80:84] = bytes(4)  # the pixel format's flags
    with pytest.raises(ImageDecodeError, match="not a readable image: NotImplementedError: Unknown pixel format"):
        decode_image(bytes(data))


def test_decode_image_scales_16_bit_grey_and_applies_the_exif_orientation():
    import io

    from PIL import Image

    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)  # 0 .. 65520
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "I;16"
    decoded = decode_image(buffer.getvalue())
    # convert("RGB") alone clips at 255: 99.6% of this ramp came out white
    torch.testing.assert_close(decoded[0], torch.from_numpy((ramp // 257).astype(np.uint8)), atol=0, rtol=0)
    assert torch.equal(decoded[0], decoded[2])
    photo = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = photo.getexif()
    exif[0x0112] = 6  # Orientation: the camera was turned 90 degrees; viewers show it 20 wide, 40 high
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).shape == (3, 40, 20)


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


# --- the official preset (augment: centernet_official), checked against the official code's numbers ---

def test_official_border_matches_the_official_get_border():
    from centernet_ray.data.transforms import official_border

    # _get_border(128, size) computed with the official code (src/lib/datasets/sample/ctdet.py)
    assert [official_border(128, size) for size in (100, 128, 255, 256, 512, 640)] == [32, 32, 64, 64, 128, 128]


def test_official_scales_are_numpy_arange_as_in_the_official_code():
    from centernet_ray.data.transforms import official_scales

    scales = official_scales((0.6, 1.4))
    assert len(scales) == 8 and scales == pytest.approx([0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3], abs=1e-12)


def official_color_aug_bgr(image, order, factors, lighting):
    """The official color_aug (src/lib/utils/image.py) on a BGR float image in [0, 1], written out
    with numpy: grey (OpenCV BGR2GRAY weights) and its mean taken first, the three ops in ``order``
    (0 brightness, 1 contrast, 2 saturation), then eigvec @ (eigval * alpha) added; no clamping."""
    eig_val = np.array([0.2141788, 0.01817699, 0.00341571], dtype=np.float32)
    eig_vec = np.array([[-0.58752847, -0.69563484, 0.41340352], [-0.5832747, 0.00994535, -0.81221408],
                        [-0.56089297, 0.71832671, 0.41158938]], dtype=np.float32)
    image = image.copy()
    gray = image @ np.array([0.114, 0.587, 0.299], dtype=np.float32)  # [H, W]
    gray_mean = gray.mean()
    for op in order:
        alpha = factors[op]
        if op == 0:
            image *= alpha
        elif op == 1:
            image = image * alpha + gray_mean * (1 - alpha)
        else:
            image = image * alpha + gray[:, :, None] * (1 - alpha)
    return image + eig_vec @ (eig_val * lighting)


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_official_color_aug_matches_the_official_definition(order):
    from centernet_ray.data.transforms import official_color_aug

    # mid-range pixels and moderate factors: nothing leaves [0, 255], so only our final uint8 rounding
    # (0.5 grey level) and torchvision's grey weights (0.2989 vs OpenCV's 0.299) differ: <= 1 level.
    rgb = torch.randint(70, 180, (3, 24, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    factors, lighting = [1.2, 0.8, 1.3], np.array([0.15, -0.1, 0.05], dtype=np.float32)
    ours = official_color_aug(rgb, order, factors, torch.from_numpy(lighting))
    bgr = rgb.permute(1, 2, 0).numpy()[:, :, ::-1].astype(np.float32) / 255
    reference = official_color_aug_bgr(bgr, order, factors, lighting)
    reference_rgb = torch.from_numpy(np.ascontiguousarray(reference[:, :, ::-1] * 255)).permute(2, 0, 1)
    assert (ours.float() - reference_rgb).abs().max().item() <= 1.0
    # the lighting shift alone moves R, G and B by the official vector, reversed from BGR
    still = official_color_aug(rgb, order, [1.0, 1.0, 1.0], torch.from_numpy(lighting))
    shift_bgr = np.array([[-0.58752847, -0.69563484, 0.41340352], [-0.5832747, 0.00994535, -0.81221408],
                          [-0.56089297, 0.71832671, 0.41158938]]) @ (np.array([0.2141788, 0.01817699, 0.00341571]) * lighting)
    moved = (still.float() - rgb.float()).mean(dim=(1, 2))
    torch.testing.assert_close(moved, torch.tensor(shift_bgr[::-1] * 255, dtype=torch.float32), atol=0.5, rtol=0)
    # and, without uint8 rounding, the RGB eigenvectors are the official BGR ones with the channels reversed
    from centernet_ray.data.transforms import PCA_EIGENVALUES, PCA_EIGENVECTORS_RGB

    for alpha in ([3.0, -2.0, 1.0], [0.0, 0.0, 5.0]):
        ours_shift = PCA_EIGENVECTORS_RGB @ (PCA_EIGENVALUES * torch.tensor(alpha))
        official = np.array([[-0.58752847, -0.69563484, 0.41340352], [-0.5832747, 0.00994535, -0.81221408],
                             [-0.56089297, 0.71832671, 0.41158938]]) @ (np.array([0.2141788, 0.01817699, 0.00341571]) * alpha)
        torch.testing.assert_close(ours_shift, torch.tensor(official[::-1].copy(), dtype=torch.float32), atol=1e-6, rtol=0)


def test_official_preset_draws_discrete_scales_and_centres_inside_the_border():
    from centernet_ray.data.transforms import letterbox_region, official_border

    image = torch.randint(0, 255, (3, 300, 400), dtype=torch.uint8)
    transform = TrainTransform((128, 128), preset="centernet_official", flip_prob=0.0)
    border_x, border_y = official_border(128, 400), official_border(128, 300)
    allowed = {}
    for scale in transform.scales:
        for cx in range(border_x, 400 - border_x):
            top, left, crop_h, crop_w = letterbox_region(400, 300, (128, 128), scale, (cx, 150))
            allowed.setdefault(crop_w, scale)
    scales_seen = set()
    for seed in range(40):
        matrix = transform(image, torch.zeros(0, 4), torch.zeros(0), seed=seed).input_to_original
        crop_w = round(matrix[0, 0].item() * 128)
        assert crop_w in allowed  # one of the 8 discrete scales
        scales_seen.add(allowed[crop_w])
        cx = matrix[0, 2].item() + crop_w / 2  # the crop's centre in original pixels (within rounding)
        cy = matrix[1, 2].item() + matrix[1, 1].item() * 64
        assert border_x - 1 <= cx <= 400 - border_x and border_y - 1 <= cy <= 300 - border_y
    assert len(scales_seen) >= 5


def test_official_preset_needs_a_scale_range_with_room_for_a_step():
    from centernet_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="low < high"):
        load_config(None, ["data.augment=centernet_official", "data.scale_range=[1.0,1.0]"])
    assert load_config(None, ["data.augment=centernet_official"]).data.augment == "centernet_official"
