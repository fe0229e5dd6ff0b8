"""The contenders of the kernel benchmark: each builds its own weights for a linear of shape (N, K)
and computes y = f(x) for x [M, K] in bf16.

A factory returns a Contender holding several distinct weight copies (so a timing loop can rotate
past L2, see timing.py), the call, and an fp32 reference of what copy 0 must compute. Anything that
cannot run here (bitsandbytes or gemlite not installed, a LoRDS backend not built) raises
Unavailable with the reason; the runner prints it and goes on.

LoRDS weights are random, not quantized from a matrix: random codes packed in the canonical layout
with lords_ext.formats.pack, B and A random positive bf16 with B @ A around 0.02 (a typical weight
scale), 4-bit NF4, the parity rank for block 64. Speed does not depend on which codes were chosen,
and the benchmark then does not wait for the quantizer.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import timing

DTYPE = torch.bfloat16
BLOCK = 64  # block size of every block-wise baseline and of the LoRDS parity rank
LORA_RANK = 16  # QLoRA branch, as in BENCHMARKING.md
LORA_ALPHA = 16
WEIGHT_STD = 0.02


class Unavailable(Exception):
    """This contender cannot run on this machine; the message says why."""


@dataclass
class Contender:
    key: str  # CLI name
    label: str  # name in tables and plots
    family: str  # "lords", "existing" (a 4-bit or bf16 kernel that ships today), "qlora", "floor"
    bytes_per_copy: int  # weight bytes one call must read
    copies: list[Any]  # per-copy state handed to `call`
    call: Callable[[Any, torch.Tensor], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor]  # x -> fp32 y of copy 0
    supports: Callable[[torch.Tensor], str | None] = lambda x: None  # reason not to run x, or None
    tol: float = 2e-2  # bound on ||y - ref|| / ||ref||: bf16 output and bf16 operands
    note: str = ""
    info: Callable[[torch.Tensor], str] = lambda x: ""  # per-call detail (e.g. the backend picked)
    extra: dict[str, Any] = field(default_factory=dict)


def parity_rank(N: int, K: int, block: int = BLOCK) -> int:
    """r = floor(N*K / (block*(N + K))), at least 1 (LORDS.md): 32 for 4096x4096 at block 64."""
    from lords_ext.quantize import parity_rank as rank

    return rank(N, K, block)


def lords_bytes(N: int, K: int, bits: int, r: int) -> int:
    """Bytes of a LoRDS layer: packed codes + B + A in bf16 (the codebook's 64 bytes aside)."""
    return N * K * bits // 8 + (N * r + r * K) * 2


def _dense_reference(w_fp32: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: x.float() @ w_fp32.T


def check(c: Contender, x: torch.Tensor) -> float:
    """||y - ref|| / ||ref|| of copy 0 on input x (inf for NaN, inf or a wrong shape)."""
    y = c.call(c.copies[0], x)
    return timing.rel_error(y, c.reference(x))


# --- LoRDS --------------------------------------------------------------------------------------

def _import_lords():
    try:
        import lords_ext
        from lords_ext import formats
    except Exception as exc:  # noqa: BLE001 - a half-built package must not stop the other contenders
        raise Unavailable(f"lords_ext does not import ({type(exc).__name__}: {exc})") from exc
    return lords_ext, formats


class LordsWeights:
    """Random LoRDS layers of one shape, shared by every LoRDS contender (same bytes, same math)."""

    def __init__(self, N: int, K: int, device: torch.device, bits: int = 4, codebook: str = "nf4",
                 rank: int | None = None, seed: int = 0):
        _, formats = _import_lords()
        self.N, self.K, self.bits = N, K, bits
        self.r = rank if rank is not None else parity_rank(N, K)
        self.bytes_per_copy = lords_bytes(N, K, bits, self.r)
        levels, self.codebook_name = formats.get_codebook(codebook, bits)
        self.codebook = levels.to(device)
        gen = torch.Generator(device=device).manual_seed(seed)
        amp = math.sqrt(WEIGHT_STD / self.r)
        self.copies = []
        self.codes0 = None
        for i in range(timing.copies_for(self.bytes_per_copy)):
            codes = torch.randint(0, 1 << bits, (N, K), device=device, dtype=torch.uint8, generator=gen)
            qweight = formats.pack(codes, bits)
            B = ((torch.rand(N, self.r, device=device, generator=gen) + 0.5) * amp).to(DTYPE)
            A = ((torch.rand(self.r, K, device=device, generator=gen) + 0.5) * amp).to(DTYPE)
            self.copies.append((qweight, B, A))
            if i == 0:
                self.codes0 = codes  # kept unpacked: the reference does not trust the packing
        self._w0 = None

    def weight0(self) -> torch.Tensor:
        """fp32 W of copy 0 from the unpacked codes: codebook[Q] * (B @ A)."""
        if self._w0 is None:
            _, B, A = self.copies[0]
            self._w0 = self.codebook.float()[self.codes0.long()] * (B.float() @ A.float())
        return self._w0


def lords_backend(name: str) -> Callable[[int, int, torch.device, LordsWeights], Contender]:
    def build(N: int, K: int, device: torch.device, lw: LordsWeights) -> Contender:
        lords_ext, _ = _import_lords()
        backends = lords_ext.backends
        if not backends.available(name):
            mod = backends.get(name)
            why = "module does not import" if mod is None else "available() is False"
            raise Unavailable(f"LoRDS backend {name!r} is not available here ({why})")
        mod = backends.get(name)
        cb = lw.codebook

        def call(state, x):
            qweight, B, A = state
            return mod.dequant_matmul(x, qweight, B, A, cb, None)

        def supports(x):
            if not mod.supports("dequant_matmul", x, x.shape[0]):
                return f"backend {name} does not support dequant_matmul for M={x.shape[0]}"
            return None

        return Contender(key=f"lords_{name}", label=f"LoRDS {name}", family="lords",
                         bytes_per_copy=lw.bytes_per_copy, copies=lw.copies, call=call,
                         reference=_dense_reference(lw.weight0()), supports=supports,
                         note=f"backend module {name}, r={lw.r}, {lw.codebook_name}")
    return build


def lords_op(N: int, K: int, device: torch.device, lw: LordsWeights) -> Contender:
    lords_ext, _ = _import_lords()
    if not hasattr(torch.ops, "lords") or not hasattr(torch.ops.lords, "dequant_matmul"):
        raise Unavailable("torch.ops.lords.dequant_matmul is not registered")
    op = torch.ops.lords.dequant_matmul
    cb = lw.codebook

    def call(state, x):
        qweight, B, A = state
        return op(x, qweight, B, A, cb, None)

    def info(x):
        try:
            # the same arguments as the op's own choice (lords_ext/_ops.py): the fused GEMM rule reads K, N, bits
            name = lords_ext.backends.dispatch.choose("dequant_matmul", x, x.shape[0], lw.r, lw.K, lw.N, lw.bits)
            return "dispatch -> " + name
        except Exception as exc:  # noqa: BLE001 - informational only
            return f"dispatch unknown ({exc})"

    return Contender(key="lords_op", label="LoRDS op", family="lords", bytes_per_copy=lw.bytes_per_copy,
                     copies=lw.copies, call=call, reference=_dense_reference(lw.weight0()), info=info,
                     note=f"torch.ops.lords.dequant_matmul, r={lw.r}, {lw.codebook_name}")


def _lords_linear_module(lords_ext, qweight, B, A, codebook, bits, codebook_name):
    """A LordsLinear holding these exact tensors, without running the quantizer."""
    qw = lords_ext.LordsQuantized(qweight=qweight, B=B, A=A, codebook=codebook, bits=bits,
                                  codebook_name=codebook_name)
    return lords_ext.LordsLinear.from_quantized(qw, None, dtype=B.dtype)


def lords_linear(N: int, K: int, device: torch.device, lw: LordsWeights) -> Contender:
    lords_ext, _ = _import_lords()
    if not hasattr(lords_ext, "LordsLinear") or not hasattr(lords_ext.LordsLinear, "from_quantized"):
        raise Unavailable("lords_ext.LordsLinear.from_quantized does not exist")
    mods = [_lords_linear_module(lords_ext, q, B, A, lw.codebook, lw.bits, lw.codebook_name).eval()
            for q, B, A in lw.copies]
    return Contender(key="lords_linear", label="LordsLinear", family="lords", bytes_per_copy=lw.bytes_per_copy,
                     copies=mods, call=lambda m, x: m(x), reference=_dense_reference(lw.weight0()),
                     note=f"lords_ext.LordsLinear forward, r={lw.r}")


# --- existing kernels ---------------------------------------------------------------------------

def _random_weight(N: int, K: int, device, gen) -> torch.Tensor:
    return (torch.randn(N, K, device=device, generator=gen) * WEIGHT_STD).to(DTYPE)


def cublas(N: int, K: int, device: torch.device, lw=None, seed: int = 1) -> Contender:
    gen = torch.Generator(device=device).manual_seed(seed)
    nbytes = N * K * 2
    ws = [_random_weight(N, K, device, gen) for _ in range(timing.copies_for(nbytes))]
    return Contender(key="cublas", label="cuBLAS bf16", family="existing", bytes_per_copy=nbytes, copies=ws,
                     call=lambda w, x: F.linear(x, w), reference=_dense_reference(ws[0].float()),
                     note="F.linear, bf16 weights")


def _import_bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        raise Unavailable(f"bitsandbytes is not installed or does not load ({type(exc).__name__}: {exc})") from exc
    return bnb, bnbf


def _bnb_copies(N, K, device, seed, double_quant):
    bnb, bnbf = _import_bnb()
    gen = torch.Generator(device=device).manual_seed(seed)
    # codes + absmax (fp32 per block, or 8-bit with a second-level fp32 absmax per 256 blocks)
    absmax_bytes = (N * K // BLOCK) * (1 if double_quant else 4) + (N * K // BLOCK // 256 * 4 if double_quant else 0)
    nbytes = N * K // 2 + absmax_bytes
    copies = []
    for _ in range(timing.copies_for(nbytes)):
        w = _random_weight(N, K, device, gen)
        packed, state = bnbf.quantize_4bit(w, blocksize=BLOCK, quant_type="nf4",
                                           compress_statistics=double_quant, quant_storage=torch.uint8)
        copies.append((packed, state))
    packed0, state0 = copies[0]
    w0 = bnbf.dequantize_4bit(packed0, state0).float()
    return bnb, copies, nbytes, w0


def bnb_nf4(N: int, K: int, device: torch.device, lw=None, seed: int = 2, double_quant: bool = False) -> Contender:
    bnb, copies, nbytes, w0 = _bnb_copies(N, K, device, seed, double_quant)

    def call(state, x):
        packed, qs = state
        return bnb.matmul_4bit(x, packed.t(), quant_state=qs)

    key, label = ("bnb_nf4_dq", "bnb NF4 (double quant)") if double_quant else ("bnb_nf4", "bnb NF4")
    return Contender(key=key, label=label, family="existing", bytes_per_copy=nbytes, copies=copies, call=call,
                     reference=_dense_reference(w0),
                     note=f"bitsandbytes {bnb.__version__} matmul_4bit, nf4, blocksize {BLOCK}, bf16"
                          + (", compress_statistics" if double_quant else ""))


def bnb_nf4_dq(N: int, K: int, device: torch.device, lw=None, seed: int = 2) -> Contender:
    return bnb_nf4(N, K, device, lw, seed=seed, double_quant=True)


def qlora(N: int, K: int, device: torch.device, lw=None, seed: int = 3) -> Contender:
    """peft's Linear4bit forward: base NF4 matmul, then + lora_B(lora_A(x)) * (alpha / r)."""
    bnb, copies, nbytes, w0 = _bnb_copies(N, K, device, seed, double_quant=False)
    gen = torch.Generator(device=device).manual_seed(seed + 100)
    scaling = LORA_ALPHA / LORA_RANK
    lora = []
    for packed, qs in copies:
        # peft starts lora_B at zero; a trained adapter is not zero, and zeros are never timed.
        la = (torch.randn(LORA_RANK, K, device=device, generator=gen) / math.sqrt(K)).to(DTYPE)
        lb = (torch.randn(N, LORA_RANK, device=device, generator=gen) * 0.01).to(DTYPE)
        lora.append((packed, qs, la, lb))
    w_eff = w0 + scaling * (lora[0][3].float() @ lora[0][2].float())

    def call(state, x):
        packed, qs, la, lb = state
        y = bnb.matmul_4bit(x, packed.t(), quant_state=qs)
        return y + F.linear(F.linear(x, la), lb) * scaling

    return Contender(key="qlora", label=f"QLoRA NF4+r{LORA_RANK}", family="qlora",
                     bytes_per_copy=nbytes + (LORA_RANK * (N + K)) * 2, copies=lora, call=call,
                     reference=_dense_reference(w_eff),
                     note=f"bnb {bnb.__version__} matmul_4bit + rank-{LORA_RANK} LoRA branch (peft forward order)")


def torch_int4(N: int, K: int, device: torch.device, lw=None, seed: int = 4, inner_k_tiles: int = 8) -> Contender:
    """torch's tinygemm int4 kernel (what torchao's int4 weight-only path runs), group 64.
    Layout (as torch's own tests build it): uint8 [N, K/2] with code 2j in the HIGH nibble, then
    _convert_weight_to_int4pack; scales_and_zeros [K/g, N, 2]; W = (q - 8) * scale + zero."""
    for op in ("_convert_weight_to_int4pack", "_weight_int4pack_mm"):
        if not hasattr(torch, op):
            raise Unavailable(f"torch.{op} does not exist in torch {torch.__version__}")
    if K % (inner_k_tiles * 16) or N % 8:
        raise Unavailable(f"tinygemm needs K % {inner_k_tiles * 16} == 0 and N % 8 == 0, got N={N}, K={K}")
    gen = torch.Generator(device=device).manual_seed(seed)
    nbytes = N * K // 2 + (K // BLOCK) * N * 4
    copies, w0 = [], None
    step = WEIGHT_STD / 4
    for i in range(timing.copies_for(nbytes)):
        q = torch.randint(0, 16, (N, K), device=device, dtype=torch.int32, generator=gen)
        packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        wp = torch._convert_weight_to_int4pack(packed, inner_k_tiles)
        scales = (torch.rand(K // BLOCK, N, device=device, generator=gen) + 0.5) * step
        zeros = (torch.rand(K // BLOCK, N, device=device, generator=gen) - 0.5) * step
        sz = torch.stack([scales, zeros], dim=-1).to(DTYPE).contiguous()
        copies.append((wp, sz))
        if i == 0:
            s = sz[..., 0].float().T.repeat_interleave(BLOCK, dim=1)
            z = sz[..., 1].float().T.repeat_interleave(BLOCK, dim=1)
            w0 = (q.float() - 8) * s + z

    def call(state, x):
        wp, sz = state
        return torch._weight_int4pack_mm(x, wp, BLOCK, sz)

    return Contender(key="torch_int4", label="torch int4 g64", family="existing", bytes_per_copy=nbytes,
                     copies=copies, call=call, reference=_dense_reference(w0),
                     note=f"torch._weight_int4pack_mm (tinygemm), group {BLOCK}, inner_k_tiles {inner_k_tiles}")


def gemlite_a16w4(N: int, K: int, device: torch.device, lw=None, seed: int = 5) -> Contender:
    """gemlite's A16W4 Triton kernels, HQQ-style W = (q - zero) * scale, group 64, bf16."""
    try:
        import gemlite
        from gemlite.helper import A16W4_HQQ_INT
    except Exception as exc:  # noqa: BLE001 - not installed, or fails at import on this machine
        raise Unavailable(f"gemlite is not installed or does not load ({type(exc).__name__}: {exc})") from exc
    gen = torch.Generator(device=device).manual_seed(seed)
    nbytes = N * K // 2 + (N * K // BLOCK) * 4
    copies, w0 = [], None
    step = WEIGHT_STD / 4
    for i in range(timing.copies_for(nbytes)):
        q = torch.randint(0, 16, (N, K), device=device, dtype=torch.uint8, generator=gen)
        scales = ((torch.rand(N, K // BLOCK, device=device, generator=gen) + 0.5) * step).to(DTYPE)
        zeros = (7.5 + torch.rand(N, K // BLOCK, device=device, generator=gen) - 0.5).to(DTYPE)
        layer = A16W4_HQQ_INT(device=str(device), dtype=DTYPE).from_weights(q, scales, zeros)
        copies.append(layer)
        if i == 0:
            w0 = (q.float() - zeros.float().repeat_interleave(BLOCK, 1)) * scales.float().repeat_interleave(BLOCK, 1)
    # tol: gemlite's split-K GEMV kernels (M <= 8) add partial sums into the bf16 output atomically;
    # measured on the H100, 1.4e-2 to 2.0e-2 at M = 1..4 and 3e-3 from M = 64, against fp32.
    return Contender(key="gemlite", label="gemlite A16W4 g64", family="existing", bytes_per_copy=nbytes,
                     copies=copies, call=lambda layer, x: layer(x), reference=_dense_reference(w0), tol=5e-2,
                     note=f"gemlite {getattr(gemlite, '__version__', '?')} A16W4_HQQ_INT, group {BLOCK}")


# --- the floor ----------------------------------------------------------------------------------

def _read_kernel():
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - fall back to a torch reduction
        return None

    @triton.jit
    def read_words(src, out, n, BLOCK_W: tl.constexpr, ITERS: tl.constexpr):
        # Each program streams ITERS * BLOCK_W int32 words and stores their maximum (a reduction
        # that cannot overflow), so the traffic is the buffer's bytes read once plus a tiny write.
        pid = tl.program_id(0)
        base = pid.to(tl.int64) * (BLOCK_W * ITERS)
        acc = tl.full([BLOCK_W], -2147483648, dtype=tl.int32)
        for i in tl.static_range(ITERS):
            offs = base + i * BLOCK_W + tl.arange(0, BLOCK_W)
            acc = tl.maximum(acc, tl.load(src + offs, mask=offs < n, other=-2147483648))
        tl.store(out + pid, tl.max(acc, axis=0))

    return triton, read_words


# (words per load step, steps per program, warps): measured all, the fastest is the floor.
FLOOR_CONFIGS = ((1024, 4, 4), (2048, 4, 8), (4096, 4, 8), (2048, 8, 8), (1024, 2, 4), (2048, 2, 8), (512, 4, 4))


def _check_block_max(out: torch.Tensor, buf: torch.Tensor, span: int) -> bool:
    """Every program's stored maximum equals torch's over its span: all of the buffer was read."""
    pad = (-buf.numel()) % span
    full = torch.cat([buf, buf.new_full((pad,), -2**31)]) if pad else buf
    return bool(torch.equal(out, full.view(-1, span).amax(dim=1)))


def floor_variants(N: int, K: int, device: torch.device, lw=None, bits: int = 4, r: int | None = None,
                   seed: int = 6) -> list[Contender]:
    """The streaming-read floor: read as many bytes as a LoRDS layer (codes + B + A in bf16), once.
    One Contender per kernel configuration; its `x` argument is ignored (the floor has no M)."""
    r = r if r is not None else parity_rank(N, K)
    nbytes = lords_bytes(N, K, bits, r)
    words = (nbytes + 3) // 4
    gen = torch.Generator(device=device).manual_seed(seed)
    bufs = [torch.randint(-2**31, 2**31 - 1, (words,), device=device, dtype=torch.int32, generator=gen)
            for _ in range(timing.copies_for(nbytes))]
    # Triton runs on CPU tensors only in its interpreter; elsewhere the torch reduction stands in.
    kern = _read_kernel() if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else None
    out_list = []

    if kern is None:
        c = Contender(key="floor", label="read floor", family="floor", bytes_per_copy=nbytes, copies=bufs,
                      call=lambda buf, x: buf.amax(), reference=lambda x: None,
                      note="torch.amax over int32 words (no triton kernel here)")
        c.extra["check"] = lambda out, buf=bufs[0]: int(out) == int(buf.max())
        return [c]
    triton, read_words = kern
    for bw, iters, warps in FLOOR_CONFIGS:
        grid = (triton.cdiv(words, bw * iters),)
        outs = [torch.empty(grid[0], device=device, dtype=torch.int32) for _ in bufs]

        def call(state, x, bw=bw, iters=iters, warps=warps, grid=grid):
            buf, out = state
            read_words[grid](buf, out, buf.numel(), BLOCK_W=bw, ITERS=iters, num_warps=warps)
            return out

        c = Contender(key="floor", label="read floor", family="floor", bytes_per_copy=nbytes,
                      copies=list(zip(bufs, outs)), call=call, reference=lambda x: None,
                      note=f"triton read kernel, {bw} words x {iters} steps per program, {warps} warps")
        c.extra["check"] = functools.partial(_check_block_max, buf=bufs[0], span=bw * iters)
        out_list.append(c)
    return out_list


# --- registry -----------------------------------------------------------------------------------

EXISTING = {
    "cublas": cublas,
    "bnb_nf4": bnb_nf4,
    "bnb_nf4_dq": bnb_nf4_dq,
    "qlora": qlora,
    "torch_int4": torch_int4,
    "gemlite": gemlite_a16w4,
}
DEFAULT_EXTRA_OFF = ("bnb_nf4_dq",)  # opt-in: bnb with double-quantized absmax (QLoRA's storage option)


def lords_keys() -> list[str]:
    """Keys of the LoRDS contenders known to this checkout (available or not)."""
    try:
        lords_ext, _ = _import_lords()
        backend_names = list(lords_ext.backends.names())
    except Unavailable:
        backend_names = ["cuda", "triton", "reference"]
    return [f"lords_{n}" for n in backend_names] + ["lords_op", "lords_linear"]


def all_keys() -> list[str]:
    return lords_keys() + list(EXISTING) + ["floor"]


def default_keys() -> list[str]:
    return [k for k in all_keys() if k not in DEFAULT_EXTRA_OFF]


def build(key: str, N: int, K: int, device: torch.device,
          lords_weights: Callable[[], LordsWeights]) -> Contender | list[Contender]:
    """Build one contender (the floor gives a list of kernel variants). Raises Unavailable."""
    if key in EXISTING:
        return EXISTING[key](N, K, device)
    if key == "floor":
        return floor_variants(N, K, device)
    if key == "lords_op":
        return lords_op(N, K, device, lords_weights())
    if key == "lords_linear":
        return lords_linear(N, K, device, lords_weights())
    if key.startswith("lords_"):
        return lords_backend(key[len("lords_"):])(N, K, device, lords_weights())
    raise ValueError(f"method: expected one of {all_keys()}, got {key!r}")
