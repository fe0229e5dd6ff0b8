"""bench/host_overhead_cpu.py runs, prints its table and leaves the reference backend and thread count
as it found them (it stubs them while timing)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_host_overhead_cpu_runs_and_restores(capsys):
    import host_overhead_cpu
    from lords_ext.backends import reference

    before = (reference.dequant_matmul, reference.grad_x, reference.grad_scales, torch.get_num_threads())
    rows = host_overhead_cpu.main(["--n", "20"])
    assert [r[0] for r in rows][-1].startswith("nn.Linear") and len(rows) == 3
    assert all(fwd > 0 and fb > fwd for _, fwd, fb in rows)
    assert "| torch.ops.lords.dequant_matmul |" in capsys.readouterr().out
    assert (reference.dequant_matmul, reference.grad_x, reference.grad_scales, torch.get_num_threads()) == before
