"""Static SASS facts of the CUDA kernels, without a GPU: instruction counts per kernel region.

The decode kernels are issue-bound (bench/cuda_notes.md: ncu showed ~0.3 warp instructions per weight
at ~0.37 issued per scheduler per cycle), so the number of instructions a warp executes is the first
thing a change should move. This compiles one .cu file with the flags of setup.py for one
architecture (nvcc -cubin), disassembles it with nvdisasm and, for every kernel whose mangled name
contains each given substring, prints the instructions before the first tensor-core instruction
(prologue), from the first to the last of them (main loop) and after the last one
(epilogue), with the main loop's most frequent opcodes. Static counts: a loop body counts once, both
sides of a branch count; compare versions of the same kernel, never kernels of different shape.

nvdisasm is not part of the nvcc-only toolkit on the development machine; `pip install
nvidia-cuda-nvdisasm` provides it (found automatically), or pass --nvdisasm.

    python bench/sass_static.py --cu csrc/reassoc_gemv.cu --kernel reassoc_kernelI13__nv_bfloat16Li4ELi4ELb1E
    python bench/sass_static.py --triton dequant      # the Triton dequant kernel, compiled ahead of time
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the Triton presets import lords_ext from this checkout
TENSOR_OPS = ("HMMA", "HGMMA", "IMMA")


def find_nvdisasm(given: str | None) -> str:
    if given:
        return given
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:
        import nvidia
        for base in nvidia.__path__:
            for cand in sorted(Path(base).glob("cu*/bin/nvdisasm")):
                return str(cand)
    except ImportError:
        pass
    raise SystemExit("nvdisasm not found: pip install nvidia-cuda-nvdisasm, or pass --nvdisasm PATH")


def compile_cubin(cu: Path, arch: str, out: Path) -> None:
    cmd = ["nvcc", "-O3", "-std=c++20", "-lineinfo", f"-I{ROOT / 'csrc'}",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-cubin", "-o", str(out), str(cu)]
    subprocess.run(cmd, check=True)


def disassemble(nvdisasm: str, write_cubin) -> str:
    """nvdisasm's text of the cubin that `write_cubin(path)` writes (into a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        write_cubin(cubin)
        return subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout


def kernels(sass: str) -> dict[str, list[str]]:
    """{mangled name: opcode list} from nvdisasm's text."""
    out: dict[str, list[str]] = {}
    name = None
    for line in sass.splitlines():
        if line.startswith(".text."):
            name = line[len(".text."):].rstrip(":")
            out[name] = []
        elif name is not None:
            m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
            if m:
                out[name].append(m.group(1).split(".")[0])
    return out


def regions(ops: list[str]) -> dict:
    mma = [i for i, op in enumerate(ops) if op in TENSOR_OPS]
    if not mma:
        return {"total": len(ops)}
    # the span from the first to the last tensor-core op: the unrolled body of the main loop in these
    # kernels (an enclosing loop's bookkeeping and any code loads issued for the next trip sit outside)
    loop = ops[mma[0]:mma[-1] + 1]
    return {"total": len(ops), "prologue": mma[0], "main_loop": len(loop),
            "epilogue": len(ops) - mma[-1] - 1, "tensor_ops": len(mma),
            "main_loop_ops": dict(Counter(loop).most_common(8))}


# Triton kernels compiled ahead of time for sm_90 (no GPU needed), with the specializations the JIT gives
# 16-byte-aligned tensors and multiple-of-16 sizes (tt.divisibility), 4-bit NF codes, bf16, r_pad 32.
_PTR_TYPES = {"x_ptr": "*bf16", "q_ptr": "*u8", "b_ptr": "*bf16", "a_ptr": "*bf16", "cb_ptr": "*fp32",
              "bias_ptr": "*fp32", "y_ptr": "*bf16", "w_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
_TRITON_PRESETS = {
    "dequant": ("lords_ext.backends.triton_kernels.dequant", "dequant_kernel",
                {"BLOCK_N": 64, "BLOCK_K": 128}, 4, 1),
    "splitk": ("lords_ext.backends.triton_kernels.decode_splitk", "decode_splitk_kernel",
               {"HAS_BIAS": False, "X_PREC": "tf32", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}, 4, 3),
}


def triton_sass(preset: str, nvdisasm: str) -> str:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, name, extra, warps, stages = _TRITON_PRESETS[preset]
    fn = getattr(importlib.import_module(module), name)
    consts = {"BITS": 4, "LEVELS": 16, "R_PAD": 32, "LUT": 0, "S_PREC": "tf32", **extra}
    sig = {a: _PTR_TYPES.get(a) or ("constexpr" if a in consts else "i32") for a in fn.arg_names}
    div16 = [a for a in fn.arg_names if a.endswith("_ptr") or a in ("N", "K", "R", "stride_q")]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div16}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return disassemble(nvdisasm, lambda path: path.write_bytes(k.asm["cubin"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cu", default="csrc/reassoc_gemv.cu")
    ap.add_argument("--arch", default="90")
    ap.add_argument("--kernel", nargs="+", help="substrings of mangled kernel names")
    ap.add_argument("--triton", choices=sorted(_TRITON_PRESETS),
                    help="a Triton kernel instead (sm_90, 4-bit, bf16, r_pad 32, tiles as in the preset)")
    ap.add_argument("--nvdisasm")
    args = ap.parse_args(argv)
    nvdisasm = find_nvdisasm(args.nvdisasm)
    if args.triton:
        ops = next(iter(kernels(triton_sass(args.triton, nvdisasm)).values()))
        r = regions(ops)
        print(f"Triton {args.triton}, sm_90: {r['total']} static instructions per thread; "
              f"top opcodes {dict(Counter(ops).most_common(14))}")
        return 0
    if not args.kernel:
        ap.error("--kernel is required unless --triton is given")
    found = kernels(disassemble(nvdisasm, lambda path: compile_cubin(ROOT / args.cu, args.arch, path)))
    print(f"{args.cu}, sm_{args.arch}: static instructions per region")
    print("| kernel | total | prologue | main loop | epilogue | tensor-core ops | main loop opcodes |")
    print("|---|---|---|---|---|---|---|")
    rc = 0
    for want in args.kernel:
        hits = [n for n in found if want in n]
        if not hits:
            print(f"| {want} | not found | | | | | |")
            rc = 1
        for n in hits:
            r = regions(found[n])
            m = re.search(r"\d([a-z_]+_kernel)(I.*?E)EvP", n)
            short = (m.group(1) + "<" + m.group(2)[1:-1] + ">") if m else n[:70]
            print(f"| {short} | {r['total']} | {r.get('prologue', '-')} | {r.get('main_loop', '-')} | "
                  f"{r.get('epilogue', '-')} | {r.get('tensor_ops', 0)} | {r.get('main_loop_ops', '')} |")
    return rc


if __name__ == "__main__":
    sys.exit(main())
