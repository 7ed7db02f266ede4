"""Channel scripts, P2WSH and addresses (protocol.md section 2; BIP173/BIP350)."""

from __future__ import annotations

import coincurve
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.scripts import (
    ChannelScript,
    _segwit_encode,
    address_to_script_pubkey,
    cltv_witness_script,
    is_height_expiry,
    is_standard_output_script,
    multisig_witness_script,
    p2wsh_address,
    p2wsh_script_pubkey,
    script_pubkey_to_address,
)

K1 = coincurve.PrivateKey((1).to_bytes(32, "big")).public_key.format()
K2 = coincurve.PrivateKey((2).to_bytes(32, "big")).public_key.format()
HASH20 = bytes.fromhex("751e76e8199196d454941c45d1b3a323f1433bd6")  # hash160 of K1
NETWORKS = ("main", "testnet", "signet", "regtest")


@pytest.mark.parametrize(
    ("expiry", "push"),
    [
        (1, "51"),  # OP_1
        (16, "60"),  # OP_16
        (17, "0111"),
        (127, "017f"),
        (128, "028000"),  # sign bit needs a zero byte
        (32768, "03008000"),
        (499_999_999, "04ff64cd1d"),
        (500_000_000, "040065cd1d"),
        (0xFFFFFFFF, "05ffffffff00"),
    ],
)
def test_cltv_script_layout_and_minimal_expiry(expiry: int, push: str) -> None:
    script = cltv_witness_script(K1, K2, expiry)
    expected = (
        "63"  # OP_IF
        + "21" + K2.hex() + "ad"  # <K2> OP_CHECKSIGVERIFY
        + "67"  # OP_ELSE
        + push + "b175"  # <expiry> OP_CHECKLOCKTIMEVERIFY OP_DROP
        + "68"  # OP_ENDIF
        + "21" + K1.hex() + "ac"  # <K1> OP_CHECKSIG
    )  # fmt: skip
    assert script.hex() == expected


def test_multisig_script_layout() -> None:
    script = multisig_witness_script(K1, K2)
    assert script.hex() == "52" + "21" + K1.hex() + "21" + K2.hex() + "52ae"


@pytest.mark.parametrize("expiry", [0, -1, 1 << 32, True])
def test_bad_expiry(expiry: int) -> None:
    with pytest.raises(ProtocolError) as exc:
        ChannelScript.make("cltv", K1, K2, expiry)
    assert exc.value.code is ErrorCode.BAD_EXPIRY


@pytest.mark.parametrize("kind", ["cltv", "multisig"])
@pytest.mark.parametrize(
    ("client", "server", "who"),
    [
        (K1[:32], K2, "client"),
        (K1, b"\x04" + K2[1:], "server"),
        (b"\x02" + (5).to_bytes(32, "big"), K2, "client"),
    ],
)
def test_bad_keys(kind: str, client: bytes, server: bytes, who: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        ChannelScript.make(kind, client, server, 1000)
    assert exc.value.code is ErrorCode.BAD_KEY
    assert who in exc.value.message


def test_unknown_kind() -> None:
    with pytest.raises(ProtocolError) as exc:
        ChannelScript.make("htlc", K1, K2, 1000)
    assert exc.value.code is ErrorCode.BAD_MESSAGE


def test_bip173_p2wsh_vector() -> None:
    # BIP173 test vector: P2WSH of <K1> OP_CHECKSIG.
    script = b"\x21" + K1 + b"\xac"
    assert p2wsh_script_pubkey(script).hex() == (
        "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262"
    )
    assert p2wsh_address(script, "main") == (
        "bc1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3qccfmv3"
    )
    assert p2wsh_address(script, "testnet") == (
        "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7"
    )
    regtest = p2wsh_address(script, "regtest")
    assert regtest.startswith("bcrt1q")
    assert address_to_script_pubkey(regtest, "regtest") == p2wsh_script_pubkey(script)


@pytest.mark.parametrize(
    ("address", "network", "spk"),
    [
        # BIP173/BIP350 valid vectors.
        ("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "main", "0014" + HASH20.hex()),
        (
            "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
            "main",
            "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
        ),
        ("bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs", "main", "5210751e76e8199196d454941c45d1b3a323"),
        # Base58Check of hash160(K1) (the compressed key of secret 1).
        ("1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH", "main", "76a914" + HASH20.hex() + "88ac"),
        ("mrCDrCybB6J1vRfbwM5hemdJz73FwDBC8r", "testnet", "76a914" + HASH20.hex() + "88ac"),
        ("mrCDrCybB6J1vRfbwM5hemdJz73FwDBC8r", "regtest", "76a914" + HASH20.hex() + "88ac"),
    ],
)
def test_address_vectors(address: str, network: str, spk: str) -> None:
    assert address_to_script_pubkey(address, network).hex() == spk
    # Encoding gives the canonical form: lowercase for bech32.
    canonical = address if address[0] in "1m" else address.lower()
    assert script_pubkey_to_address(bytes.fromhex(spk), network) == canonical


@pytest.mark.parametrize(
    ("address", "network"),
    [
        # v1 with a bech32 (not bech32m) checksum: BIP350 invalid vector.
        ("bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd", "main"),
        # v0 with a bech32m checksum: BIP350 invalid vector.
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kemeawh", "main"),
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t5", "main"),  # checksum
        ("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7kv8f3t4", "main"),  # mixed case
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "regtest"),  # other network
        ("bc1q", "main"),  # too short
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3tb", "main"),  # 'b' is not bech32
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4\x7f", "main"),  # bad character
        ("1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH", "testnet"),  # mainnet P2PKH
        ("1BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMJ", "main"),  # Base58 checksum
        ("0BgGZ9tcN4rm9KBzDn7KprQz87SZ26SAMH", "main"),  # '0' is not Base58
        ("1111111111", "main"),  # too short
        ("", "main"),
        ("bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kv8f3t4", "nonet"),
    ],
)
def test_bad_addresses(address: str, network: str) -> None:
    with pytest.raises(ValueError):
        address_to_script_pubkey(address, network)


@pytest.mark.parametrize(
    ("version", "program"),
    [(0, b"\x11" * 25), (0, b"\x11" * 16), (1, b"\x11"), (1, b"\x11" * 41), (17, b"\x11" * 32)],
)
def test_bad_witness_programs(version: int, program: bytes) -> None:
    # Checksums are right; the payload breaks BIP141 (program sizes, version).
    address = _segwit_encode("bcrt", version, program)
    with pytest.raises(ValueError):
        address_to_script_pubkey(address, "regtest")


def test_bip173_invalid_vectors() -> None:
    # BIP173: v0 program of 16 bytes; non-zero padding.
    for address in (
        "BC1QR508D6QEJXTDG4Y5R3ZARVARYV98GJ9P",
        "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3pjxtptv",
    ):
        network = "main" if address.lower().startswith("bc") else "testnet"
        with pytest.raises(ValueError):
            address_to_script_pubkey(address, network)


def _segwit_spk(version: int, program: bytes) -> bytes:
    return bytes([0x50 + version if version else 0, len(program)]) + program


SPK_CASES = [
    ("p2pkh", b"\x76\xa9\x14" + HASH20 + b"\x88\xac", True),
    ("p2sh", b"\xa9\x14" + HASH20 + b"\x87", True),
    ("p2wpkh", _segwit_spk(0, HASH20), True),
    ("p2wsh", _segwit_spk(0, b"\x11" * 32), True),
    ("p2tr", _segwit_spk(1, b"\x22" * 32), True),
    ("v0-25", _segwit_spk(0, b"\x11" * 25), False),
    ("v1-20", _segwit_spk(1, HASH20), False),
    ("v2-16", _segwit_spk(2, b"\x11" * 16), False),
    ("op-return", b"\x6a\x04abcd", False),
    ("bare-multisig", b"\x51\x21" + K1 + b"\x51\xae", False),
    ("p2pk", b"\x21" + K1 + b"\xac", False),
    ("empty", b"", False),
    ("p2pkh-bad-tail", b"\x76\xa9\x14" + HASH20 + b"\x88\xad", False),
    ("p2sh-bad-tail", b"\xa9\x14" + HASH20 + b"\x88", False),
    ("wrong-push-length", b"\x00\x15" + HASH20, False),
]


@pytest.mark.parametrize(("name", "spk", "standard"), SPK_CASES)
def test_is_standard_output_script(name: str, spk: bytes, standard: bool) -> None:
    assert is_standard_output_script(spk) is standard


def test_script_pubkey_to_address_none_for_non_address_scripts() -> None:
    for spk in (b"\x6a\x04abcd", _segwit_spk(0, b"\x11" * 25), b"", b"\x21" + K1 + b"\xac"):
        assert script_pubkey_to_address(spk, "main") is None
    with pytest.raises(ValueError):
        script_pubkey_to_address(b"", "mainnet")


standard_spks = st.one_of(
    st.binary(min_size=20, max_size=20).map(lambda h: b"\x76\xa9\x14" + h + b"\x88\xac"),
    st.binary(min_size=20, max_size=20).map(lambda h: b"\xa9\x14" + h + b"\x87"),
    st.binary(min_size=20, max_size=20).map(lambda h: _segwit_spk(0, h)),
    st.binary(min_size=32, max_size=32).map(lambda h: _segwit_spk(0, h)),
    st.binary(min_size=32, max_size=32).map(lambda h: _segwit_spk(1, h)),
    st.tuples(st.integers(2, 16), st.binary(min_size=2, max_size=40)).map(
        lambda vp: _segwit_spk(*vp)
    ),
)


@given(standard_spks, st.sampled_from(NETWORKS))
def test_address_round_trip(spk: bytes, network: str) -> None:
    address = script_pubkey_to_address(spk, network)
    assert address is not None
    assert address_to_script_pubkey(address, network) == spk
    if spk[0] in (0, *range(0x51, 0x61)) and len(spk) == spk[1] + 2:
        # BIP173: segwit addresses are case-insensitive (but never mixed).
        assert address_to_script_pubkey(address.upper(), network) == spk


def test_channel_script() -> None:
    cltv = ChannelScript.make("cltv", K1, K2, 700_000)
    assert cltv.kind == "cltv"
    assert cltv.witness_script == cltv_witness_script(K1, K2, 700_000)
    assert cltv.script_pubkey == p2wsh_script_pubkey(cltv.witness_script)
    assert cltv.is_height_expiry
    for network in NETWORKS:
        address = cltv.address(network)
        assert address_to_script_pubkey(address, network) == cltv.script_pubkey
    assert cltv.address("regtest").startswith("bcrt1q")
    assert cltv.address("signet").startswith("tb1q")
    multisig = ChannelScript.make("multisig", K1, K2, 1_800_000_000)
    assert multisig.witness_script == multisig_witness_script(K1, K2)
    assert not multisig.is_height_expiry
    assert multisig.expiry == 1_800_000_000
    with pytest.raises(ValueError):
        cltv.address("bitcoin")


def test_is_height_expiry_boundary() -> None:
    assert is_height_expiry(499_999_999)
    assert not is_height_expiry(500_000_000)


# BIP350's reference vectors (https://github.com/bitcoin/bips/blob/master/bip-0350.mediawiki).
BIP350_VALID = [
    ("BC1QW508D6QEJXTDG4Y5R3ZARVARY0C5XW7KV8F3T4", "0014751e76e8199196d454941c45d1b3a323f1433bd6"),
    (
        "tb1qrp33g0q5c5txsp9arysrx4k6zdkfs4nce4xj0gdcccefvpysxf3q0sl5k7",
        "00201863143c14c5166804bd19203356da136c985678cd4d27a1b8c6329604903262",
    ),
    (
        "bc1pw508d6qejxtdg4y5r3zarvary0c5xw7kw508d6qejxtdg4y5r3zarvary0c5xw7kt5nd6y",
        "5128751e76e8199196d454941c45d1b3a323f1433bd6751e76e8199196d454941c45d1b3a323f1433bd6",
    ),
    ("BC1SW50QGDZ25J", "6002751e"),
    ("bc1zw508d6qejxtdg4y5r3zarvaryvaxxpcs", "5210751e76e8199196d454941c45d1b3a323"),
    (
        "tb1qqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesrxh6hy",
        "0020000000c4a5cad46221b2a187905e5266362b99d5e91c6ce24d165dab93e86433",
    ),
    (
        "tb1pqqqqp399et2xygdj5xreqhjjvcmzhxw4aywxecjdzew6hylgvsesf3hn0c",
        "5120000000c4a5cad46221b2a187905e5266362b99d5e91c6ce24d165dab93e86433",
    ),
    (
        "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqzk5jj0",
        "512079be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798",
    ),
]

BIP350_INVALID = [
    "tc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq5zuyut",  # unknown HRP
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqh2y7hd",  # v1 with bech32
    "tb1z0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vqglt7rf",  # v2 with bech32
    "BC1S0XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ54WELL",  # v16 with bech32
    "bc1qw508d6qejxtdg4y5r3zarvary0c5xw7kemeawh",  # v0 with bech32m
    "tb1q0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq24jc47",  # v0 with bech32m
    "bc1p38j9r5y49hruaue7wxjce0updqjuyyx0kh56v8s25huc6995vvpql3jow4",  # bad checksum char
    "BC130XLXVLHEMJA6C4DQV22UAPCTQUPFHLXM9H8Z3K2E72Q4K9HCZ7VQ7ZWS8R",  # version 17
    "bc1pw5dgrnzv",  # 1-byte program
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v8n0nx0muaewav253zgeav",  # 41 bytes
    "BC1QR508D6QEJXTDG4Y5R3ZARVARYV98GJ9P",  # v0 of 16 bytes
    "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vq47Zagq",  # mixed case
    "bc1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7v07qwwzcrf",  # padding > 4 bits
    "tb1p0xlxvlhemja6c4dqv22uapctqupfhlxm9h8z3k2e72q4k9hcz7vpggkg4j",  # non-zero padding
    "bc1gmk9yu",  # empty data section
]


@pytest.mark.parametrize(("address", "spk"), BIP350_VALID)
def test_bip350_valid_vectors(address: str, spk: str) -> None:
    network = "main" if address.lower().startswith("bc1") else "testnet"
    assert address_to_script_pubkey(address, network).hex() == spk
    assert script_pubkey_to_address(bytes.fromhex(spk), network) == address.lower()


@pytest.mark.parametrize("address", BIP350_INVALID)
def test_bip350_invalid_vectors(address: str) -> None:
    for network in ("main", "testnet", "regtest"):
        with pytest.raises(ValueError):
            address_to_script_pubkey(address, network)
