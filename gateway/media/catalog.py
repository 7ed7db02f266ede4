"""The media catalog: publishers, items, their rates and their chunks.

Layout of a media directory (``media/`` by default)::

    catalog.toml          publishers and items (this module reads and writes it)
    <item id>/            one directory per item, written by the segmenter:
        manifest.json       chunk times and sizes, MIME type, total duration
        init.mp4            initialization segment (index -1, always free)
        chunk-00000.m4s     1-2 s media segments (protocol.md section 7)
    .sources/             sample sources made by ``gateway media sample``

``catalog.toml``::

    [publishers.demo]
    name = "Demo Publisher"
    address = "bcrt1q..."           # payout address

    [items.sample-video]
    title = "Sample video"
    publisher = "demo"
    rate_msat = 2000                # msat per second of media: authoritative
    rate = 2                        # the same in sat/s, for people; may be alone
    free_ms = 60000                 # protocol.md section 7, default 60 000
    source = "/path/to/input.mp4"
    dir = "sample-video"

    [live.match]                    # a live item (issue 16): no media files;
    title = "The match"             # its media comes from its publisher over
    publisher = "demo"              # WHIP while it is on air
    rate_msat = 2000
    rate = 2
    free_ms = 60000
    record = true                   # recorded into the catalog when it ends

A :class:`Catalog` is an immutable snapshot; writers build a new one and
:meth:`Catalog.save` replaces the file atomically (temp file, fsync,
``os.replace``), so a failed command leaves the old file byte for byte.
Writers serialize on an advisory lock (``.lock``) in the media directory.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import tomli_w

from gateway.media.segment import ChunkInfo, Manifest, MediaError, segment
from gateway.protocol.scripts import NETWORKS, address_to_script_pubkey

CATALOG_NAME = "catalog.toml"
#: protocol.md section 7: the first minute of each media is free by default.
DEFAULT_FREE_MS = 60_000
#: Publisher and item ids: lowercase, a leading letter or digit (so they can
#: never name the hidden ``.staging-*`` and ``.sources`` directories).
_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: protocol.md section 1: integers on the wire stay within 2^53 - 1.
_MAX_INT = 2**53 - 1


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid publisher or item id, else raise MediaError."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise MediaError(
            f"bad {what} {value!r}: use 1-64 of a-z 0-9 . _ - starting with a letter or digit"
        )
    return value


def parse_rate(value: object) -> int:
    """A rate in sat/s (``2``, ``0.5``, ``"1.25"``) as integer msat per second.

    Fractions of a sat are allowed down to 1 msat; a negative, non-finite or
    finer rate raises MediaError.
    """
    return _parse_thousandths(value, "rate", "sat/s", "msat")


def parse_seconds(value: object, what: str = "free seconds") -> int:
    """A duration in seconds (``60``, ``"1.5"``) as integer milliseconds."""
    return _parse_thousandths(value, what, "s", "ms")


def _parse_thousandths(value: object, what: str, unit: str, milli: str) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MediaError(f"bad {what} {value!r}: expected a number of {unit}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise MediaError(f"bad {what} {value!r}: expected a number of {unit}") from None
    if not number.is_finite() or number < 0:
        raise MediaError(f"bad {what} {value!r}: must be a number >= 0 {unit}")
    thousandths = number * 1000
    if thousandths != thousandths.to_integral_value() or thousandths > _MAX_INT:
        raise MediaError(f"bad {what} {value!r}: must be a whole number of {milli}")
    return int(thousandths)


def _thousandths_to_number(value: int) -> int | float:
    """msat → sat (ms → s) as a JSON/TOML number: an int when whole."""
    return value // 1000 if value % 1000 == 0 else value / 1000


class _Priced:
    """What a media item and a live item share: who is paid, and at what price."""

    id: str
    title: str
    publisher: str
    rate_msat: int
    free_ms: int

    @property
    def rate(self) -> int | float:
        """The rate in sat/s (an int when whole)."""
        return _thousandths_to_number(self.rate_msat)

    def _price_api(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "publisher": self.publisher,
            "rate": self.rate,
            "rate_msat": self.rate_msat,
            "free_seconds": _thousandths_to_number(self.free_ms),
        }

    def _price_toml(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "publisher": self.publisher,
            "rate_msat": self.rate_msat,
            "rate": self.rate,
            "free_ms": self.free_ms,
        }


@dataclass(frozen=True)
class Publisher:
    """Who gets paid for an item: ``address`` is a payout address string."""

    id: str
    name: str
    address: str


@dataclass(frozen=True)
class MediaItem(_Priced):
    """One published media item with its price and its chunks."""

    id: str
    title: str
    publisher: str
    rate_msat: int
    free_ms: int
    duration_ms: int
    mime: str
    chunks: tuple[ChunkInfo, ...]
    init_path: Path
    init_size: int
    source: str
    dir: str

    def chunk(self, index: int) -> ChunkInfo:
        """The chunk at ``index`` (IndexError if there is none; -1 is not a chunk)."""
        if not 0 <= index < len(self.chunks):
            raise IndexError(f"{self.id} has no chunk {index}")
        return self.chunks[index]

    def read_chunk(self, index: int) -> bytes:
        """The bytes of chunk ``index``; ``-1`` is the initialization segment."""
        if index == -1:
            return self.init_path.read_bytes()
        return self.chunk(index).path.read_bytes()

    def to_api(self) -> dict[str, Any]:
        """This item as one entry of ``GET /api/catalog``."""
        return {
            **self._price_api(),
            "duration_ms": self.duration_ms,
            "mime": self.mime,
        }

    def to_toml(self) -> dict[str, Any]:
        """This item's table in ``catalog.toml``."""
        return {
            **self._price_toml(),
            "source": self.source,
            "dir": self.dir,
        }

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        *,
        id: str,
        title: str,
        publisher: str,
        rate_msat: int,
        free_ms: int,
        source: str,
        dir: str,
    ) -> MediaItem:
        """An item whose media facts come from the segmenter's manifest."""
        return cls(
            id=id,
            title=title,
            publisher=publisher,
            rate_msat=rate_msat,
            free_ms=free_ms,
            duration_ms=manifest.duration_ms,
            mime=manifest.mime,
            chunks=manifest.chunks,
            init_path=manifest.init_path,
            init_size=manifest.init_size,
            source=source,
            dir=dir,
        )


@dataclass(frozen=True)
class LiveItem(_Priced):
    """A live item: priced like a media item, its media comes from a publisher (WHIP).

    Item and live ids share one namespace (``play`` names either).
    ``record``: the stream becomes an ordinary item when it ends
    (gateway/live/record.py).
    """

    id: str
    title: str
    publisher: str
    rate_msat: int
    free_ms: int
    record: bool = True

    def to_api(self, on_air: bool = False) -> dict[str, Any]:
        """This live item as one entry of ``GET /api/catalog``."""
        return {
            **self._price_api(),
            "live": True,
            "on_air": on_air,
        }

    def to_toml(self) -> dict[str, Any]:
        """This live item's table in ``catalog.toml``."""
        return {
            **self._price_toml(),
            "record": self.record,
        }


@dataclass(frozen=True)
class Catalog:
    """A snapshot of ``catalog.toml`` and the manifests it points to."""

    media_dir: Path
    publishers: Mapping[str, Publisher] = field(default_factory=dict)
    items: Mapping[str, MediaItem] = field(default_factory=dict)
    live: Mapping[str, LiveItem] = field(default_factory=dict)
    #: ``st_mtime_ns`` of the file this was loaded from (None: no file).
    mtime_ns: int | None = None

    @property
    def path(self) -> Path:
        """The catalog file."""
        return self.media_dir / CATALOG_NAME

    @classmethod
    def load(cls, media_dir: Path | str) -> Catalog:
        """Read ``media_dir/catalog.toml`` (absent: an empty catalog) and its manifests.

        Raises MediaError naming the file and the problem for anything malformed.
        """
        media_dir = Path(media_dir)
        path = media_dir / CATALOG_NAME
        try:
            mtime_ns = path.stat().st_mtime_ns
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return cls(media_dir)
        except OSError as exc:
            raise MediaError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise MediaError(f"{path}: {exc}") from exc
        try:
            publishers = {
                pid: _publisher_from_toml(pid, table)
                for pid, table in _table(data, "publishers").items()
            }
            items = {
                iid: _item_from_toml(media_dir, iid, table, publishers)
                for iid, table in _table(data, "items").items()
            }
            live = {
                lid: _live_from_toml(lid, table, publishers)
                for lid, table in _table(data, "live").items()
            }
            both = sorted(set(items) & set(live))
            if both:
                raise MediaError(f"{both[0]!r} is both an item and a live item")
        except MediaError as exc:
            raise MediaError(f"{path}: {exc}") from exc
        return cls(media_dir, publishers, items, live, mtime_ns)

    def reload_if_changed(self) -> Catalog:
        """This snapshot, or a fresh one if ``catalog.toml`` changed since it was read."""
        try:
            mtime_ns: int | None = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime_ns = None
        return self if mtime_ns == self.mtime_ns else Catalog.load(self.media_dir)

    def to_api(self, on_air: frozenset[str] | set[str] = frozenset()) -> list[dict[str, Any]]:
        """The body of ``GET /api/catalog``: one entry per item, sorted by id.

        Live items carry ``live: true`` and ``on_air`` (their id is in ``on_air``).
        """
        entries = [self.items[iid].to_api() for iid in self.items]
        entries += [item.to_api(item.id in on_air) for item in self.live.values()]
        return sorted(entries, key=lambda entry: str(entry["id"]))

    def with_publisher(self, publisher: Publisher) -> Catalog:
        """A copy with ``publisher`` added or replaced."""
        return replace(self, publishers={**self.publishers, publisher.id: publisher})

    def with_item(self, item: MediaItem) -> Catalog:
        """A copy with ``item`` added or replaced (its publisher must exist)."""
        if item.publisher not in self.publishers:
            raise MediaError(f"unknown publisher {item.publisher!r}")
        if item.id in self.live:
            raise MediaError(f"{item.id!r} is a live item")
        return replace(self, items={**self.items, item.id: item})

    def with_live(self, item: LiveItem) -> Catalog:
        """A copy with live item ``item`` added or replaced (its publisher must exist)."""
        if item.publisher not in self.publishers:
            raise MediaError(f"unknown publisher {item.publisher!r}")
        if item.id in self.items:
            raise MediaError(f"{item.id!r} is already a media item")
        return replace(self, live={**self.live, item.id: item})

    def to_toml(self) -> str:
        """The catalog file's text."""
        data = {
            "publishers": {
                p.id: {"name": p.name, "address": p.address}
                for p in sorted(self.publishers.values(), key=lambda p: p.id)
            },
            "items": {iid: self.items[iid].to_toml() for iid in sorted(self.items)},
        }
        if self.live:
            data["live"] = {lid: self.live[lid].to_toml() for lid in sorted(self.live)}
        return tomli_w.dumps(data)

    def save(self) -> None:
        """Write ``catalog.toml`` atomically: temp file, fsync, ``os.replace``."""
        self.media_dir.mkdir(parents=True, exist_ok=True)
        text = self.to_toml().encode()
        fd, tmp = tempfile.mkstemp(prefix=".catalog-", suffix=".tmp", dir=self.media_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes it 0600
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.media_dir)


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise MediaError(f"[{key}] must be a table")
    return value


def _field(table: Mapping[str, Any], key: str, where: str, kind: type) -> Any:
    value = table.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or value in ("", None):
        raise MediaError(f"{where}: {key} must be a non-empty {kind.__name__}")
    return value


def _publisher_from_toml(pid: str, table: Any) -> Publisher:
    where = f"publisher {pid!r}"
    check_id(pid, "publisher id")
    if not isinstance(table, Mapping):
        raise MediaError(f"{where} must be a table")
    return Publisher(pid, _field(table, "name", where, str), _field(table, "address", where, str))


def _price_from_toml(
    where: str, table: Mapping[str, Any], publishers: Mapping[str, Publisher]
) -> tuple[str, int, int]:
    """(publisher, rate_msat, free_ms) of an item's or a live item's table."""
    publisher = _field(table, "publisher", where, str)
    if publisher not in publishers:
        raise MediaError(f"{where}: unknown publisher {publisher!r}")
    if "rate_msat" in table:
        rate_msat = table["rate_msat"]
        if not isinstance(rate_msat, int) or isinstance(rate_msat, bool) or rate_msat < 0:
            raise MediaError(f"{where}: rate_msat must be an integer >= 0")
        if "rate" in table and parse_rate(table["rate"]) != rate_msat:
            raise MediaError(f"{where}: rate and rate_msat disagree")
    elif "rate" in table:
        rate_msat = parse_rate(table["rate"])
    else:
        raise MediaError(f"{where}: rate_msat (or rate in sat/s) is missing")
    free_ms = table.get("free_ms", DEFAULT_FREE_MS)
    if not isinstance(free_ms, int) or isinstance(free_ms, bool) or free_ms < 0:
        raise MediaError(f"{where}: free_ms must be an integer >= 0")
    return publisher, rate_msat, free_ms


def _item_from_toml(
    media_dir: Path, iid: str, table: Any, publishers: Mapping[str, Publisher]
) -> MediaItem:
    where = f"item {iid!r}"
    check_id(iid, "item id")
    if not isinstance(table, Mapping):
        raise MediaError(f"{where} must be a table")
    publisher, rate_msat, free_ms = _price_from_toml(where, table, publishers)
    directory = check_id(_field(table, "dir", where, str), f"{where} dir")
    manifest = Manifest.load(media_dir / directory)
    return MediaItem.from_manifest(
        manifest,
        id=iid,
        title=_field(table, "title", where, str),
        publisher=publisher,
        rate_msat=rate_msat,
        free_ms=free_ms,
        source=str(table.get("source", "")),
        dir=directory,
    )


def _live_from_toml(lid: str, table: Any, publishers: Mapping[str, Publisher]) -> LiveItem:
    where = f"live item {lid!r}"
    check_id(lid, "live id")
    if not isinstance(table, Mapping):
        raise MediaError(f"{where} must be a table")
    publisher, rate_msat, free_ms = _price_from_toml(where, table, publishers)
    record = table.get("record", True)
    if not isinstance(record, bool):
        raise MediaError(f"{where}: record must be true or false")
    return LiveItem(
        lid, _field(table, "title", where, str), publisher, rate_msat, free_ms, record
    )


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX: fsync the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _writer_lock(media_dir: Path) -> Iterator[None]:
    """Serialize writers of one media directory (advisory ``flock``)."""
    media_dir.mkdir(parents=True, exist_ok=True)
    with (media_dir / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield  # the lock is released when the file closes


def set_price(
    media_dir: Path, item_id: str, *, rate_msat: int, free_ms: int | None = None
) -> MediaItem | None:
    """Change an item's rate (and free allowance) in catalog.toml; None if no such item.

    Plays already started keep the rate they were quoted (protocol.md
    section 6, ``stream``); new plays get the new one.
    """
    with _writer_lock(media_dir):
        catalog = Catalog.load(media_dir)
        item = catalog.items.get(item_id)
        if item is None:
            return None
        item = replace(
            item, rate_msat=rate_msat, free_ms=item.free_ms if free_ms is None else free_ms
        )
        catalog.with_item(item).save()
    return item


def add_publisher(media_dir: Path, publisher_id: str, name: str, address: str) -> Publisher:
    """Add (or replace) a publisher in the catalog and save it."""
    check_id(publisher_id, "publisher id")
    if not name.strip():
        raise MediaError("the publisher name must not be empty")
    # The catalog does not know the gateway's network: the address must be
    # valid on one of them here, and is checked against the gateway's own
    # when it settles (a mismatch sends that share to the operator).
    if not address.strip() or address != address.strip():
        raise MediaError("the payout address must be non-empty, without spaces around it")
    if not any(_pays_on(address, network) for network in NETWORKS):
        raise MediaError(f"{address} is not a Bitcoin address (bad checksum or format)")
    publisher = Publisher(publisher_id, name.strip(), address)
    with _writer_lock(media_dir):
        Catalog.load(media_dir).with_publisher(publisher).save()
    return publisher


def add_live(
    media_dir: Path,
    live_id: str,
    *,
    title: str,
    publisher: str,
    rate_msat: int,
    free_ms: int = DEFAULT_FREE_MS,
    record: bool = True,
) -> LiveItem:
    """Add (or replace) live item ``live_id`` in the catalog and save it."""
    _check_item(live_id, title, rate_msat, free_ms)
    item = LiveItem(live_id, title.strip(), publisher, rate_msat, free_ms, record)
    with _writer_lock(media_dir):
        catalog = Catalog.load(media_dir)
        if publisher not in catalog.publishers:
            raise MediaError(
                f"unknown publisher {publisher!r} (add it with `gateway publisher add`)"
            )
        catalog.with_live(item).save()
    return item


def _pays_on(address: str, network: str) -> bool:
    try:
        address_to_script_pubkey(address, network)
    except ValueError:
        return False
    return True


def publish(
    media_dir: Path,
    source: Path,
    *,
    item_id: str,
    title: str,
    publisher: str,
    rate_msat: int,
    free_ms: int = DEFAULT_FREE_MS,
    preset: str = "veryfast",
    crf: int = 26,
) -> MediaItem:
    """Segment ``source`` into ``media_dir/item_id`` and add (or replace) the item.

    Everything is checked and segmented in a staging directory first; only a
    complete result replaces the old directory and catalog entry, so on any
    MediaError the catalog file is left unchanged.
    """
    _check_item(item_id, title, rate_msat, free_ms)
    if not source.is_file():
        raise MediaError(f"no such file: {source}")
    if publisher not in Catalog.load(media_dir).publishers:  # fail before any writing
        raise MediaError(f"unknown publisher {publisher!r} (add it with `gateway publisher add`)")
    with _writer_lock(media_dir):
        catalog = Catalog.load(media_dir)
        staging = new_staging_dir(media_dir, item_id)
        try:
            segment(source, staging, preset=preset, crf=crf)
            item = _install(
                media_dir,
                catalog,
                staging,
                item_id=item_id,
                title=title,
                publisher=publisher,
                rate_msat=rate_msat,
                free_ms=free_ms,
                source=_source_name(media_dir, source),
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return item


def new_staging_dir(media_dir: Path, item_id: str) -> Path:
    """A fresh hidden directory in ``media_dir`` to write an item's files into."""
    media_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{item_id}-", dir=media_dir))
    staging.chmod(0o755)  # mkdtemp makes it 0700; the server may run as another user
    return staging


def add_segmented(
    media_dir: Path,
    staging: Path,
    *,
    item_id: str,
    title: str,
    publisher: str,
    rate_msat: int,
    free_ms: int = DEFAULT_FREE_MS,
    source: str,
) -> MediaItem:
    """Add (or replace) item ``item_id`` from files already segmented into ``staging``.

    ``staging`` (from :func:`new_staging_dir`) holds a manifest, init segment
    and chunks as :func:`~gateway.media.segment.segment` writes them (a live
    recording writes them as the stream goes). It becomes the item's
    directory; on any MediaError the catalog is left unchanged and
    ``staging`` is removed.
    """
    try:
        _check_item(item_id, title, rate_msat, free_ms)
        with _writer_lock(media_dir):
            catalog = Catalog.load(media_dir)
            if publisher not in catalog.publishers:
                raise MediaError(f"unknown publisher {publisher!r}")
            return _install(
                media_dir,
                catalog,
                staging,
                item_id=item_id,
                title=title,
                publisher=publisher,
                rate_msat=rate_msat,
                free_ms=free_ms,
                source=source,
            )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_item(item_id: str, title: str, rate_msat: int, free_ms: int) -> None:
    check_id(item_id, "item id")
    if not title.strip():
        raise MediaError("the title must not be empty")
    for value, what in ((rate_msat, "rate_msat"), (free_ms, "free_ms")):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_INT:
            raise MediaError(f"{what} must be an integer >= 0")


def _install(
    media_dir: Path,
    catalog: Catalog,
    staging: Path,
    *,
    item_id: str,
    title: str,
    publisher: str,
    rate_msat: int,
    free_ms: int,
    source: str,
) -> MediaItem:
    """Move ``staging`` to the item's directory and save the catalog (writer lock held).

    An old directory of the same item is kept aside until the new catalog is
    saved, and put back if anything fails.
    """
    final = media_dir / item_id
    old: Path | None = None
    try:
        if final.exists():
            old = staging.with_name(staging.name + ".old")
            final.rename(old)
        staging.rename(final)
        try:
            item = MediaItem.from_manifest(
                Manifest.load(final),
                id=item_id,
                title=title.strip(),
                publisher=publisher,
                rate_msat=rate_msat,
                free_ms=free_ms,
                source=source,
                dir=item_id,
            )
            catalog.with_item(item).save()
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            if old is not None:
                old.rename(final)
                old = None
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return item


def _source_name(media_dir: Path, source: Path) -> str:
    """The source as stored: relative to the media directory when inside it."""
    resolved = source.resolve()
    try:
        return str(resolved.relative_to(media_dir.resolve()))
    except ValueError:
        return str(resolved)
