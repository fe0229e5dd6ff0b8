"""Post-training quantization: the block-wise NF/INT baseline and LoRDS (init + refinement).

LoRDS stores W ~ codebook[Q] * (B @ A). `quantize_weight` does
  1. init: block scales (absmax, or the per-block MSE clipping search), expanded to [N, K], and the
     best rank-r approximation of that matrix (computed from the [N, K/block] block matrix, never
     from the expanded one, so it costs an SVD of a small matrix);
  2. refinement: alternate nearest-level reassignment of Q with an update of (B, A) on
     ||codebook[Q] * (B @ A) - W||^2 (or the activation-aware trace(E H E^T) when `hessian` is given),
     either exact weighted least squares (`optimizer="als"`) or Adam steps (`optimizer="adam"`),
     keeping the best iterate and stopping early when the loss stops improving.
All arithmetic is float32 on W's device.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .formats import check_bits, check_packable_K, get_codebook, nearest_level, pack, unpack

_INITS = ("block", "exact")
_INIT_SCALES = ("absmax", "search")
_OPTIMIZERS = ("als", "adam")


# --- helpers ------------------------------------------------------------------------------------

def parity_rank(N: int, K: int, block: int) -> int:
    """Rank whose B and A hold as many numbers as one scale per `block` weights: floor(NK / (block (N+K))), >= 1."""
    return max(1, (N * K) // (block * (N + K)))


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F / ||W||_F, computed in float64."""
    W64 = W.detach().double()
    return float(torch.linalg.norm(W_hat.detach().double() - W64) / torch.linalg.norm(W64))


def frobenius_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F; the paper sums this over the layers of a model."""
    return float(torch.linalg.norm(W_hat.detach().double() - W.detach().double()))


def check_weight_matrix(W: torch.Tensor, name: str = "W") -> None:
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, K] tensor, got shape {tuple(W.shape)}")
    if not W.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point dtype, got {W.dtype}")
    if W.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty matrix, got shape {tuple(W.shape)}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError(f"{name}: expected finite values, found NaN or inf")


def _check_block(block: int, K: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block: expected a positive integer, got {block!r}")
    if K % block:
        raise ValueError(f"block: expected a divisor of K={K}, got {block}")


def _safe_divisor(S: torch.Tensor) -> torch.Tensor:
    """S with entries too close to zero pushed away from it (keeping the sign), so W / S stays
    finite; where |S| is that tiny any code reproduces W to within the tolerance anyway."""
    tiny = S.abs().amax().clamp_min(1e-30) * 1e-8
    return torch.where(S.abs() < tiny, torch.where(S < 0, -tiny, tiny), S)


def _clip_search(Wb: torch.Tensor, absmax: torch.Tensor, cb: torch.Tensor, grid: int) -> torch.Tensor:
    """Per block, the scale in {absmax * t, t in linspace(0.5, 1, grid)} with the least squared error."""
    best = absmax.clone()
    best_err = torch.full_like(absmax, float("inf"))
    for t in torch.linspace(0.5, 1.0, grid).tolist():
        s = absmax * t
        q = nearest_level(Wb / _safe_divisor(s).unsqueeze(-1), cb)
        err = (cb[q.long()] * s.unsqueeze(-1) - Wb).square().sum(-1)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def _block_bounds(K: int, nblocks: int) -> torch.Tensor:
    """Start offsets of `nblocks` contiguous blocks covering K, as even as possible (last ones shorter)."""
    size = math.ceil(K / nblocks)
    return torch.arange(0, K, size)


def block_scales(W: torch.Tensor, cb: torch.Tensor, starts: torch.Tensor, search: bool, grid: int) -> torch.Tensor:
    """[N, nblocks] absmax (or clipping-searched) scales for blocks starting at `starts` (ragged last block ok)."""
    N, K = W.shape
    size = int(starts[1] - starts[0]) if len(starts) > 1 else K
    pad = size * len(starts) - K
    Wp = torch.nn.functional.pad(W, (0, pad)).view(N, len(starts), size)
    absmax = Wp.abs().amax(-1)
    if not search:
        return absmax
    # Padding zeros add no error at any scale (they quantize to the zero level or near it only for
    # codebooks without zero; there the error of a padded entry is the same for all candidates up to
    # the scale, which biases slightly toward smaller scales in the one ragged block: acceptable).
    return _clip_search(Wp, absmax, cb, grid)


def _lowrank_of_blocks(S_blocks: torch.Tensor, starts: torch.Tensor, K: int, r: int):
    """Best rank-r factors (B, A) of the expanded scale matrix S[n, k] = S_blocks[n, block(k)].
    With E the [nb, K] block-indicator matrix, S = S_blocks E and E E^T = diag(len), so
    S = (S_blocks diag(sqrt len)) (diag(1/sqrt len) E), the right factor having orthonormal rows:
    the SVD of the small left factor gives the SVD of S."""
    starts = starts.to(S_blocks.device)
    lengths = torch.diff(torch.cat([starts, starts.new_tensor([K])])).to(S_blocks)
    U, sig, Vh = torch.linalg.svd(S_blocks * lengths.sqrt(), full_matrices=False)
    r_eff = min(r, sig.numel())
    root = sig[:r_eff].sqrt()
    B = U[:, :r_eff] * root
    block_of_k = torch.repeat_interleave(torch.arange(len(starts), device=S_blocks.device), lengths.long())
    A = (root.unsqueeze(1) * Vh[:r_eff] / lengths.sqrt())[:, block_of_k]
    if r_eff < r:  # fewer blocks than the rank: the extra components start at zero
        B = torch.cat([B, B.new_zeros(B.shape[0], r - r_eff)], 1)
        A = torch.cat([A, A.new_zeros(r - r_eff, K)], 0)
    S = S_blocks[:, block_of_k]
    init_err = float(torch.linalg.norm(S - B @ A) / torch.linalg.norm(S).clamp_min(1e-30))
    return B.contiguous(), A.contiguous(), init_err


# --- results ------------------------------------------------------------------------------------

@dataclass
class BlockwiseQuantized:
    """Block-wise baseline: W ~ codebook[Q] * scales[n, k // block]."""
    qweight: torch.Tensor
    scales: torch.Tensor
    codebook: torch.Tensor
    bits: int
    block: int
    K: int
    rel_error: float = float("nan")

    def dequantize(self) -> torch.Tensor:
        codes = unpack(self.qweight, self.bits, self.K).long()
        return self.codebook.to(self.scales)[codes] * self.scales.repeat_interleave(self.block, 1)

    @property
    def bits_per_weight(self) -> float:
        return self.bits + 16 / self.block


@dataclass
class LordsQuantized:
    """LoRDS weight: W ~ codebook[Q] * (B @ A), Q packed canonically."""
    qweight: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    codebook: torch.Tensor
    bits: int
    codebook_name: str = "custom"
    rel_error: float = float("nan")
    stats: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.B.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    @property
    def bits_per_weight(self) -> float:
        N, K = self.shape
        return self.bits + 16 * self.rank * (N + K) / (N * K)

    def dequantize(self) -> torch.Tensor:
        return torch.ops.lords.dequant(self.qweight, self.B, self.A, self.codebook.to(self.B))


# --- block-wise baseline -----------------------------------------------------------------------

def blockwise_quantize(
    W: torch.Tensor, bits: int = 4, codebook: str | torch.Tensor | None = None, block: int = 64,
    search: bool = False, grid: int = 20,
) -> BlockwiseQuantized:
    """Round-to-nearest block-wise quantization (bitsandbytes-style NF/INT). `search=True` picks each
    block's scale by an MSE clipping search over `grid` ratios in [0.5, 1] of its absmax instead of
    the absmax itself: the honest baseline, since LoRDS optimizes its scales too."""
    check_weight_matrix(W)
    check_bits(bits)
    cb, _ = get_codebook(codebook, bits)
    N, K = W.shape
    _check_block(block, K)
    check_packable_K(K, bits, "W.shape[1] (K)")
    Wf = W.detach().float()
    cb = cb.to(Wf.device)
    scales = block_scales(Wf, cb, torch.arange(0, K, block), search, grid)
    S = scales.repeat_interleave(block, 1)
    codes = nearest_level(Wf / _safe_divisor(S), cb)
    out = BlockwiseQuantized(pack(codes, bits), scales, cb, bits, block, K)
    out.rel_error = relative_error(Wf, out.dequantize())
    return out


# --- LoRDS --------------------------------------------------------------------------------------

@dataclass
class LordsConfig:
    """How to quantize one weight with LoRDS.

    bits, codebook: code width and levels (None -> f"nf{bits}"; a name from formats.CODEBOOK_NAMES or a tensor).
    block, rank: rank=None takes the parity rank for `block` (same storage as block-wise with that block).
    init: "block" (SVD of the block-`block` scale matrix, the paper's text) or "exact" (blocks of
      K/rank, whose expanded matrix B @ A reproduces exactly).
    init_scales: "absmax" (the paper) or "search" (per-block MSE clipping search before the SVD).
    steps, lr, optimizer: refinement iterations; "als" = exact alternating weighted least squares on
      B and A (lr unused), "adam" = Adam steps on (B, A) with cosine-decayed lr. steps=0: init only.
    learn_codebook: weight-only objective: also fit the 2**bits levels to this weight (Lloyd's update under the
      per-element scales; 2**bits extra floats per layer, stored as a custom codebook).
    patience, tol: stop when the loss has not improved by a relative `tol` for `patience` iterations.
    """
    bits: int = 4
    codebook: str | torch.Tensor | None = None
    block: int = 64
    rank: int | None = None
    init: str = "block"
    init_scales: str = "search"
    steps: int = 100
    lr: float = 2e-2
    optimizer: str = "als"
    learn_codebook: bool = False
    patience: int = 10
    tol: float = 1e-4
    search_grid: int = 20

    def __post_init__(self):
        check_bits(self.bits)
        get_codebook(self.codebook, self.bits)  # validates name / tensor / width
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block: expected a positive integer, got {self.block!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank: expected None or an integer >= 1, got {self.rank!r}")
        for name, value, allowed in (("init", self.init, _INITS), ("init_scales", self.init_scales, _INIT_SCALES),
                                     ("optimizer", self.optimizer, _OPTIMIZERS)):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps: expected an integer >= 0, got {self.steps!r}")
        if not (self.lr > 0):
            raise ValueError(f"lr: expected a positive float, got {self.lr!r}")

    @property
    def codebook_name(self) -> str:
        return get_codebook(self.codebook, self.bits)[1]

    def to_dict(self) -> dict:
        """JSON-ready fields (a custom codebook tensor becomes a list of levels)."""
        d = asdict(self)
        if isinstance(self.codebook, torch.Tensor):
            d["codebook"] = self.codebook.tolist()
        return d


def _check_hessian(H: torch.Tensor, K: int, device: torch.device) -> torch.Tensor:
    if not isinstance(H, torch.Tensor) or H.dim() != 2 or tuple(H.shape) != (K, K):
        raise ValueError(f"hessian: expected a [{K}, {K}] tensor (X^T X of the layer inputs), got "
                         f"{tuple(H.shape) if isinstance(H, torch.Tensor) else type(H).__name__}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("hessian: expected finite values, found NaN or inf")
    H = H.detach().to(device=device, dtype=torch.float32)
    # A little damping keeps directions the calibration data never excited from being free to drift.
    return H + torch.eye(K, device=device) * (1e-2 * H.diagonal().mean().clamp_min(1e-12))


def _loss(W, C, B, A, H):
    E = C * (B @ A) - W
    return (E @ H * E).sum() if H is not None else E.square().sum()


def _als_step(W: torch.Tensor, C: torch.Tensor, B: torch.Tensor, A: torch.Tensor):
    """Exact minimizers of ||C * (B A) - W||^2 over B (rows independent), then over A (columns).
    Row n: (A diag(C_n^2) A^T) b_n = A (C_n * W_n); the r x r systems for all rows come from one
    matmul of C^2 with the outer products of A's columns."""
    r = A.shape[0]
    C2, CW = C.square(), C * W

    def solve(Cm2, CmW, F):  # F: [r, L]; rows of Cm2: [M, L]
        outer = (F.unsqueeze(1) * F.unsqueeze(0)).reshape(r * r, -1)  # [r*r, L]
        G = (Cm2 @ outer.T).view(-1, r, r)
        ridge = 1e-7 * G.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        G = G + ridge.view(-1, 1, 1) * torch.eye(r, device=G.device)
        return torch.linalg.solve(G, (CmW @ F.T).unsqueeze(-1)).squeeze(-1)

    B = solve(C2, CW, A)
    A = solve(C2.T, CW.T, B.T).T.contiguous()
    return B, A


def _codebook_step(W, codes, S, cb, B):
    """Exact minimizer of ||cb[Q] * S - W||^2 over the levels (Lloyd's update with per-element
    scales): level q = sum_{Q=q} S W / sum_{Q=q} S^2. Levels are then sorted (nearest-level codes
    need it) and rescaled to max |level| = 1, the factor moving into B so the product is unchanged."""
    idx = codes.long().flatten()
    num = torch.zeros_like(cb).index_add_(0, idx, (S * W).flatten())
    den = torch.zeros_like(cb).index_add_(0, idx, (S * S).flatten())
    new = torch.where(den > 0, num / den.clamp_min(1e-30), cb).sort().values
    if bool((new[1:] <= new[:-1]).any()):  # two levels collapsed: keep the old codebook this round
        return cb, B
    m = new.abs().max()
    return new / m, B * m


def quantize_weight(W: torch.Tensor, cfg: LordsConfig | None = None, hessian: torch.Tensor | None = None,
                    **overrides) -> LordsQuantized:
    """Quantize one [N, K] weight with LoRDS; see LordsConfig. `hessian` ([K, K], X^T X of the
    layer's calibration inputs) switches the refinement objective to trace(E H E^T)."""
    cfg = LordsConfig(**{**asdict(cfg or LordsConfig()), **overrides}) if overrides else (cfg or LordsConfig())
    check_weight_matrix(W)
    N, K = W.shape
    check_packable_K(K, cfg.bits, "W.shape[1] (K)")
    r = cfg.rank if cfg.rank is not None else parity_rank(N, K, cfg.block)
    if r > min(N, K):
        raise ValueError(f"rank: expected 1 <= rank <= min(N, K) = {min(N, K)}, got {r}")
    t0 = time.perf_counter()
    cb, cb_name = get_codebook(cfg.codebook, cfg.bits)
    Wf = W.detach().float()
    cb = cb.to(Wf.device)
    if cfg.init == "block":
        _check_block(cfg.block, K)
        starts = torch.arange(0, K, cfg.block)
    else:
        starts = _block_bounds(K, r)
    S_blocks = block_scales(Wf, cb, starts, cfg.init_scales == "search", cfg.search_grid)
    B, A, init_scale_err = _lowrank_of_blocks(S_blocks, starts, K, r)
    B, A = B.to(Wf.device), A.to(Wf.device)
    H = _check_hessian(hessian, K, Wf.device) if hessian is not None else None

    def assign(B, A, cb):
        codes = nearest_level(Wf / _safe_divisor(B @ A), cb)
        return codes, cb[codes.long()]

    codes, C = assign(B, A, cb)
    w_norm = Wf.square().sum()  # the weight-only loss's normalizer; `norm` is the objective's
    norm = (Wf @ H * Wf).sum() if H is not None else w_norm
    init_loss = float(_loss(Wf, C, B, A, H) / norm)
    best = (init_loss, codes, B, A, cb)
    history = [init_loss]

    def als(best, steps):
        """Exact weight-only ALS from best's factors; returns the best iterate by the weight-only loss."""
        _, codes, B, A, cb = best
        C, stale = cb[codes.long()], 0
        for _ in range(steps):
            B, A = _als_step(Wf, C, B, A)
            codes, C = assign(B, A, cb)
            if cfg.learn_codebook:
                cb, B = _codebook_step(Wf, codes, B @ A, cb, B)
                codes, C = assign(B, A, cb)
            cur = float(_loss(Wf, C, B, A, None) / w_norm)
            history.append(cur)
            improved = cur < best[0] * (1 - cfg.tol)
            if cur < best[0]:
                best = (cur, codes, B, A, cb)
            stale = 0 if improved else stale + 1
            if stale >= cfg.patience:
                break
        return best

    if cfg.steps and H is not None and cfg.optimizer != "adam":
        # ALS has no closed form under H. Adam alone from the block-scale start reached a higher output error
        # than the weight-only ALS on 5 of 9 SmolLM2 layers (bench/cpu/ptq_hessian_check.py, session 12), so
        # the weight-only ALS runs first and Adam refines its result under H; the H-loss of the ALS result is
        # where `best` starts, so the H-aware result is never worse than the weight-only one in that metric.
        _, codes, B, A, cb = als((float(_loss(Wf, C, B, A, None) / w_norm), codes, B, A, cb), cfg.steps)
        C = cb[codes.long()]
        best = (float(_loss(Wf, C, B, A, H) / norm), codes, B, A, cb)
    stale = 0
    if cfg.steps and (cfg.optimizer == "adam" or H is not None):
        Bp, Ap = B.clone().requires_grad_(True), A.clone().requires_grad_(True)
        opt = torch.optim.Adam([Bp, Ap], lr=cfg.lr)
        # Adam's lr is relative to the size of the factors' entries.
        scale = float((B.abs().mean() + A.abs().mean()) / 2)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * scale
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            loss = _loss(Wf, C, Bp, Ap, H) / norm
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                codes, C = assign(Bp, Ap, cb)
                if cfg.learn_codebook and H is None:
                    cb, B_scaled = _codebook_step(Wf, codes, Bp @ Ap, cb, Bp)
                    Bp.copy_(B_scaled)
                    codes, C = assign(Bp, Ap, cb)
                cur = float(_loss(Wf, C, Bp, Ap, H) / norm)
            history.append(cur)
            if cur < best[0] * (1 - cfg.tol):
                best, stale = (cur, codes, Bp.detach().clone(), Ap.detach().clone(), cb), 0
            else:
                if cur < best[0]:
                    best = (cur, codes, Bp.detach().clone(), Ap.detach().clone(), cb)
                stale += 1
                if stale >= cfg.patience:
                    break
    elif cfg.steps:
        best = als(best, cfg.steps)
    _, codes, B, A, cb = best
    if cfg.learn_codebook:
        cb_name = "learned"
    out = LordsQuantized(pack(codes, cfg.bits), B.contiguous(), A.contiguous(), cb, cfg.bits, cb_name)
    out.rel_error = relative_error(Wf, out.dequantize())
    out.stats = {
        "rank": r, "init_scale_error": init_scale_err, "init_loss": init_loss, "final_loss": best[0],
        "steps_run": len(history) - 1, "seconds": time.perf_counter() - t0,
    }
    return out
