import pytest
import torch

import lords_ext
from lords_ext.formats import nearest_level, packed_cols

# bitsandbytes' NF4 table (bitsandbytes/functional.py, get_4bit_type("nf4")), the reference to match.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
           0.7229568362236023, 1.0]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("N", [1, 7, 33])
def test_pack_roundtrip(bits, N, gen):
    K = {2: 52, 3: 40, 4: 38}[bits]
    codes = torch.randint(0, 1 << bits, (N, K), generator=gen, dtype=torch.int64)
    q = lords_ext.pack(codes, bits)
    assert q.dtype == torch.uint8 and q.shape == (N, K * bits // 8) == (N, packed_cols(K, bits))
    assert torch.equal(lords_ext.unpack(q, bits, K).long(), codes)


def test_pack_layout_matches_the_contract():
    # 4 bits: code 2j low nibble, 2j+1 high nibble.
    assert lords_ext.pack(torch.tensor([[0x3, 0xA, 0xF, 0x1]]), 4).tolist() == [[0xA3, 0x1F]]
    # 2 bits: code 4j in the lowest two bits.
    assert lords_ext.pack(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00111001]]
    # 3 bits: 8 codes -> one little-endian 24-bit integer, code i in bits 3i..3i+2.
    codes = [1, 2, 3, 4, 5, 6, 7, 0]
    word = sum(c << (3 * i) for i, c in enumerate(codes))
    assert lords_ext.pack(torch.tensor([codes]), 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unpack_works_on_meta_shapes_and_any_int_dtype(bits, gen):
    codes = torch.randint(0, 1 << bits, (5, 16), generator=gen, dtype=torch.int32)
    assert torch.equal(lords_ext.unpack(lords_ext.pack(codes, bits), bits, 16).int(), codes)


def test_nf4_matches_bitsandbytes():
    torch.testing.assert_close(lords_ext.normal_float(4), torch.tensor(BNB_NF4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codebook_properties(bits):
    nf, name = lords_ext.get_codebook(f"nf{bits}")
    assert name == f"nf{bits}" and nf.numel() == 1 << bits
    assert bool((nf[1:] > nf[:-1]).all()) and nf.max() == 1.0 and nf.min() == -1.0
    assert (nf == 0).sum() == 1  # NormalFloat keeps an exact zero
    assert (nf > 0).sum() == (nf < 0).sum() + 1  # asymmetric: one more positive level
    it, _ = lords_ext.get_codebook(f"int{bits}")
    assert it.numel() == 1 << bits and bool((it[1:] > it[:-1]).all())
    torch.testing.assert_close(it, -it.flip(0))  # symmetric
    torch.testing.assert_close(torch.diff(it), torch.full((it.numel() - 1,), 2 / ((1 << bits) - 1)))
    assert lords_ext.get_codebook(None, bits)[1] == f"nf{bits}"


def test_custom_codebook_accepted_and_checked():
    cb, name = lords_ext.get_codebook(torch.tensor([-1.0, -0.2, 0.3, 0.9]))
    assert name == "custom" and cb.dtype == torch.float32
    with pytest.raises(ValueError, match="codebook.*sorted"):
        lords_ext.get_codebook(torch.tensor([-1.0, 0.3, -0.2, 0.9]))
    with pytest.raises(ValueError, match="codebook.*4, 8 or 16"):
        lords_ext.get_codebook(torch.linspace(-1, 1, 5))
    with pytest.raises(ValueError, match="codebook.*8 levels for bits=3"):
        lords_ext.get_codebook(torch.linspace(-1, 1, 4), bits=3)
    with pytest.raises(ValueError, match="codebook.*one of"):
        lords_ext.get_codebook("nf5")
    with pytest.raises(ValueError, match="codebook.*4 bits but bits=2"):
        lords_ext.get_codebook("nf4", bits=2)


def test_nearest_level_is_the_argmin(gen):
    cb = lords_ext.normal_float(3)
    v = torch.randn(1000, generator=gen)
    expected = (v.unsqueeze(1) - cb).abs().argmin(1)
    assert torch.equal(nearest_level(v, cb).long(), expected)


@pytest.mark.parametrize("bits,K", [(4, 7), (2, 6), (3, 12)])
def test_pack_rejects_bad_K(bits, K):
    with pytest.raises(ValueError, match="K.*multiple"):
        lords_ext.pack(torch.zeros(2, K, dtype=torch.int64) + 1, bits)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits"):
        lords_ext.pack(torch.ones(2, 8, dtype=torch.int64), 5)
    with pytest.raises(ValueError, match=r"codes: expected values in \[0, 4\)"):
        lords_ext.pack(torch.full((2, 8), 4), 2)
    with pytest.raises(ValueError, match="codes: expected an integer dtype"):
        lords_ext.pack(torch.ones(2, 8), 2)
    with pytest.raises(ValueError, match="qweight: expected shape"):
        lords_ext.unpack(torch.ones(2, 3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="qweight: expected dtype torch.uint8"):
        lords_ext.unpack(torch.ones(2, 4, dtype=torch.int32), 4, 8)
