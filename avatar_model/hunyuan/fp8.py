"""Weight-only fp8 linears, as in the official `_fp8.pt` checkpoint.

Each block linear keeps its weight as float8_e4m3fn plus one per-layer scale and is dequantised to the compute dtype
on every call (`W.to(dtype) * scale`), then a normal matmul runs. This halves weight memory; it does not speed up
compute (there is no fp8 GEMM, exactly like the official code).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448 for E4M3


class FP8Linear(nn.Module):
    """`y = x @ (W_fp8 * scale)^T + b`, with `W_fp8` stored in float8_e4m3fn and `scale` a scalar buffer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=FP8_DTYPE), False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), False) if bias else None
        self.register_buffer("scale", torch.ones((), device=device, dtype=torch.float32))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> FP8Linear:
        """Quantise a float linear with a per-tensor scale `max|W| / 448` (the official scale convention)."""
        weight = linear.weight.detach()
        scale = (weight.abs().max().float() / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        fp8 = cls(linear.in_features, linear.out_features, linear.bias is not None, device=weight.device)
        fp8.weight.data = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        fp8.scale.copy_(scale)
        if linear.bias is not None:
            fp8.bias.data = linear.bias.detach().clone()
        return fp8

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The effective weight in `dtype`; the scale is rounded to `dtype` first, as the official forward does."""
        return self.weight.to(dtype) * self.scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` would upcast the fp8 storage; values are exact in bf16, so cast them back.
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.weight.data = self.weight.data.to(FP8_DTYPE)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def convert_linears_to_fp8(module: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    """Replace, in place and without copying data, every `nn.Linear` under the named child prefixes with an
    (uninitialised) `FP8Linear` of the same shape; returns the replaced module names. Meant for a meta-device model
    that a checkpoint is then assigned into."""
    replaced = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or not name.startswith(prefixes):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        fp8 = FP8Linear(
            child.in_features,
            child.out_features,
            child.bias is not None,
            device=child.weight.device,
            dtype=child.weight.dtype,
        )
        setattr(parent, attr, fp8)
        replaced.append(name)
    return replaced
