"""Embedding gather kernel (kernels/embedding.py) on the simulator against ReferenceOps.embed
(`table[ids]`). A gather copies bits, so outputs must match exactly (tolerance 0)."""
import ml_dtypes
import numpy as np
import pytest

from mimo_kernels.backend import simulate
from mimo_kernels.embedding import embed, embedding_kernel
from mimo_kernels.launch import to_host
from mimo_v2_flash.selfcheck.kernels_basic import patterned_table

BF16 = np.dtype(ml_dtypes.bfloat16)
VOCAB, HIDDEN = 152576, 4096


@pytest.fixture(scope="module")
def mimo_table():
    return patterned_table(VOCAB, HIDDEN)


def same_bits(a, b):
    return np.array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.mark.parametrize("tokens", [1, 7, 129, 1000])
def test_embedding_full_vocab(mimo_table, tokens):
    rng = np.random.default_rng(tokens)
    ids = rng.integers(0, VOCAB, tokens)
    ids[0] = VOCAB - 1                             # last row of the table
    ids[-1] = 0
    out = to_host(embed(ids, mimo_table))
    assert out.dtype == BF16 and out.shape == (tokens, HIDDEN)
    assert same_bits(out, mimo_table[ids])


def test_embedding_batch_shape_and_repeats():
    table = patterned_table(512, 256)
    ids = np.array([[3, 3, 511, 0], [7, 3, 3, 9]])
    out = to_host(embed(ids, table))
    assert out.shape == (2, 4, 256) and same_bits(out, table[ids])


def test_embedding_fp32_table():
    table = np.random.default_rng(1).standard_normal((300, 128)).astype(np.float32)
    ids = np.arange(299, -1, -1)
    np.testing.assert_array_equal(to_host(embed(ids, table)), table[ids])


def test_rejects_out_of_vocabulary_id():
    table = patterned_table(100, 128)
    with pytest.raises(ValueError, match=r"token id 100 is outside the vocabulary \[0, 100\)"):
        embed(np.array([1, 100, 2]), table)
    with pytest.raises(TypeError, match="token ids must be integers"):
        embed(np.array([1.0, 2.0]), table)


def test_kernel_raises_on_out_of_range_id_at_runtime():
    """Bypassing the launcher check, the indirect DMA itself refuses the row."""
    table = patterned_table(100, 128)
    with pytest.raises(IndexError, match="outside the tensor"):
        simulate(embedding_kernel)(np.array([5, 100], np.int32), table)


@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_lnc2_splits_tiles_between_cores(monkeypatch, mimo_table, tokens):
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "2")
    ids = np.random.default_rng(tokens).integers(0, VOCAB, tokens)
    out, report = to_host(embed(ids, mimo_table, report=True))
    assert report.num_programs == 2 and same_bits(out, mimo_table[ids])
