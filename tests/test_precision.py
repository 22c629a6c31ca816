"""visae.precision: the one vocabulary of extraction's and training's matmul precision."""

import pytest
import torch

from visae.errors import VisaeError
from visae.precision import applied, resolve


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve("auto", "cuda") == resolve("auto", "cuda:1") == "bf16"
    assert resolve("auto", "cpu") == "fp32" and resolve("tf32", "cpu") == "tf32"
    with pytest.raises(VisaeError, match="^unknown precision 'fp16': use one of auto, fp32$"):
        resolve("fp16", "cpu", ("auto", "fp32"))


def test_applied_sets_and_restores_what_each_precision_means():
    before = torch.get_float32_matmul_precision()
    with applied("tf32", "cuda"):  # a global flag: settable without a GPU
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with applied("tf32", "cpu"):  # TF32 is a CUDA thing: fp32 elsewhere
        assert torch.get_float32_matmul_precision() == before
    with applied("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with applied("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
