"""LordsLinear: a drop-in nn.Linear whose weight is codebook[Q] * (B @ A)."""
from __future__ import annotations

import torch
from torch import nn

from . import _ops
from .formats import check_bits, check_packable_K, get_codebook, packed_cols
from .quantize import LordsConfig, LordsQuantized, quantize_weight


class LordsLinear(nn.Module):
    """y = x @ (codebook[Q] * (B @ A)).T + bias, through torch.ops.lords.dequant_matmul.

    `qweight` (packed codes) and `codebook` are buffers and never train. `B`, `A` (and `bias`) are
    parameters, frozen by default; `train_scales()` unfreezes B and A for multiplicative PEFT.
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int = 4, rank: int,
                 codebook: str | torch.Tensor | None = None, bias: bool = True, device=None, dtype=None):
        super().__init__()
        check_bits(bits)
        check_packable_K(in_features, bits, "in_features")
        if out_features < 1:
            raise ValueError(f"out_features: expected >= 1, got {out_features}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank: expected an integer in [1, {min(in_features, out_features)}], got {rank!r}")
        levels, self.codebook_name = get_codebook(codebook, bits)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("qweight", torch.zeros(out_features, packed_cols(in_features, bits),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("codebook", levels.to(device=device))
        self.B = nn.Parameter(torch.empty(out_features, rank, **factory), requires_grad=False)
        self.A = nn.Parameter(torch.empty(rank, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def bits_per_weight(self) -> float:
        N, K = self.out_features, self.in_features
        return self.bits + 16 * self.rank * (N + K) / (N * K)

    @classmethod
    def from_quantized(cls, qw: LordsQuantized, bias: torch.Tensor | None = None, dtype=None) -> "LordsLinear":
        N, K = qw.shape
        dtype = dtype or qw.B.dtype
        layer = cls(K, N, bits=qw.bits, rank=qw.rank, codebook=qw.codebook, bias=bias is not None,
                    device=qw.B.device, dtype=dtype)
        layer.codebook_name = qw.codebook_name
        with torch.no_grad():
            layer.qweight.copy_(qw.qweight)
            layer.B.copy_(qw.B)
            layer.A.copy_(qw.A)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LordsConfig | None = None,
                    hessian: torch.Tensor | None = None) -> "LordsLinear":
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected a torch.nn.Linear, got {type(linear).__name__}")
        qw = quantize_weight(linear.weight, cfg, hessian=hessian)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_quantized(qw, bias, dtype=linear.weight.dtype)

    def train_scales(self, mode: bool = True) -> "LordsLinear":
        """Make B and A trainable (multiplicative PEFT); the codes stay frozen."""
        self.B.requires_grad_(mode)
        self.A.requires_grad_(mode)
        return self

    def dequantize(self) -> torch.Tensor:
        return torch.ops.lords.dequant(self.qweight, self.B, self.A, self.codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.dequant_matmul(x, self.qweight, self.B, self.A, self.codebook, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"codebook={self.codebook_name}, rank={self.rank}, bias={self.bias is not None}")
