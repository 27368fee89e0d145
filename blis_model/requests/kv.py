"""The KV block pool of a replayed vLLM server, with a per-group prefix cache.

Blocks are counted, not tracked one by one. Every block is in exactly one place:

* ``free``: holds nothing;
* a request's *private* blocks (its KV beyond what it shares);
* a prefix group's cached blocks (``cached[g]``, the group's leading full blocks).

Invariant: ``free + Σ private + Σ cached == num_blocks``.

A group's cache is *pinned* while some running request references it (``holders[g]``
> 0). Unpinned cached blocks are *evictable*: they count as free for allocation (vLLM's
``get_num_free_blocks`` counts them too) and are evicted, least recently released group
first and a group's tail blocks first, only when an allocation needs them. Costs are
per group, never per block.
"""

from __future__ import annotations


class KVPool:
    """Block counts of one server (see module docstring); ``cached[g]`` ≤ ``full[g]``."""

    __slots__ = ("num_blocks", "free", "evictable", "cached", "holders", "full", "_lru")

    def __init__(self, num_blocks: int, full_blocks: list[int]) -> None:
        """``full_blocks[g]``: full KV blocks of group g's shared prefix."""
        self.num_blocks = num_blocks
        self.free = num_blocks
        self.evictable = 0  # Σ cached[g] over unpinned groups
        self.full = full_blocks
        self.cached = [0] * len(full_blocks)
        self.holders = [0] * len(full_blocks)
        self._lru: dict[int, None] = {}  # unpinned groups with cached blocks, oldest first

    @property
    def available(self) -> int:
        """Blocks an allocation may use: free plus evictable."""
        return self.free + self.evictable

    def take(self, n: int) -> None:
        """Allocate ``n`` blocks (caller checked ``n ≤ available``), evicting as needed."""
        if n > self.free:
            self._evict(n - self.free)
        self.free -= n

    def give(self, n: int) -> None:
        """Return ``n`` private blocks to the free list."""
        self.free += n

    def _evict(self, n: int) -> None:
        lru, cached = self._lru, self.cached
        while n > 0:
            g = next(iter(lru))
            e = min(cached[g], n)
            cached[g] -= e
            self.evictable -= e
            self.free += e
            n -= e
            if cached[g] == 0:
                del lru[g]

    def admit(self, group: int, hit: int, new: int) -> bool:
        """Admit a request that reuses ``hit`` cached blocks of ``group`` (0: none) and needs
        ``new`` fresh blocks: False if they do not fit (nothing changes), else pin and
        allocate. Blocks of an unpinned group beyond the hit are released first (only the
        hit is touched, as in vLLM; they were evictable, so the check is unchanged)."""
        if hit <= 0:
            if new > self.free + self.evictable:
                return False
            self.take(new)
            return True
        if self.holders[group] == 0:
            if new > self.free + self.evictable - hit:
                return False
            extra = self.cached[group] - hit
            self.cached[group] = hit
            self.free += extra
            self.evictable -= extra + hit
            del self._lru[group]
        elif new > self.free + self.evictable:
            return False
        self.holders[group] += 1
        self.take(new)
        return True

    def pin(self, group: int) -> None:
        """One more running request references ``group``'s cached blocks."""
        if self.holders[group] == 0 and self.cached[group]:
            self.evictable -= self.cached[group]
            del self._lru[group]
        self.holders[group] += 1

    def unpin(self, group: int) -> None:
        """A referencing request left: the last one makes the group's cache evictable
        (most recently released)."""
        self.holders[group] -= 1
        if self.holders[group] == 0 and self.cached[group]:
            self.evictable += self.cached[group]
            self._lru[group] = None

    def complete(self, group: int) -> int:
        """A pinned request has computed ``group``'s whole prefix: its private copies of
        the missing cached blocks join the group's cache. Returns how many moved."""
        moved = self.full[group] - self.cached[group]
        if moved > 0:
            self.cached[group] = self.full[group]
        return max(moved, 0)
