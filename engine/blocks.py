"""KV-cache blocks: a pool of fixed-size blocks, reference counts, and the prefix cache over full blocks.

    pool = BlockPool(num_blocks=4096, block_size=16)
    digests = pool.digests(tokens)            # one per full block: the block's tokens and everything before them
    hit = pool.lookup(digests)               # the cached blocks of the longest prefix, in order (not yet held)
    pool.hold(hit)                           # reference them for a sequence
    block = pool.allocate()                  # a fresh block (None when every block is held)
    pool.register(block, digest)             # the block is full: later prompts that start the same way reuse it
    pool.release(blocks)                     # the sequence is done; full blocks stay cached until evicted

A block holds the keys and values of ``block_size`` consecutive positions of one sequence (every layer). A full
block is known by a digest of its tokens and of the digest of the block before it, so equal digests mean equal
prefixes (and equal keys and values: the model is the pool's). Blocks nobody holds stay cached, oldest use first
out: a fresh block comes from the never-cached free list first, else the least recently released cached block is
evicted. The digest is BLAKE2b over the token ids (and a salt naming the model): a colliding prompt would read
another prompt's keys, so a hash an attacker can steer (Python's ``hash`` of ints) will not do.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, salt: bytes = b""):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: expected both >= 1")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._root = hashlib.blake2b(b"raypress-kv" + salt, digest_size=16).digest()
        self.refs = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # never cached, or evicted
        self._cached: dict[bytes, int] = {}  # digest -> block
        self._digest_of: dict[int, bytes] = {}  # block -> digest
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached and held by nobody, least recent first
        self.evictions = 0

    # -- reading ------------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that ``allocate`` can hand out (free ones and cached ones nobody holds)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def digests(self, tokens: list[int], known: list[bytes] | None = None) -> list[bytes]:
        """The digest of every full block of ``tokens``; ``known`` are digests already computed for its first
        blocks (they are kept, and only the rest are computed)."""
        out = list(known or [])
        size = self.block_size
        parent = out[-1] if out else self._root
        for b in range(len(out), len(tokens) // size):
            block = array("i", tokens[b * size : (b + 1) * size]).tobytes()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            out.append(parent)
        return out

    def lookup(self, digests: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``digests`` (not yet held: ``hold`` them)."""
        if not self.prefix_caching:
            return []
        hit = []
        for d in digests:
            block = self._cached.get(d)
            if block is None:
                break
            hit.append(block)
        return hit

    # -- changing -----------------------------------------------------------------------------------------------

    def hold(self, blocks: list[int]) -> None:
        for block in blocks:
            if self.refs[block] == 0:
                self._evictable.pop(block, None)
            self.refs[block] += 1

    def allocate(self) -> int | None:
        """A block for new keys and values, held once; None when every block is held."""
        if self._free:
            block = self._free.popleft()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._digest_of.pop(block)]
            self.evictions += 1
        else:
            return None
        self.refs[block] = 1
        return block

    def register(self, block: int, digest: bytes) -> None:
        """``block`` is full and its contents are those of ``digest``: cache it (unless another block already
        holds the same prefix, or caching is off)."""
        if self.prefix_caching and digest not in self._cached and block not in self._digest_of:
            self._cached[digest] = block
            self._digest_of[block] = digest

    def release(self, blocks: list[int]) -> None:
        """A sequence lets its blocks go, the last first, so that a prefix's tail is evicted before its head."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._digest_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
