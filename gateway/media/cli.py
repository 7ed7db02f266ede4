"""``gateway publish``, ``gateway publisher add|token``, ``gateway live add``,
``gateway media sample|list``.

Wired into ``gateway/cli.py`` through :func:`register_cli`. Every failure the
user caused (unknown publisher, missing or undecodable file, bad rate, bad
catalog) is a :class:`gateway.cli.CliError`: one line, exit status 1, and the
catalog file unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

from gateway.datadir import secure_datadir
from gateway.errors import CliError
from gateway.keys import MasterKey
from gateway.media.catalog import (
    DEFAULT_FREE_MS,
    Catalog,
    MediaItem,
    add_live,
    add_publisher,
    parse_rate,
    parse_seconds,
    publish,
)
from gateway.media.sample import DEFAULT_SECONDS, ensure_samples
from gateway.media.segment import MediaError
from gateway.protocol.metering import total_due
from gateway.protocol.settlement import feerate, lone_payout_share
from gateway.protocol.transactions import DUST_LIMIT

#: The media directory when ``--media`` is not given (relative to the cwd).
DEFAULT_MEDIA_DIR = Path("media")


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn MediaError into the CLI's one-line error."""
    try:
        yield
    except MediaError as exc:
        raise CliError(str(exc)) from exc


def _add_feerate_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--feerate",
        type=float,
        default=2.0,
        metavar="SAT_PER_VB",
        help="settlement feerate the payout warning assumes (default: 2, the gateway's "
        "fee floor)",
    )


def _add_media_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--media",
        type=Path,
        default=DEFAULT_MEDIA_DIR,
        metavar="DIR",
        help="media directory holding catalog.toml (default: ./media)",
    )


def _add_datadir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--datadir",
        type=Path,
        metavar="DIR",
        help="gateway data dir holding master.key (default $PAYSTREAM_DATADIR or ./data)",
    )
    parser.add_argument(
        "--master-key",
        type=Path,
        metavar="PATH",
        help="the master key file, when the gateway runs with --master-key",
    )


def cmd_publish(args: argparse.Namespace) -> int:
    """``gateway publish FILE --id ID --publisher P --rate SAT_PER_S``."""
    rate = _feerate(args)  # checked before anything is written
    with _user_errors():
        started = time.monotonic()
        item = publish(
            args.media,
            args.file,
            item_id=args.id,
            title=args.title if args.title is not None else args.id,
            publisher=args.publisher,
            rate_msat=parse_rate(args.rate),
            free_ms=parse_seconds(args.free),
        )
    print(
        f"published {item.id}: {len(item.chunks)} chunks, {item.duration_ms / 1000:.1f} s, "
        f"{item.mime}, {item.rate} sat/s after {item.free_ms / 1000:g} s free "
        f"({time.monotonic() - started:.1f} s)"
    )
    warn_if_below_payout(item, rate)
    return 0


def whole_price(item: MediaItem) -> int:
    """What one viewer pays for all of ``item`` beyond its free time (sat, rounded up)."""
    return total_due(0, item.rate_msat, max(0, item.duration_ms - item.free_ms))


def warn_if_below_payout(item: MediaItem, rate: Fraction) -> None:
    """Warn when a whole watch of ``item`` cannot pay its publisher from one channel.

    At ``rate`` sat/vB a channel settled alone needs :func:`lone_payout_share`
    sat of media for a publisher output (docs/economics.md); below that, the
    publisher earns from ``item`` only when viewers' channels settle together.
    """
    needed = lone_payout_share(rate)
    price = whole_price(item)
    paid_ms = item.duration_ms - item.free_ms
    if price >= needed or paid_ms <= 0:
        return
    even = -(-needed * 1_000_000 // paid_ms)  # msat per second
    print(
        f"warning: all of {item.id} costs {price} sat beyond its free time, below the "
        f"{needed} sat a viewer's channel settled alone needs to pay its publisher at "
        f"{float(rate):g} sat/vB (a {DUST_LIMIT}-sat output plus its fee): it earns only "
        f"when settled with other viewers; --rate {even / 1000:g} or more breaks even alone",
        file=sys.stderr,
    )


def _feerate(args: argparse.Namespace) -> Fraction:
    if not args.feerate >= 1:
        raise CliError("--feerate must be at least 1 sat/vB (the minimum relay feerate)")
    return feerate(str(args.feerate))


def _datadir(args: argparse.Namespace) -> Path:
    return Path(args.datadir or os.environ.get("PAYSTREAM_DATADIR", "data"))


def publisher_token(datadir: Path, publisher_id: str, master_key: Path | None = None) -> str:
    """Publisher ``publisher_id``'s WHIP bearer token, from the gateway's master key.

    The key is ``master_key`` (``gateway serve --master-key``) or the data
    dir's ``master.key``.
    """
    if master_key is None:
        secure_datadir(datadir)
    return MasterKey.load_or_create(master_key or datadir / "master.key").publisher_token(
        publisher_id
    )


def cmd_publisher_add(args: argparse.Namespace) -> int:
    """``gateway publisher add ID --name N --address ADDR``: also prints its WHIP token."""
    with _user_errors():
        publisher = add_publisher(args.media, args.id, args.name, args.address)
    print(f"publisher {publisher.id}: {publisher.name}, paid to {publisher.address}")
    datadir = _datadir(args)
    # The token comes from the gateway's master key: made here only in a
    # data dir named on purpose, never in a stray ./data.
    if args.datadir is not None or args.master_key is not None or (datadir / "master.key").exists():
        token = publisher_token(datadir, publisher.id, args.master_key)
        print(f"WHIP bearer token: {token}")
    else:
        print(f"WHIP bearer token: `gateway publisher token {publisher.id} --datadir DIR`")
    return 0


def cmd_publisher_token(args: argparse.Namespace) -> int:
    """``gateway publisher token ID``: the publisher's WHIP bearer token again."""
    with _user_errors():
        catalog = Catalog.load(args.media)
    if args.id not in catalog.publishers:
        raise CliError(f"unknown publisher {args.id!r} (add it with `gateway publisher add`)")
    print(publisher_token(_datadir(args), args.id, args.master_key))
    return 0


def cmd_live_add(args: argparse.Namespace) -> int:
    """``gateway live add ID --title T --publisher P --rate R --free S [--no-record]``."""
    with _user_errors():
        item = add_live(
            args.media,
            args.id,
            title=args.title or args.id,
            publisher=args.publisher,
            rate_msat=parse_rate(args.rate),
            free_ms=parse_seconds(args.free),
            record=args.record,
        )
    print(
        f"live {item.id}: {item.rate} sat/s, {item.free_ms / 1000:g} s free, "
        f"{'recorded' if item.record else 'not recorded'}; publish with WHIP to /whip/{item.id}"
    )
    return 0


def cmd_media_sample(args: argparse.Namespace) -> int:
    """``gateway media sample``: generate and publish the demo media once."""
    rate = _feerate(args)
    if args.seconds < 1:
        raise CliError("--seconds must be at least 1")
    with _user_errors():
        started = time.monotonic()
        items = ensure_samples(args.media, args.seconds)
    if not items:
        print(f"sample media already in {args.media / 'catalog.toml'}")
    for item in items:
        print(f"published {item.id}: {len(item.chunks)} chunks, {item.duration_ms / 1000:.1f} s")
        warn_if_below_payout(item, rate)
    if items:
        print(f"sample media ready in {time.monotonic() - started:.1f} s")
    return 0


def cmd_media_list(args: argparse.Namespace) -> int:
    """``gateway media list``: the catalog, one item per line."""
    with _user_errors():
        catalog = Catalog.load(args.media)
    for item in catalog.items.values():
        print(
            f"{item.id}\t{item.rate} sat/s\t{item.free_ms // 1000} s free\t"
            f"{item.duration_ms / 1000:.1f} s\t{item.publisher}\t{item.title}"
        )
    for live in catalog.live.values():
        print(
            f"{live.id}\t{live.rate} sat/s\t{live.free_ms // 1000} s free\t"
            f"live\t{live.publisher}\t{live.title}"
        )
    return 0


def _add_price_options(p: argparse.ArgumentParser) -> None:
    """Title, publisher and price: the same for a file and a live item."""
    p.add_argument("--title", help="title shown to viewers (default: the id)")
    p.add_argument("--publisher", required=True, help="publisher id (see `publisher add`)")
    p.add_argument("--rate", required=True, help="price in sat per second, e.g. 2 or 0.5")
    p.add_argument(
        "--free",
        default=str(DEFAULT_FREE_MS // 1000),
        metavar="SECONDS",
        help="free seconds per channel (default: 60)",
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``publish``, ``publisher`` and ``media`` subcommands."""
    p = subparsers.add_parser("publish", help="segment a media file into the catalog")
    p.add_argument("file", type=Path, metavar="FILE", help="audio or video file to publish")
    p.add_argument("--id", required=True, help="item id (a-z 0-9 . _ -); re-publish replaces")
    _add_price_options(p)
    _add_feerate_option(p)
    _add_media_option(p)
    p.set_defaults(func=cmd_publish)

    p = subparsers.add_parser("publisher", help="manage publishers")
    publisher_sub = p.add_subparsers(dest="publisher_command", metavar="ACTION", required=True)
    p = publisher_sub.add_parser("add", help="add or replace a publisher")
    p.add_argument("id", help="publisher id (a-z 0-9 . _ -)")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--address", required=True, help="payout address")
    _add_media_option(p)
    _add_datadir_option(p)
    p.set_defaults(func=cmd_publisher_add)
    p = publisher_sub.add_parser("token", help="show a publisher's WHIP bearer token")
    p.add_argument("id", help="publisher id")
    _add_media_option(p)
    _add_datadir_option(p)
    p.set_defaults(func=cmd_publisher_token)

    p = subparsers.add_parser("live", help="live items (published over WHIP)")
    live_sub = p.add_subparsers(dest="live_command", metavar="ACTION", required=True)
    p = live_sub.add_parser("add", help="add or replace a live item")
    p.add_argument("id", help="live id (a-z 0-9 . _ -): publish to /whip/ID")
    _add_price_options(p)
    p.add_argument(
        "--no-record",
        dest="record",
        action="store_false",
        help="do not record the stream into the catalog when it ends",
    )
    _add_media_option(p)
    p.set_defaults(func=cmd_live_add)

    p = subparsers.add_parser("media", help="sample media and the catalog")
    media_sub = p.add_subparsers(dest="media_command", metavar="ACTION", required=True)
    p = media_sub.add_parser("sample", help="generate and publish the demo video and music")
    p.add_argument(
        "--seconds",
        type=int,
        default=DEFAULT_SECONDS,
        help=f"length of each sample (default: {DEFAULT_SECONDS})",
    )
    _add_media_option(p)
    _add_feerate_option(p)
    p.set_defaults(func=cmd_media_sample)
    p = media_sub.add_parser("list", help="list the catalog")
    _add_media_option(p)
    p.set_defaults(func=cmd_media_list)
