"""The shared-memory index of stage_A (csrc/lords_tile.cuh): the per-item base plus a compile-time
offset per element equals the first version's per-element formula, for every k offset of an item,
element, rank row and rank-chunk count. Pure index arithmetic, so it runs without a GPU."""
import pytest

K_SUPER = 128


def per_element(o0, e, j, rt):
    c, jj = j // 16, j % 16
    reg, tt, half = jj // 8, (jj % 8) // 2, jj % 2
    o = o0 + e
    sc, oo = o // K_SUPER, o % K_SUPER
    s, w = (oo % 32) // 4, oo % 4
    lane = 4 * (2 * (oo // 32) + w % 2) + tt
    return ((((sc * 8 + s) * rt + c) * 32 + lane) * 4 + (w // 2) * 2 + reg) * 2 + half


def base_plus_offset(o0, e, j, rt):
    c, jj = j // 16, j % 16
    reg, tt, half = jj // 8, (jj % 8) // 2, jj % 2
    sc, q32, sb = o0 // K_SUPER, (o0 % K_SUPER) // 32, (o0 % 32) // 4
    base = ((((sc * 8 + sb) * rt + c) * 32 + 8 * q32 + tt) * 4 + reg) * 2 + half
    return base + (e // 4) * rt * 256 + (e % 2) * 32 + ((e // 2) % 2) * 4


@pytest.mark.parametrize("rt", [1, 2, 4, 8])
def test_stage_a_index(rt):
    cases = [(o0, e, j) for j in range(rt * 16) for o0 in range(0, 4 * K_SUPER, 8) for e in range(8)]
    got = [base_plus_offset(*c, rt) for c in cases]
    assert got == [per_element(*c, rt) for c in cases]
    assert len(set(got)) == len(got)  # and no two elements of a superchunk range share a slot
