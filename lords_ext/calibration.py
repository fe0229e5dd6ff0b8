"""Calibration statistics for activation-aware quantization: H = X^T X of every linear layer's input.

With E = W_hat - W, the output error of a layer on inputs X is ||X E^T||_F^2 = trace(E H E^T), so
`quantize_weight(W, cfg, hessian=H)` can minimize what the layer's outputs actually see instead of
the plain weight error. H is collected once, on the unquantized model, with forward pre-hooks.

Layers fed the very same input tensor (q/k/v projections, gate/up projections) share one H object:
the hook sees the identical tensor arrive consecutively and accumulates it once.
"""
from __future__ import annotations

import torch
from torch import nn


def calibration_windows(ids: torch.Tensor, seq_len: int = 512, n_windows: int | None = None) -> torch.Tensor:
    """[n, seq_len] consecutive non-overlapping windows of the 1-D token stream `ids`."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"ids: expected a 1-D tensor of token ids, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: expected an integer >= 1, got {seq_len!r}")
    n = ids.numel() // seq_len
    if n_windows is not None:
        n = min(n, n_windows)
    if n < 1:
        raise ValueError(f"ids: expected at least seq_len={seq_len} tokens for one calibration window, got {ids.numel()}")
    return ids[: n * seq_len].view(n, seq_len)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def collect_hessians(model: nn.Module, windows: torch.Tensor, names=None, *, device=None,
                     batch_size: int = 1, progress: bool = True) -> dict[str, torch.Tensor]:
    """{layer name: H [K, K] float32} = mean over calibration tokens of x x^T for every nn.Linear
    named in `names` (all of them when None). Runs `model(input_ids=...)` on each row of `windows`
    ([n, seq_len] token ids). H lives on `device` (the model's by default)."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError(f"windows: expected a [n, seq_len] tensor of token ids, got "
                         f"{tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in linears]
        if missing:
            raise ValueError(f"names: expected names of nn.Linear layers of the model, not found: {missing[:5]}")
        linears = {n: linears[n] for n in names}
    model_device = _model_device(model)
    device = torch.device(device) if device is not None else model_device

    acc: dict[str, torch.Tensor] = {}
    leader_of: dict[str, str] = {}     # follower -> leader whose H it shares
    last = {"x": None, "name": None}   # the tensor most recently accumulated, and by whom
    tokens = [0]

    def make_hook(name):
        def hook(module, args):
            x = args[0]
            if x is last["x"]:
                leader = last["name"]
                if leader_of.get(name, leader) != leader:
                    raise RuntimeError(f"collect_hessians: layer {name} shared its input with "
                                       f"{leader_of[name]} before and with {leader} now")
                leader_of[name] = leader
                return
            if name in leader_of:
                raise RuntimeError(f"collect_hessians: layer {name} shared the input of {leader_of[name]} "
                                   "in an earlier window but not in this one")
            x2 = x.detach().reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
            if name not in acc:
                acc[name] = torch.zeros(x2.shape[1], x2.shape[1], device=device, dtype=torch.float32)
            acc[name].addmm_(x2.T, x2)
            last["x"], last["name"] = x, name
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in linears.items()]
    was_training = model.training
    model.eval()
    try:
        from tqdm.auto import tqdm
        it = range(0, windows.shape[0], batch_size)
        for i in tqdm(it, desc="calibration", unit="batch", disable=not progress, leave=False):
            batch = windows[i:i + batch_size].to(model_device)
            last["x"] = last["name"] = None
            model(input_ids=batch)
            tokens[0] += batch.numel()
    finally:
        for h in handles:
            h.remove()
        last["x"] = None
        model.train(was_training)
    out = {}
    for name, H in acc.items():
        out[name] = H.div_(tokens[0])
    for name, leader in leader_of.items():
        out[name] = out[leader]
    not_seen = [n for n in linears if n not in out]
    if not_seen:
        raise RuntimeError(f"collect_hessians: these layers were never called on the calibration text: {not_seen[:5]}")
    return out
