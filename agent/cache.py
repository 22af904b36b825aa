"""The inference cache of one deployment on one node: bounded in bytes, keyed by a hash of the
request's documents as they travel (msgpack), least-recently-used eviction.

LRU rather than Elasticsearch's LFU: a hit costs an O(1) move, a miss never scans, and a
deployment whose traffic shifts stops holding yesterday's hot keys. Values are the encoded reply
bodies exactly as they go back on the wire (bytes, sent again as they are on a hit), and each
entry is accounted at its real cost in memory: the bytes plus the key, the tuple and the
dictionary entry (``ENTRY_OVERHEAD``, measured with tracemalloc on CPython 3.11: about 210 bytes).
"""

from __future__ import annotations

import collections
import hashlib
import sys
from typing import Optional

ENTRY_OVERHEAD = 256  # key (20-byte digest), (value, size) tuple, OrderedDict node


class LruCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = max(0, int(capacity_bytes))
        self.used = 0
        self._items: collections.OrderedDict[bytes, tuple[bytes, int]] = collections.OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @staticmethod
    def key(docs_packed: bytes) -> bytes:
        return hashlib.blake2b(docs_packed, digest_size=20).digest()

    def get(self, key: bytes) -> Optional[bytes]:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    @staticmethod
    def cost(value: bytes) -> int:
        """What an entry really holds in memory."""
        return sys.getsizeof(value) + ENTRY_OVERHEAD

    def put(self, key: bytes, value: bytes) -> None:
        size = self.cost(value)
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
