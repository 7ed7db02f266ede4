"""Media: the catalog (publishers, items, rates, free seconds) and the PyAV segmenter.

The gateway uses :class:`Catalog` (``Catalog.load(media_dir)``), whose items
give chunk times and sizes and ``read_chunk(index)`` (``-1`` = init segment).
``gateway publish``, ``gateway publisher add`` and ``gateway media sample``
live in :mod:`gateway.media.cli`.
"""

from gateway.media.catalog import Catalog, MediaItem, Publisher
from gateway.media.segment import ChunkInfo, MediaError

__all__ = ["Catalog", "ChunkInfo", "MediaError", "MediaItem", "Publisher"]
