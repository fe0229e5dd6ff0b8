"""Perplexity of a causal LM on a token stream, in non-overlapping windows.

The stream is cut into windows of `seq_len` tokens; each window is one forward pass and scores
its own next-token predictions (seq_len - 1 targets: the first token of a window has no context
inside it). perplexity = exp(total negative log-likelihood / number of targets). Windows do not
overlap, so the figure is comparable between quantized variants of one model on the same stream,
not with sliding-window numbers published elsewhere.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float          # summed negative log-likelihood, nats
    tokens: int         # number of scored targets
    windows: int
    seconds: float

    def __str__(self) -> str:
        return f"perplexity {self.perplexity:.3f} over {self.tokens} tokens ({self.windows} windows, {self.seconds:.1f} s)"


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, seq_len: int = 512, max_tokens: int | None = None,
               batch_size: int = 1, device=None, progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of `model` (a Hugging Face causal LM: `model(input_ids).logits`) on the 1-D token
    stream `ids`, cut to its first `max_tokens` tokens. A last window shorter than 2 tokens is dropped."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids: expected a 1-D integer tensor of token ids, got "
                         f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}"
                         f"{' ' + str(ids.dtype) if isinstance(ids, torch.Tensor) else ''}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an integer >= 2, got {seq_len!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"ids: expected at least 2 tokens to score, got {ids.numel()}")
    device = torch.device(device) if device is not None else _model_device(model)
    starts = [s for s in range(0, ids.numel(), seq_len) if ids.numel() - s >= 2]
    # Full windows go in batches; a shorter last window runs alone.
    groups: list[list[int]] = []
    full = [s for s in starts if s + seq_len <= ids.numel()]
    for i in range(0, len(full), batch_size):
        groups.append(full[i:i + batch_size])
    if len(full) < len(starts):
        groups.append([starts[-1]])

    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(starts), desc=desc, unit="win", disable=not progress, leave=False)
    except ImportError:  # tqdm is a dependency, but never let a missing bar stop an evaluation
        bar = None
    try:
        for group in groups:
            batch = torch.stack([ids[s:s + seq_len] for s in group]).to(device)
            logits = model(input_ids=batch).logits
            V = logits.shape[-1]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), batch[:, 1:].reshape(-1), reduction="sum")
            nll += float(loss)
            count += batch[:, 1:].numel()
            if bar is not None:
                bar.update(len(group))
                bar.set_postfix_str(f"ppl={math.exp(nll / count):.3f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return PerplexityResult(math.exp(nll / count), nll, count, len(starts), time.perf_counter() - t0)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 24, device=None) -> str:
    """Greedy continuation of `prompt` (deterministic, so runs can be compared)."""
    device = torch.device(device) if device is not None else _model_device(model)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
