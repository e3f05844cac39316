"""KV pool and recursion-aware caches (SPEC.md section 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mor import preset
from mor.cache import CacheLayout, KVCache, KVPool, PoolExhausted, expected_kv_layers_per_token, make_pool
from mor.engine.runner import ModelRunner
from helpers import V, build, tiny



# ---------------------------------------------------------------------- layout and formulas
def test_layouts():
    v = CacheLayout.for_config(tiny("vanilla"))
    assert v.names == ("full",) and v.layers == (8,) and v.rec_write == ()
    m = CacheLayout.for_config(tiny("mor"))  # middle-cycle, 8 layers, N_r=3: 1 + 3*2 + 1
    assert m.names == ("full", "rec0", "rec1", "rec2") and m.layers == (2, 2, 2, 2)
    assert m.rec_write == (1, 2, 3) and m.rec_read == (1, 2, 3) and m.num_prefix == 1
    s = CacheLayout.for_config(tiny("recursive", kv_mode="shared"))
    assert s.names == ("full", "rec0") and s.rec_write == (1, None, None) and s.rec_read == (1, 1, 1)
    cycle = CacheLayout.for_config(tiny("mor", sharing="cycle", num_hidden_layers=9))
    assert cycle.full is None and cycle.names == ("rec0", "rec1", "rec2") and cycle.layers == (3, 3, 3)


def test_memory_formulas_match_spec():
    # SPEC section 5: recursion-wise ~ (N_r+1)/(2 N_r) of a full cache, sharing 1/N_r
    for nr in (2, 3, 4):
        cfg = preset("tiny", "mor", nr, sharing="cycle", num_hidden_layers=3 * nr)
        full = cfg.num_hidden_layers
        assert expected_kv_layers_per_token(cfg) == pytest.approx(full * (nr + 1) / (2 * nr))
        shared = cfg.replace(kv_mode="shared")
        assert expected_kv_layers_per_token(shared) == pytest.approx(full / nr)
    mor4 = preset("smollm-360m", "mor", 4)  # 34 layers: 1 + 4 * 8 + 1
    assert expected_kv_layers_per_token(mor4) == pytest.approx(2 + 8 * (1 + 0.75 + 0.5 + 0.25))
    assert expected_kv_layers_per_token(preset("smollm-360m", "vanilla")) == 32
    assert expected_kv_layers_per_token(mor4, [1.0, 0.5, 0.5, 0.0]) == pytest.approx(2 + 8 * 2.0)


# ---------------------------------------------------------------------- the pool
def small_pool(num_blocks=12, block_size=4, max_seqs=3, max_len=16):
    layout = CacheLayout.for_config(tiny("mor"))
    return KVPool(layout, num_blocks=num_blocks, block_size=block_size, max_seqs=max_seqs, max_len=max_len,
                  num_kv_heads=2, head_dim=4, dtype=torch.float32)


def test_pool_allocates_frees_and_trims():
    pool = small_pool()
    assert pool.free_blocks == 11 and pool.used_blocks == 0  # block 0 is reserved
    pool.ensure(1, np.array([0, 2]), np.array([5, 3]))  # group rec0 (2 layers): 2 + 1 logical blocks
    assert pool.used_blocks == 6 and pool.nblocks[1].tolist() == [2, 0, 1]
    assert 0 not in pool.tables[1][0, :2] and 0 not in pool.tables[1][2, :1]
    ids = set(pool.tables[1][0, :2].ravel()) | set(pool.tables[1][2, :1].ravel())
    assert len(ids) == 6  # each layer gets its own physical block
    pool.ensure(1, np.array([0]), np.array([8]))  # still 2 blocks: nothing new
    assert pool.used_blocks == 6
    with pytest.raises(PoolExhausted):  # all or nothing
        pool.ensure(2, np.array([0, 1]), np.array([8, 8]))
    assert pool.used_blocks == 6
    with pytest.raises(ValueError, match="max_len"):
        pool.ensure(0, np.array([1]), np.array([17]))
    pool.add_tokens(1, [0], 3)
    with pytest.raises(RuntimeError, match="ensure"):  # more tokens than the owned blocks hold
        pool.add_tokens(1, [0], 6)
    pool.trim(0)
    assert pool.nblocks[1, 0] == 1 and pool.used_blocks == 4
    assert pool.peak_used == 6
    pool.free_seq(0)
    pool.free_seq(2)
    assert pool.used_blocks == 0 and pool.free_blocks == 11 and pool.lens.sum() == 0
    st = pool.stats()
    assert st["kv_used_bytes"] == 0 and st["kv_peak_bytes"] == 6 * pool.block_bytes
    assert pool.block_bytes == 2 * 4 * 2 * 4 * 4  # K and V, 4 tokens, 2 heads, dim 4, fp32


def test_pool_addresses_rows_of_many_groups_at_once_like_one_group_at_a_time():
    """``row_index`` / ``block_table`` / ``num_tokens`` with one group per row (one NumPy call
    for rows of different groups, the engine's shared-block step) equal the per-group calls,
    and refuse entries beyond the blocks a sequence owns or rows without a group;
    ``ensure_one_more`` gives room like ``ensure``."""
    pool = small_pool()
    pool.ensure(1, np.array([0, 2]), np.array([5, 3]))
    pool.ensure(2, np.array([1]), np.array([2]))
    pool.add_tokens(1, [0, 2], np.array([4, 2]))
    groups, seqs, idx = np.array([1, 2, 1]), np.array([0, 1, 2]), np.array([4, 1, 2])
    rows = pool.row_index(groups, seqs, idx)
    for i in range(3):
        assert rows[i, :2].tolist() == pool.row_index(groups[i], seqs[i:i + 1], idx[i:i + 1])[0].tolist()
    blocks = pool.block_table(groups, seqs, 2)
    for i in range(3):
        assert blocks[i, :, :2].tolist() == pool.block_table(groups[i], seqs[i:i + 1], 2)[0].tolist()
    assert pool.num_tokens(groups, seqs).tolist() == [4, 0, 2]
    with pytest.raises(RuntimeError, match="ensure"):
        pool.row_index(np.array([2]), np.array([1]), np.array([4]))  # seq 1 owns one block of group 2
    with pytest.raises(ValueError, match="without a cache group"):
        pool.row_index(np.array([-1]), np.array([1]), np.array([0]))
    before = pool.used_blocks
    pool.ensure_one_more(1, np.array([0, 2]))  # 5th and 3rd entries: room already
    assert pool.used_blocks == before
    pool.add_tokens(1, [0], 4)
    pool.ensure_one_more(1, np.array([0, 2]))  # seq 0's 9th entry needs a third block
    assert pool.used_blocks == before + 2 and pool.nblocks[1].tolist() == [3, 0, 1]


@pytest.mark.parametrize("free", [None, 5])
def test_ensure_one_more_each_allocates_like_ensure_group_by_group(free):
    """``ensure_one_more_each`` (the engine's per-step reservation, pairs of many groups at
    once) gives the same blocks, block tables, counts, free list and peaks as ``ensure``
    called group by group in increasing order on the pairs' new lengths; with too few free
    blocks both raise PoolExhausted after allocating the same earlier groups."""
    def pool_in_use():
        pool = small_pool(num_blocks=200)
        for g in range(pool.layout.num_groups):  # sequences at a block boundary (4, 8) and inside one
            lens = np.array([4, 8, 6]) if g % 2 else np.array([8, 3, 4])
            pool.ensure(g, np.arange(3), lens)
            pool.add_tokens(g, np.arange(3), lens)
        if free is not None:  # a short free list: the first groups' blocks fit, a later one's not
            pool._nfree = free
        return pool

    groups = np.array([2, 0, 1, 2, 0, 1, 2])
    seqs = np.array([0, 1, 2, 2, 0, 0, 1])
    pool, ref = pool_in_use(), pool_in_use()
    outcome = []
    for p, many in ((pool, True), (ref, False)):
        try:
            if many:
                p.ensure_one_more_each(groups, seqs)
            else:
                for g in sorted(set(groups.tolist())):
                    mine = groups == g
                    p.ensure(g, seqs[mine], p.lens[g, seqs[mine]] + 1)
            outcome.append("ok")
        except PoolExhausted:
            outcome.append("exhausted")
    assert outcome[0] == outcome[1] == ("ok" if free is None else "exhausted")
    assert np.array_equal(pool.table_array, ref.table_array) and np.array_equal(pool.nblocks, ref.nblocks)
    assert pool.free_blocks == ref.free_blocks and np.array_equal(pool._free[:pool.free_blocks], ref._free[:ref.free_blocks])
    assert pool.peak_used == ref.peak_used and pool.group_peak == ref.group_peak
    if free is None:
        assert (pool.lens[groups, seqs] + 1 <= pool.nblocks[groups, seqs] * pool.block_size).all()
        assert pool.used_blocks > 0 and not np.array_equal(pool.nblocks, small_pool().nblocks)


def test_pool_write_and_gather_roundtrip():
    pool = small_pool()
    pool.ensure(2, np.array([1]), np.array([6]))
    rows = pool.row_index(2, np.array([1]), np.array([[0, 1, 2, 3, 4, 5]]))  # (1, 6, layers=2)
    k = torch.arange(6 * 8, dtype=torch.float32).view(6, 2, 4)
    cache = KVCache(pool, "cpu")
    cache.write(torch.as_tensor(rows[0, :, 1]), k, -k)  # layer 1 of the group
    blocks = torch.as_tensor(pool.block_table(2, np.array([1]), 2)[..., 1])
    kk, vv = cache.gather(blocks)  # (1, heads, 8, dim)
    assert torch.equal(kk[0, :, :6].transpose(0, 1), k) and torch.equal(vv[0, :, :6].transpose(0, 1), -k)
    assert pool.row_index(2, np.array([1]), np.array([-1]))[0, 0] == 0  # padding goes to the reserved block
    with pytest.raises(RuntimeError, match="ensure"):
        pool.row_index(2, np.array([1]), np.array([8]))  # beyond the owned blocks


def test_default_pool_holds_worst_case():
    cfg = tiny("mor")
    pool = make_pool(cfg, max_seqs=3, max_len=20, dtype=torch.float32, block_size=4)
    # the worst case of every sequence plus the engine's admission slack of one block per layer
    assert pool.num_blocks - 1 == 3 * (pool.worst_case_blocks(20) + pool.layout.total_layers)
    sized = make_pool(cfg, max_seqs=3, max_len=20, dtype=torch.float32, block_size=4,
                      memory_bytes=10 * pool.block_bytes)
    assert sized.capacity_bytes == 10 * pool.block_bytes


# ---------------------------------------------------------------------- cache contents
def _decode_token(runner, slot, tok, pos):
    """One token through enter / (decide, recurse)* / finish, reserving room before each
    write and recording the writes after it, as the scheduler and the engine do."""
    pool, lay = runner.pool, runner.layout
    s = np.array([slot])
    if lay.full is not None:
        pool.ensure(lay.full, s, np.array([pos + 1]))
    runner.enter(s, np.array([tok]), np.array([pos]))
    pool.add_written(runner.take_written())
    rec = 0
    while runner.decide(s, np.array([rec]))[0]:
        g = lay.rec_write[rec]
        if g is not None:
            pool.ensure_one_more(g, s)
        runner.recurse(s, np.array([rec]), np.array([pos]))
        pool.add_written(runner.take_written())
        rec += 1
    return runner.finish(s, np.array([pos]))[0], rec


@pytest.mark.parametrize("kw", [dict(), dict(kv_mode="shared"), dict(router_type="token"),
                                dict(use_aux_router=True, kv_mode="shared")],
                         ids=["expert", "expert-shared", "token", "aux-shared"])
def test_prefill_and_token_by_token_write_identical_caches(kw):
    """Slot 0: the prompt in one compacted forward (prefill). Slot 1: the same tokens one at a
    time. Same logits, same per-recursion token counts, same cached K/V; recursion-wise slots
    hold exactly the tokens that entered each recursion."""
    model = build(tiny("mor", **kw), seed=3)
    cfg = model.config
    ids = torch.randint(1, V, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    pool = make_pool(cfg, max_seqs=2, max_len=32, dtype=torch.float32, block_size=4)
    runner = ModelRunner(model, pool, 2)
    P = len(ids) - 1
    for g in range(pool.layout.num_groups):
        pool.ensure(g, np.array([0]), np.array([P]))
    prompt_depth = runner.prefill([0], [ids[:-1]])[0]
    pool.add_written(runner.take_written())
    pool.trim(0)
    last0, _ = _decode_token(runner, 0, ids[-1], P)
    steps = [_decode_token(runner, 1, t, i) for i, t in enumerate(ids)]
    with torch.no_grad():
        ref = model(torch.tensor([ids]), routing="threshold")
    torch.testing.assert_close(last0, ref.logits[0, -1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([s[0] for s in steps]), ref.logits[0], atol=2e-5, rtol=1e-4)
    assert [s[1] for s in steps] == ref.depth[0].tolist()
    assert prompt_depth.tolist() == ref.depth[0, :-1].tolist()
    assert np.array_equal(pool.lens[:, 0], pool.lens[:, 1])
    depth = ref.depth[0]
    for r, g in enumerate(pool.layout.rec_write):
        if g is not None:  # written only by the tokens that entered recursion r
            assert pool.lens[g, 1] == int((depth > r).sum())
    assert len(set(depth.tolist())) > 1
    for g, n_layers in enumerate(pool.layout.layers):
        n = int(pool.lens[g, 0])
        nb = -(-n // pool.block_size)
        for j in range(n_layers):
            k0, v0 = runner.cache.gather(torch.as_tensor(pool.block_table(g, np.array([0]), nb)[..., j]))
            k1, v1 = runner.cache.gather(torch.as_tensor(pool.block_table(g, np.array([1]), nb)[..., j]))
            torch.testing.assert_close(k0[..., :n, :], k1[..., :n, :], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(v0[..., :n, :], v1[..., :n, :], atol=1e-5, rtol=1e-4)


def test_runner_leaves_pool_bookkeeping_to_the_engine():
    """The scheduler reserves, the runner only counts what it wrote, the engine records it."""
    from mor.engine import Engine, SamplingParams
    eng = Engine(build(tiny("mor"), seed=3), max_batch=2, block_size=4)
    eng.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    plan = eng.scheduler.schedule()
    pool = eng.pool
    before = (pool.lens.copy(), pool.nblocks.copy(), pool.free_blocks)
    out = eng.runner.execute(plan)
    assert np.array_equal(pool.lens, before[0]) and np.array_equal(pool.nblocks, before[1])
    assert pool.free_blocks == before[2]
    full = pool.layout.full
    assert out.written[full, plan.prefill[0].slot] == 5  # 4 prompt tokens + the entering one
    eng._postprocess(plan, out)
    assert pool.lens[full, plan.prefill[0].slot] == 5
