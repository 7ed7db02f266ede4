"""Channel witness scripts, P2WSH outputs and addresses (protocol.md section 2).

The funding output of T1 is P2WSH (BIP141) of one of two witness scripts:

``cltv`` (BIP65)::

    OP_IF <K2> OP_CHECKSIGVERIFY OP_ELSE <expiry> OP_CHECKLOCKTIMEVERIFY OP_DROP OP_ENDIF
    <K1> OP_CHECKSIG

``multisig`` (the original construction)::

    OP_2 <K1> <K2> OP_2 OP_CHECKMULTISIG

Addresses are built per call from the network's parameters: python-bitcoinlib
keeps its network in global state (``SelectParams``), which a gateway serving
one network and tests covering four must not touch. Segwit addresses follow
BIP173 (witness v0, bech32) and BIP350 (v1+, bech32m); legacy ones are
Base58Check.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from dataclasses import dataclass

from bitcoin import base58
from bitcoin.core.script import (
    OP_2,
    OP_CHECKLOCKTIMEVERIFY,
    OP_CHECKMULTISIG,
    OP_CHECKSIG,
    OP_CHECKSIGVERIFY,
    OP_DROP,
    OP_ELSE,
    OP_ENDIF,
    OP_IF,
    CScript,
)
from bitcoin.segwit_addr import CHARSET, bech32_hrp_expand, bech32_polymod, convertbits

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.signatures import is_valid_pubkey

__all__ = [
    "LOCKTIME_THRESHOLD",
    "NETWORKS",
    "ChannelKind",
    "ChannelScript",
    "address_to_script_pubkey",
    "cltv_witness_script",
    "hash160",
    "is_height_expiry",
    "is_standard_output_script",
    "multisig_witness_script",
    "p2wpkh_script_pubkey",
    "p2wsh_address",
    "p2wsh_script_pubkey",
    "script_pubkey_to_address",
]



class ChannelKind(enum.StrEnum):
    """The two channel script kinds of protocol.md section 2; ``cltv`` is the default.

    A ``str``: it is the wire's spelling, and compares equal to it.
    """

    CLTV = "cltv"
    MULTISIG = "multisig"

#: nLockTime values below this are block heights, others unix times (BIP65).
LOCKTIME_THRESHOLD = 500_000_000


@dataclass(frozen=True)
class _Network:
    hrp: str
    p2pkh_version: int
    p2sh_version: int


#: Address parameters per ``hello.network`` value (protocol.md section 6).
NETWORKS: dict[str, _Network] = {
    "main": _Network("bc", 0x00, 0x05),
    "testnet": _Network("tb", 0x6F, 0xC4),
    "signet": _Network("tb", 0x6F, 0xC4),
    "regtest": _Network("bcrt", 0x6F, 0xC4),
}

_BECH32_CONST = 1  # BIP173
_BECH32M_CONST = 0x2BC830A3  # BIP350


def _network(network: str) -> _Network:
    try:
        return NETWORKS[network]
    except KeyError:
        raise ValueError(f"unknown network {network!r}") from None


def is_height_expiry(expiry: int) -> bool:
    """True if ``expiry`` is a block height, False if a unix time (as nLockTime)."""
    return expiry < LOCKTIME_THRESHOLD


def _check_key(pubkey: bytes, who: str) -> None:
    if not is_valid_pubkey(pubkey):
        raise ProtocolError(ErrorCode.BAD_KEY, f"{who} public key is not a compressed SEC point")


def _check_expiry(expiry: int) -> None:
    # nLockTime is an unsigned 32-bit field: an expiry outside it can never
    # be satisfied by a refund (BIP65 compares it with nLockTime).
    if isinstance(expiry, bool) or not isinstance(expiry, int) or not 0 < expiry <= 0xFFFFFFFF:
        raise ProtocolError(ErrorCode.BAD_EXPIRY, "expiry must be between 1 and 4294967295")


def cltv_witness_script(client_pubkey: bytes, server_pubkey: bytes, expiry: int) -> bytes:
    """The ``cltv`` witness script of protocol.md section 2.

    ``expiry`` is pushed as a minimal script number (BIP62 rule 3/4), which
    python-bitcoinlib's integer coercion produces.
    """
    _check_key(client_pubkey, "client")
    _check_key(server_pubkey, "server")
    _check_expiry(expiry)
    return bytes(
        CScript(
            [
                OP_IF,
                server_pubkey,
                OP_CHECKSIGVERIFY,
                OP_ELSE,
                expiry,
                OP_CHECKLOCKTIMEVERIFY,
                OP_DROP,
                OP_ENDIF,
                client_pubkey,
                OP_CHECKSIG,
            ]
        )
    )


def multisig_witness_script(client_pubkey: bytes, server_pubkey: bytes) -> bytes:
    """The ``multisig`` witness script of protocol.md section 2 (K1 first)."""
    _check_key(client_pubkey, "client")
    _check_key(server_pubkey, "server")
    return bytes(CScript([OP_2, client_pubkey, server_pubkey, OP_2, OP_CHECKMULTISIG]))


def hash160(data: bytes) -> bytes:
    """RIPEMD160(SHA256(data)): the key hash of P2PKH and P2WPKH.

    Through hashlib (OpenSSL), not python-bitcoinlib's pure-Python RIPEMD160.
    """
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def p2wpkh_script_pubkey(pubkey_hash: bytes) -> bytes:
    """``OP_0 <20-byte key hash>`` (BIP141 P2WPKH)."""
    return b"\x00\x14" + pubkey_hash


def p2wsh_script_pubkey(witness_script: bytes) -> bytes:
    """``OP_0 <sha256(witness_script)>`` (BIP141 P2WSH)."""
    return b"\x00\x20" + hashlib.sha256(witness_script).digest()


def _segwit_encode(hrp: str, version: int, program: bytes) -> str:
    # BIP173 checksum for v0, BIP350 (bech32m) for v1 and above.
    const = _BECH32_CONST if version == 0 else _BECH32M_CONST
    data = [version, *convertbits(program, 8, 5)]
    polymod = bech32_polymod([*bech32_hrp_expand(hrp), *data, 0, 0, 0, 0, 0, 0]) ^ const
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[d] for d in data + checksum)


def _segwit_decode(hrp: str, addr: str) -> tuple[int, bytes] | None:
    """(version, program) of a valid BIP173/BIP350 address for ``hrp``."""
    if any(not 33 <= ord(c) <= 126 for c in addr) or (addr.lower() != addr != addr.upper()):
        return None
    addr = addr.lower()
    pos = addr.rfind("1")
    # At least a version character and the 6-character checksum after "1".
    if pos < 1 or pos + 8 > len(addr) or len(addr) > 90 or addr[:pos] != hrp:
        return None
    if any(c not in CHARSET for c in addr[pos + 1 :]):
        return None
    data = [CHARSET.find(c) for c in addr[pos + 1 :]]
    version = data[0]
    const = _BECH32_CONST if version == 0 else _BECH32M_CONST
    if bech32_polymod([*bech32_hrp_expand(hrp), *data]) != const:
        return None
    program = convertbits(data[1:-6], 5, 8, False)
    if program is None or not 2 <= len(program) <= 40 or version > 16:
        return None
    if version == 0 and len(program) not in (20, 32):
        return None
    return version, bytes(program)


@functools.lru_cache(maxsize=1024)
def p2wsh_address(witness_script: bytes, network: str) -> str:
    """The bech32 P2WSH address of ``witness_script`` on ``network``."""
    return _segwit_encode(_network(network).hrp, 0, hashlib.sha256(witness_script).digest())


def _base58check(version: int, payload: bytes) -> str:
    data = bytes([version]) + payload
    checksum = hashlib.sha256(hashlib.sha256(data).digest()).digest()[:4]
    return str(base58.encode(data + checksum))


def _witness_program(spk: bytes) -> tuple[int, bytes] | None:
    """(version, program) if ``spk`` is a BIP141 witness output script."""
    if not 4 <= len(spk) <= 42 or spk[1] != len(spk) - 2 or not 2 <= spk[1] <= 40:
        return None
    if spk[0] == 0x00:
        return 0, spk[2:]
    if 0x51 <= spk[0] <= 0x60:  # OP_1 … OP_16
        return spk[0] - 0x50, spk[2:]
    return None


def _is_p2pkh(spk: bytes) -> bool:
    return len(spk) == 25 and spk[:3] == b"\x76\xa9\x14" and spk[23:] == b"\x88\xac"


def _is_p2sh(spk: bytes) -> bool:
    return len(spk) == 23 and spk[:2] == b"\xa9\x14" and spk[22] == 0x87


def is_standard_output_script(spk: bytes) -> bool:
    """True for P2PKH, P2SH, P2WPKH, P2WSH and P2TR output scripts.

    These are the output types any wallet pays to; protocol.md section 9
    answers any other ``change_script`` with ``bad_script``.
    """
    if _is_p2pkh(spk) or _is_p2sh(spk):
        return True
    witness = _witness_program(spk)
    if witness is None:
        return False
    version, program = witness
    return (version == 0 and len(program) in (20, 32)) or (version == 1 and len(program) == 32)


def script_pubkey_to_address(spk: bytes, network: str) -> str | None:
    """The address of an output script on ``network``, or None if it has none.

    P2PKH and P2SH give Base58Check; witness programs (v0 of 20 or 32 bytes,
    v1-v16 of 2-40 bytes) give bech32/bech32m.
    """
    params = _network(network)
    if _is_p2pkh(spk):
        return _base58check(params.p2pkh_version, spk[3:23])
    if _is_p2sh(spk):
        return _base58check(params.p2sh_version, spk[2:22])
    witness = _witness_program(spk)
    if witness is None:
        return None
    version, program = witness
    if version == 0 and len(program) not in (20, 32):
        return None
    return _segwit_encode(params.hrp, version, program)


def address_to_script_pubkey(addr: str, network: str) -> bytes:
    """The output script an address on ``network`` pays to (``ValueError`` if bad)."""
    params = _network(network)
    if not isinstance(addr, str) or not addr:
        raise ValueError("address must be a non-empty string")
    if addr.lower().startswith(params.hrp + "1"):
        witness = _segwit_decode(params.hrp, addr)
        if witness is None:
            raise ValueError(f"invalid segwit address for {network}")
        version, program = witness
        return bytes([0x50 + version if version else 0, len(program)]) + program
    try:
        raw = base58.decode(addr)
    except Exception:  # InvalidBase58Error for characters outside the alphabet
        raise ValueError(f"invalid address for {network}") from None
    data, checksum = raw[:-4], raw[-4:]
    if len(raw) != 25 or hashlib.sha256(hashlib.sha256(data).digest()).digest()[:4] != checksum:
        raise ValueError(f"invalid address for {network}")
    if data[0] == params.p2pkh_version:
        return b"\x76\xa9\x14" + data[1:] + b"\x88\xac"
    if data[0] == params.p2sh_version:
        return b"\xa9\x14" + data[1:] + b"\x87"
    raise ValueError(f"address is not for {network}")


@dataclass(frozen=True)
class ChannelScript:
    """A channel's funding script: kind, keys, expiry and the derived scripts.

    Build it with :meth:`make`, which checks keys (``bad_key``) and the
    expiry range (``bad_expiry``); the scripts are computed once.
    """

    kind: ChannelKind
    client_pubkey: bytes
    server_pubkey: bytes
    expiry: int
    witness_script: bytes
    script_pubkey: bytes

    @classmethod
    def make(
        cls, kind: str, client_pubkey: bytes, server_pubkey: bytes, expiry: int
    ) -> ChannelScript:
        """Build the channel script of ``kind`` (protocol.md section 2).

        ``expiry`` is in the witness script only for ``cltv``; a multisig
        channel's expiry is the nLockTime of its refund T2.
        """
        _check_expiry(expiry)
        if kind == ChannelKind.CLTV:
            checked = ChannelKind.CLTV
            witness_script = cltv_witness_script(client_pubkey, server_pubkey, expiry)
        elif kind == ChannelKind.MULTISIG:
            checked = ChannelKind.MULTISIG
            witness_script = multisig_witness_script(client_pubkey, server_pubkey)
        else:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "kind must be 'cltv' or 'multisig'")
        return cls(
            kind=checked,
            client_pubkey=bytes(client_pubkey),
            server_pubkey=bytes(server_pubkey),
            expiry=expiry,
            witness_script=witness_script,
            script_pubkey=p2wsh_script_pubkey(witness_script),
        )

    @property
    def is_height_expiry(self) -> bool:
        """True if the expiry is a block height (protocol.md section 2)."""
        return is_height_expiry(self.expiry)

    def address(self, network: str) -> str:
        """The funding address (``terms.funding_address``) on ``network``."""
        return p2wsh_address(self.witness_script, network)
