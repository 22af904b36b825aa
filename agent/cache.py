"""The inference cache of one deployment on one node: bounded in bytes, keyed by a digest of the
request's payload frames as they travel (``protocol.payload_key``: the agent never decodes them),
least-recently-used eviction.

LRU rather than Elasticsearch's LFU: a hit costs an O(1) move, a miss never scans, and a
deployment whose traffic shifts stops holding yesterday's hot keys. Values are the results'
payload frames exactly as the worker encoded them (sent again as they are on a hit), and each
entry is accounted at its real cost in memory: the bytes, each kept frame object, plus the key,
the tuple and the dictionary entry (``ENTRY_OVERHEAD``, measured with tracemalloc on CPython
3.11: about 210 bytes).
"""

from __future__ import annotations

import collections
import sys
from typing import Optional

ENTRY_OVERHEAD = 256  # key (20-byte digest), (value, size) tuple, OrderedDict node


class LruCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = max(0, int(capacity_bytes))
        self.used = 0
        self._items: collections.OrderedDict[bytes, tuple[object, int]] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def get(self, key: bytes) -> Optional[object]:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    @staticmethod
    def cost(value: object) -> int:
        """What an entry really holds in memory."""
        return sys.getsizeof(value) + ENTRY_OVERHEAD

    def put(self, key: bytes, value: object, size: Optional[int] = None) -> None:
        """``size``: what the value holds in memory, when ``cost`` cannot see it (frames whose
        bytes live outside Python's heap); without it, ``cost(value)``."""
        size = self.cost(value) if size is None else size + ENTRY_OVERHEAD
        if size > self.capacity:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.used -= old[1]
        while self._items and self.used + size > self.capacity:
            _, (_, s) = self._items.popitem(last=False)
            self.used -= s
        self._items[key] = (value, size)
        self.used += size

    def clear(self) -> None:
        self._items.clear()
        self.used = 0

    def __len__(self) -> int:
        return len(self._items)
