"""The dispatch policy, exercised without a GPU by faking the compute capability."""
import pytest
import torch

from lords_ext.backends import dispatch


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.mark.parametrize("M,r,first", [(1, 32, "cuda"), (4, 32, "cuda"), (8, 32, "triton"), (1, 49, "cuda"), (2, 49, "triton"), (1, 65, "triton"),
                                       (64, 16, "triton"), (4096, 32, "triton")])
def test_policy_on_hopper(hopper, M, r, first):
    order = dispatch.candidates(torch.device("cuda"), M, r)
    assert order[0] == first and order[-1] == "reference"


def test_policy_before_ampere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert dispatch.candidates(torch.device("cuda"), 1, 8) == ("reference",)


def test_cpu_runs_the_reference(monkeypatch):
    monkeypatch.delenv("LORDS_BACKEND", raising=False)
    assert dispatch.candidates(torch.device("cpu"), 1, 8) == ("reference",)
    assert dispatch.choose("dequant_matmul", torch.empty(1, 8), 1, 8) == "reference"


def test_forced_backend_must_be_able_to_run(monkeypatch):
    monkeypatch.setenv("LORDS_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="LORDS_BACKEND=triton"):
        dispatch.choose("dequant_matmul", torch.empty(1, 8), 1, 8)
