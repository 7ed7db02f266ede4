"""The catalog a gateway serves, and the media chunks it reads, cached in memory.

Every viewer of an item reads the same chunks: they are read once, from a
thread, and kept in a bounded LRU cache (a thread hop per chunk read cost a
large part of the gateway's CPU at thousands of paid chunks per second:
docs/performance.md). Viewers of one item move in step, so the first miss
reads and the others wait for that one read.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path

from gateway.media.catalog import Catalog, MediaItem

#: Bytes of media chunks kept in memory.
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


class Library:
    """The catalog (re-read when ``catalog.toml`` changes) and its chunks."""

    def __init__(self, media_dir: Path) -> None:
        self.catalog = Catalog.load(media_dir)
        # (id(item), index) -> (item, bytes): the item is held so that its id
        # is not reused while the entry lives; a republished item is a new
        # object, so its chunks are read afresh.
        self._chunks: OrderedDict[tuple[int, int], tuple[MediaItem, bytes]] = OrderedDict()
        self._chunk_bytes = 0
        self._loading: dict[tuple[int, int], tuple[MediaItem, asyncio.Future[bytes]]] = {}
        self._publisher_of: tuple[Catalog | None, dict[str, str]] = (None, {})

    def current(self) -> Catalog:
        """The catalog, re-reading catalog.toml if it changed."""
        self.catalog = self.catalog.reload_if_changed()
        return self.catalog

    def item(self, media: str) -> MediaItem | None:
        """The catalog item ``media`` (re-reading the catalog if it changed)."""
        return self.current().items.get(media)

    def cached_chunk(self, item: MediaItem, index: int) -> bytes | None:
        """Chunk ``index`` of ``item`` if it is in memory (no ``await``), else None."""
        key = (id(item), index)
        hit = self._chunks.get(key)
        if hit is not None and hit[0] is item:
            self._chunks.move_to_end(key)
            return hit[1]
        return None

    async def read_chunk(self, item: MediaItem, index: int) -> bytes:
        """Chunk ``index`` of ``item`` (-1: init segment), from memory when cached."""
        hit = self.cached_chunk(item, index)
        if hit is not None:
            return hit
        key = (id(item), index)
        loading = self._loading.get(key)
        if loading is not None and loading[0] is item:
            return await asyncio.shield(loading[1])
        task = asyncio.ensure_future(asyncio.to_thread(item.read_chunk, index))
        self._loading[key] = (item, task)
        try:
            data = await asyncio.shield(task)
        finally:
            if self._loading.get(key, (None, None))[1] is task:
                del self._loading[key]
        if len(data) <= CHUNK_CACHE_BYTES // 16:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._chunk_bytes -= len(old[1])
            self._chunks[key] = (item, data)
            self._chunk_bytes += len(data)
            while self._chunk_bytes > CHUNK_CACHE_BYTES:
                _, (_, evicted) = self._chunks.popitem(last=False)
                self._chunk_bytes -= len(evicted)
        return data

    def publisher_of(self) -> dict[str, str]:
        """media id -> publisher id, per catalog snapshot (asked on every pay: built once)."""
        catalog, mapping = self._publisher_of
        if catalog is not self.catalog:
            mapping = {iid: item.publisher for iid, item in self.catalog.items.items()}
            # A live item's seconds pay its publisher as an item's do.
            mapping.update({lid: item.publisher for lid, item in self.catalog.live.items()})
            self._publisher_of = (self.catalog, mapping)
        return mapping
