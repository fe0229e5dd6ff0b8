import os

import pytest
import torch

SEED = int(os.environ.get("LORDS_TEST_SEED", "1234"))


@pytest.fixture
def gen():
    """A seeded generator per test (LORDS_TEST_SEED overrides the seed): random data, never zeros,
    reproducible failures."""
    return torch.Generator().manual_seed(SEED)


def random_lords(N, K, r, bits, gen, dtype=torch.float32, codebook=None, device="cpu"):
    """Random (qweight, B, A, codebook, codes) with scales bounded away from zero."""
    import lords_ext

    cb = codebook if isinstance(codebook, torch.Tensor) else lords_ext.get_codebook(codebook, bits)[0]
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen)
    B = (torch.rand(N, r, generator=gen) + 0.5).to(dtype)
    A = (torch.randn(r, K, generator=gen) * 0.3 + 1.0).to(dtype)
    return (lords_ext.pack(codes, bits).to(device), B.to(device), A.to(device),
            cb.to(device=device, dtype=torch.float32), codes)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread is an order of magnitude faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
