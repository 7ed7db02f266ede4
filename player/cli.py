"""``player play|status|refund|channels``: a thin command line over :mod:`player.client`.

Exit status: 0 on a normal finish (including a clean close after Ctrl-C),
1 on any error (one line on stderr), 2 on bad usage, 3 when the gateway
overcharged (the channel was closed and nothing beyond the metered figure
was signed), 4 when a settlement failed the check of protocol.md section 3
(the channel is not marked settled).
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
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Final, TextIO

from gateway.protocol.channel import DEFAULT_MAX_FEERATE, ClientChannel
from gateway.protocol.messages import Terms
from gateway.protocol.scripts import ChannelKind, is_height_expiry
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
    format_feerate,
    parse_expiry,
    refund_channel,
)
from player.keystore import ChannelState, Keystore, KeystoreError, StoredChannel, default_data_dir
from player.settlement import (
    SettlementCheckFailed,
    follow,
    format_time,
    unsettled_text,
)
from player.wallet import Wallet, WalletError
from player.webrtc import WebrtcReceiver

__all__ = [
    "EXIT_BAD_SETTLEMENT",
    "EXIT_ERROR",
    "EXIT_OVERCHARGE",
    "ProgressLine",
    "cost_lines",
    "format_channels",
    "main",
    "media_cost",
]

EXIT_ERROR = 1
EXIT_OVERCHARGE = 3
EXIT_BAD_SETTLEMENT = 4
#: The "watching this long costs" example of the cost lines (ms).
COST_EXAMPLE_MS: Final = 5 * 60_000


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
                f"{p.media} {_fmt_ms(p.position_ms)}/{_fmt_ms(p.duration_ms)}"
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


def _settlement_cell(ch: StoredChannel) -> str:
    if ch.state == ChannelState.REFUNDED:
        return f"refund {ch.refund_txid}"
    if ch.closing_txid is not None:
        return ch.closing_txid
    if ch.state == ChannelState.PENDING and ch.settle_by is not None:
        return f"by {format_time(ch.settle_by)}"
    if ch.state == ChannelState.UNSETTLED:
        return "none: refund after expiry"
    return "-"


def format_channels(channels: Sequence[StoredChannel]) -> str:
    """The ``player channels`` table: amounts in sat, ``paid`` includes ``exit_fee``."""
    header = (
        "id", "channel", "gateway", "kind", "value", "paid", "exit_fee", "balance", "expiry",
        "state", "settlement",
    )
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
                str(ch.paid),
                str(ch.exit_fee),
                "-" if balance is None else str(balance),
                expiry,
                ch.state,
                _settlement_cell(ch),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def media_cost(rate_msat: int, free_ms: int, watched_ms: int) -> int:
    """Sat a new channel pays for the first ``watched_ms`` of an item, reserve aside.

    Section 7 charges only media delivered beyond the free allowance, at the
    item's rate, and rounds the channel's whole bill up once: from a new
    channel's first chunk to a chunk's end this is exactly what is paid.
    """
    return -(-rate_msat * max(0, watched_ms - free_ms) // 1_000_000)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def cost_lines(
    media: str,
    item: dict[str, Any],
    *,
    exit_fee: int,
    quoted: Fraction,
    value: int,
    start_ms: int = 0,
    duration_ms: int | None = None,
) -> list[str]:
    """What a session on a new channel costs, said before it is funded.

    The item's rate and free time (``GET /api/catalog``), the reserve (the
    exit fee of ``terms``, protocol.md section 3), and what the media costs
    on top: ``--duration-ms`` of it or five minutes, and the whole item (from
    ``--from``).
    """
    lines = []
    rate_msat, free_s, length = item.get("rate_msat"), item.get("free_seconds"), item.get(
        "duration_ms"
    )
    priced = _number(rate_msat) and _number(free_s) and _number(length)
    if priced:
        assert isinstance(rate_msat, int) and isinstance(length, int)
        assert isinstance(free_s, int | float)
        free_ms = round(free_s * 1000)
        rate = f"{rate_msat / 1000:g} sat/s"
        lines.append(
            f"{media} costs {rate} after its first {_fmt_ms(free_ms)} free "
            f"({_fmt_ms(length)} long)"
            if free_ms
            else f"{media} costs {rate} from the start ({_fmt_ms(length)} long)"
        )
    lines.append(
        f"leaving costs {exit_fee} sat: the network fee to return your change, at "
        f"{format_feerate(quoted)} sat/vB (paid first, before any media)"
    )
    if priced:
        assert isinstance(rate_msat, int) and isinstance(length, int)
        rest = max(0, length - start_ms)
        parts = []
        if duration_ms is not None and duration_ms < rest:
            parts.append(f"this run's {_fmt_ms(duration_ms)}")
        elif rest > COST_EXAMPLE_MS:
            parts.append(f"{_fmt_ms(COST_EXAMPLE_MS)}")
        whole = "the whole item" if start_ms == 0 else f"the rest from {_fmt_ms(start_ms)}"
        amounts = [
            media_cost(rate_msat, free_ms, ms)
            for ms in ([duration_ms or COST_EXAMPLE_MS] if parts else []) + [rest]
        ]
        if parts:
            text = f"{parts[0]} costs {amounts[0]} sat, {whole} {amounts[1]} sat"
        else:
            text = f"{whole} costs {amounts[0]} sat"
        lines.append(f"{text}, plus the exit fee; this channel holds {value} sat")
    return lines


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


def _feerate_arg(text: str) -> Fraction:
    try:
        rate = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        rate = Fraction(0)
    if rate <= 0:
        raise argparse.ArgumentTypeError(f"expected a feerate in sat/vB above 0, got {text!r}")
    return rate


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
        "start once it was played to the end), unless --from says where; its exit fee is "
        "said too. Without a stored channel one is opened and funded from --wallet-rpc, for "
        "exactly --budget sat; before any money moves the player says what the session "
        "costs: the item's rate and free time, the exit fee (the network fee of returning "
        "your change, paid first as the reserve) and what five minutes (or --duration-ms) "
        "and the whole item cost on top. Progress goes to stderr: one line redrawn on a "
        "terminal, else a plain line every few seconds; its time and free time left follow "
        "playback (with --no-pace, what was written), not what was received ahead. "
        "Ctrl-C or SIGTERM closes the channel and prints a summary, then what happens to "
        "your change: settled by a txid (checked against the gateway's channel API, and on "
        "your node with --wallet-rpc; one that fails the check exits 4), pending until a "
        "time (player status checks it then), or nothing broadcast (player refund after "
        "expiry).",
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
    play.add_argument("--kind", choices=tuple(ChannelKind), default=ChannelKind.CLTV)
    play.add_argument(
        "--max-feerate",
        type=_feerate_arg,
        default=DEFAULT_MAX_FEERATE,
        metavar="SATVB",
        help="do not fund a new channel whose exit the gateway quotes above this feerate "
        f"(sat/vB, e.g. 20 or 1.5; default {float(DEFAULT_MAX_FEERATE):g}): one line, "
        "before anything is stored or funded",
    )
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
    play.add_argument(
        "--webrtc",
        action="store_true",
        help="a live item: receive it over WebRTC (aiortc), paying per live second; --out "
        "FILE gets the media in the container its extension names (e.g. live.mkv)",
    )
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

    status = sub.add_parser(
        "status",
        help="follow closed channels' settlements and check them on chain",
        description="For CHANNEL, or every funded channel not yet final, ask its gateway "
        "(GET /api/channel/<txid:vout>) what became of it: pending (by when), nothing "
        "broadcast (refund after expiry), or its settlement, which is checked as "
        "protocol.md section 3 promises (our input, our exact change at our index, a "
        "feerate at least the one our exit fee was quoted at). With --wallet-rpc, your node "
        "must also show our change output (gettxout) confirmed: only then is the channel "
        "marked settled. A settlement that fails the check is reported on stderr, the "
        "channel is not marked settled, and the exit status is 4.",
    )
    status.add_argument(
        "channel", nargs="?", help="id, txid:vout or txid prefix (default: every funded one "
        "not yet settled or refunded)"
    )
    status.add_argument(
        "--gateway", metavar="URL", help="ask this gateway (ws://HOST:PORT/paystream/2) "
        "instead of the one stored with the channel"
    )
    wallet_args(status)
    common(status)

    channels = sub.add_parser(
        "channels",
        help="list stored channels",
        description="Stored channels with their amounts in sat (paid includes the exit fee) "
        "and state: open, refund_signed, funding, ready, closing (close sent), closed "
        "(not yet followed), pending (settlement waits for its batch), settling (broadcast, "
        "not yet confirmed on your node), settled, unsettled (nothing broadcast: refund "
        "after expiry), refunded.",
    )
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


def _check_play(args: argparse.Namespace) -> dict[str, Any]:
    """What ``play`` checks before it writes anything (keystore, output file, channel).

    The URL, then the gateway's catalog: an id it does not have fails here,
    not once a channel is funded; and ``--from`` within the media. Returns
    the catalog's entry (its price, for the cost lines).
    """
    check_gateway_url(args.url)
    item = catalog_item(args.url, args.media)
    if args.webrtc and not item.get("live"):
        raise PlayerError(f"--webrtc is for live items; {args.media} is not one (drop --webrtc)")
    if args.webrtc and args.out == "-":
        raise PlayerError("--webrtc writes a file: --out FILE, not -")
    duration_ms = item.get("duration_ms")
    if isinstance(duration_ms, int) and (args.start_ms or 0) > duration_ms:
        raise PlayerError(
            f"--from {_fmt_ms(args.start_ms)} is past the end of {args.media} "
            f"({_fmt_ms(duration_ms)})"
        )
    return item


async def _play(args: argparse.Namespace, store: Keystore, item: dict[str, Any]) -> int:
    wallet = _wallet(args, required=False)
    receiver: WebrtcReceiver | None = None
    if args.webrtc:
        receiver = WebrtcReceiver(args.url, Path(args.out) if args.out else None)
        out, must_close = None, False
    else:
        out, must_close = _open_out(args.out)
    line = ProgressLine(sys.stderr)

    def terms(channel: ClientChannel, terms: Terms) -> None:
        for text in cost_lines(
            args.media,
            item,
            exit_fee=terms.exit_fee,
            quoted=channel.quoted,
            value=channel.budget,
            start_ms=args.start_ms or 0,
            duration_ms=args.duration_ms,
        ):
            line.note(text)

    def resuming(rec: StoredChannel, channel: ClientChannel) -> None:
        value, paid = channel.value or 0, channel.paid
        balance = value - paid
        text = (
            f"resuming channel {rec.id} (value {value}, paid {paid}, balance {balance} sat, "
            f"exit fee {rec.exit_fee} sat)"
        )
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
            max_feerate=args.max_feerate,
            on_terms=terms,
            kind=args.kind,
            expiry=args.expiry,
            new_channel=args.new_channel,
            out=out,
            on_progress=line,
            buffer_s=None if args.no_pace else args.buffer,
            webrtc=receiver,
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
            if out is not None:
                with contextlib.suppress(OSError):
                    out.flush()
                if must_close:
                    out.close()
                    out = None
        print(_summary(result), file=sys.stderr)
        if not result.closed:
            return 0
        return await _after_close(store, result, wallet)
    finally:
        if out is not None and must_close:
            out.close()
        if wallet is not None:
            await wallet.close()


def _summary(r: PlayResult) -> str:
    ch = r.channel
    how = "resumed" if r.resumed else "opened"
    return (
        f"{r.reason}: {r.chunks} chunks, {_fmt_ms(r.media_ms)} of media; channel {ch.id} "
        f"({how}, {ch.channel_id}) paid {r.paid} sat (exit fee {ch.exit_fee} sat), "
        f"balance {r.balance} sat; {'closed' if r.closed else 'still open'}"
    )


async def _after_close(store: Keystore, r: PlayResult, wallet: Wallet | None) -> int:
    """Say what ``closed`` means for the viewer's change (protocol.md section 8).

    A settlement broadcast at once is checked now (the gateway's channel API,
    and the viewer's node with a wallet); a pending one is left to
    ``player status``.
    """
    rec = store.get(r.channel.id)
    if r.closed_txid is None:
        if r.settle_by is not None:
            print(
                f"settlement pending: your change of {r.balance} sat goes out by "
                f"{format_time(r.settle_by)} (exit fee {rec.exit_fee} sat); "
                f"`player status {rec.id}` checks it then",
                file=sys.stderr,
            )
        else:
            print(unsettled_text(rec), file=sys.stderr)
        return 0
    try:
        followed = await follow(store, rec, wallet=wallet)
    except SettlementCheckFailed as exc:
        print(f"player: {exc}; not marked settled", file=sys.stderr)
        return EXIT_BAD_SETTLEMENT
    except (PlayerError, WalletError) as exc:
        print(
            f"settled by {r.closed_txid} (not checked: {exc}; `player status {rec.id}` "
            "checks it)",
            file=sys.stderr,
        )
        return 0
    print(followed.text, file=sys.stderr)
    return 0


async def _status(args: argparse.Namespace, store: Keystore) -> int:
    if args.gateway is not None:
        check_gateway_url(args.gateway)
    wallet = _wallet(args, required=False)
    try:
        if args.channel is not None:
            targets = [store.find(args.channel)]
        else:
            # Closed ones, and open ones the gateway may have closed meanwhile
            # (the resume grace passed, or the expiry's settle margin).
            targets = [
                ch
                for ch in store.channels()
                if ch.state in ChannelState.FOLLOWED | ChannelState.RESUMABLE
                and ch.channel_id is not None
            ]
            if not targets:
                print("no channel to follow")
                return 0
        worst = 0
        for ch in targets:
            if ch.state == ChannelState.REFUNDED:
                print(f"channel {ch.id}: refunded in {ch.refund_txid}")
                continue
            try:
                followed = await follow(store, ch, wallet=wallet, gateway_url=args.gateway)
            except SettlementCheckFailed as exc:
                print(f"player: {exc}; not marked settled", file=sys.stderr)
                worst = EXIT_BAD_SETTLEMENT
                continue
            except (PlayerError, WalletError) as exc:
                print(f"player: channel {ch.id}: {exc}", file=sys.stderr)
                worst = worst or EXIT_ERROR
                continue
            print(f"channel {ch.id}: {followed.text}")
        return worst
    finally:
        if wallet is not None:
            await wallet.close()


async def _refund(args: argparse.Namespace, store: Keystore) -> int:
    wallet = _wallet(args, required=True)
    assert wallet is not None
    try:
        if args.channel is not None:
            targets = [store.find(args.channel)]
        else:
            # Until a channel is final, its refund stays the way back: a
            # settlement not yet confirmed may never be (protocol.md section 8).
            targets = [
                ch
                for ch in store.channels()
                if ch.signed_refund is not None and ch.state not in ChannelState.FINAL
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
        item = _check_play(args) if args.command == "play" else {}
        with Keystore(data_dir) as store:
            if args.command == "channels":
                print(format_channels(store.channels()))
                return 0
            if args.command == "refund":
                return asyncio.run(_refund(args, store))
            if args.command == "status":
                return asyncio.run(_status(args, store))
            return asyncio.run(_play(args, store, item))
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
