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
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from gateway.protocol.scripts import is_height_expiry
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


class ProgressLine:
    """The live progress line on ``stream`` (stderr): rewritten in place on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self._last = ""

    def __call__(self, p: Progress) -> None:
        """Show ``p``."""
        if p.status == "funding" and p.needed:
            line = f"funding: {p.confirmations}/{p.needed} confirmations"
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

    play = sub.add_parser("play", help="watch MEDIA from a gateway, paying per chunk")
    play.add_argument("url", help="ws://HOST:PORT/paystream/2")
    play.add_argument("media", help="media id in the gateway's catalog")
    play.add_argument(
        "--budget",
        type=_positive,
        default=DEFAULT_BUDGET,
        help="channel value and the most paid (sat)",
    )
    play.add_argument("--kind", choices=("cltv", "multisig"), default="cltv")
    play.add_argument(
        "--expiry", type=_expiry_arg, default=None, help="e.g. 6h, 3600 (s) or h:HEIGHT"
    )
    play.add_argument("--out", metavar="FILE", help="write media to FILE ('-' = stdout)")
    play.add_argument(
        "--start-ms", type=_non_negative, default=0, help="start playback at this media time"
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


async def _play(args: argparse.Namespace, store: Keystore) -> int:
    check_gateway_url(args.url)  # before creating the output file
    wallet = _wallet(args, required=False)
    out, must_close = _open_out(args.out)
    line = ProgressLine(sys.stderr)
    try:
        player = Player(
            args.url,
            store,
            wallet=wallet,
            budget=args.budget,
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

        # Not possible off the main thread or on Windows: Ctrl-C then just interrupts.
        handled = False
        with contextlib.suppress(RuntimeError, NotImplementedError, ValueError):
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            handled = True
        try:
            result = await player.play(
                args.media,
                start_ms=args.start_ms,
                max_chunks=args.max_chunks,
                duration_ms=args.duration_ms,
                keep_open=args.keep_open,
            )
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)
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
