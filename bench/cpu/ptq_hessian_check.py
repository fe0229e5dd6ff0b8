"""Session 12 diagnostic: per layer, does the activation-aware LoRDS PTQ (quantize_weight with a
Hessian) reach a lower output error trace(E H E^T) than the weight-only PTQ, as it is meant to?
Same settings as peft_compare.py's PTQ (4-bit, block 64, parity rank, steps=25: with H, 25 weight-only ALS steps
then 25 Adam steps under H since the session-12 fix); H from the
first 64 windows of 128 tokens of the pystdlib training stream (the same stream --ptq-calibration-tokens
draws from). Prints, per layer, the relative output error (H undamped) and the relative weight error."""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import peft_compare as pc  # noqa: E402
from lords_ext import LordsConfig  # noqa: E402
from lords_ext.calibration import calibration_windows, collect_hessians  # noqa: E402
from lords_ext.quantize import quantize_weight  # noqa: E402

torch.manual_seed(0)
src, cal, _, _ = pc.load_packaged(320_000, 8192, "pystdlib")
names = [f"model.layers.{i}.{p}" for i in (0, 15, 29) for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
t0 = time.time()
Hs = collect_hessians(src, calibration_windows(cal[:64 * 128], 128), names, progress=False)
print(f"hessians of {len(names)} layers from 8192 training tokens: {time.time() - t0:.0f} s")
cfg = LordsConfig(bits=4, block=64, steps=25)
print("| layer | output err weight-only | output err H-aware (steps=25) | H-aware (steps=100) | weight err weight-only | H-aware |")
print("|---|---|---|---|---|---|")
for n in names:
    W = src.get_submodule(n).weight.detach().float()
    H = Hs[n]

    def out_err(q):
        E = q.dequantize().float() - W
        return float((E @ H * E).sum() / (W @ H * W).sum())

    wo, ha, ha100 = quantize_weight(W, cfg), quantize_weight(W, cfg, hessian=H), quantize_weight(W, cfg, hessian=H, steps=100)
    print(f"| {n.replace('model.layers.', '')} | {out_err(wo):.5f} | {out_err(ha):.5f} | {out_err(ha100):.5f} "
          f"| {wo.rel_error:.4f} | {ha.rel_error:.4f} |", flush=True)
