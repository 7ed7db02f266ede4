"""Validation of SDP offers from WHIP publishers and from viewers.

aiortc parses SDP leniently (a body of garbage can become an offer with no
media, or raise an arbitrary exception deep inside the peer connection), so
the gateway checks every offer itself before aiortc sees it and names the
first thing that is wrong. The HTTP layer answers ``400`` with that message
(RFC 9725 section 4.2 leaves the error body to the server).

What is checked, in order:

* size and shape: at most :data:`MAX_OFFER_BYTES`, UTF-8, at most
  :data:`MAX_LINE_CHARS` per line, every line ``<letter>=<value>`` (RFC 8866
  section 5), no control characters;
* the session part: ``v=0`` first, then ``o=`` (six fields), a non-empty
  ``s=``, at least one ``t=`` (two integers) before the first ``m=``, and only
  the type letters RFC 8866 allows at each level (section 5: a parser may
  reject a description with a letter it does not understand);
* every media section: ``m=<media> <port> <proto> <fmt>...`` with a port and
  integer payload types; a connection line at session or media level
  (section 5.7);
* the sections that will carry media (port not zero, or ``bundle-only``) must
  be ``UDP/TLS/RTP/SAVPF`` (RFC 8829 section 5.1.2), have ICE credentials of
  legal length and alphabet (RFC 8839 section 5.4), a certificate
  fingerprint with a hash aiortc can check (RFC 8122 section 5), a DTLS
  ``setup`` role (RFC 8842 section 3), ``rtcp-mux`` (RFC 8843/RFC 5761, which
  aiortc requires) and a codec the gateway takes;
* the direction: a publisher must send (``sendonly``/``sendrecv``) at least
  one audio or video section, a viewer must receive (``recvonly``/
  ``sendrecv``); at most one such section per kind;
* finally aiortc's own parser must accept the text.

Codecs taken mirror aiortc's negotiation, so that an offer that passes here
is one aiortc answers with media: publishers may send VP8 or H.264
(packetization mode 1, baseline or constrained baseline profile, RFC 6184)
video and Opus, G.722, PCMU or PCMA audio; viewers receive VP8 and Opus only,
because the gateway forwards its one encoding of each and never re-encodes
per viewer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from aiortc import sdp as aiortc_sdp

#: A browser's offer is a few kilobytes; this leaves room for many codecs
#: and candidates while bounding what one request can make the gateway parse.
MAX_OFFER_BYTES = 32 * 1024
MAX_LINE_CHARS = 2048
MAX_MEDIA_SECTIONS = 16

#: RFC 8829 section 5.1.2: the profile WebRTC media sections use.
WEBRTC_PROTO = "UDP/TLS/RTP/SAVPF"
#: aiortc verifies only these certificate hashes (rtcdtlstransport.py).
FINGERPRINT_HASHES = {"sha-256": 32, "sha-384": 48, "sha-512": 64}
SETUP_ROLES = ("actpass", "active", "passive")

Role = Literal["publisher", "viewer"]
Kind = Literal["audio", "video"]

#: RFC 8866 section 5: letters allowed in the session part and in a media part.
_SESSION_LETTERS = frozenset("vosiuepcbtrzka")
_MEDIA_LETTERS = frozenset("icbka")
#: RFC 8839 section 5.4: ice-char = ALPHA / DIGIT / "+" / "/".
_ICE_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")
_ICE_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")
_FINGERPRINT = re.compile(r"([0-9A-Fa-f]{2})(:[0-9A-Fa-f]{2})*")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
#: RFC 3551 section 6: static payload types with a fixed meaning.
_STATIC_PAYLOAD_TYPES = {0: ("pcmu", 8000, 1), 8: ("pcma", 8000, 1), 9: ("g722", 8000, 1)}


class OfferError(ValueError):
    """The offer is not one the gateway takes; ``code`` names the problem.

    ``str(error)`` is a sentence for the HTTP error body; ``code`` is a stable
    identifier (``too_large``, ``not_utf8``, ``bad_line``, ``bad_version``,
    ``bad_origin``, ``bad_session_name``, ``bad_timing``, ``bad_order``,
    ``bad_media_line``, ``no_connection``, ``no_media``, ``too_many_media``,
    ``bad_proto``, ``no_ice_credentials``, ``bad_ice_credentials``,
    ``no_fingerprint``, ``bad_fingerprint``, ``no_setup``, ``bad_setup``,
    ``no_rtcp_mux``, ``wrong_direction``, ``no_codec``, ``duplicate_kind``,
    ``unparsable``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class MediaSection:
    """One audio or video section that will carry media, as validated."""

    index: int
    kind: Kind
    mid: str | None
    direction: str
    #: The codecs of this section the gateway takes, in the offer's order
    #: (lowercase encoding names, e.g. ``vp8``, ``opus``).
    codecs: tuple[str, ...]


@dataclass(frozen=True)
class Offer:
    """A validated SDP offer: the text to give aiortc and what it carries."""

    sdp: str
    role: Role
    media: tuple[MediaSection, ...]

    @property
    def kinds(self) -> frozenset[str]:
        """The kinds (``audio``, ``video``) the offer sends (publisher) or receives (viewer)."""
        return frozenset(m.kind for m in self.media)


@dataclass
class _Section:
    index: int
    kind: str
    port: int
    proto: str
    formats: list[str]
    attributes: list[tuple[str, str | None]]
    has_connection: bool


def validate_offer(text: str | bytes, *, role: Role = "publisher") -> Offer:
    """Check an SDP offer (RFC 8866) and return it, or raise :class:`OfferError`.

    ``role`` is ``"publisher"`` for a WHIP ingest offer (RFC 9725) and
    ``"viewer"`` for a viewer's offer to receive the live stream.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_OFFER_BYTES:
        raise OfferError("too_large", f"the offer is {len(raw)} bytes, at most {MAX_OFFER_BYTES}")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OfferError("not_utf8", "the offer is not UTF-8 text") from None
    lines = _split_lines(decoded)
    session, sections = _structure(lines)
    session_attributes = [_attribute(value) for letter, value in session if letter == "a"]
    session_has_connection = any(letter == "c" for letter, _ in session)

    media: list[MediaSection] = []
    seen_kinds: set[str] = set()
    for section in sections:
        if not session_has_connection and not section.has_connection:
            raise OfferError(
                "no_connection",
                f"media section {section.index} has no c= line and the session has none "
                "(RFC 8866 section 5.7)",
            )
        active = section.port != 0 or _has(section.attributes, "bundle-only")
        if section.kind not in ("audio", "video") or not active:
            continue
        checked = _check_section(section, session_attributes, role)
        if checked is None:
            continue
        if checked.kind in seen_kinds:
            raise OfferError(
                "duplicate_kind",
                f"more than one {checked.kind} section to "
                f"{'send' if role == 'publisher' else 'receive'}: the gateway takes one per kind",
            )
        seen_kinds.add(checked.kind)
        media.append(checked)
    if not media:
        want = "sendonly or sendrecv" if role == "publisher" else "recvonly or sendrecv"
        raise OfferError("no_media", f"the offer has no {want} audio or video section")

    normalized = "\r\n".join(lines) + "\r\n"
    try:
        aiortc_sdp.SessionDescription.parse(normalized)
    except Exception as exc:  # aiortc raises anything from garbage: say so plainly
        raise OfferError("unparsable", f"the offer cannot be parsed: {exc!r}") from None
    return Offer(normalized, role, tuple(media))


def _split_lines(text: str) -> list[str]:
    """The offer's lines: CRLF per RFC 8866, bare LF tolerated, blank lines refused."""
    if not text.strip():
        raise OfferError("bad_line", "the offer is empty")
    body = text[:-1] if text.endswith("\n") else text
    lines = [line[:-1] if line.endswith("\r") else line for line in body.split("\n")]
    for number, line in enumerate(lines, 1):
        if len(line) > MAX_LINE_CHARS:
            raise OfferError("bad_line", f"line {number} is longer than {MAX_LINE_CHARS}")
        if len(line) < 2 or line[1] != "=" or not ("a" <= line[0] <= "z"):
            raise OfferError("bad_line", f"line {number} is not <letter>=<value>: {line[:40]!r}")
        if _CONTROL.search(line) or "\r" in line:
            raise OfferError("bad_line", f"line {number} holds a control character")
    return lines


def _structure(lines: list[str]) -> tuple[list[tuple[str, str]], list[_Section]]:
    """Split into the session part and media sections, checking RFC 8866's order."""
    fields = [(line[0], line[2:]) for line in lines]
    if fields[0] != ("v", "0"):
        raise OfferError("bad_version", "the first line must be v=0 (RFC 8866 section 5.1)")
    if len(fields) < 2 or fields[1][0] != "o":
        raise OfferError("bad_origin", "the second line must be o= (RFC 8866 section 5.2)")
    origin = fields[1][1].split(" ")
    if (
        len(origin) != 6
        or not origin[1].isdigit()
        or not origin[2].isdigit()
        or origin[3] != "IN"
        or origin[4] not in ("IP4", "IP6")
    ):
        raise OfferError(
            "bad_origin",
            "o= must be <username> <sess-id> <sess-version> IN IP4|IP6 <address> "
            "(RFC 8866 section 5.2)",
        )
    if len(fields) < 3 or fields[2][0] != "s" or not fields[2][1].strip():
        raise OfferError(
            "bad_session_name", "the third line must be a non-empty s= (RFC 8866 section 5.3)"
        )

    session: list[tuple[str, str]] = []
    sections: list[_Section] = []
    timing = False
    for letter, value in fields:
        if letter == "m":
            if not timing:
                raise OfferError("bad_timing", "no t= line before the first m= line")
            if len(sections) == MAX_MEDIA_SECTIONS:
                raise OfferError("too_many_media", f"more than {MAX_MEDIA_SECTIONS} media sections")
            sections.append(_media_line(len(sections), value))
        elif sections:
            if letter not in _MEDIA_LETTERS:
                raise OfferError(
                    "bad_order",
                    f"{letter}= is not allowed inside media section {len(sections) - 1}",
                )
            section = sections[-1]
            if letter == "a":
                section.attributes.append(_attribute(value))
            elif letter == "c":
                section.has_connection = True
        else:
            if letter not in _SESSION_LETTERS or (letter in "vos" and _seen(session, letter)):
                raise OfferError("bad_order", f"{letter}= is not allowed in the session part here")
            if letter == "t":
                times = value.split(" ")
                if len(times) != 2 or not all(t.isdigit() for t in times):
                    raise OfferError("bad_timing", "t= must be two integers (RFC 8866 section 5.9)")
                timing = True
            session.append((letter, value))
    if not sections:
        raise OfferError("no_media", "the offer has no m= line")
    return session, sections


def _seen(fields: list[tuple[str, str]], letter: str) -> bool:
    return any(seen == letter for seen, _ in fields)


def _media_line(index: int, value: str) -> _Section:
    parts = value.split(" ")
    if len(parts) < 4 or not parts[0]:
        raise OfferError(
            "bad_media_line", f"m= line {index} must be <media> <port> <proto> <fmt> ..."
        )
    port = parts[1].split("/", 1)[0]
    if not port.isdigit() or int(port) > 65535:
        raise OfferError("bad_media_line", f"m= line {index} has a bad port {parts[1]!r}")
    formats = parts[3:]
    if parts[0] in ("audio", "video") and not all(f.isdigit() and int(f) <= 127 for f in formats):
        raise OfferError(
            "bad_media_line", f"m= line {index} must list RTP payload types 0-127 (RFC 3551)"
        )
    return _Section(index, parts[0], int(port), parts[2], formats, [], False)


def _attribute(value: str) -> tuple[str, str | None]:
    name, sep, rest = value.partition(":")
    return name, rest if sep else None


def _has(attributes: list[tuple[str, str | None]], name: str) -> bool:
    return any(n == name for n, _ in attributes)


def _values(attributes: list[tuple[str, str | None]], name: str) -> list[str]:
    return [v for n, v in attributes if n == name and v is not None]


def _check_section(
    section: _Section, session: list[tuple[str, str | None]], role: Role
) -> MediaSection | None:
    """Check one active audio/video section; None when it carries nothing our way."""
    where = f"{section.kind} section {section.index}"
    attrs = section.attributes
    directions = [n for n, _ in attrs if n in ("sendrecv", "sendonly", "recvonly", "inactive")]
    if len(directions) > 1:
        raise OfferError("wrong_direction", f"{where} has more than one direction attribute")
    # RFC 8866 section 6.7: sendrecv unless said otherwise (at either level).
    session_direction = [n for n, _ in session if n in ("sendrecv", "sendonly", "recvonly")]
    direction = directions[0] if directions else (session_direction or ["sendrecv"])[0]
    wanted = ("sendonly", "sendrecv") if role == "publisher" else ("recvonly", "sendrecv")
    if direction not in wanted:
        return None

    if section.proto != WEBRTC_PROTO:
        raise OfferError(
            "bad_proto", f"{where} uses {section.proto!r}, not {WEBRTC_PROTO} (RFC 8829)"
        )
    ufrag = _values(attrs, "ice-ufrag") or _values(session, "ice-ufrag")
    pwd = _values(attrs, "ice-pwd") or _values(session, "ice-pwd")
    if not ufrag or not pwd:
        raise OfferError("no_ice_credentials", f"{where} has no a=ice-ufrag and a=ice-pwd")
    if not _ICE_UFRAG.fullmatch(ufrag[0]) or not _ICE_PWD.fullmatch(pwd[0]):
        raise OfferError(
            "bad_ice_credentials",
            f"{where}: ice-ufrag must be 4-256 and ice-pwd 22-256 ice-chars (RFC 8839 section 5.4)",
        )
    _check_fingerprints(where, _values(attrs, "fingerprint") or _values(session, "fingerprint"))
    setup = _values(attrs, "setup") or _values(session, "setup")
    if not setup:
        raise OfferError("no_setup", f"{where} has no a=setup (RFC 8842)")
    if setup[0] not in SETUP_ROLES:
        raise OfferError(
            "bad_setup", f"{where}: a=setup:{setup[0]} is not actpass, active or passive"
        )
    if not _has(attrs, "rtcp-mux"):
        raise OfferError("no_rtcp_mux", f"{where} has no a=rtcp-mux (RFC 8843 section 9.1)")

    codecs = _codecs(section, role)
    if not codecs:
        taken = {
            ("publisher", "video"): "VP8 or H.264 (packetization-mode=1, baseline profile)",
            ("publisher", "audio"): "Opus, G.722, PCMU or PCMA",
            ("viewer", "video"): "VP8",
            ("viewer", "audio"): "Opus",
        }[(role, section.kind)]
        raise OfferError("no_codec", f"{where} offers no codec the gateway takes ({taken})")
    mids = _values(attrs, "mid")
    return MediaSection(
        section.index,
        "audio" if section.kind == "audio" else "video",
        mids[0] if mids else None,
        direction,
        tuple(codecs),
    )


def _check_fingerprints(where: str, fingerprints: list[str]) -> None:
    if not fingerprints:
        raise OfferError("no_fingerprint", f"{where} has no a=fingerprint (RFC 8122)")
    usable = False
    for fingerprint in fingerprints:
        algorithm, _, value = fingerprint.strip().partition(" ")
        algorithm = algorithm.lower()
        if not _FINGERPRINT.fullmatch(value):
            raise OfferError("bad_fingerprint", f"{where}: malformed a=fingerprint {fingerprint!r}")
        size = FINGERPRINT_HASHES.get(algorithm)
        if size is not None:
            if value.count(":") + 1 != size:
                raise OfferError(
                    "bad_fingerprint", f"{where}: a {algorithm} fingerprint has {size} bytes"
                )
            usable = True
    if not usable:
        raise OfferError(
            "bad_fingerprint",
            f"{where}: no fingerprint uses {', '.join(FINGERPRINT_HASHES)}",
        )


def _codecs(section: _Section, role: Role) -> list[str]:
    """The section's codecs the gateway takes, in the offer's order."""
    rtpmaps: dict[int, tuple[str, int, int]] = {}
    for value in _values(section.attributes, "rtpmap"):
        pt, _, encoding = value.partition(" ")
        bits = encoding.split("/")
        if pt.isdigit() and len(bits) >= 2 and bits[1].isdigit():
            channels = int(bits[2]) if len(bits) > 2 and bits[2].isdigit() else 1
            rtpmaps[int(pt)] = (bits[0].lower(), int(bits[1]), channels)
    fmtps: dict[int, str] = {}
    for value in _values(section.attributes, "fmtp"):
        pt, _, params = value.partition(" ")
        if pt.isdigit():
            fmtps[int(pt)] = params
    taken: list[str] = []
    for payload_type in map(int, section.formats):
        codec = rtpmaps.get(payload_type) or _STATIC_PAYLOAD_TYPES.get(payload_type)
        if codec is None:
            continue
        name = _taken(section.kind, role, codec, fmtps.get(payload_type, ""))
        if name is not None and name not in taken:
            taken.append(name)
    return taken


def _taken(kind: str, role: Role, codec: tuple[str, int, int], fmtp: str) -> str | None:
    name, clock, channels = codec
    if kind == "video":
        if clock != 90000:
            return None
        if name == "vp8":
            return name
        if name == "h264" and role == "publisher" and _h264_taken(fmtp):
            return name
        return None
    if name == "opus" and clock == 48000 and channels == 2:
        return name
    if role == "publisher" and name in ("pcmu", "pcma", "g722") and clock == 8000:
        return name
    return None


def _h264_taken(fmtp: str) -> bool:
    """Whether aiortc negotiates this H.264 format: packetization mode 1, baseline family."""
    try:
        params = aiortc_sdp.parameters_from_sdp(fmtp)
        if str(params.get("packetization-mode", "0")) != "1":
            return False
        # aiortc's default when the parameter is absent (rtcpeerconnection.py).
        profile, _ = aiortc_sdp.parse_h264_profile_level_id(
            str(params.get("profile-level-id", "42e01f"))
        )
    except ValueError:
        return False
    return profile in (
        aiortc_sdp.H264Profile.PROFILE_BASELINE,
        aiortc_sdp.H264Profile.PROFILE_CONSTRAINED_BASELINE,
    )
