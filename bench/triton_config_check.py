"""Find which autotune config of a split-K Triton kernel faults or is wrong on one shape (GPU).

An illegal memory access poisons the CUDA context, so every run happens in its own process with
CUDA_LAUNCH_BLOCKING=1: first the autotuned path per M, then, for each M where that fails, every
config of the pruned tuning space on its own. Prints one row per run and a summary last.

    python bench/triton_config_check.py --case 2,int2,fp32,bf16,64,64,4092 --ms 1,3,16,37,200 --algo splitk
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "python_tests")]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _layer(case, M):
    import torch
    from test_gpu_triton import make_layer
    bits, cb_name, xd, sd, r, N, K = case
    q, B, A, cb = make_layer(N, K, r, bits, cb_name, getattr(torch, DTYPES[sd]), seed=r * 7 + bits)
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(M, K, device="cuda", generator=gen).to(getattr(torch, DTYPES[xd]))
    return x, q, B, A, cb


def _configs(case, M, algo):
    """The pruned tuning space the autotuner would time for this call (no kernel launched)."""
    import torch
    import triton
    from lords_ext.backends import triton_backend as tb
    from lords_ext.backends.triton_kernels import _tuning
    bits, _, xd, sd, r, N, K = case
    x, B = (torch.empty(1, dtype=getattr(torch, DTYPES[d])) for d in (xd, sd))
    s_prec, _ = tb._precisions(x.dtype, B.dtype)
    kw = dict(BITS=bits, R_PAD=max(16, triton.next_power_of_2(r)), BLOCK_M=tb.decode_block_m(algo, M))
    if algo == "splitk":
        kw["S_PREC"] = s_prec
    cfgs = _tuning.with_split_k(_tuning.decode_configs(), dict(N=N, K=K, M=M, x_ptr=x, b_ptr=B), **kw)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs]


def run_child(args):
    import torch
    from test_gpu_triton import reference_y
    from lords_ext.backends import triton_backend as tb
    case, M, algo, idx = args.case, args.child_m, args.algo, args.child_cfg
    x, q, B, A, cb = _layer(case, M)
    config = _configs(case, M, algo)[idx] if idx >= 0 else None
    out = {"M": M, "cfg": config or "auto"}
    y = tb.dequant_matmul(x, q, B, A, cb, None, algo=algo, config=config)
    torch.cuda.synchronize()
    ref = reference_y(x, q, B, A, cb, None)
    out["rel_err"] = float((y.float() - ref).norm() / ref.norm())
    print("RESULT " + json.dumps(out))


def spawn(args, M, idx):
    cmd = [sys.executable, __file__, "--case", ",".join(map(str, args.case)), "--algo", args.algo,
           "--child-m", str(M), "--child-cfg", str(idx)]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = [ln for ln in (p.stderr or "").splitlines() if "Error" in ln or "error" in ln]
    return {"M": M, "cfg": idx, "fault": (err[-1] if err else f"rc {p.returncode}")[:160]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", required=True, help="bits,codebook,x dtype,scale dtype,r,N,K (dtypes fp32|fp16|bf16)")
    ap.add_argument("--ms", default="1,3,16,37,200")
    ap.add_argument("--algo", default="splitk", choices=["splitk", "reassoc"])
    ap.add_argument("--child-m", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child-cfg", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = args.case.split(",")
    args.case = (int(p[0]), p[1], p[2], p[3], int(p[4]), int(p[5]), int(p[6]))
    if args.child_m:
        return run_child(args)
    rows = []
    for M in map(int, args.ms.split(",")):
        res = spawn(args, M, -1)
        rows.append(res)
        print(res, flush=True)
        if "fault" in res or res.get("rel_err", 1) > 1e-2:
            for idx in range(len(_configs(args.case, M, args.algo))):  # every config on its own
                r = spawn(args, M, idx)
                rows.append(r)
                print(r, flush=True)
    bad = [r for r in rows if "fault" in r or r.get("rel_err", 0) > 1e-2]
    print(f"summary: {len(rows)} runs, {len(bad)} faulted or wrong")
    for r in bad:
        print("  BAD", r)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main() or 0)
