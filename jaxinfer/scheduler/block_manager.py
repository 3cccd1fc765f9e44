"""Host-side bookkeeping of the paged KV pool: which physical block holds which sequence's tokens.

The pool has `num_blocks` blocks of `block_size` token slots. Block 0 is the null block of the
attention-metadata contract (padding writes land there) and is never handed out, so
`num_blocks - 1` blocks are usable. Slots are allocated lazily, for the tokens a step computes
(`allocate_slots`; a multi-step decode call's slots all at its start, so a sequence that stops
early leaves a few unused until it is freed), and blocks carry reference counts so sequences can
share them:

* Prefix caching: a full block is identified by the hash chain `h_i = sha256(h_{i-1} || tokens_i)`
  (`h_{-1}` empty, tokens as int64 bytes), so equal hashes mean equal whole prefixes. A block is
  registered under its hash once its K/V has been computed (after the step ran); a new sequence
  then reuses the longest registered chain of its full blocks. Blocks nobody references keep their
  hash in an LRU list and are evicted only when a fresh block is needed; never-hashed free blocks
  are used first. All requests share one cache namespace: nothing else than the token ids (no
  adapters, no multimodal inputs) determines a block's K/V in this engine.
* Copy-on-write: forked sequences share all blocks; a sequence about to write into a block that
  others also reference gets a fresh block plus a `(src, dst)` copy for the runner to perform on
  the device at the start of the step, before any K/V write.

Everything is plain Python ints; block tables live on the `Sequence` objects as `list[int]`.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib

from jaxinfer.scheduler.request import Sequence

NULL_BLOCK = 0


def hash_block(parent_hash: bytes, token_ids: list[int]) -> bytes:
    """The prefix-cache key of a full block: its tokens chained onto the key of the block before."""
    return hashlib.sha256(parent_hash + array.array("q", token_ids).tobytes()).digest()


@dataclasses.dataclass(frozen=True)
class BlockManagerMetrics:
    """A snapshot of the pool. Prefix-cache counters are in tokens, counted once per admission."""

    block_size: int
    num_blocks: int  # usable blocks (the null block excluded)
    num_used_blocks: int  # referenced by at least one live sequence
    num_free_blocks: int  # unreferenced, including cached blocks that can be evicted
    num_cached_blocks: int  # registered in the prefix cache (in use or evictable)
    num_unfilled_slots: int  # internal fragmentation: slots of used blocks that hold no token
    prefix_cache_queries: int
    prefix_cache_hits: int

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of usable blocks in use, 0 to 1 (as vLLM's kv_cache_usage_perc, despite its name)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def fragmentation(self) -> float:
        """Fraction of the slots of used blocks that hold no token."""
        allocated = self.num_used_blocks * self.block_size
        return self.num_unfilled_slots / allocated if allocated else 0.0


class BlockManager:
    """Reference-counted block allocator with a prefix cache and copy-on-write."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"num_blocks={num_blocks}: the pool needs the null block plus at least one")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        # Tokens written into each block; kept for cached blocks while they are free.
        self._fill = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}
        # Never-hashed free blocks; popped from the end, so block 1 goes out first.
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))
        # Unreferenced hashed blocks, least recently used first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._num_filled_slots_in_use = 0
        self._prefix_cache_queries = 0
        self._prefix_cache_hits = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """The physical blocks of the longest cached chain of `seq`'s full blocks (changes nothing).

        At most `(num_tokens - 1) // block_size` blocks, so at least one token is left to compute
        and the step produces the logits of the last token.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._extend_hashes(seq, max_blocks)
        hits = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def admit(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Gives a sequence without blocks the cached prefix plus fresh blocks for `num_new_tokens`.

        On success sets `seq.num_computed_tokens` to the cached tokens and counts the prefix-cache
        query; returns False and changes nothing when the free blocks do not suffice.
        """
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"{seq!r} already holds blocks; admit() is for waiting sequences")
        num_cached_tokens = len(cached_blocks) * self.block_size
        num_fresh = self.blocks_needed(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        # Reusing an evictable cached block takes it out of the free pool as well.
        num_reclaimed = sum(1 for block in cached_blocks if block in self._evictable)
        if num_fresh > self.num_free_blocks - num_reclaimed:
            return False
        for block in cached_blocks:
            self._acquire(block)
        seq.block_table = list(cached_blocks)
        seq.num_computed_tokens = num_cached_tokens
        self._grow(seq, num_cached_tokens + num_new_tokens)
        if self.enable_prefix_caching:
            self._prefix_cache_queries += seq.num_tokens
            self._prefix_cache_hits += num_cached_tokens
        return True

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Makes the slots of positions `num_computed_tokens .. + num_new_tokens - 1` writable.

        Appends fresh blocks as needed and replaces every shared block in that range by a private
        copy. Returns the `(src, dst)` block copies, or None (changing nothing) when the free
        blocks do not suffice.
        """
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        table = seq.block_table
        num_blocks_after = self.blocks_needed(end)
        shared = [i for i in range(start // self.block_size, min(len(table), num_blocks_after))
                  if self._ref_counts[table[i]] > 1]
        if len(shared) + max(0, num_blocks_after - len(table)) > self.num_free_blocks:
            return None
        copies = []
        for i in shared:
            src = table[i]
            dst = self._take_fresh()
            self._set_fill(dst, self._fill[src])
            self._release(src)
            table[i] = dst
            copies.append((src, dst))
        self._grow(seq, end)
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Makes `child` share every block of `parent`."""
        child.block_table = list(parent.block_table)
        for block in child.block_table:
            self._acquire(block)

    def free(self, seq: Sequence) -> None:
        """Drops `seq`'s references; its tail blocks become the least recently used."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    def cache_computed_blocks(self, seq: Sequence, num_previously_computed: int) -> None:
        """Registers the blocks that became full and computed since `num_previously_computed`."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        self._extend_hashes(seq, num_full)
        for i in range(num_previously_computed // self.block_size, num_full):
            block, block_hash = seq.block_table[i], seq.block_hashes[i]
            # Another sequence may have computed the same content first: keep its block.
            if self._block_hash[block] is None and block_hash not in self._cached:
                self._block_hash[block] = block_hash
                self._cached[block_hash] = block

    def metrics(self) -> BlockManagerMetrics:
        num_used = self.num_usable_blocks - self.num_free_blocks
        return BlockManagerMetrics(
            block_size=self.block_size,
            num_blocks=self.num_usable_blocks,
            num_used_blocks=num_used,
            num_free_blocks=self.num_free_blocks,
            num_cached_blocks=len(self._cached),
            num_unfilled_slots=num_used * self.block_size - self._num_filled_slots_in_use,
            prefix_cache_queries=self._prefix_cache_queries,
            prefix_cache_hits=self._prefix_cache_hits,
        )

    def _extend_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        size = self.block_size
        for i in range(len(seq.block_hashes), num_full_blocks):
            parent = seq.block_hashes[i - 1] if i else b""
            seq.block_hashes.append(hash_block(parent, seq.token_ids[i * size:(i + 1) * size]))

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        """Appends fresh blocks until `seq` has slots for `num_tokens`; marks the new tokens' slots."""
        table = seq.block_table
        num_blocks_after = self.blocks_needed(num_tokens)
        while len(table) < num_blocks_after:
            table.append(self._take_fresh())
        for i in range(seq.num_computed_tokens // self.block_size, num_blocks_after):
            self._set_fill(table[i], min(self.block_size, num_tokens - i * self.block_size))

    def _take_fresh(self) -> int:
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hash[block]]
            self._block_hash[block] = None
            self._fill[block] = 0
        self._ref_counts[block] = 1
        return block

    def _acquire(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._evictable[block]
            self._num_filled_slots_in_use += self._fill[block]
        self._ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self._ref_counts[block] -= 1
        if self._ref_counts[block]:
            return
        self._num_filled_slots_in_use -= self._fill[block]
        if self._block_hash[block] is None:
            self._fill[block] = 0
            self._free.append(block)
        else:
            self._evictable[block] = None

    def _set_fill(self, block: int, num_tokens: int) -> None:
        if num_tokens > self._fill[block]:
            self._num_filled_slots_in_use += num_tokens - self._fill[block]
            self._fill[block] = num_tokens
