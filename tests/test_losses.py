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


@pytest.mark.parametrize("alpha, beta", [(2.0, 4.0), (1.5, 3.0), (0.0, 0.0)])  # Tune searches both
@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (2, 7, 96, 100)])  # 134,400 > 2 chunks of 65,536, not a multiple
def test_focal_loss_and_its_gradient_match_autograd_of_the_plain_formula(alpha, beta, shape):
    """The module's forward and hand-written backward, chunked on the CPU, against float64 autograd
    of DESIGN.md's formula; rtol 1e-4 (float32 against float64 over up to 134k terms)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, generator=gen) * 2
    target = torch.rand(*shape, generator=gen) ** 3
    target.view(-1)[torch.randperm(target.numel(), generator=gen)[:max(2, target.numel() // 1000)]] = 1.0
    x1 = logits.double().requires_grad_()
    p_log, np_log = torch.nn.functional.logsigmoid(x1), torch.nn.functional.logsigmoid(-x1)
    pos = target == 1
    terms = torch.where(pos, (1 - p_log.exp()) ** alpha * p_log,
                        (1 - target.double()) ** beta * p_log.exp() ** alpha * np_log)
    reference = -terms.sum() / pos.sum()
    reference.backward()
    x2 = logits.clone().requires_grad_()
    loss = focal_loss(x2, target, alpha, beta)
    loss.backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    torch.testing.assert_close(x2.grad.double(), x1.grad, rtol=1e-4, atol=1e-9)


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


def official_reg_l1(output, mask, ind, target):
    """The official CenterNet ``RegL1Loss`` (src/lib/models/losses.py), written out in torch:
    gather at ``ind``, mask expanded to both coordinates, summed L1 / (mask.sum() + 1e-4)."""
    batch, channels = output.shape[:2]
    pred = output.permute(0, 2, 3, 1).reshape(batch, -1, channels)
    pred = pred.gather(1, ind.unsqueeze(2).expand(-1, -1, channels))
    expanded = mask.unsqueeze(2).expand_as(pred).float()
    return torch.nn.functional.l1_loss(pred * expanded, target * expanded, reduction="sum") / (expanded.sum() + 1e-4)


# Tolerance against the official definition: its "+ 1e-4" in the denominator, a relative 5e-5 of
# 2N for N >= 1 object (ours divides by exactly 2N); rel=1e-4 covers it.
OFFICIAL_REL = 1e-4


def test_masked_l1_is_the_mean_over_the_2n_coordinates_as_the_official_reg_l1_loss():
    # The hand-computed case: one object, target (w, h) = (10, 20), prediction 0 -> (10 + 20) / 2.
    prediction, index, mask = torch.zeros(1, 2, 4, 4), torch.tensor([[5]]), torch.tensor([[1]])
    target = torch.tensor([[[10.0, 20.0]]])
    assert masked_l1_loss(prediction, target, index, mask).item() == 15.0
    assert official_reg_l1(prediction, mask, index, target).item() == pytest.approx(15.0, rel=OFFICIAL_REL)


def test_masked_l1_ignores_padding_slots():
    prediction = torch.zeros(1, 2, 2, 2)
    prediction[0, :, 0, 1] = torch.tensor([3.0, 4.0])
    target = torch.tensor([[[1.0, 1.0], [100.0, 100.0]]])
    index = torch.tensor([[1, 0]])
    mask = torch.tensor([[1, 0]])
    assert masked_l1_loss(prediction, target, index, mask).item() == pytest.approx((2 + 3) / 2)
    assert masked_l1_loss(prediction, target, index, torch.zeros(1, 2)).item() == 0.0


def test_masked_l1_matches_the_official_definition_on_random_batches():
    generator = torch.Generator().manual_seed(3)
    for objects in (1, 3, 17):
        prediction = torch.randn(4, 2, 8, 8, generator=generator) * 5
        index = torch.randint(0, 64, (4, 20), generator=generator)
        mask = (torch.arange(20) < objects).repeat(4, 1).long()
        mask[1] = 0  # an image without objects
        target = torch.rand(4, 20, 2, generator=generator) * 30
        ours = masked_l1_loss(prediction, target, index, mask).item()
        assert ours == pytest.approx(official_reg_l1(prediction, mask, index, target).item(), rel=OFFICIAL_REL)


def test_centernet_loss_weights_terms():
    logits, heat = small_case()
    outputs = {"heatmap": logits, "size": torch.ones(2, 2, 5, 6), "offset": torch.zeros(2, 2, 5, 6)}
    targets = {"heatmap": heat, "index": torch.tensor([[3], [7]]), "mask": torch.ones(2, 1),
               "size": torch.full((2, 1, 2), 3.0), "offset": torch.full((2, 1, 2), 0.5)}
    criterion = CenterNetLoss(weights=LossWeights(heatmap=1.0, size=0.1, offset=1.0))
    terms = criterion(outputs, targets)
    assert terms["size"].item() == pytest.approx(2.0)  # |1-3| on 2 coords x 2 objects, / 4 coordinates
    assert terms["offset"].item() == pytest.approx(0.5)
    assert terms["total"].item() == pytest.approx(terms["heatmap"].item() + 0.1 * 2.0 + 0.5)
    from centernet_ray.config import LossConfig

    weighted = CenterNetLoss.from_config(LossConfig(hm_weight=2.0, wh_weight=0.3, off_weight=0.5))(outputs, targets)
    # each weight on its own term (defaults of 1.0 could not tell hm_weight from off_weight)
    assert weighted["total"].item() == pytest.approx(2.0 * terms["heatmap"].item() + 0.3 * 2.0 + 0.5 * 0.5, rel=1e-6)


def test_centernet_loss_averages_the_stacks_as_the_official_ctdet_loss():
    logits, heat = small_case()
    targets = {"heatmap": heat, "index": torch.tensor([[3], [7]]), "mask": torch.ones(2, 1),
               "size": torch.full((2, 1, 2), 3.0), "offset": torch.full((2, 1, 2), 0.5)}
    last = {"heatmap": logits, "size": torch.ones(2, 2, 5, 6), "offset": torch.zeros(2, 2, 5, 6)}
    first = {"heatmap": logits * 0.5, "size": torch.full((2, 2, 5, 6), 5.0), "offset": torch.ones(2, 2, 5, 6)}
    criterion = CenterNetLoss()
    one, other = criterion(last, targets), criterion(first, targets)
    both = criterion({**last, "aux": [first]}, targets)
    # CtdetLoss: each term += crit(stack) / num_stacks
    for name in ("heatmap", "size", "offset", "total"):
        assert both[name].item() == pytest.approx((one[name].item() + other[name].item()) / 2, rel=1e-6)
    assert criterion({**last, "aux": [last]}, targets)["total"].item() == pytest.approx(one["total"].item(), rel=1e-6)
    with pytest.raises(TypeError, match="dict of heads"):
        criterion([last, first], targets)
