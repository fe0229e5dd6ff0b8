"""Helpers shared by the backend test modules (Triton under the interpreter, Triton and CUDA on the GPU).

Imported as a plain module: pytest puts python_tests/ on sys.path for its test files.
"""
from __future__ import annotations

import importlib
import sys

import torch

from lords_ext import formats
from lords_ext.backends import reference


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| in float64; asserts equal shapes and a finite y."""
    assert y.shape == ref.shape, f"shape {tuple(y.shape)} != {tuple(ref.shape)}"
    y64 = y.double()
    assert torch.isfinite(y64).all(), "non-finite values in the output"
    ref64 = ref.double()
    return float((y64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def codebook_for(kind: str, bits: int, gen: torch.Generator) -> torch.Tensor:
    """A named codebook (`nf`, `int`) of this width, or `custom`: sorted random float32 levels."""
    if kind == "custom":
        levels = torch.randn(1 << bits, generator=gen, dtype=torch.float64).sort().values
        return levels.to(torch.float32)
    return formats.get_codebook(f"{kind}{bits}")[0]


def autograd_scales_ref(gy, x, qweight, B, A, cb):
    """(dL/dB, dL/dA) for L = <gy, dequant_matmul(x)>, by autograd through the reference forward in
    float64: independent of any hand-written backward formula."""
    B64 = B.detach().double().requires_grad_(True)
    A64 = A.detach().double().requires_grad_(True)
    y = reference.dequant_matmul(x.double(), qweight, B64, A64, cb.double(), None)
    y.backward(gy.double())
    return B64.grad, A64.grad


def load_interpreted(module_names: list[str]):
    """Import (or re-import) these modules in order and return the last one: the Triton backend with
    interpreted kernels, even if another test module imported it compiled first."""
    for name in module_names:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
        else:
            importlib.import_module(name)
    return sys.modules[module_names[-1]]


def compiled_triton():
    """The Triton backend module for tests of the compiled kernels; skips under the interpreter (which
    has its own test files) and where the backend cannot run (no triton, no GPU, GPU before sm_80)."""
    import os

    import pytest
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("this module tests the compiled kernels; the interpreter has its own test file")
    from lords_ext.backends import triton_backend
    if not triton_backend.available():
        pytest.skip("triton backend unavailable (no triton or GPU before sm_80)")
    return triton_backend
