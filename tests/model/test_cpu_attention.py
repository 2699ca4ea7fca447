"""Our CPU decode attention (cpu_attention.py): equal to gathering the blocks for SDPA, for query
heads sharing KV heads, any context length and blocks in any order; a row's numbers independent
of its batch and the thread count; what it refuses; and which caches are read in place."""

from __future__ import annotations

import math

import pytest
import torch

from openelm_server.model import cpu_extension
from openelm_server.model.cpu_attention import paged_decode_attention
from openelm_server.model.kv_cache import KVCache
from openelm_server.model.openelm import AttentionGroup, grouped_query_attention

pytestmark = pytest.mark.skipif(not cpu_extension.available(), reason="our CPU kernels do not build here (see the log)")

BLOCK = 16


def filled_cache(kv_heads: int, head_dim: int, blocks: int = 80, seed: int = 0) -> KVCache:
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache((kv_heads,), head_dim, blocks, torch.float32, "cpu")
    cache.keys[0].copy_(torch.randn(cache.keys[0].shape, generator=generator))
    cache.values[0].copy_(torch.randn(cache.values[0].shape, generator=generator))
    return cache


def scattered_table(lengths: list[int], blocks: int, seed: int = 1) -> torch.Tensor:
    """Each row's blocks drawn at random from the pool (never the scratch block); padding is scratch."""
    generator = torch.Generator().manual_seed(seed)
    width = max(-(-length // BLOCK) for length in lengths)
    table = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        used = -(-length // BLOCK)
        table[row, :used] = torch.randperm(blocks - 1, generator=generator)[:used] + 1
    return table


def sdpa_reference(queries, cache, table, lengths):
    group = AttentionGroup.build(0, torch.tensor(lengths).view(-1, 1) - 1, table, BLOCK)
    keys, values = cache.gather(0, table)
    return grouped_query_attention(queries.contiguous(), keys, values, group)


def attend(queries, cache, table, lengths):
    dim = queries.shape[-1]
    return paged_decode_attention(
        queries, cache.keys[0], cache.values[0], table, torch.tensor(lengths), 1 / math.sqrt(dim)
    )


@pytest.mark.parametrize(
    "query_heads, kv_heads, head_dim",
    [(4, 4, 8), (12, 3, 64), (8, 2, 32), (6, 3, 24), (20, 5, 128)],
)
@pytest.mark.parametrize("lengths", [[1], [16], [17], [131, 1, 47, 64], [500, 9]])
def test_equals_sdpa_over_the_gathered_blocks(query_heads, kv_heads, head_dim, lengths):
    cache = filled_cache(kv_heads, head_dim)
    table = scattered_table(lengths, cache.num_blocks)
    generator = torch.Generator().manual_seed(2)
    # Queries as the model hands them over: a view of the projection, rows apart.
    projection = torch.randn(len(lengths), query_heads + 2 * kv_heads, head_dim, generator=generator)
    queries = projection[:, :query_heads]
    got = attend(queries, cache, table, lengths)
    want = sdpa_reference(queries, cache, table, lengths)
    assert got.shape == (len(lengths), query_heads * head_dim)
    assert torch.allclose(got, want, atol=2e-6, rtol=1e-5)


def test_one_key_far_above_the_others_takes_all_the_weight():
    cache = filled_cache(2, 16)
    table = scattered_table([40], cache.num_blocks)
    queries = torch.zeros(1, 2, 16)
    queries[0, :, 0] = 1.0
    cache.keys[0].view(-1, 2, 16)[:, :, 0] = -50.0  # every key scores -200 (scaled) but one
    slot = int(table[0, 1]) * BLOCK + 3  # position 19
    cache.keys[0].view(-1, 2, 16)[slot, :, 0] = 50.0
    got = attend(queries, cache, table, [40]).view(2, 16)
    assert torch.allclose(got, cache.values[0].view(-1, 2, 16)[slot], atol=1e-6)


def test_a_rows_numbers_do_not_depend_on_its_batch_or_the_threads():
    cache = filled_cache(3, 64)
    lengths = [131, 7, 64, 300, 2]
    table = scattered_table(lengths, cache.num_blocks)
    queries = torch.randn(len(lengths), 12, 64, generator=torch.Generator().manual_seed(3))
    together = attend(queries, cache, table, lengths)
    for row, length in enumerate(lengths):
        alone = attend(queries[row : row + 1], cache, table[row : row + 1, : -(-length // BLOCK)], [length])
        assert torch.equal(alone, together[row : row + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attend(queries, cache, table, lengths), together)
    finally:
        torch.set_num_threads(threads)


def test_operands_it_cannot_take_are_refused_with_what_it_needs():
    cache = filled_cache(2, 16)
    table = scattered_table([20], cache.num_blocks)
    queries = torch.randn(1, 4, 16)
    with pytest.raises(RuntimeError, match="lengths: each row sees 1 to blocks \\* block_size keys"):
        attend(queries, cache, table, [33])
    with pytest.raises(RuntimeError, match="lengths: each row sees 1 to blocks"):
        attend(queries, cache, table, [0])
    with pytest.raises(RuntimeError, match="query_heads a multiple of kv_heads"):
        attend(torch.randn(1, 3, 16), cache, table, [20])
    with pytest.raises(RuntimeError, match="queries: float32"):
        attend(queries.to(torch.bfloat16), cache, table, [20])
    with pytest.raises(RuntimeError, match="block_table: int64"):
        attend(queries, cache, table.int(), [20])
    odd = KVCache((2,), 12, 8, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="head_dim equal and a multiple of 8"):
        attend(torch.randn(1, 4, 12), odd, table, [20])


@pytest.mark.parametrize(
    "dtype, head_dim, in_place",
    [(torch.float32, 64, True), (torch.float32, 12, False), (torch.bfloat16, 64, False)],
)
def test_float32_caches_whose_head_dim_the_kernel_takes_are_read_in_place(dtype, head_dim, in_place):
    assert KVCache((2, 3), head_dim, 4, dtype, "cpu").attends_in_place is in_place
