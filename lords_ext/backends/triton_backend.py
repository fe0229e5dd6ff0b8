"""Triton backend of the `lords` ops (registered as "triton" in lords_ext.backends).

Inputs arrive validated and contiguous from lords_ext._ops (see the registry docstring); this
module only chooses an algorithm per token count M and launches it:

    M <= DECODE_MAX_M (128)   decode_splitk: fused, split-K over the grid, one launch
    larger M                  dequant to x.dtype (one fused pass), then torch's matmul (cuBLAS)

and the same split for grad_x (GRAD_X_FUSED_MAX_M): the fused split-N kernel up to 128 rows of
grad_y, one dequant pass + cuBLAS above (W lives only for the call, as in the forward).

decode_reassoc (M <= 2) and tiled_gemm (any M) are complete and tested but never chosen by
default: on the H100 they lost to the two above at every M measured (bench/triton_notes.md:
reassoc 23.8 vs 22.7 us at M=1, 98 vs 22 us at M=2; tiled 63-121 us vs 26 us at M=64 and
2.4x slower than dequant+cuBLAS at M >= 1024). LORDS_TRITON_ALGO (reassoc | splitk | tiled |
dequant_mm) forces one algorithm, LORDS_TRITON_LUT (gather | global | select) one codebook
look-up (gather measured 2x faster than the others), and LORDS_TRITON_TUNE=0 fixed configs
instead of autotuning (for benchmarking and tests); LORDS_TRITON_GRADX (fused | dequant_mm) forces a
grad_x path.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    _TRITON_ERROR = None
except ImportError as exc:  # the registry reports the backend as unavailable
    triton = None
    _TRITON_ERROR = exc

if triton is not None:
    from .triton_kernels import _tuning
    from .triton_kernels.decode_reassoc import decode_reassoc_kernel, decode_reassoc_tuned
    from .triton_kernels.decode_splitk import decode_splitk_kernel, decode_splitk_tuned
    from .triton_kernels.dequant import dequant_kernel, dequant_tuned
    from .triton_kernels import grad_scales as _gs
    from .triton_kernels.grad_x import grad_x_kernel, grad_x_tuned
    from .triton_kernels.tiled_gemm import tiled_gemm_kernel, tiled_gemm_tuned

REASSOC_MAX_M = 0
DECODE_MAX_M = 128
# grad_x at training token counts: on the H100 (SmolLM2 layers, M = 2048, bf16; torch.profiler of the
# PEFT step, bench/peft_notes.md) the fused kernel took 39.9 us per call against 3.8 us (dequant kernel)
# + 10.0 us (cuBLAS) for the forward's dequant_mm path on the same layers; the threshold mirrors the
# forward's (measured at M = 64 and 256 there, not yet for grad_x itself).
GRAD_X_FUSED_MAX_M = 128
GRAD_X_ALGOS = ("fused", "dequant_mm")
TILED_MAX_M = 0
SPLITK_MAX_BLOCK_M = 256
ALGOS = ("reassoc", "splitk", "tiled", "dequant_mm")
_LUTS = {"gather": 0, "global": 1, "select": 2}
_X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_OPS = ("dequant", "dequant_matmul", "grad_x", "grad_scales")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available() -> bool:
    if triton is None:
        return False
    if _interpreting():
        return True
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def supports(op: str, x_or_qweight: torch.Tensor, M: int) -> bool:
    if triton is None or op not in _OPS:
        return False
    dev = x_or_qweight.device
    if dev.type == "cuda":
        # bf16 tensor-core dots need sm_80 or newer
        if torch.cuda.get_device_capability(dev)[0] < 8:
            return False
    elif not (dev.type == "cpu" and _interpreting()):
        return False
    if op == "dequant":
        return x_or_qweight.dtype == torch.uint8
    return x_or_qweight.dtype in _X_DTYPES


# ----------------------------------------------------------------------------- helpers

def _lut() -> int:
    name = os.environ.get("LORDS_TRITON_LUT", "gather")
    if name not in _LUTS:
        raise ValueError(f"LORDS_TRITON_LUT: expected one of {sorted(_LUTS)}, got {name!r}")
    return _LUTS[name]


def _forced_algo() -> str | None:
    name = os.environ.get("LORDS_TRITON_ALGO", "")
    if name in ("", "auto"):
        return None
    if name not in ALGOS:
        raise ValueError(f"LORDS_TRITON_ALGO: expected one of {ALGOS} or 'auto', got {name!r}")
    return name


def _geometry(qweight, B, A, codebook):
    levels = codebook.numel()
    bits = levels.bit_length() - 1
    R, K = A.shape
    return dict(N=qweight.shape[0], K=K, R=R, stride_q=qweight.stride(0), BITS=bits,
                LEVELS=levels, R_PAD=max(16, triton.next_power_of_2(R)))


def _needs_reference(*tensors) -> bool:
    # float64 scales (gradcheck) have no tensor-core path; the reference computes them exactly
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _scales(B, A):
    # tl.dot takes one operand dtype; mixed B/A dtypes meet in fp32
    if B.dtype != A.dtype:
        return B.float(), A.float()
    return B, A


def _precisions(x_dtype, s_dtype):
    """(scale-tile dot, main dot) input precisions: fp32 activations keep ~fp32 accuracy through
    3xTF32; 16-bit activations are rounded to 16 bits anyway, so one TF32 pass is enough."""
    exact = x_dtype == torch.float32
    return ("tf32x3" if exact and s_dtype == torch.float32 else "tf32",
            "tf32x3" if exact else "tf32")


def _bucket(M: int) -> int:
    return min(triton.next_power_of_2(max(M, 1)), 1 << 16)


def _bias_arg(bias, codebook):
    # HAS_BIAS=False never reads it; a tensor the kernel does not write, because the interpreter
    # copies every tensor argument back after the launch and an output passed twice is clobbered
    return bias if bias is not None else codebook


_workspaces: dict = {}


def _workspace(device, M: int, N: int, tiles: int):
    """Zeroed fp32 partial sums [M*N] and int32 tile counters; the split-K kernels leave both
    zero when they finish, so the buffer is allocated once per device and stream and reused."""
    # the raw stream handle: torch.cuda.current_stream(device) costs ~10 us of host time per call
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0
    key = (str(device), stream)
    need = M * N + tiles
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < need:
        buf = torch.zeros(need, dtype=torch.float32, device=device)
        _workspaces[key] = buf
    return buf[: M * N], buf[M * N: need].view(torch.int32)


def choose_algo(M: int, R: int) -> str:
    forced = _forced_algo()
    if forced is not None:
        return forced
    if M <= REASSOC_MAX_M:
        return "reassoc"
    if M <= DECODE_MAX_M:
        return "splitk"
    if M <= TILED_MAX_M:
        return "tiled"
    return "dequant_mm"


# ----------------------------------------------------------------------------- ops

def _launch(tuned, raw, grid, args, kw, kind, config, M, N, K, block_m=16, xsz=2, bsz=2):
    """Run the autotuned kernel, or `raw` with a fixed config (given, or the default one when
    LORDS_TRITON_TUNE=0)."""
    if config is None and not _tuning.tuning_enabled():
        config = _tuning.default_config(kind, M, N, K, block_m, kw["BITS"], kw["R_PAD"], xsz, bsz)
    if config is None:
        _tuning.run_tuned(tuned, grid, args, kw)
        return
    config = dict(config)
    launch = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    while True:
        try:
            raw[grid(config)](*args, **kw, **config, **launch)
            return
        except triton.runtime.errors.OutOfResources:
            # the shared-memory model in _tuning is an estimate: shorten the pipeline, then the
            # K tile, before giving up
            if launch.get("num_stages", 3) > 1:
                launch["num_stages"] = launch.get("num_stages", 3) - 1
            elif config.get("BLOCK_K", 0) > 32:
                config["BLOCK_K"] //= 2
            else:
                raise


def dequant(qweight, B, A, codebook, out_dtype=None, s_prec=None, config=None):
    """W [N, K] in B.dtype (or out_dtype)."""
    if _needs_reference(B, A, codebook):
        from . import reference
        W = reference.dequant(qweight, B, A, codebook)
        return W if out_dtype is None else W.to(out_dtype)
    B, A = _scales(B, A)
    g = _geometry(qweight, B, A, codebook)
    N, K = g["N"], g["K"]
    out_dtype = out_dtype or B.dtype
    W = torch.empty((N, K), dtype=out_dtype, device=qweight.device)
    if s_prec is None:
        s_prec = "tf32x3" if B.dtype == torch.float32 else "tf32"

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"]))

    _launch(dequant_tuned, dequant_kernel, grid,
            (qweight, B, A, codebook, W, N, K, g["R"], g["stride_q"]),
            dict(BITS=g["BITS"], LEVELS=g["LEVELS"], R_PAD=g["R_PAD"], LUT=_lut(), S_PREC=s_prec),
            "dequant", config, 0, N, K, bsz=B.element_size())
    return W


def decode_block_m(algo: str, M: int) -> int:
    """Token rows per program of the decode kernels: up to 2 for "reassoc", 16 to 256 for "splitk"."""
    if algo == "reassoc":
        return triton.next_power_of_2(min(M, 2))
    return max(16, triton.next_power_of_2(min(M, SPLITK_MAX_BLOCK_M)))


def dequant_matmul(x2d, qweight, B, A, codebook, bias=None, algo=None, config=None):
    """y = x2d @ W.T + bias, [M, N] in x2d.dtype. `algo` / `config` force a variant (benchmarks)."""
    if _needs_reference(B, A, codebook, bias):
        from . import reference
        return reference.dequant_matmul(x2d, qweight, B, A, codebook, bias)
    B, A = _scales(B, A)
    g = _geometry(qweight, B, A, codebook)
    M, N, K = x2d.shape[0], g["N"], g["K"]
    algo = algo or choose_algo(M, g["R"])
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    s_prec, x_prec = _precisions(x2d.dtype, B.dtype)
    if algo == "dequant_mm":
        W = dequant(qweight, B, A, codebook, out_dtype=x2d.dtype, s_prec=s_prec, config=config)
        bias_c = bias.to(x2d.dtype) if bias is not None else None
        return torch.nn.functional.linear(x2d, W, bias_c)
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if M == 0:
        return y
    kw = dict(HAS_BIAS=bias is not None, BITS=g["BITS"], LEVELS=g["LEVELS"], R_PAD=g["R_PAD"],
              LUT=_lut(), X_PREC=x_prec)
    if algo == "tiled":
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _launch(tiled_gemm_tuned, tiled_gemm_kernel, grid,
                (x2d, qweight, B, A, codebook, _bias_arg(bias, codebook), y,
                 M, N, K, g["R"], g["stride_q"], _bucket(M)),
                dict(kw, S_PREC=s_prec), "tiled", config, M, N, K,
                xsz=x2d.element_size(), bsz=B.element_size())
        return y
    block_m = decode_block_m(algo, M)
    if algo == "reassoc":
        tuned, raw = decode_reassoc_tuned, decode_reassoc_kernel
    else:
        tuned, raw = decode_splitk_tuned, decode_splitk_kernel
        kw["S_PREC"] = s_prec
    ws, cnt = _workspace(x2d.device, M, N, triton.cdiv(N, 16) * triton.cdiv(M, block_m))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, block_m), meta["SPLIT_K"])

    _launch(tuned, raw, grid,
            (x2d, qweight, B, A, codebook, _bias_arg(bias, codebook), y, ws, cnt,
             M, N, K, g["R"], g["stride_q"], _bucket(M)),
            dict(kw, BLOCK_M=block_m), algo, config, M, N, K, block_m,
            xsz=x2d.element_size(), bsz=B.element_size())
    return y


def choose_grad_x_algo(M: int) -> str:
    """"fused" (the split-N kernel, W never materialized) up to GRAD_X_FUSED_MAX_M rows of grad_y,
    "dequant_mm" (one dequant pass into a transient W, then cuBLAS) above; LORDS_TRITON_GRADX forces one."""
    name = os.environ.get("LORDS_TRITON_GRADX", "")
    if name in ("", "auto"):
        return "fused" if M <= GRAD_X_FUSED_MAX_M else "dequant_mm"
    if name not in GRAD_X_ALGOS:
        raise ValueError(f"LORDS_TRITON_GRADX: expected one of {GRAD_X_ALGOS} or 'auto', got {name!r}")
    return name


def grad_x(grad_y2d, qweight, B, A, codebook, config=None, algo=None):
    """grad_y2d @ W as [M, K] in grad_y2d.dtype. `algo` ("fused" | "dequant_mm") forces a path."""
    if _needs_reference(B, A, codebook):
        from . import reference
        return reference.grad_x(grad_y2d, qweight, B, A, codebook)
    B, A = _scales(B, A)
    g = _geometry(qweight, B, A, codebook)
    M, N, K = grad_y2d.shape[0], g["N"], g["K"]
    algo = algo or choose_grad_x_algo(M)
    if algo not in GRAD_X_ALGOS:
        raise ValueError(f"algo: expected one of {GRAD_X_ALGOS}, got {algo!r}")
    s_prec, x_prec = _precisions(grad_y2d.dtype, B.dtype)
    if algo == "dequant_mm" and M > 0:
        # the same GEMM class as the forward's dequant_mm path, with the same transient W
        W = dequant(qweight, B, A, codebook, out_dtype=grad_y2d.dtype, s_prec=s_prec)
        return grad_y2d @ W
    gx = torch.empty((M, K), dtype=grad_y2d.dtype, device=grad_y2d.device)
    if M == 0:
        return gx
    ws, cnt = _workspace(grad_y2d.device, M, K, triton.cdiv(K, 16) * triton.cdiv(M, 16))

    def grid(meta):
        return (triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(M, meta["BLOCK_M"]), meta["SPLIT_N"])

    _launch(grad_x_tuned, grad_x_kernel, grid,
            (grad_y2d, qweight, B, A, codebook, gx, ws, cnt, M, N, K, g["R"], g["stride_q"], _bucket(M)),
            dict(BITS=g["BITS"], LEVELS=g["LEVELS"], R_PAD=g["R_PAD"], LUT=_lut(),
                 S_PREC=s_prec, X_PREC=x_prec), "grad_x", config, M, N, K,
            xsz=grad_y2d.element_size(), bsz=B.element_size())
    return gx


def _grad_scales_fp32(gy, x, qweight, B, A, codebook, config, det):
    """fp32 (grad_B [N, r], grad_A [r, K]) for r <= MAX_R_PAD; see triton_kernels/grad_scales.py."""
    g = _geometry(qweight, B, A, codebook)
    M, N, K, R = gy.shape[0], g["N"], g["K"], g["R"]
    x_prec = "tf32x3" if x.dtype == torch.float32 else "tf32"
    # bf16 results: bf16 rank products (see triton_kernels/grad_scales.py)
    r_bf16 = x.dtype != torch.float32 and B.dtype == A.dtype == torch.bfloat16
    kw = dict(BITS=g["BITS"], LEVELS=g["LEVELS"], R_PAD=g["R_PAD"], LUT=_lut(),
              X_PREC=x_prec, R_PREC=x_prec, R_BF16=r_bf16, DET=det)
    args = (gy, x, qweight, B, A, codebook)
    tail = (M, N, K, R, g["stride_q"], _bucket(M))
    if config is None and not det and _tuning.tuning_enabled():
        out = torch.zeros(N * R + R * K, dtype=torch.float32, device=gy.device)
        gb, ga = out[: N * R], out[N * R:]

        def grid(meta):
            return (triton.cdiv(K, meta["BLOCK_K"]), meta["SPLIT_N"])

        _tuning.run_tuned(_gs.grad_scales_tuned, grid, (*args, gb, ga, *tail), kw)
        return gb.view(N, R), ga.view(R, K)
    config = dict(config or _gs.default_config(M, N, K, g["R_PAD"], x.element_size()))
    launch = {k: config.pop(k) for k in ("num_warps", "num_stages") if k in config}
    while True:
        k_tiles = triton.cdiv(K, config["BLOCK_K"])
        split = config["SPLIT_N"]
        if det:
            gb = torch.empty((k_tiles, N, R), dtype=torch.float32, device=gy.device)
            ga = torch.empty((split, R, K), dtype=torch.float32, device=gy.device)
        else:
            out = torch.zeros(N * R + R * K, dtype=torch.float32, device=gy.device)
            gb, ga = out[: N * R].view(N, R), out[N * R:].view(R, K)
        try:
            _gs.grad_scales_kernel[(k_tiles, split)](*args, gb, ga, *tail, **kw, **config, **launch)
        except triton.runtime.errors.OutOfResources:
            # shorter pipeline first, then smaller M and K tiles (the buffers follow BLOCK_K)
            if launch.get("num_stages", 3) > 1:
                launch["num_stages"] = launch.get("num_stages", 3) - 1
            elif config["BLOCK_M"] > 16:
                config["BLOCK_M"] //= 2
            elif config["BLOCK_K"] > 32:
                config["BLOCK_K"] //= 2
            else:
                raise
            continue
        # deterministic mode: the slots are summed in a fixed order
        return (gb.sum(0), ga.sum(0)) if det else (gb, ga)


def grad_scales(grad_y2d, x2d, qweight, B, A, codebook, config=None, deterministic=None):
    """(grad_B [N, r] in B.dtype, grad_A [r, K] in A.dtype) of dequant_matmul, with
    dS = (grad_y2d^T @ x2d) * codebook[Q] never materialized. `deterministic` (default: torch's
    use_deterministic_algorithms setting) trades fp32 atomics for per-tile partial sums."""
    if _needs_reference(grad_y2d, x2d, B, A, codebook):
        from . import reference
        return reference.grad_scales(grad_y2d, x2d, qweight, B, A, codebook)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # one dtype for both operands of the grad_y^T @ x dot
    dt = torch.promote_types(grad_y2d.dtype, x2d.dtype)
    gy, x = grad_y2d.to(dt).contiguous(), x2d.to(dt).contiguous()
    R = A.shape[0]
    if gy.shape[0] == 0:
        return B.new_zeros(B.shape), A.new_zeros(A.shape)
    step = _gs.MAX_R_PAD
    if R <= step:
        gb, ga = _grad_scales_fp32(gy, x, qweight, B, A, codebook, config, deterministic)
    else:
        # ranks beyond one register tile: chunks of 128, each recomputing grad_y^T @ x
        parts = [_grad_scales_fp32(gy, x, qweight, B[:, c:c + step].contiguous(), A[c:c + step],
                                   codebook, config, deterministic) for c in range(0, R, step)]
        gb = torch.cat([p[0] for p in parts], dim=1)
        ga = torch.cat([p[1] for p in parts], dim=0)
    return gb.to(B.dtype), ga.to(A.dtype)
