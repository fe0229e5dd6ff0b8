"""Quantization-aware training: latent float weights trained jointly with their quantization scales.

LordsQATLinear keeps a float weight W [N, K] and trainable B [N, r], A [r, K]. Its forward uses

    S = B @ A,   u = W / S,   W_hat = codebook[nearest_level(u)] * S

with a straight-through estimator for the rounding (the LSQ form): inside the codebook's range the
rounding passes gradients through unchanged (dW_hat/dW = 1, dW_hat/dS = codebook[Q] - u); outside
it the value is clipped to the end level, W gets no gradient and S gets the end level. So the
gradient reaches W, B and A. The forward value is exactly `codebook[Q] * (B @ A)`, which is what
`freeze()` deploys as a LordsLinear (Q, B, A).

BlockQATLinear is the baseline: the same latent weight and rounding, with one trainable scale per
block of `block` consecutive weights of a row (block-wise NF/INT quantization made trainable). It
freezes into a LordsLinear too, with B = the block scales and A = the 0/1 block indicator (the exact
rank-K/block factorization used by lords_ext.model for the block-wise baseline).

Both forwards are plain tensor code with no data-dependent Python branching, so they compile with
torch.compile(fullgraph=True).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .formats import check_packable_K, get_codebook, nearest_level, pack
from .nn import LordsLinear
from .quantize import LordsConfig, _safe_divisor, blockwise_quantize, quantize_weight


def ste_round_to_level(u: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """codebook[nearest level of u] in value; in gradient, identity inside [codebook[0], codebook[-1]]
    and zero outside. The value is exactly the level (the identity term adds x - x = 0)."""
    cb = codebook.to(u.dtype)
    levels = cb[nearest_level(u.detach(), cb).long()]
    clipped = torch.clamp(u, cb[0], cb[-1])
    return levels + (clipped - clipped.detach())


def _check_linear(linear, name="linear"):
    if not isinstance(linear, nn.Linear) or isinstance(linear, LordsLinear):
        raise ValueError(f"{name}: expected a torch.nn.Linear, got {type(linear).__name__}")


class _QATBase(nn.Module):
    """Shared parts: latent weight, codebook buffer, bias, and the forward through quantized_weight()."""

    def _init_common(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, codebook):
        levels, self.codebook_name = get_codebook(codebook, bits)
        N, K = weight.shape
        check_packable_K(K, bits, "weight.shape[1] (in_features)")
        self.out_features, self.in_features, self.bits = N, K, bits
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("codebook", levels.to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(weight.dtype))

    def scale_matrix(self) -> torch.Tensor:
        raise NotImplementedError

    def quantized_weight(self) -> torch.Tensor:
        """W_hat [N, K] in the latent weight's dtype, differentiable (STE) in the weight and the scales."""
        # Outside autocast: a bf16 B @ A would round the scales and pick other codes than freeze().
        with torch.autocast(device_type=self.weight.device.type, enabled=False):
            S = self.scale_matrix()
            u = self.weight / _safe_divisor(S)
            return ste_round_to_level(u, self.codebook) * S

    def codes(self) -> torch.Tensor:
        """[N, K] uint8 codes the current latent weight and scales round to."""
        with torch.no_grad(), torch.autocast(device_type=self.weight.device.type, enabled=False):
            S = self.scale_matrix()
            return nearest_level(self.weight / _safe_divisor(S), self.codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight().to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def weight_parameters(self) -> list[nn.Parameter]:
        return [self.weight]

    def scale_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError


class LordsQATLinear(_QATBase):
    """nn.Linear replacement for QAT with LoRDS scales; see the module docstring.

    weight [N, K] float (the latent weight), B [N, r], A [r, K] (initial scales, e.g. from LoRDS PTQ),
    codebook: a name or tensor of 2**bits levels, bias [N] or None. All of weight, B, A, bias train."""

    def __init__(self, weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, *, bits: int = 4,
                 codebook: str | torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError(f"weight: expected a 2-D float tensor [N, K], got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        N, K = weight.shape
        if B.dim() != 2 or A.dim() != 2 or B.shape[0] != N or A.shape[1] != K or B.shape[1] != A.shape[0]:
            raise ValueError(f"B, A: expected [N, r] and [r, K] with N={N}, K={K} and the same r, got "
                             f"{tuple(B.shape)} and {tuple(A.shape)}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
        self._init_common(weight, bias, bits, codebook)
        self.B = nn.Parameter(B.detach().clone().to(weight.dtype))
        self.A = nn.Parameter(A.detach().clone().to(weight.dtype))

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, cfg: LordsConfig | None = None) -> "LordsQATLinear":
        """Latent weight = the layer's weight; B, A = LoRDS PTQ of it under `cfg` (init + refinement)."""
        _check_linear(linear)
        cfg = cfg or LordsConfig()
        qw = quantize_weight(linear.weight.detach().float(), cfg)
        # The latent weight is float32 whatever the layer's dtype: it accumulates small updates.
        return cls(linear.weight.detach().float(), qw.B, qw.A, bits=qw.bits, codebook=qw.codebook,
                   bias=linear.bias).named(qw.codebook_name)

    @classmethod
    def from_lords(cls, layer: LordsLinear, weight: torch.Tensor) -> "LordsQATLinear":
        """Start QAT from an already quantized LordsLinear (its B, A, codebook, bias) and the float weight."""
        if not isinstance(layer, LordsLinear):
            raise ValueError(f"layer: expected a LordsLinear, got {type(layer).__name__}")
        if tuple(weight.shape) != (layer.out_features, layer.in_features):
            raise ValueError(f"weight: expected shape {(layer.out_features, layer.in_features)}, got {tuple(weight.shape)}")
        return cls(weight, layer.B, layer.A, bits=layer.bits, codebook=layer.codebook,
                   bias=layer.bias).named(layer.codebook_name)

    def named(self, codebook_name: str) -> "LordsQATLinear":
        self.codebook_name = codebook_name
        return self

    def scale_matrix(self) -> torch.Tensor:
        return self.B @ self.A

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.B, self.A]

    @torch.no_grad()
    def freeze(self) -> LordsLinear:
        """The deployable LordsLinear (packed codes Q, B, A, bias) computing this layer's current forward."""
        layer = LordsLinear(self.in_features, self.out_features, bits=self.bits, rank=self.rank,
                            codebook=self.codebook, bias=self.bias is not None, device=self.B.device,
                            dtype=self.B.dtype)
        layer.codebook_name = self.codebook_name
        layer.qweight.copy_(pack(self.codes(), self.bits))
        layer.B.copy_(self.B)
        layer.A.copy_(self.A)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"codebook={self.codebook_name}, rank={self.rank}, bias={self.bias is not None}")


class BlockQATLinear(_QATBase):
    """QAT baseline with block-wise scales: scales [N, K // block], one per `block` weights of a row."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, *, block: int, bits: int = 4,
                 codebook: str | torch.Tensor | None = None, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError("weight: expected a 2-D float tensor [N, K]")
        N, K = weight.shape
        if isinstance(block, bool) or not isinstance(block, int) or block < 1 or K % block:
            raise ValueError(f"block: expected a positive divisor of K={K}, got {block!r}")
        if tuple(scales.shape) != (N, K // block):
            raise ValueError(f"scales: expected shape {(N, K // block)} for block={block}, got {tuple(scales.shape)}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected shape ({N},), got {tuple(bias.shape)}")
        self._init_common(weight, bias, bits, codebook)
        self.block = block
        self.scales = nn.Parameter(scales.detach().clone().to(weight.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, codebook: str | torch.Tensor | None = None,
                    block: int = 64, search: bool = True) -> "BlockQATLinear":
        """Latent weight = the layer's weight; scales = block absmax (or clipping-searched, search=True)."""
        _check_linear(linear)
        bw = blockwise_quantize(linear.weight.detach().float(), bits=bits, codebook=codebook, block=block,
                                search=search)
        layer = cls(linear.weight.detach().float(), bw.scales, block=block, bits=bits, codebook=bw.codebook,
                    bias=linear.bias)
        layer.codebook_name = get_codebook(codebook, bits)[1]
        return layer

    @property
    def rank(self) -> int:
        return self.scales.shape[1]

    def scale_matrix(self) -> torch.Tensor:
        return self.scales.repeat_interleave(self.block, dim=1)

    def scale_parameters(self) -> list[nn.Parameter]:
        return [self.scales]

    @torch.no_grad()
    def freeze(self) -> LordsLinear:
        """A LordsLinear with B = the block scales, A = the 0/1 block indicator: the same W_hat."""
        N, K, nb = self.out_features, self.in_features, self.in_features // self.block
        if nb > N:
            raise ValueError(f"block: freezing a {N}x{K} block-wise layer into (Q, B, A) needs K/block={nb} <= "
                             f"N={N}; use a block of at least {-(-K // N)}")
        layer = LordsLinear(K, N, bits=self.bits, rank=nb, codebook=self.codebook, bias=self.bias is not None,
                            device=self.scales.device, dtype=self.scales.dtype)
        layer.codebook_name = self.codebook_name
        layer.qweight.copy_(pack(self.codes(), self.bits))
        layer.B.copy_(self.scales)
        indicator = torch.zeros(nb, K, device=self.scales.device, dtype=self.scales.dtype)
        k = torch.arange(K, device=self.scales.device)
        indicator[k // self.block, k] = 1.0
        layer.A.copy_(indicator)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer.requires_grad_(False)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"codebook={self.codebook_name}, block={self.block}, bias={self.bias is not None}")


QAT_LAYERS = (LordsQATLinear, BlockQATLinear)
KINDS = ("lords", "block")


# --- whole models -------------------------------------------------------------------------------

def prepare_for_qat(model: nn.Module, cfg: LordsConfig | None = None, *, kind: str = "lords",
                    skip=("lm_head",), freeze_rest: bool = True) -> int:
    """Replace every eligible nn.Linear of `model` with a QAT layer, in place: kind="lords"
    (LordsQATLinear, scales initialized by LoRDS PTQ under cfg) or "block" (BlockQATLinear with
    cfg.block, clipping-searched scales). freeze_rest: everything but the QAT layers' weight,
    scales and bias is frozen. Returns the number of trainable parameters."""
    from .model import _set_submodule, eligible_linears
    cfg = cfg or LordsConfig()
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if isinstance(skip, str):
        skip = (skip,)
    need_block = kind == "block" or cfg.init == "block"
    todo, _ = eligible_linears(model, skip, cfg.bits, cfg.block if need_block else None)
    if not todo:
        raise ValueError(f"model: no nn.Linear layer to convert (skip={tuple(skip)})")
    if freeze_rest:
        model.requires_grad_(False)
    for name, lin in todo:
        if kind == "lords":
            new = LordsQATLinear.from_linear(lin, cfg)
        else:
            new = BlockQATLinear.from_linear(lin, bits=cfg.bits, codebook=cfg.codebook, block=cfg.block)
        _set_submodule(model, name, new.to(lin.weight.device))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_model(model: nn.Module) -> nn.Module:
    """Replace every QAT layer of `model` with its deployable LordsLinear, in place."""
    from .model import _set_submodule
    names = [n for n, m in model.named_modules() if isinstance(m, QAT_LAYERS)]
    if not names:
        raise ValueError("model: expected QAT layers (LordsQATLinear / BlockQATLinear), found none")
    for name in names:
        _set_submodule(model, name, model.get_submodule(name).freeze())
    return model


def param_groups(model: nn.Module, lr_scales: float, lr_weights: float, *, lr_other: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: "scales" (B, A of LordsQATLinear and trainable LordsLinear,
    block scales of BlockQATLinear) at lr_scales without weight decay, "weights" (latent QAT weights
    and biases) at lr_weights with `weight_decay`, and "other" (any further trainable parameter) at
    lr_other (default lr_weights). Empty groups are left out; frozen parameters never appear."""
    for name, v in (("lr_scales", lr_scales), ("lr_weights", lr_weights)):
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name}: expected a positive number, got {v!r}")
    scales, weights, seen = [], [], set()
    for m in model.modules():
        if isinstance(m, QAT_LAYERS):
            scale_ps, weight_ps = m.scale_parameters(), m.weight_parameters() + ([m.bias] if m.bias is not None else [])
        elif isinstance(m, LordsLinear):
            scale_ps, weight_ps = [m.B, m.A], ([m.bias] if m.bias is not None else [])
        else:
            continue
        for p in scale_ps:
            if p.requires_grad and id(p) not in seen:
                scales.append(p)
                seen.add(id(p))
        for p in weight_ps:
            if p.requires_grad and id(p) not in seen:
                weights.append(p)
                seen.add(id(p))
    other = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [
        {"name": "scales", "params": scales, "lr": lr_scales, "weight_decay": 0.0},
        {"name": "weights", "params": weights, "lr": lr_weights, "weight_decay": weight_decay},
        {"name": "other", "params": other, "lr": lr_other if lr_other is not None else lr_weights,
         "weight_decay": weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("model: no trainable parameter found (run prepare_for_qat or prepare_for_peft first)")
    return groups
