"""The launch cache in front of Triton's autotuner (lords_ext.backends.triton_kernels._tuning.run_tuned),
exercised with a stand-in for triton.autotune's object (the real one only tunes on a GPU)."""
import pytest
import torch

_tuning = pytest.importorskip("lords_ext.backends.triton_kernels._tuning")


class FakeConfig:
    def __init__(self, **kw):
        self.kw, self.pre_hook = kw, None

    def all_kwargs(self):
        return dict(self.kw)


class FakeJit:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append(("direct", args, kw, grid(kw)))


class FakeAutotuner:
    """Tunes by picking BLOCK = 2 * N (so different keys give different configs)."""
    arg_names = ["x", "y", "N", "K", "BITS"]
    keys = ["N", "K", "BITS"]

    def __init__(self):
        self.log = []
        self.fn = FakeJit(self.log)
        self.best_config = None

    def __getitem__(self, grid):
        def run(*args, **kw):
            self.best_config = FakeConfig(BLOCK=2 * args[2], num_warps=4)
            self.log.append(("tuned", args, kw, grid({**kw, **self.best_config.kw})))
        return run


def test_tunes_once_per_signature_then_launches_the_chosen_config():
    t = FakeAutotuner()
    x = torch.zeros(2, dtype=torch.float16)
    grid = lambda meta: (meta["BLOCK"],)  # noqa: E731
    for _ in range(3):
        _tuning.run_tuned(t, grid, (x, x, 8, 16), {"BITS": 4})
    assert [e[0] for e in t.log] == ["tuned", "direct", "direct"]
    assert t.log[1][2] == {"BITS": 4, "BLOCK": 16, "num_warps": 4} and t.log[1][3] == (16,)
    # any change of a key argument, a constexpr or a tensor dtype tunes again
    _tuning.run_tuned(t, grid, (x, x, 9, 16), {"BITS": 4})
    _tuning.run_tuned(t, grid, (x, x, 8, 16), {"BITS": 3})
    _tuning.run_tuned(t, grid, (x.float(), x, 8, 16), {"BITS": 4})
    assert [e[0] for e in t.log[3:]] == ["tuned", "tuned", "tuned"]
    assert t.log[3][3] == (18,)
    # a value that is not part of the signature (a different tensor of the same dtype) reuses it
    _tuning.run_tuned(t, grid, (torch.ones(5, dtype=torch.float16), x, 8, 16), {"BITS": 4})
    assert t.log[-1][0] == "direct"


def test_configs_with_pre_hooks_always_go_through_the_autotuner():
    t = FakeAutotuner()
    orig = t.__getitem__

    def with_hook(grid):
        run = orig(grid)

        def wrapped(*a, **k):
            run(*a, **k)
            t.best_config.pre_hook = lambda nargs: None
        return wrapped

    t.__class__ = type("Hooked", (FakeAutotuner,), {"__getitem__": lambda self, g: with_hook(g)})
    x = torch.zeros(1)
    for _ in range(2):
        _tuning.run_tuned(t, lambda m: (1,), (x, x, 4, 4), {"BITS": 2})
    assert [e[0] for e in t.log] == ["tuned", "tuned"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_split_k_space_has_no_8_warp_configs_for_fp32_activations(monkeypatch, bits):
    """Triton 3.6 miscompiled the 8-warp split-K kernel for fp32 activations (an out-of-bounds shared-memory
    read, bench/triton_notes.md session 13): the GPU tuning space must leave those configs out, for the tuned
    and the fixed (LORDS_TRITON_TUNE=0) path, and keep them for 16-bit activations."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU space, even if an interpreter module set it
    b = torch.empty(1, dtype=torch.bfloat16)
    kw = dict(BITS=bits, R_PAD=64, S_PREC="tf32", BLOCK_M=16)
    for M in (1, 16, 200):
        for x, allowed in ((torch.empty(1, dtype=torch.float32), {4}), (torch.empty(1, dtype=torch.bfloat16), {4, 8})):
            named = dict(N=64, K=4092, M=M, x_ptr=x, b_ptr=b)
            space = _tuning.with_split_k(_tuning.decode_configs(), named, **kw)
            assert space and {c.num_warps for c in space} <= allowed
            if 8 in allowed and M == 1:
                assert 8 in {c.num_warps for c in space}, "bf16 keeps its 8-warp config"
            cfg = _tuning.default_config("splitk", M, 64, 4092, block_m=256 if M == 200 else 16, bits=bits,
                                         r_pad=64, xsz=x.element_size(), bsz=2)
            assert cfg["num_warps"] in allowed
