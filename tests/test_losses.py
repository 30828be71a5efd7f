import math

import pytest
import torch

from centernet_ray.losses import CenterNetLoss, LossWeights, focal_loss, gather_at, masked_l1_loss


def direct_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The DESIGN.md formula written element by element in float64 (independent of the module)."""
    total, positives = 0.0, 0
    for x, y in zip(logits.double().flatten().tolist(), target.double().flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        if y == 1:
            total += (1 - p) ** alpha * math.log(p)
            positives += 1
        else:
            total += (1 - y) ** beta * p**alpha * math.log(1 - p)
    return torch.tensor(-total / max(positives, 1), dtype=torch.float64)


def small_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, 6, generator=gen) * 2
    target = torch.rand(2, 3, 5, 6, generator=gen) ** 3
    target[0, 1, 2, 3] = 1.0
    target[1, 0, 4, 5] = 1.0
    return logits, target


@pytest.mark.parametrize("alpha, beta", [(2.0, 4.0), (1.5, 3.0), (0.0, 0.0)])
def test_focal_loss_matches_the_direct_formula(alpha, beta):
    logits, target = small_case()
    assert focal_loss(logits, target, alpha, beta).double() == pytest.approx(
        direct_focal(logits, target, alpha, beta).item(), rel=1e-5)


def test_focal_loss_without_positives_is_the_negative_sum():
    logits, target = small_case()
    target = target.clamp(max=0.9)
    assert focal_loss(logits, target).item() == pytest.approx(direct_focal(logits, target, 2, 4).item(), rel=1e-5)


def test_focal_loss_gradient_matches_autograd_of_the_plain_formula():
    logits, target = small_case(1)
    x1 = logits.double().requires_grad_()
    p_log, np_log = torch.nn.functional.logsigmoid(x1), torch.nn.functional.logsigmoid(-x1)
    pos = target == 1
    terms = torch.where(pos, (1 - p_log.exp()) ** 2 * p_log, (1 - target.double()) ** 4 * p_log.exp() ** 2 * np_log)
    (-terms.sum() / pos.sum()).backward()
    x2 = logits.clone().requires_grad_()
    focal_loss(x2, target).backward()
    torch.testing.assert_close(x2.grad.double(), x1.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_focal_loss_is_finite_for_extreme_logits(dtype):
    logits = torch.tensor([[-1e4, 1e4, -1e4, 1e4]], dtype=dtype).view(1, 1, 2, 2).requires_grad_()
    target = torch.tensor([1.0, 1.0, 0.0, 0.5]).view(1, 1, 2, 2)
    loss = focal_loss(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # wrong positive: log p = -|x|; wrong negative with y = 0.5: (1 - 0.5)^4 * log(1 - p) = -|x| / 16;
    # confident right ones contribute 0; N = 2 positives. |x| is 1e4 as the dtype rounds it.
    magnitude = logits.detach().float().abs()[0, 0, 0, 0].item()
    assert loss.item() == pytest.approx(magnitude * (1 + 1 / 16) / 2, rel=1e-5)


def test_focal_loss_under_bf16_autocast_matches_fp32():
    logits, target = small_case(2)
    reference = focal_loss(logits, target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = focal_loss(logits.bfloat16(), target)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=2e-2)  # bf16 logits: ~3 digits


def test_gather_at_reads_flat_positions():
    feature = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)
    index = torch.tensor([[0, 5], [11, 4]])
    gathered = gather_at(feature, index)
    assert gathered.shape == (2, 2, 2)
    assert gathered[0, 1].tolist() == [5.0, 17.0]  # y=1, x=1 of channels 0 and 1
    assert gathered[1, 0].tolist() == [24 + 11.0, 36 + 11.0]


def test_masked_l1_ignores_padding_slots_and_divides_by_objects():
    prediction = torch.zeros(1, 2, 2, 2)
    prediction[0, :, 0, 1] = torch.tensor([3.0, 4.0])
    target = torch.tensor([[[1.0, 1.0], [100.0, 100.0]]])
    index = torch.tensor([[1, 0]])
    mask = torch.tensor([[1, 0]])
    assert masked_l1_loss(prediction, target, index, mask).item() == pytest.approx((2 + 3) / 1)
    assert masked_l1_loss(prediction, target, index, torch.zeros(1, 2)).item() == 0.0


def test_centernet_loss_weights_terms_and_sums_stacks():
    logits, heat = small_case()
    outputs = {"heatmap": logits, "size": torch.ones(2, 2, 5, 6), "offset": torch.zeros(2, 2, 5, 6)}
    targets = {"heatmap": heat, "index": torch.tensor([[3], [7]]), "mask": torch.ones(2, 1),
               "size": torch.full((2, 1, 2), 3.0), "offset": torch.full((2, 1, 2), 0.5)}
    criterion = CenterNetLoss(weights=LossWeights(heatmap=1.0, size=0.1, offset=1.0))
    terms = criterion(outputs, targets)
    assert terms["size"].item() == pytest.approx(2.0 * 2 * 2 / 2)  # |1-3| on 2 coords, 2 objects
    assert terms["offset"].item() == pytest.approx(0.5 * 2 * 2 / 2)
    assert terms["total"].item() == pytest.approx(terms["heatmap"].item() + 0.1 * 4.0 + 1.0)
    from centernet_ray.config import LossConfig

    assert CenterNetLoss.from_config(LossConfig(wh_weight=0.1))(outputs, targets)["total"].item() == pytest.approx(terms["total"].item())
    two_stacks = criterion([outputs, outputs], targets)
    assert two_stacks["total"].item() == pytest.approx(2 * terms["total"].item())
