"""LoRDS: low-rank decomposed scaling for quantized LLM weights, W = codebook[Q] * (B @ A).

Public API only; see README.md and ../shared/DESIGN.md for the contracts."""
from . import _ops  # noqa: F401  (registers torch.ops.lords.*)
from .formats import CODEBOOK_NAMES, get_codebook, normal_float, pack, symmetric_int, unpack
from .quantize import (
    BlockwiseQuantized,
    LordsConfig,
    LordsQuantized,
    blockwise_quantize,
    frobenius_error,
    parity_rank,
    quantize_weight,
    relative_error,
)
from .nn import LordsLinear

__version__ = "0.1.0"
