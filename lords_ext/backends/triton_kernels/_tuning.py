"""Autotuning spaces. Triton's autotuner caches the winner per key for the life of the process,
so each (M bucket, N, K, r, bits, codebook look-up, dtypes) is tuned once. Under
TRITON_INTERPRET=1 (CI on the CPU) every space shrinks to one small config that still exercises
several K tiles, split-K and masking."""
import os

import triton

SMS = 132  # H100 SXM; split-K targets are coarse, an exact count is not needed
DECODE_KEY = ["M_BUCKET", "N", "K", "R", "BITS", "LUT", "BLOCK_M", "HAS_BIAS"]
TILED_KEY = ["M_BUCKET", "N", "K", "R", "BITS", "LUT", "HAS_BIAS"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _cfg(num_warps=4, num_stages=3, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


def decode_configs():
    if interpreting():
        return [_cfg(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, num_warps=1, num_stages=1)]
    # measured on the H100 (bench/triton_notes.md): 64x128 with 4 warps was best at M <= 16;
    # 8 warps and 128-row tiles lost 20-45%; 64x64 tiles keep the large-M accumulators small
    return [
        _cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=3),
        _cfg(BLOCK_N=64, BLOCK_K=64, SPLIT_K=0, num_warps=4, num_stages=4),
        _cfg(BLOCK_N=64, BLOCK_K=64, SPLIT_K=0, num_warps=8, num_stages=3),
    ]


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, int(v)).bit_length() - 1)


def split_for(tiles: int, k_tiles: int, waves: int) -> int:
    """Split factor giving about `waves` programs per SM, at least one K tile per split."""
    want = max(1, (waves * SMS) // max(1, tiles))
    return max(1, min(_pow2_floor(want), _pow2_floor(k_tiles)))


SMEM_BUDGET = 220 * 1024  # H100/H200 allow 227 KB per block; keep a margin for Triton's scratch


def _esize(t, default=2):
    return t.element_size() if hasattr(t, "element_size") else default


def smem_stage_bytes(kind, kw, bits, r_pad, xsz, bsz):
    """(bytes per pipeline stage, bytes outside the pipeline) of one program, from the tiles it
    streams. Fitted against Triton's own report on sm_90 (within ~10%, never under); fp32
    operands count twice because 3xTF32 keeps a high and a low part of each."""
    bn, bk = kw["BLOCK_N"], kw["BLOCK_K"]
    bm = kw.get("BLOCK_M", 16)
    codes = bn * bk * bits // 8
    xw = xsz * (2 if xsz == 4 else 1)
    bw = bsz * (2 if bsz == 4 else 1)
    if kind == "grad_x":
        return codes + bn * r_pad * bw + bn * bm * xw, r_pad * bk * bw + bn * bk * 4 * (xw // xsz) + 8192
    fixed = bn * bk * 4 * (xw // xsz) + 8192  # layout conversion of the fp32 scale / weight tile
    if kind == "reassoc":
        fixed += bk * bm * r_pad * 4 * (xw // xsz)
    return codes + r_pad * bk * bw + bm * bk * xw, fixed


def fit_stages(kind, kw, num_stages, bits, r_pad, xsz, bsz):
    """The deepest pipeline (<= num_stages) that fits SMEM_BUDGET, or None if none does."""
    per, fixed = smem_stage_bytes(kind, kw, bits, r_pad, xsz, bsz)
    for st in range(num_stages, 0, -1):
        if st * per + fixed <= SMEM_BUDGET:
            return st
    return None


def _fit(kind, cfg, named_args, kwargs, x_name):
    bits, r_pad = kwargs["BITS"], kwargs["R_PAD"]
    kw = dict(cfg.kwargs)
    kw.setdefault("BLOCK_M", kwargs.get("BLOCK_M", 16))
    st = fit_stages(kind, kw, cfg.num_stages, bits, r_pad, _esize(named_args.get(x_name)),
                    _esize(named_args.get("b_ptr")))
    if st is None:
        return None
    return triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=st)


def miscompiled(kind: str, num_warps: int, xsz: int) -> bool:
    """Configs Triton 3.6 compiles wrongly on sm_90: the 8-warp split-K kernel for fp32 activations
    (3xTF32) read shared memory past its allocation (compute-sanitizer, 2-bit codes, r = 64, 64x4092,
    bench/triton_config_check.py); the 4-warp configs of the same tiles are exact. fp32 activations
    are the accuracy path, not a speed target, so both the tuned and the fixed path leave them out."""
    return kind == "splitk" and num_warps == 8 and xsz == 4


def with_split_k(configs, named_args, **kwargs):
    """SPLIT_K=0 in a config means: choose from the grid size (1 and 2 waves of programs)."""
    N, K, M = named_args["N"], named_args["K"], named_args["M"]
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 16))
    out, seen = [], set()
    kind = "splitk" if "S_PREC" in kwargs else "reassoc"
    xsz = _esize(named_args.get("x_ptr"))
    for c in configs:
        if c.kwargs.get("SPLIT_K", 0) != 0:
            out.append(c)
            continue
        if miscompiled(kind, c.num_warps, xsz):
            continue
        tiles = triton.cdiv(N, c.kwargs["BLOCK_N"]) * triton.cdiv(M, block_m)
        k_tiles = triton.cdiv(K, c.kwargs["BLOCK_K"])
        c = _fit(kind, c, named_args, kwargs, "x_ptr")
        if c is None:
            continue
        for waves in (2, 4):
            s = split_for(tiles, k_tiles, waves)
            sig = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, s)
            if sig in seen:
                continue
            seen.add(sig)
            out.append(triton.Config({**c.kwargs, "SPLIT_K": s}, num_warps=c.num_warps,
                                     num_stages=c.num_stages))
    if not out:  # nothing fits the shared-memory budget: the smallest tiles, no pipelining
        tiles = triton.cdiv(N, 32) * triton.cdiv(M, block_m)
        out.append(triton.Config({"BLOCK_N": 32, "BLOCK_K": 64,
                                  "SPLIT_K": split_for(tiles, triton.cdiv(K, 64), 2)},
                                 num_warps=4, num_stages=1))
    return out


def tiled_configs():
    if interpreting():
        return [_cfg(BLOCK_N=32, BLOCK_M=16, BLOCK_K=32, GROUP_N=2, num_warps=1, num_stages=1)]
    return [
        _cfg(BLOCK_N=128, BLOCK_M=64, BLOCK_K=64, GROUP_N=8, num_warps=4, num_stages=4),
        _cfg(BLOCK_N=128, BLOCK_M=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
        _cfg(BLOCK_N=128, BLOCK_M=256, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
        _cfg(BLOCK_N=64, BLOCK_M=128, BLOCK_K=64, GROUP_N=8, num_warps=4, num_stages=4),
    ]


def prune_tiled(configs, named_args, **kwargs):
    M = named_args["M"]
    cap = max(16, triton.next_power_of_2(M))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= cap] or configs[:1]
    fitted = [_fit("tiled", c, named_args, kwargs, "x_ptr") for c in kept]
    return [c for c in fitted if c is not None] or [_smallest(kept[0])]


def _smallest(cfg):
    return triton.Config({**cfg.kwargs, "BLOCK_K": 32}, num_warps=cfg.num_warps, num_stages=1)


def dequant_configs():
    if interpreting():
        return [_cfg(BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)]
    # 64x128 / 4 warps measured best of four on the H100 (74.8 us vs 78-83 at 4096x4096, M=1024)
    return [
        _cfg(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=1),
        _cfg(BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1),
    ]


def grad_x_configs():
    if interpreting():
        return [_cfg(BLOCK_K=32, BLOCK_N=16, BLOCK_M=16, SPLIT_N=2, num_warps=1, num_stages=1)]
    return [
        _cfg(BLOCK_K=128, BLOCK_N=64, BLOCK_M=64, SPLIT_N=0, num_warps=4, num_stages=3),
        _cfg(BLOCK_K=128, BLOCK_N=64, BLOCK_M=128, SPLIT_N=0, num_warps=8, num_stages=3),
        _cfg(BLOCK_K=64, BLOCK_N=64, BLOCK_M=16, SPLIT_N=0, num_warps=4, num_stages=3),
    ]


def with_split_n(configs, named_args, **kwargs):
    """grad_x reduces over N: SPLIT_N=0 means choose it from the grid size like `with_split_k`."""
    N, K, M = named_args["N"], named_args["K"], named_args["M"]
    out, seen = [], set()
    cap = max(16, triton.next_power_of_2(M))
    for c in configs:
        if c.kwargs["BLOCK_M"] > cap and c is not configs[0]:
            continue
        if c.kwargs.get("SPLIT_N", 0) != 0:
            out.append(c)
            continue
        c = _fit("grad_x", c, named_args, kwargs, "gy_ptr")
        if c is None:
            continue
        tiles = triton.cdiv(K, c.kwargs["BLOCK_K"]) * triton.cdiv(M, c.kwargs["BLOCK_M"])
        s = split_for(tiles, triton.cdiv(N, c.kwargs["BLOCK_N"]), 2)
        sig = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, s)
        if sig not in seen:
            seen.add(sig)
            out.append(triton.Config({**c.kwargs, "SPLIT_N": s}, num_warps=c.num_warps,
                                     num_stages=c.num_stages))
    if not out:
        tiles = triton.cdiv(K, 64) * triton.cdiv(M, 16)
        out.append(triton.Config({"BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_M": 16,
                                  "SPLIT_N": split_for(tiles, triton.cdiv(N, 32), 2)},
                                 num_warps=4, num_stages=1))
    return out


def reassoc_configs():
    if interpreting():
        return [_cfg(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, num_warps=1, num_stages=1)]
    return [
        _cfg(BLOCK_N=64, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=3),
        _cfg(BLOCK_N=128, BLOCK_K=128, SPLIT_K=0, num_warps=4, num_stages=3),
        _cfg(BLOCK_N=64, BLOCK_K=256, SPLIT_K=0, num_warps=4, num_stages=3),
    ]


def tuning_enabled() -> bool:
    """LORDS_TRITON_TUNE=0 skips autotuning (fixed configs below): fast start, slower kernels."""
    return os.environ.get("LORDS_TRITON_TUNE", "1") != "0" and not interpreting()


def default_config(kind: str, M: int, N: int, K: int, block_m: int = 16, bits: int = 4,
                   r_pad: int = 32, xsz: int = 2, bsz: int = 2) -> dict:
    """A reasonable fixed config per kernel (kwargs plus num_warps / num_stages), its pipeline
    depth cut to fit shared memory."""
    if interpreting():
        cfg = {"splitk": decode_configs, "reassoc": reassoc_configs, "tiled": tiled_configs,
               "dequant": dequant_configs, "grad_x": grad_x_configs}[kind]()[0]
        return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if kind in ("splitk", "reassoc"):
        bn, bk = 64, (128 if block_m <= 64 else 64)
        kw = {"BLOCK_N": bn, "BLOCK_K": bk}
        if fit_stages(kind, {**kw, "BLOCK_M": block_m}, 3, bits, r_pad, xsz, bsz) is None:
            bn, bk = 32, 64
            kw = {"BLOCK_N": bn, "BLOCK_K": bk}
        tiles = triton.cdiv(N, bn) * triton.cdiv(M, block_m)
        kw["SPLIT_K"] = split_for(tiles, triton.cdiv(K, bk), 2)
        warps = 8 if block_m >= 128 and not miscompiled(kind, 8, xsz) else 4
    elif kind == "tiled":
        bm = min(128, max(16, triton.next_power_of_2(M)))
        kw = {"BLOCK_N": 128, "BLOCK_M": bm, "BLOCK_K": 64, "GROUP_N": 8}
        warps = 8 if bm >= 128 else 4
    elif kind == "dequant":
        return {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
    elif kind == "grad_x":
        bm = min(64, max(16, triton.next_power_of_2(M)))
        kw = {"BLOCK_K": 128, "BLOCK_N": 64, "BLOCK_M": bm}
        if fit_stages(kind, kw, 3, bits, r_pad, xsz, bsz) is None:
            kw = {"BLOCK_K": 64, "BLOCK_N": 32, "BLOCK_M": 16}
        tiles = triton.cdiv(K, kw["BLOCK_K"]) * triton.cdiv(M, kw["BLOCK_M"])
        kw["SPLIT_N"] = split_for(tiles, triton.cdiv(N, kw["BLOCK_N"]), 2)
        warps = 4
    else:
        raise ValueError(f"kind: expected one of splitk, reassoc, tiled, dequant, grad_x, got {kind!r}")
    stages = fit_stages(kind, {"BLOCK_M": block_m, **kw}, 3, bits, r_pad, xsz, bsz) or 1
    return {**kw, "num_warps": warps, "num_stages": stages}


def autotune_kwargs() -> dict:
    """Shorter timing per candidate than Triton's default (25 ms warm-up, 100 ms of repeats): the
    spaces are small and the kernels take microseconds. Older Triton without `do_bench` keeps its own."""
    import inspect

    if "do_bench" not in inspect.signature(triton.autotune).parameters:
        return {}
    from triton.testing import do_bench

    def quick(fn, quantiles=None):
        return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    return {"do_bench": quick}


# Config chosen per call signature, so a tuned kernel is launched through the JIT function
# directly after its first call. Triton's Autotuner.run rebuilds its key on every call (a dict of
# all arguments, hasattr + str(dtype) on each): ~40 us of host time per launch on the H100
# machine (bench/host_overhead.py), more than the GPU time of a small layer's kernels.
_chosen: dict = {}
_key_positions: dict = {}


def run_tuned(tuned, grid, args: tuple, kw: dict) -> None:
    """tuned[grid](*args, **kw), tuning once per distinct signature. The signature is finer than
    the autotuner's own key (its key arguments, every constexpr in kw, every tensor dtype), so the
    config reused is exactly the one the autotuner would have picked."""
    entry = _key_positions.get(id(tuned))
    if entry is None:
        names = list(tuned.arg_names)
        # the entry holds `tuned` itself so that its id is never reused by another object
        entry = _key_positions[id(tuned)] = (tuned, tuple(names.index(k) for k in tuned.keys
                                                          if names.index(k) < len(args)))
    pos = entry[1]
    key = (id(tuned), tuple(args[i] for i in pos), tuple(kw.items()),
           tuple(a.dtype for a in args if hasattr(a, "dtype")))
    cfg = _chosen.get(key)
    if cfg is None:
        tuned[grid](*args, **kw)
        if tuned.best_config.pre_hook is None:
            _chosen[key] = tuned.best_config.all_kwargs()
        return
    tuned.fn[grid](*args, **kw, **cfg)
