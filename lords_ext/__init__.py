"""LoRDS: low-rank decomposed scaling for quantized LLM weights, W = codebook[Q] * (B @ A).

Public API only; see README.md and ../shared/DESIGN.md for the contracts."""
from . import _ops  # noqa: F401  (registers torch.ops.lords.*)
from ._ops import dequant_matmul
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
from .model import load_quantized, quantize_model, save_quantized
from .peft import load_adapter, prepare_for_peft, save_adapter
from .qat import BlockQATLinear, LordsQATLinear, freeze_model, param_groups, prepare_for_qat
from .selftest import selftest

__version__ = "0.1.0"
