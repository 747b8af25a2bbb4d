"""engine.scheduler and engine.blocks: what runs each step, and the KV blocks it holds, on the pool alone (no model)."""

import collections
import random
import zlib

import pytest

from engine.blocks import BlockPool
from engine.request import Sequence
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler


def seq(name: str, prompt: list[int] | int) -> Sequence:
    """A request; an int prompt is that many tokens of the request's own (no two names share a prefix)."""
    start = 1000 * (1 + zlib.crc32(name.encode()) % 10**6)
    prompt = list(range(start, start + prompt)) if isinstance(prompt, int) else prompt
    return Sequence(name, prompt, SamplingParams(), handle=None, detokenizer=None)


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_batch_tokens=16, caching=True) -> Scheduler:
    return Scheduler(BlockPool(num_blocks, block_size, prefix_caching=caching), max_num_seqs, max_batch_tokens)


def step(s: Scheduler, token: int = 7) -> list[tuple[str, int]]:
    """One step as the engine runs it, a sampled token appended to every ready row; returns the parts by name."""
    plan = s.schedule()
    for row in s.advance(plan.parts):
        plan.parts[row][0].append(token)
    return [(q.id, n) for q, n in plan.parts]


def held(s: Scheduler) -> set[int]:
    return {b for q in s.running for b in q.block_table}


def test_running_sequences_decode_first_and_prompts_share_what_is_left():
    s = make(max_batch_tokens=16)
    for k in range(6):
        s.add(seq(f"d{k}", 2))
    step(s, token=1)  # six 2-token prompts in one step: now each is one token behind
    s.add(seq("a", 5))
    s.add(seq("b", 7))
    plan = s.schedule()
    assert plan.num_decode == 6 and [n for _, n in plan.parts[:6]] == [1] * 6
    assert [(q.id, n) for q, n in plan.parts[6:]] == [("a", 5), ("b", 5)]  # b gets what is left, the rest next step
    assert plan.num_tokens == 16


def test_a_long_prompt_is_chunked_over_steps_and_continues_before_new_admissions():
    s = make(num_blocks=64, max_batch_tokens=32)
    s.add(seq("r1", 2))
    s.add(seq("r2", 2))
    step(s)
    s.add(seq("long", 100))
    assert step(s) == [("r1", 1), ("r2", 1), ("long", 30)]
    s.add(seq("short", 3))
    assert step(s) == [("r1", 1), ("r2", 1), ("long", 30)]  # the budget goes to the prompt already started
    assert step(s) == [("r1", 1), ("r2", 1), ("long", 30)]
    assert step(s) == [("r1", 1), ("r2", 1), ("long", 10), ("short", 3)]


def test_admission_is_in_arrival_order_and_stops_at_max_num_seqs():
    s = make(max_num_seqs=2, max_batch_tokens=100)
    for name in "abc":
        s.add(seq(name, 1))
    assert step(s) == [("a", 1), ("b", 1)] and [q.id for q in s.waiting] == ["c"]


def test_new_requests_wait_while_decodes_and_running_prompts_use_the_budget():
    s = make(max_num_seqs=8, max_batch_tokens=12)
    for k in range(4):
        s.add(seq(f"d{k}", 1))
    step(s)
    s.add(seq("long", 40))
    step(s)
    s.add(seq("w", 1))
    assert step(s) == [(f"d{k}", 1) for k in range(4)] + [("long", 8)]
    assert [q.id for q in s.waiting] == ["w"]


def test_a_cached_prefix_is_reused_by_the_next_prompt_that_starts_with_it():
    s = make(block_size=4, max_batch_tokens=64)
    shared = list(range(500, 510))  # two full blocks and half a third
    first = seq("first", shared + [1, 2, 3])
    s.add(first)
    step(s)
    s.free(first)  # finished: its full blocks stay cached
    assert s.pool.num_cached == 3 and s.pool.num_free == 64
    second = seq("second", shared + [9, 9])
    s.add(second)
    assert step(s) == [("second", 4)]  # 12 tokens, the first 8 from the cache (the partial third block is not shared)
    assert second.num_cached_tokens == 8 and s.cached_tokens == 8 and s.prompt_tokens == 13 + 12
    again = seq("again", shared[:8])  # a prompt that is all cached still computes its last token
    s.add(again)
    assert step(s) == [("second", 1), ("again", 4)] and again.num_cached_tokens == 4


def test_caching_off_shares_nothing():
    s = make(caching=False)
    a = seq("a", 12)
    s.add(a)
    step(s)
    s.free(a)
    b = seq("b", list(a.prompt))
    s.add(b)
    step(s)
    assert b.num_cached_tokens == 0 and s.pool.num_cached == 0


def test_a_request_larger_than_the_free_blocks_waits_until_others_finish():
    s = make(num_blocks=10, block_size=4, max_batch_tokens=64)  # 40 positions
    big = seq("big", 30)
    other = seq("other", 20)
    s.add(other)
    step(s)
    s.add(big)
    for _ in range(3):
        step(s)
        assert [q.id for q in s.waiting] == ["big"]  # other holds 6 blocks; big's 30 tokens need 8
    s.free(other)
    assert step(s) == [("big", 30)]


def test_decodes_short_of_blocks_preempt_the_newest_which_is_recomputed_later():
    s = make(num_blocks=8, block_size=4, max_num_seqs=4, max_batch_tokens=64, caching=False)  # 32 positions
    a, b = seq("a", 12), seq("b", 11)
    s.add(a)
    s.add(b)
    step(s)  # 3 blocks each, 2 free: a's fifth block takes the last, and its sixth preempts b
    for _ in range(8):
        step(s)
    assert s.preemptions >= 1 and b in s.waiting and a in s.running
    kept = list(b.tokens)
    assert len(b.output) >= 1 and b.computed == 0 and b.block_table == []  # its tokens stay; its blocks went back
    s.free(a)
    plan = s.schedule()
    assert plan.parts == [(b, len(kept))]  # readmitted: all of its tokens, prompt and output, computed again
    assert b.num_cached_tokens == 0  # hits are counted once per request


def test_a_held_block_is_never_handed_out_again_and_none_leak():
    """Random traffic over three shared prefixes, with preemptions and evictions: after every step each block's
    reference count is its number of holders, two holders share only a cached block at the same place in prompts
    that agree up to it, and at the end every block is back."""
    rng = random.Random(3)
    s = make(num_blocks=24, block_size=4, max_num_seqs=6, max_batch_tokens=24)
    prefixes = [[rng.randrange(50) for _ in range(8)] for _ in range(3)]
    target, done = {}, 0
    for t in range(400):
        if rng.random() < 0.5:
            q = seq(f"r{t}", rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 10))])
            target[q.id] = rng.randint(1, 30)
            s.add(q)
        step(s, token=rng.randrange(50))
        owners = collections.defaultdict(list)
        for q in s.running:
            assert len(q.block_table) * 4 >= q.computed
            for i, b in enumerate(q.block_table):
                owners[b].append((q, i))
        for b in range(24):
            assert s.pool.refs[b] == len(owners.get(b, ()))
        for b, holders in owners.items():
            if len(holders) > 1:
                (i,) = {i for _, i in holders}
                assert b in s.pool._digest_of and len({q.digests[i] for q, _ in holders}) == 1
        for q in list(s.running):
            if len(q.output) >= target[q.id]:
                s.free(q)
                done += 1
    for q in list(s.sequences()):
        s.free(q)
    assert done > 20 and s.preemptions > 0 and s.pool.evictions > 0 and s.cached_tokens > 0
    assert s.pool.num_free == 24 and all(r == 0 for r in s.pool.refs)


def test_digests_name_a_prefix_not_a_block():
    pool = BlockPool(8, 4)
    a = pool.digests([1, 2, 3, 4, 5, 6, 7, 8])
    b = pool.digests([9, 9, 9, 9, 5, 6, 7, 8])
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert pool.digests([1, 2, 3, 4, 5, 6, 7, 8, 1], known=a[:1]) == a
    assert BlockPool(8, 4, salt=b"other model").digests([1, 2, 3, 4]) != a[:1]
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0, 4)
