"""``player play|refund|channels``: a thin command line over :mod:`player.client`.

Exit status: 0 on a normal finish (including a clean close after Ctrl-C),
1 on any error (one line on stderr), 2 on bad usage, 3 when the gateway
overcharged (the channel was closed and nothing beyond the metered figure
was signed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from gateway.protocol.channel import ClientChannel
from gateway.protocol.scripts import is_height_expiry
from player.catalog import catalog_item
from player.client import (
    DEFAULT_BUDGET,
    DEFAULT_BUFFER_S,
    ExpirySpec,
    OverchargeDetected,
    Player,
    PlayerError,
    PlayResult,
    Progress,
    check_gateway_url,
    parse_expiry,
    refund_channel,
)
from player.keystore import ChannelState, Keystore, KeystoreError, StoredChannel, default_data_dir
from player.wallet import Wallet, WalletError

__all__ = ["EXIT_ERROR", "EXIT_OVERCHARGE", "ProgressLine", "format_channels", "main"]

EXIT_ERROR = 1
EXIT_OVERCHARGE = 3


def _fmt_ms(ms: int) -> str:
    s = ms // 1000
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


#: Seconds between two progress lines while playing when stderr is not a terminal.
PLAIN_INTERVAL_S = 5.0


class ProgressLine:
    """Progress on ``stream`` (stderr).

    On a terminal, one line rewritten in place. Otherwise (a pipe, a log
    file) plain lines: one per change of status, and while playing one
    every ``interval`` seconds, so a log shows the player is alive without a
    line per chunk.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = PLAIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.interval = interval
        self.clock = clock
        self._last = ""
        self._status = ""
        self._printed_at = -math.inf

    def __call__(self, p: Progress) -> None:
        """Show ``p``."""
        if p.status == "funding" and p.needed:
            line = f"funding: {p.confirmations}/{p.needed} confirmations"
        elif p.status == "playing" and not p.duration_ms:  # its `stream` is not here yet
            line = f"playing {p.media}"
        elif p.status in ("playing", "closing", "closed", "disconnected"):
            line = (
                f"{p.media} {_fmt_ms(p.media_ms)}/{_fmt_ms(p.duration_ms)}"
                f"  free left {p.free_left_ms // 1000}s"
                f"  paid {p.paid} sat  balance {p.balance} sat"
                f"  rate {p.rate_msat / 1000:g} sat/s"
            )
            if p.status != "playing":
                line += f"  [{p.status}]"
        else:
            line = p.status
        if line == self._last:
            return
        self._last = line
        if self.live:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
            return
        now = self.clock()
        if p.status != self._status or now - self._printed_at >= self.interval:
            self._status, self._printed_at = p.status, now
            self.stream.write(line + "\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        """A message of its own line, above the live line (which is drawn again)."""
        if self.live and self._last:
            self.stream.write("\r\x1b[2K" + text + "\n" + self._last)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        """End the live line (the summary goes on its own line)."""
        if self.live and self._last:
            self.stream.write("\n")
            self.stream.flush()


def format_channels(channels: Sequence[StoredChannel]) -> str:
    """The ``player channels`` table."""
    header = ("id", "channel", "gateway", "kind", "value", "balance", "paid", "expiry", "state")
    rows = [header]
    for ch in channels:
        if is_height_expiry(ch.expiry):
            expiry = f"h:{ch.expiry}"
        else:
            expiry = time.strftime("%Y-%m-%d %H:%M", time.gmtime(ch.expiry))
        balance = ch.balance if ch.balance is not None else ch.value
        rows.append(
            (
                str(ch.id),
                ch.channel_id or "-",
                ch.gateway_url,
                ch.kind,
                "-" if ch.value is None else str(ch.value),
                "-" if balance is None else str(balance),
                str(ch.paid),
                expiry,
                ch.state,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _expiry_arg(text: str) -> ExpirySpec:
    try:
        return parse_expiry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
    return value


_TIME = re.compile(r"(?:(?:(\d+):)?(\d+):)?(\d+(?:\.\d{1,3})?)")


def _media_time(text: str) -> int:
    """``--from``: ``[[H:]MM:]SS[.mmm]`` or seconds, as milliseconds."""
    match = _TIME.fullmatch(text.strip())
    bad = argparse.ArgumentTypeError(
        f"bad time {text!r}: expected seconds or [H:]MM:SS, e.g. 90, 1:30 or 1:02:03"
    )
    if match is None:
        raise bad
    hours, minutes, seconds = int(match[1] or 0), int(match[2] or 0), float(match[3])
    # After an hour or a minute field, minutes and seconds stay below a full one;
    # bare seconds may be any number.
    if (match[2] is not None and seconds >= 60) or (match[1] is not None and minutes >= 60):
        raise bad
    return round((hours * 3600 + minutes * 60 + seconds) * 1000)


def _positive(text: str) -> int:
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    return _integer(text, 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="player", description="Watch pay-per-second media over a Bitcoin payment channel."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="where K1 and the channels live (default $PAYSTREAM_PLAYER_DIR "
            "or ~/.paystream-player)",
        )

    def wallet_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wallet-rpc", metavar="URL", help="Bitcoin Core-compatible wallet RPC URL")
        p.add_argument("--wallet-cookie", metavar="PATH", help="the RPC's cookie file")

    play = sub.add_parser(
        "play",
        help="watch MEDIA from a gateway, paying per chunk",
        description="Watch MEDIA from a gateway, paying per chunk. The gateway's catalog "
        "is read first: an id it does not have is refused before any channel is opened. "
        "A funded channel stored for this gateway is resumed (the player says which, "
        "with its value, paid and balance) and MEDIA goes on where it was left off on "
        "that channel (after the last chunk received, so nothing is paid twice; from the "
        "start once it was played to the end), unless --from says where. Without a "
        "stored channel one is opened and funded from --wallet-rpc, for exactly --budget "
        "sat. Progress goes to stderr: one line redrawn on a terminal, else a plain line "
        "every few seconds. Ctrl-C or SIGTERM closes the channel and prints a summary.",
    )
    play.add_argument("url", help="ws://HOST:PORT/paystream/2")
    play.add_argument("media", help="media id in the gateway's catalog")
    play.add_argument(
        "--budget",
        type=_positive,
        default=None,
        metavar="SAT",
        help="a new channel's value, the most ever paid on it; within the gateway's "
        f"limits or refused (default {DEFAULT_BUDGET}). On a resumed channel: the most "
        "this run pays more (at most its balance; default: its balance)",
    )
    play.add_argument("--kind", choices=("cltv", "multisig"), default="cltv")
    play.add_argument(
        "--expiry", type=_expiry_arg, default=None, help="e.g. 6h, 3600 (s) or h:HEIGHT"
    )
    play.add_argument("--out", metavar="FILE", help="write media to FILE ('-' = stdout)")
    start = play.add_mutually_exclusive_group()
    start.add_argument(
        "--from",
        dest="start_ms",
        type=_media_time,
        default=None,
        metavar="TIME",
        help="start at this media time, e.g. 0, 90 or 1:30 (default: where this channel "
        "left MEDIA off, else the start)",
    )
    start.add_argument(
        "--start-ms", dest="start_ms", type=_non_negative, help="the same in milliseconds"
    )
    play.add_argument(
        "--duration-ms", type=_positive, default=None, help="stop after this much media"
    )
    play.add_argument(
        "--max-chunks", type=_positive, default=None, help="stop after this many chunks"
    )
    play.add_argument(
        "--keep-open", action="store_true", help="on stop, disconnect instead of closing"
    )
    play.add_argument("--new-channel", action="store_true", help="do not resume a stored channel")
    pace = play.add_mutually_exclusive_group()
    pace.add_argument(
        "--buffer",
        type=float,
        default=DEFAULT_BUFFER_S,
        metavar="SECONDS",
        help="pay at most this far ahead of real-time playback (default %(default)g)",
    )
    pace.add_argument(
        "--no-pace",
        action="store_true",
        help="pay for chunks as fast as they come (downloading, not watching)",
    )
    wallet_args(play)
    common(play)

    refund = sub.add_parser("refund", help="broadcast the refund of an expired channel")
    refund.add_argument(
        "channel", nargs="?", help="id, txid:vout or txid prefix (default: every unsettled one)"
    )
    wallet_args(refund)
    common(refund)

    channels = sub.add_parser("channels", help="list stored channels")
    common(channels)
    return parser


def _wallet(args: argparse.Namespace, *, required: bool) -> Wallet | None:
    if args.wallet_rpc is None:
        if required:
            raise PlayerError("--wallet-rpc URL (and --wallet-cookie PATH) is required")
        return None
    return Wallet.connect(args.wallet_rpc, cookie_path=args.wallet_cookie)


def _open_out(target: str | None) -> tuple[BinaryIO | None, bool]:
    """(stream, must_close) for ``--out``."""
    if target is None:
        if sys.stdout.isatty():
            raise PlayerError("refusing to write media to a terminal: use --out FILE, or pipe it")
        target = "-"
    if target == "-":
        return sys.stdout.buffer, False
    try:
        return open(target, "wb"), True
    except OSError as exc:
        raise PlayerError(f"cannot write {target}: {exc.strerror}") from None


def _check_play(args: argparse.Namespace) -> None:
    """What ``play`` checks before it writes anything (keystore, output file, channel).

    The URL, then the gateway's catalog: an id it does not have fails here,
    not once a channel is funded; and ``--from`` within the media.
    """
    check_gateway_url(args.url)
    item = catalog_item(args.url, args.media)
    duration_ms = item.get("duration_ms")
    if isinstance(duration_ms, int) and (args.start_ms or 0) > duration_ms:
        raise PlayerError(
            f"--from {_fmt_ms(args.start_ms)} is past the end of {args.media} "
            f"({_fmt_ms(duration_ms)})"
        )


async def _play(args: argparse.Namespace, store: Keystore) -> int:
    wallet = _wallet(args, required=False)
    out, must_close = _open_out(args.out)
    line = ProgressLine(sys.stderr)

    def resuming(rec: StoredChannel, channel: ClientChannel) -> None:
        value, paid = channel.value or 0, channel.paid
        balance = value - paid
        text = f"resuming channel {rec.id} (value {value}, paid {paid}, balance {balance} sat)"
        if args.budget is not None:
            most = channel.budget - paid
            text += f"; this run pays at most {most} sat"
            if most < args.budget:
                text += " (the channel's balance; --new-channel opens another)"
        line.note(text)
        if args.start_ms is None and (at := store.position(rec.id, args.media)):
            line.note(f"{args.media} goes on at {_fmt_ms(at)} (--from 0 starts it over)")

    try:
        player = Player(
            args.url,
            store,
            wallet=wallet,
            budget=DEFAULT_BUDGET if args.budget is None else args.budget,
            resume_budget=args.budget,
            on_resume=resuming,
            kind=args.kind,
            expiry=args.expiry,
            new_channel=args.new_channel,
            out=out,
            on_progress=line,
            buffer_s=None if args.no_pace else args.buffer,
        )
        loop = asyncio.get_running_loop()
        interrupts = 0

        def on_sigint() -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts > 1:  # a second Ctrl-C: give up waiting for `closed`
                raise KeyboardInterrupt
            player.stop()

        # SIGTERM (`timeout`, `kill`, a service manager) ends the session as Ctrl-C
        # does: close, wait for `closed`, summary. Not possible off the main
        # thread or on Windows: the signal then just interrupts.
        handled: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
                loop.add_signal_handler(sig, on_sigint)
                handled.append(sig)
        try:
            result = await player.play(
                args.media,
                start_ms=args.start_ms,
                max_chunks=args.max_chunks,
                duration_ms=args.duration_ms,
                keep_open=args.keep_open,
            )
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            line.done()
    finally:
        if out is not None:
            with contextlib.suppress(OSError):
                out.flush()
            if must_close:
                out.close()
        if wallet is not None:
            await wallet.close()
    print(_summary(result), file=sys.stderr)
    return 0


def _summary(r: PlayResult) -> str:
    ch = r.channel
    how = "resumed" if r.resumed else "opened"
    end = (
        f"closed (settlement {r.closed_txid or 'none: refund after expiry'})"
        if r.closed
        else "still open"
    )
    return (
        f"{r.reason}: {r.chunks} chunks, {_fmt_ms(r.media_ms)} of media; channel {ch.id} "
        f"({how}, {ch.channel_id}) paid {r.paid} sat, balance {r.balance} sat; {end}"
    )


async def _refund(args: argparse.Namespace, store: Keystore) -> int:
    wallet = _wallet(args, required=True)
    assert wallet is not None
    try:
        if args.channel is not None:
            targets = [store.find(args.channel)]
        else:
            targets = [
                ch
                for ch in store.channels()
                if ch.signed_refund is not None
                and ch.state != ChannelState.REFUNDED
                and ch.closing_txid is None
            ]
            if not targets:
                raise PlayerError("no channel to refund")
        failed = 0
        for ch in targets:
            try:
                txid = await refund_channel(store, wallet, ch)
            except PlayerError as exc:
                failed += 1
                print(f"player: {exc}", file=sys.stderr)
                continue
            print(f"channel {ch.id}: refund broadcast in {txid}")
        return EXIT_ERROR if failed else 0
    finally:
        await wallet.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``player`` console script."""
    args = _parser().parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    try:
        if args.command == "play":
            _check_play(args)
        with Keystore(data_dir) as store:
            if args.command == "channels":
                print(format_channels(store.channels()))
                return 0
            if args.command == "refund":
                return asyncio.run(_refund(args, store))
            return asyncio.run(_play(args, store))
    except OverchargeDetected as exc:
        print(f"player: {exc}", file=sys.stderr)
        return EXIT_OVERCHARGE
    except (PlayerError, KeystoreError, WalletError) as exc:
        print(f"player: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("player: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
