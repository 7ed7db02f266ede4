"""Relay policy on single inputs and outputs (Bitcoin Core's policy/policy.cpp).

Consensus is the kernel's; these are the extra rules a stock node applies
before relaying: push-only scriptSigs, strict DER and low-S signatures,
compressed keys in segwit, MINIMALIF, and the dust threshold.
"""

from __future__ import annotations

from gateway.chain.node.common import RPC_VERIFY_REJECTED, TxRejected
from gateway.chain.node.wallet import script_type
from gateway.protocol.signatures import der_s_value, is_low_s_der

MAX_SCRIPT_SIG_SIZE = 1650
DUST_RELAY_FEE_PER_KVB = 3000


def script_opcodes(script: bytes) -> list[int] | None:
    """Opcodes of ``script`` (pushes reported as their push opcode), None if malformed."""
    ops: list[int] = []
    i = 0
    while i < len(script):
        op = script[i]
        i += 1
        if 0 < op < 0x4C:
            i += op
        elif op == 0x4C:
            if i + 1 > len(script):
                return None
            i += 1 + script[i]
        elif op == 0x4D:
            if i + 2 > len(script):
                return None
            i += 2 + int.from_bytes(script[i : i + 2], "little")
        elif op == 0x4E:
            if i + 4 > len(script):
                return None
            i += 4 + int.from_bytes(script[i : i + 4], "little")
        if i > len(script):
            return None
        ops.append(op)
    return ops


def _policy_flag_failure(detail: str) -> TxRejected:
    return TxRejected(RPC_VERIFY_REJECTED, f"non-mandatory-script-verify-flag ({detail})")


def _check_signature_policy(item: bytes) -> None:
    if not item:
        return  # an empty signature is a valid "no" for CHECKMULTISIG/IF branches
    # BIP66 strict DER and BIP146 LOW_S on the DER part (the last byte is the
    # sighash type): the same checks the channel core applies to increments.
    der = item[:-1]
    if der_s_value(der) is None:
        raise _policy_flag_failure("Non-canonical DER signature")
    if not is_low_s_der(der):
        raise _policy_flag_failure("Non-canonical signature: S value is unnecessarily high")
    if item[-1] not in (0x01, 0x02, 0x03, 0x81, 0x82, 0x83):
        raise _policy_flag_failure("Signature hash type missing or not understood")


def check_input_policy(script_pubkey: bytes, script_sig: bytes, witness: tuple[bytes, ...]) -> None:
    """Relay policy on one input (policy.cpp ``AreInputsStandard`` + STANDARD flags).

    Signatures must be strict DER with low S (BIP62/BIP66), segwit keys
    compressed, and an OP_IF argument in a P2WSH script minimal (MINIMALIF):
    that last one is a heuristic, since without an interpreter the node treats
    every 1-byte non-signature item of a script using OP_IF/OP_NOTIF as an
    OP_IF argument.
    """
    if len(script_sig) > MAX_SCRIPT_SIG_SIZE:
        raise TxRejected(RPC_VERIFY_REJECTED, "scriptsig-size")
    ops = script_opcodes(script_sig)
    if ops is None or any(op > 0x60 for op in ops):
        raise TxRejected(RPC_VERIFY_REJECTED, "scriptsig-not-pushonly")
    kind = script_type(script_pubkey)
    if kind == "witness_v0_keyhash" and len(witness) == 2:
        _check_signature_policy(witness[0])
        if len(witness[1]) != 33 or witness[1][0] not in (2, 3):
            raise _policy_flag_failure("Using non-compressed keys in segwit")
    elif kind == "witness_v0_scripthash" and witness:
        wscript = witness[-1]
        wops = script_opcodes(wscript) or []
        uses_if = 0x63 in wops or 0x64 in wops
        for item in witness[:-1]:
            if len(item) >= 9 and item[0] == 0x30:
                _check_signature_policy(item)
            elif uses_if and len(item) == 1 and item != b"\x01":
                raise _policy_flag_failure("OP_IF/NOTIF argument must be minimal")


def dust_threshold(script: bytes) -> int:
    """Bitcoin Core's ``GetDustThreshold`` at the default 3 sat/vB dust relay fee."""
    if script and script[0] == 0x6A:
        return 0
    size = 8 + len(script) + (1 if len(script) < 0xFD else 3)
    kind = script_type(script)
    if kind.startswith("witness") or kind == "anchor":
        size += 32 + 4 + 1 + (107 // 4) + 4
    else:
        size += 32 + 4 + 1 + 107 + 4
    return size * DUST_RELAY_FEE_PER_KVB // 1000
