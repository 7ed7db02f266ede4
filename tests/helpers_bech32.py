"""Segwit address encoding with a chosen checksum, to build BIP350's invalid cases."""

from __future__ import annotations

from bitcoin.segwit_addr import CHARSET, bech32_hrp_expand, bech32_polymod, convertbits

BECH32_CONST = 1  # BIP173
BECH32M_CONST = 0x2BC830A3  # BIP350


def encode_with_checksum(hrp: str, version: int, program: bytes, *, bech32m: bool) -> str:
    """``hrp1...`` for (version, program) with a bech32 or bech32m checksum, valid or not."""
    const = BECH32M_CONST if bech32m else BECH32_CONST
    data = [version, *convertbits(program, 8, 5)]
    polymod = bech32_polymod([*bech32_hrp_expand(hrp), *data, 0, 0, 0, 0, 0, 0]) ^ const
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[d] for d in data + checksum)
