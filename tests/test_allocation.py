import pytest

from qr_lib.algorithm.allocation import Allocation, split, uniform
from qr_lib.errors import QRError


def test_roundtrip_json_and_genes():
    a = Allocation(bits=(2, 3, 4, 8), ranks=(4, 8, 16, 4), name="mixed")
    assert Allocation.from_json(a.to_json()) == a
    assert Allocation.from_genes(a.to_genes(), a.bit_ladder, a.rank_ladder) == a
    assert a.to_genes() == [0, 0, 1, 1, 2, 2, 3, 0]


@pytest.mark.parametrize("bits,ranks,needle", [
    ((5, 4), (8, 8), "bit-width 5 is not on the bit ladder [2, 3, 4, 8]"),
    ((4, 4), (8, 12), "rank 12 is not on the rank ladder [4, 8, 16]"),
    ((4, 4), (8,), "2 bit-widths but 1 ranks"),
])
def test_invalid_allocations_name_the_value_and_the_ladder(bits, ranks, needle):
    with pytest.raises(QRError, match=None) as e:
        Allocation(bits=bits, ranks=ranks)
    assert needle in str(e.value)


def test_block_count_mismatch():
    with pytest.raises(QRError, match="allocation has 2 blocks but the model has 4"):
        uniform(2, 4, 8).check_blocks(4)


def test_uniform_and_split_extend_ladders():
    lora16 = uniform(3, 16, 8)
    assert lora16.bits == (16, 16, 16) and 16 in lora16.bit_ladder
    c = split(4, shallow=(8, 16), deep=(2, 16), name="C")
    assert c.bits == (8, 8, 2, 2) and c.ranks == (16,) * 4
    no_adapter = uniform(2, 4, 0)
    assert 0 in no_adapter.rank_ladder


def test_table_lists_every_block():
    text = Allocation(bits=(2, 4), ranks=(4, 8)).table()
    assert text.splitlines()[1].split() == ["0", "2", "4"]
    assert text.splitlines()[2].split() == ["1", "4", "8"]


def test_heatmap_has_a_row_for_bits_and_one_for_ranks():
    from qr_lib.workbook.plots import allocation_heatmap
    fig = allocation_heatmap(Allocation(bits=(2, 4, 8), ranks=(4, 8, 16), name="x"))
    bits_ax, rank_ax = fig.axes
    assert [t.get_text() for t in bits_ax.texts] == ["2", "4", "8"]
    assert [t.get_text() for t in rank_ax.texts] == ["4", "8", "16"]
