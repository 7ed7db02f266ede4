"""Recording a live stream into the catalog as an ordinary item.

The MSE rendition's fragments are the recording: each is written to a
staging directory in the media directory as it is produced (memory stays
bounded however long the stream), named and described as the segmenter's
chunks are (``init.mp4``, ``chunk-NNNNN.m4s``, ``manifest.json``,
:mod:`gateway.media.segment`). When the stream ends the manifest is written
and the directory becomes the item (:func:`gateway.media.catalog.add_segmented`,
under the catalog's writer lock), at the rate the live stream had. An
existing ``Catalog.load`` then reads it like any published item.

Chunk times in the manifest count from 0 and join end to end (the first
chunk absorbs any delay before the first fragment), as the segmenter's do.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from gateway.live.fmp4 import LiveFragment
from gateway.media.catalog import DEFAULT_FREE_MS, MediaItem, add_segmented, new_staging_dir
from gateway.media.segment import INIT_NAME, MANIFEST_NAME, ChunkInfo, Manifest


@dataclass(frozen=True)
class Recording:
    """Where and as what a live stream is recorded; ``enabled=False`` turns it off."""

    media_dir: Path
    item_id: str
    title: str
    publisher: str
    rate_msat: int
    free_ms: int = DEFAULT_FREE_MS
    enabled: bool = True


class Recorder:
    """Writes fragments into a staging directory, then installs the item."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording
        self.dir: Path | None = None
        self._mime: str | None = None
        self._init_size = 0
        self._chunks: list[ChunkInfo] = []
        self._end_ms = 0
        self._first_start: int | None = None

    def start(self, init: bytes, mime: str) -> None:
        """Begin with the init segment (the MSE rendition has started)."""
        self.dir = new_staging_dir(Path(self.recording.media_dir), self.recording.item_id)
        (self.dir / INIT_NAME).write_bytes(init)
        self._init_size = len(init)
        self._mime = mime

    def add(self, fragment: LiveFragment) -> None:
        """Write one fragment as the next chunk."""
        if self.dir is None:
            return
        if self._first_start is None:
            self._first_start = fragment.start_ms
        # Chunks join end to end from 0 (gateway/media/segment.py does the same).
        start = self._end_ms
        end = max(start, fragment.end_ms - self._first_start)
        path = self.dir / f"chunk-{len(self._chunks):05d}.m4s"
        path.write_bytes(fragment.data)
        size = len(fragment.data)
        self._chunks.append(ChunkInfo(len(self._chunks), start, end - start, size, path))
        self._end_ms = end

    async def finish(self) -> MediaItem | None:
        """Write the manifest and add the item to the catalog (None: nothing recorded)."""
        directory = self.dir
        if directory is None:
            return None
        if not self._chunks or self._end_ms == 0 or self._mime is None:
            shutil.rmtree(directory, ignore_errors=True)
            return None
        manifest = Manifest(
            self._mime, self._end_ms, directory / INIT_NAME, self._init_size, tuple(self._chunks)
        )
        rec = self.recording

        def install() -> MediaItem:
            (directory / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
            return add_segmented(
                Path(rec.media_dir),
                directory,
                item_id=rec.item_id,
                title=rec.title,
                publisher=rec.publisher,
                rate_msat=rec.rate_msat,
                free_ms=rec.free_ms,
                source=f"live:{rec.item_id}",
            )

        # The catalog lock and fsync are blocking: keep them off the event loop.
        return await asyncio.to_thread(install)

    def discard(self) -> None:
        """Drop what was written (recording abandoned)."""
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
