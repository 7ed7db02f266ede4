// Paystream client core for the browser (and node's test runner): the same
// arithmetic as the Python core in gateway/protocol/, checked against it by
// the shared vectors in tests/vectors/t3.json (tests/test_js_vectors.py).
//
// Pure: no DOM, no sockets, no clock. Signing is @noble/curves (RFC 6979,
// low-S, strict DER); hashing is @noble/hashes; bech32 is @scure/base.

import { secp256k1 } from '@noble/curves/secp256k1.js';
import { ripemd160 } from '@noble/hashes/legacy.js';
import { sha256 } from '@noble/hashes/sha2.js';
import { bytesToHex, concatBytes, hexToBytes, utf8ToBytes } from '@noble/hashes/utils.js';
import { bech32 } from '@scure/base';

export { bytesToHex, hexToBytes };

/** protocol.md section 3: T3 sighash types. */
export const SIGHASH_SINGLE_ACP = 0x83;
export const SIGHASH_NONE_ACP = 0x82;
/** protocol.md section 3: a balance is 0 or at least the v1 dust limit. */
export const DUST_LIMIT = 546;
/** protocol.md section 5: tag of the resume proof digest. */
export const RESUME_TAG = 'paystream/1 resume';
const BILL_PER_SAT = 1_000_000n; // bill is msat*ms/s (metering.py)
const HRP = { main: 'bc', testnet: 'tb', signet: 'tb', regtest: 'bcrt' };

export const sha256d = (data) => sha256(sha256(data));
export const hash160 = (data) => ripemd160(sha256(data));

function u32le(n) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n, true);
  return out;
}

function i64le(n) {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigInt64(0, BigInt(n), true);
  return out;
}

/** Bitcoin's CompactSize length prefix followed by the bytes. */
export function varBytes(data) {
  const n = data.length;
  let prefix;
  if (n < 0xfd) prefix = Uint8Array.of(n);
  else if (n <= 0xffff) prefix = Uint8Array.of(0xfd, n & 0xff, n >> 8);
  else prefix = concatBytes(Uint8Array.of(0xfe), u32le(n));
  return concatBytes(prefix, data);
}

/** The 36-byte outpoint: txid in internal (reversed) byte order, then vout. */
export function outpointBytes(txid, vout) {
  if (!/^[0-9a-f]{64}$/.test(txid)) throw new Error('txid must be 64 lowercase hex digits');
  return concatBytes(hexToBytes(txid).reverse(), u32le(vout));
}

/** Minimal script-number push (BIP62 rules 3 and 4) of a positive integer. */
export function scriptNumPush(n) {
  if (!Number.isSafeInteger(n) || n < 1) throw new Error('script number must be positive');
  if (n <= 16) return Uint8Array.of(0x50 + n); // OP_1 .. OP_16
  const bytes = [];
  for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.push(v % 256);
  if (bytes[bytes.length - 1] & 0x80) bytes.push(0); // keep it positive
  return Uint8Array.of(bytes.length, ...bytes);
}

function checkKey(pub, who) {
  if (pub.length !== 33 || !secp256k1.utils.isValidPublicKey(pub, true)) {
    throw new Error(`${who} public key is not a compressed SEC point`);
  }
}

/** protocol.md section 2, kind `cltv` (BIP65). */
export function cltvWitnessScript(clientPub, serverPub, expiry) {
  checkKey(clientPub, 'client');
  checkKey(serverPub, 'server');
  if (!(expiry >= 1 && expiry <= 0xffffffff)) throw new Error('expiry out of range');
  return concatBytes(
    Uint8Array.of(0x63, 0x21), serverPub, Uint8Array.of(0xad, 0x67), // IF <K2> CHECKSIGVERIFY ELSE
    scriptNumPush(expiry), Uint8Array.of(0xb1, 0x75, 0x68, 0x21), // CLTV DROP ENDIF
    clientPub, Uint8Array.of(0xac), // <K1> CHECKSIG
  );
}

/** protocol.md section 2, kind `multisig`: OP_2 <K1> <K2> OP_2 OP_CHECKMULTISIG. */
export function multisigWitnessScript(clientPub, serverPub) {
  checkKey(clientPub, 'client');
  checkKey(serverPub, 'server');
  return concatBytes(Uint8Array.of(0x52, 0x21), clientPub, Uint8Array.of(0x21), serverPub,
    Uint8Array.of(0x52, 0xae));
}

export const p2wshScript = (witnessScript) => concatBytes(Uint8Array.of(0x00, 0x20),
  sha256(witnessScript));
export const p2wpkhScript = (pubkey) => concatBytes(Uint8Array.of(0x00, 0x14), hash160(pubkey));

/** A segwit v0 address (BIP173) of a witness program. */
export function segwitAddress(network, program) {
  const hrp = HRP[network];
  if (!hrp) throw new Error(`unknown network ${network}`);
  return bech32.encode(hrp, [0, ...bech32.toWords(program)]);
}

/** The client's public key (33-byte compressed SEC) of a 32-byte secret. */
export const publicKey = (secret) => secp256k1.getPublicKey(secret, true);
/** A fresh random K1 secret (the browser's CSPRNG). */
export const newSecret = () => secp256k1.utils.randomSecretKey();

/** Sign a 32-byte digest as is: RFC 6979 nonce, low S, strict DER (protocol.md section 1). */
export function signDigest(secret, digest) {
  if (digest.length !== 32) throw new Error('digest must be 32 bytes');
  return secp256k1.sign(digest, secret, { prehash: false, lowS: true, format: 'der' });
}

/** The T3 template of protocol.md section 3 (gateway/protocol/transactions.py PaymentTemplate). */
export class PaymentTemplate {
  constructor(witnessScript, txid, vout, value, changeScript) {
    if (!Number.isSafeInteger(value) || value <= 0) throw new Error('value out of range');
    this.value = value;
    this.changeScript = changeScript;
    // BIP143 preimage head: nVersion | hashPrevouts | hashSequence (both zero
    // under ANYONECANPAY) | outpoint | scriptCode | amount | nSequence.
    this.prefix = concatBytes(u32le(2), new Uint8Array(64), outpointBytes(txid, vout),
      varBytes(witnessScript), i64le(value), u32le(0xffffffff));
  }

  /** 0x83 while balance > 0, 0x82 at balance 0. */
  static sighashType(balance) {
    return balance ? SIGHASH_SINGLE_ACP : SIGHASH_NONE_ACP;
  }

  checkBalance(balance) {
    if (!Number.isSafeInteger(balance) || balance < 0 || balance > this.value
        || (balance > 0 && balance < DUST_LIMIT)) {
      throw new Error('balance must be 0 or between 546 and the channel value');
    }
  }

  /** The BIP143 digest the client signs for `balance`. */
  digest(balance) {
    this.checkBalance(balance);
    // SIGHASH_SINGLE commits to output 0 only; SIGHASH_NONE to no output.
    const hashOutputs = balance
      ? sha256d(concatBytes(i64le(balance), varBytes(this.changeScript)))
      : new Uint8Array(32);
    return sha256d(concatBytes(this.prefix, hashOutputs, u32le(0),
      u32le(PaymentTemplate.sighashType(balance))));
  }

  /** `pay.sig`: DER + sighash byte. */
  sign(secret, balance) {
    return concatBytes(signDigest(secret, this.digest(balance)),
      Uint8Array.of(PaymentTemplate.sighashType(balance)));
  }
}

/** sha256("paystream/1 resume" ‖ channel_id ‖ nonce), protocol.md section 5. */
export function resumeDigest(channelId, nonce) {
  return sha256(concatBytes(utf8ToBytes(RESUME_TAG), utf8ToBytes(channelId), nonce));
}

/** `resume.proof`: DER signature by K1 over the resume digest, no sighash byte. */
export const resumeProof = (secret, channelId, nonce) =>
  signDigest(secret, resumeDigest(channelId, nonce));

const varLen = (n) => (n < 0xfd ? 1 : n <= 0xffff ? 3 : 5);

/**
 * The vbytes a channel's exit costs at most (protocol.md section 3): its
 * input with the largest signatures, its change output and a transaction's
 * fixed overhead (gateway/protocol/settlement.py exit_vbytes).
 */
export function exitVbytes(kind, witnessScript, changeScript) {
  const fixed = 4 * (4 + 4 + 1 + 1) + 2;
  const input = 4 * (36 + 1 + 4);
  const ws = witnessScript.length;
  const witness = 1 + 2 * (1 + 73) + varLen(ws) + ws + (kind === 'cltv' ? 2 : 1);
  const output = 4 * (8 + varLen(changeScript.length) + changeScript.length);
  return Math.ceil((fixed + input + witness + output) / 4);
}

/** The highest exit feerate (sat/vB) the page accepts in `terms`. */
export const MAX_EXIT_FEERATE = 20;

/**
 * Check `terms` against what was proposed and recompute every script
 * (never trust the server's script or address); return the witness script.
 * The exit (its vbytes and the reserve that pays them) must be this
 * channel's, at no more than `maxFeerate` sat/vB.
 */
export function checkTerms(terms, { kind, clientPub, expiry, network, changeScript,
  maxFeerate = MAX_EXIT_FEERATE }) {
  if (terms.kind !== kind) throw new Error('terms: kind differs from the one proposed');
  if (terms.expiry !== expiry) throw new Error('terms: expiry differs from the one proposed');
  const serverPub = hexToBytes(terms.server_pubkey);
  const ws = kind === 'cltv'
    ? cltvWitnessScript(clientPub, serverPub, expiry)
    : multisigWitnessScript(clientPub, serverPub);
  const spk = p2wshScript(ws);
  if (bytesToHex(ws) !== terms.witness_script) throw new Error('terms: witness_script is wrong');
  if (bytesToHex(spk) !== terms.funding_script) throw new Error('terms: funding_script is wrong');
  if (segwitAddress(network, spk.subarray(2)) !== terms.funding_address) {
    throw new Error('terms: funding_address does not pay the script');
  }
  const vbytes = exitVbytes(kind, ws, changeScript);
  if (terms.exit_vbytes !== vbytes) throw new Error(`terms: exit_vbytes is not ${vbytes}`);
  if (terms.exit_fee > maxFeerate * vbytes) {
    throw new Error(`terms: exit_fee ${terms.exit_fee} sat is above ${maxFeerate} sat/vB`);
  }
  return ws;
}

/** Milliseconds of a chunk beyond the free allowance (protocol.md section 7). */
export function chargedMs(deliveredMs, durationMs, freeMs) {
  const over = (x) => Math.max(0, x - freeMs);
  return over(deliveredMs + durationMs) - over(deliveredMs);
}

/** ceil((bill + rate*c) / 1e6) in sat; bill is a BigInt of msat*ms/s. */
export function totalDue(bill, rateMsat, charged) {
  const x = bill + BigInt(rateMsat) * BigInt(charged);
  return Number((x + BILL_PER_SAT - 1n) / BILL_PER_SAT);
}

/** The gateway asked for more than the client's own section 7 figure. */
export class OverchargeError extends Error {
  constructor(due, figure) {
    super(`gateway overcharges: due.total ${due.total} sat for ${due.media}#${due.index} `
      + `but the metered total is ${figure} sat`);
    this.due = due;
    this.figure = figure;
  }
}

/**
 * The player's own bill (gateway/protocol/metering.py ClientMeter): feed it
 * every stream, chunk and due; checkDue() refuses a due above its figure.
 * State is plain data (toJSON/fromJSON) so the page can keep it in IndexedDB.
 */
export class ClientMeter {
  constructor(state = {}) {
    this.bill = BigInt(state.bill ?? 0);
    /** The reserve (terms.exit_fee): part of every total, paid first. */
    this.reserve = state.reserve ?? 0;
    this.rates = { ...(state.rates ?? {}) };
    this.free = { ...(state.free ?? {}) };
    this.used = { ...(state.used ?? {}) };
    this.outstanding = null; // "media#index" paid for and not yet received
    this.pending = null; // [due, charged] checked and not yet paid
  }

  toJSON() {
    return { bill: this.bill.toString(), reserve: this.reserve, rates: this.rates,
      free: this.free, used: this.used };
  }

  get figure() {
    return this.reserve + totalDue(this.bill, 0, 0);
  }

  onStream(stream) {
    this.rates[stream.media] = stream.rate_msat;
    this.free[stream.media] = stream.free_ms;
    this.used[stream.media] = stream.free_used_ms;
    this.outstanding = null;
    this.pending = null;
  }

  charge(media, durationMs) {
    if (!(media in this.rates)) throw new Error(`no stream announced for ${media}`);
    return chargedMs(this.used[media], durationMs, this.free[media]);
  }

  onChunk(chunk) {
    const key = `${chunk.media}#${chunk.index}`;
    if (key === this.outstanding) {
      this.outstanding = null;
      return;
    }
    if (chunk.index === -1) return;
    // Sent without a due (already paid enough, or free): still billed.
    const c = this.charge(chunk.media, chunk.duration_ms);
    this.bill += BigInt(this.rates[chunk.media]) * BigInt(c);
    this.used[chunk.media] += chunk.duration_ms;
  }

  /** The client's own total for `due`; throws OverchargeError above it. */
  checkDue(due) {
    const key = `${due.media}#${due.index}`;
    let figure;
    let charged;
    if (key === this.outstanding) {
      figure = this.figure;
      charged = 0;
    } else {
      if (this.outstanding !== null) {
        throw new Error(`due for ${key} before paid chunk ${this.outstanding} arrived`);
      }
      // The initialization segment is due for the reserve alone.
      charged = due.index === -1 ? 0 : this.charge(due.media, due.duration_ms);
      if (!(due.media in this.rates)) throw new Error(`no stream announced for ${due.media}`);
      figure = this.reserve + totalDue(this.bill, this.rates[due.media], charged);
    }
    if (due.total > figure) throw new OverchargeError(due, figure);
    this.pending = [due, charged];
    return figure;
  }

  /** The increment for the checked `due` was signed: bill its chunk once. */
  paid(due) {
    if (this.pending === null || this.pending[0] !== due) {
      throw new Error('paid() without a matching checkDue()');
    }
    const [, charged] = this.pending;
    this.pending = null;
    const key = `${due.media}#${due.index}`;
    if (key === this.outstanding) return;
    this.bill += BigInt(this.rates[due.media]) * BigInt(charged);
    this.used[due.media] += due.duration_ms;
    this.outstanding = key;
  }
}

/** BIP21 URI for the funding QR code: amount in BTC, exact to the satoshi. */
export function bip21(address, sats) {
  const whole = Math.floor(sats / 1e8);
  const frac = String(sats % 1e8).padStart(8, '0').replace(/0+$/, '');
  return `bitcoin:${address}?amount=${whole}${frac ? `.${frac}` : ''}`;
}
