import torch

from centernet_ray import precision


def test_cuda_takes_the_setting_as_given():
    assert precision.autocast_dtype("fp16", "cuda") is torch.float16
    assert precision.autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert precision.autocast_dtype("none", "cuda") is None


def test_cpu_uses_bf16_only_with_native_support(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.autocast_dtype("bf16", "cpu") is None
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert precision.autocast_dtype("fp16", "cpu") is torch.bfloat16  # no fp16 autocast on CPU
