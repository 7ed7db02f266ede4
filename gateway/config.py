"""Gateway settings: defaults, then a TOML file, then ``PAYSTREAM_*`` environment
variables, then command-line flags (each overrides the one before).

``gateway serve`` alone works: every setting has a default fit for the
embedded regtest node on one machine.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.protocol.messages import Limits
from gateway.protocol.transactions import DUST_LIMIT


class ConfigError(ValueError):
    """A setting is unknown or has the wrong type; the message names it."""


#: ``min_conf`` by network when the operator sets none: unconfirmed funding is
#: only safe where coins are free (regtest); elsewhere a double spend of an
#: unconfirmed funding would take media the gateway already streamed.
DEFAULT_MIN_CONF = {"regtest": 0, "signet": 1, "testnet": 1, "main": 3}
#: Confirmations that make a settlement (or a refund) final for the store:
#: a channel is ``closed`` only once its close is this deep (protocol.md section 8).
DEFAULT_SETTLE_CONFIRMATIONS = {"regtest": 1, "signet": 6, "testnet": 6, "main": 6}


@dataclass
class LimitSettings:
    """The operator's abuse and safety limits, before the network is known.

    :meth:`resolve` turns them into the protocol's :class:`Limits`, the one
    advertised in ``hello.limits`` (protocol.md section 6) and checked by the
    core; the fields are the same (a test holds them so), ``min_conf`` may
    be left to the network and ``dust_limit`` is no setting (section 3).
    """

    min_value: int = 10_000
    max_value: int = 10_000_000
    min_expiry_s: int = 2 * 3600
    max_expiry_s: int = 30 * 86400
    #: Confirmations before ``ready``; unset: by network (``DEFAULT_MIN_CONF``).
    min_conf: int | None = None
    #: Stop taking payments and settle this long before expiry (section 8). An
    #: hour covers block-time drift (up to 2 h ahead is legal, so keep expiries
    #: long) and a few blocks of rebroadcasting.
    settle_margin_s: int = 3600
    resume_grace_s: int = 120

    def resolve(self, network: str) -> Limits:
        """The limits on ``network``: ``min_conf`` by network when unset."""
        values = dataclasses.asdict(self)
        if values["min_conf"] is None:
            values["min_conf"] = DEFAULT_MIN_CONF.get(network, 1)
        return Limits(**values)


@dataclass
class Config:
    """Everything ``gateway serve`` needs."""

    datadir: Path = Path("data")
    media: Path = Path("media")
    host: str = "127.0.0.1"
    port: int = 8080
    #: Use this bitcoind instead of the embedded node.
    rpc_url: str | None = None
    rpc_cookie: Path | None = None
    rpc_user: str | None = None
    rpc_password: str | None = None
    #: The embedded node's RPC port (players fund from its wallet in the demo).
    rpc_port: int = 18443
    block_interval: float = 2.0
    limits: LimitSettings = field(default_factory=LimitSettings)
    #: Where the operator's share goes (and payouts below dust, section 3).
    #: Empty: an address of the node's wallet is asked for at start.
    operator_address: str = ""
    #: Fee floor in sat/vB for settlements when the node's estimate is lower or missing.
    fee_floor: float = 2.0
    #: Sessions past ``hello`` per client address.
    max_sessions_per_ip: int = 64
    max_unfunded_per_ip: int = 8
    #: Sockets that have not said ``hello`` yet, all addresses together.
    max_half_open: int = 1024
    #: Seconds a socket may stay without ``hello`` before it is closed.
    handshake_timeout_s: float = 10.0
    #: Seconds a session may sit silent on its own unpaid ``due`` before the
    #: socket is closed (then the resume grace and settlement, as any disconnect).
    unpaid_timeout_s: float = 60.0
    #: Proxies whose ``X-Forwarded-For`` / ``Forwarded`` name the client
    #: (comma-separated addresses or networks, e.g. "127.0.0.1, 10.0.0.0/8").
    #: Empty: the socket's own peer is the client (headers are ignored).
    trusted_proxies: str = ""
    #: Seconds a session may wait for its funding output before funding_not_found.
    funding_timeout_s: float = 600.0
    #: Seconds without a message from the client before the socket is closed.
    idle_timeout_s: float = 300.0
    #: How often the settlement duty wakes (seconds).
    settle_interval_s: float = 1.0
    #: Confirmations before a settlement or refund counts as final; unset: by
    #: network (``DEFAULT_SETTLE_CONFIRMATIONS``).
    settle_confirmations: int | None = None
    #: Seconds a closed channel may wait for others to share its settlement
    #: (one transaction for many channels); unset: one block interval (the
    #: embedded node's ``block_interval``, 600 s on a real network).
    settle_window_s: float | None = None
    #: Allow ``min_conf`` 0 on mainnet (``gateway serve --allow-zero-conf``):
    #: without it the gateway refuses to start there with unconfirmed funding.
    allow_zero_conf: bool = False
    operator_token: str = ""
    #: STUN/TURN servers for live WebRTC peers (comma-separated URLs, e.g.
    #: "stun:stun.example.org:3478"); empty: host candidates only, right for a
    #: gateway with a public address and for loopback (gateway/ice.py).
    ice_servers: str = ""
    #: Gateway processes sharing the port and the store (``gateway/workers.py``);
    #: 1 runs everything in one process.
    workers: int = 1
    #: The channel ledger: empty for the SQLite file in the data dir (one
    #: box), or ``postgresql://…`` for a ledger several gateway hosts share
    #: (gateway/ledger/cluster.py).
    store: str = ""
    #: The master key's seed file (default ``DATADIR/master.key``); hosts
    #: sharing a PostgreSQL ledger must all have the same one.
    master_key: Path | None = None
    #: This host's name in a shared ledger (default: made once, kept in
    #: ``DATADIR/host-id``).
    host_id: str = ""
    #: Seconds a host's lease on its channels lasts without renewal (shared
    #: ledger): a host silent that long is taken for dead.
    lease_s: float = 10.0

    @classmethod
    def load(cls, path: Path | None, env: Mapping[str, str] | None = None) -> Config:
        """Defaults, overridden by the TOML file at ``path`` and by ``env``.

        In the file an unknown name is an error; in ``env`` (``os.environ`` by
        default) only ``PAYSTREAM_<SETTING>`` and ``PAYSTREAM_LIMITS_<LIMIT>``
        of the gateway's own settings are read, and other names are left to
        whoever they belong to.
        """
        config = cls()
        if path is not None:
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"cannot read config {path}: {exc}") from None
            config.update(data)
        env = os.environ if env is None else env
        prefix = "PAYSTREAM_"
        # The environment is shared with the player (PAYSTREAM_PLAYER_DIR) and
        # anything else of ours: only the names of gateway settings are read.
        ours = {f.name for f in dataclasses.fields(cls)}
        limits = {f.name for f in dataclasses.fields(LimitSettings)}
        updates: dict[str, Any] = {}
        for key, value in env.items():
            if key.startswith(prefix):
                name = key[len(prefix) :].lower()
                if name.startswith("limits_") and name[len("limits_") :] in limits:
                    updates.setdefault("limits", {})[name[len("limits_") :]] = value
                elif name in ours and name != "limits":
                    updates[name] = value
        config.update(updates, from_text=True)
        return config

    def check(self) -> None:
        """Raise :class:`ConfigError` for a setting out of its range (after every layer).

        Checked once all layers are applied, so a TOML file may be corrected
        by a flag. A port above 65535 would otherwise wrap silently (the OS
        takes it modulo 2^16).
        """
        lim = self.limits
        rules: list[tuple[str, bool]] = [
            ("port must be 0-65535", 0 <= self.port <= 65535),
            ("rpc_port must be 0-65535", 0 <= self.rpc_port <= 65535),
            ("block_interval must be >= 0 (0: blocks on request)", self.block_interval >= 0),
            ("fee_floor must be >= 1 sat/vB", self.fee_floor >= 1),
            ("max_sessions_per_ip must be >= 1", self.max_sessions_per_ip >= 1),
            ("max_unfunded_per_ip must be >= 1", self.max_unfunded_per_ip >= 1),
            ("max_half_open must be >= 1", self.max_half_open >= 1),
            ("handshake_timeout_s must be > 0", self.handshake_timeout_s > 0),
            ("unpaid_timeout_s must be > 0", self.unpaid_timeout_s > 0),
            ("trusted_proxies must be addresses or networks", _networks_ok(self.trusted_proxies)),
            ("funding_timeout_s must be > 0", self.funding_timeout_s > 0),
            ("idle_timeout_s must be > 0", self.idle_timeout_s > 0),
            ("settle_interval_s must be > 0", self.settle_interval_s > 0),
            (
                "settle_window_s must be >= 0",
                self.settle_window_s is None or self.settle_window_s >= 0,
            ),
            ("workers must be 1-64", 1 <= self.workers <= 64),
            (
                "store must be empty (SQLite) or a postgresql:// URL",
                not self.store or self.store.startswith(("postgresql://", "postgres://")),
            ),
            (
                "with a PostgreSQL store run one process per host (--workers 1) and add hosts",
                not self.store or self.workers == 1,
            ),
            ("lease_s must be >= 1", self.lease_s >= 1),
            (
                "limits need 546 <= min_value <= max_value",
                DUST_LIMIT <= lim.min_value <= lim.max_value,
            ),
            (
                "limits need 0 < min_expiry_s <= max_expiry_s",
                0 < lim.min_expiry_s <= lim.max_expiry_s,
            ),
            (
                "limits need min_conf, settle_margin_s, resume_grace_s >= 0",
                min(lim.min_conf or 0, lim.settle_margin_s, lim.resume_grace_s) >= 0,
            ),
            (
                "settle_confirmations must be >= 1",
                self.settle_confirmations is None or self.settle_confirmations >= 1,
            ),
        ]
        for message, ok in rules:
            if not ok:
                raise ConfigError(message)

    def settle_depth(self, network: str) -> int:
        """``settle_confirmations``, or the network's default."""
        if self.settle_confirmations is not None:
            return self.settle_confirmations
        return DEFAULT_SETTLE_CONFIRMATIONS.get(network, 6)

    def settle_window(self, network: str, *, embedded: bool) -> float:
        """``settle_window_s``, or one block interval of the chain in use."""
        if self.settle_window_s is not None:
            return self.settle_window_s
        if embedded:
            return self.block_interval
        return 0.0 if network == "regtest" else 600.0

    def check_network(self, network: str) -> None:
        """Refuse what is only safe on regtest (raises :class:`ConfigError`).

        Unconfirmed funding on mainnet lets a viewer double-spend its funding
        after watching: allowed only with ``allow_zero_conf``.
        """
        min_conf = self.limits.resolve(network).min_conf
        if network == "main" and min_conf == 0 and not self.allow_zero_conf:
            raise ConfigError(
                "min_conf 0 on mainnet accepts unconfirmed funding, which a viewer can "
                "double-spend after watching; set min_conf >= 1 or pass --allow-zero-conf"
            )

    def update(self, data: Mapping[str, Any], *, from_text: bool = False) -> None:
        """Set fields from ``data`` (a TOML table, env or flags), checking names and types."""
        _apply(self, data, from_text, "")


def trusted_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The networks of a ``trusted_proxies`` setting (ValueError if one is not)."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",")
            if part.strip()]


def _networks_ok(text: str) -> bool:
    try:
        trusted_networks(text)
    except ValueError:
        return False
    return True


def _apply(target: Any, data: Mapping[str, Any], from_text: bool, where: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown setting {where}{key}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}{key} must be a table")
            _apply(current, value, from_text, f"{where}{key}.")
            continue
        setattr(target, key, _coerce(f"{where}{key}", fields[key].type, value, from_text))


_BOOL_TEXT = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _coerce(name: str, annotation: object, value: Any, from_text: bool) -> Any:
    kind = str(annotation)
    if value is None and "None" in kind:
        return None  # an optional setting left unset (the supervisor passes it on)
    try:
        if "Path" in kind:
            return None if value in ("", None) and "None" in kind else Path(value)
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if from_text and str(value).lower() in _BOOL_TEXT:
                return _BOOL_TEXT[str(value).lower()]
            raise TypeError
        if kind.startswith("int"):
            if isinstance(value, bool) or not (isinstance(value, int) or from_text):
                raise TypeError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if "str" in kind:
            if not isinstance(value, str):
                raise TypeError
            return None if value == "" and "None" in kind else value
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name} must be {kind}, not {value!r}") from None
    raise ConfigError(f"setting {name} has an unsupported type")  # pragma: no cover
