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

/** Bitcoin's CompactSize encoding of a count or length. */
export function compactSize(n) {
  if (n < 0xfd) return Uint8Array.of(n);
  if (n <= 0xffff) return Uint8Array.of(0xfd, n & 0xff, n >> 8);
  return concatBytes(Uint8Array.of(0xfe), u32le(n));
}

/** Bitcoin's CompactSize length prefix followed by the bytes. */
export const varBytes = (data) => concatBytes(compactSize(data.length), data);

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

/** `hello.features` entry: the gateway takes the binary `pay` (protocol.md section 5a). */
export const FEATURE_PAY_BINARY = 'pay_binary';

/**
 * The binary `pay` frame (protocol.md section 5a): kind 0x01, `seq` and
 * `balance` as unsigned 64-bit big-endian integers, then `sig`.
 */
export function encodePayBinary(seq, balance, sig) {
  const frame = new Uint8Array(17 + sig.length);
  const view = new DataView(frame.buffer);
  view.setUint8(0, 0x01);
  view.setBigUint64(1, BigInt(seq));
  view.setBigUint64(9, BigInt(balance));
  frame.set(sig, 17);
  return frame;
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

// -- what a session costs (protocol.md sections 3 and 7) ------------------------

/**
 * Sat for the media of the first `seconds` of an item played from its start
 * (section 7): the free allowance left (`freeMs - usedFreeMs`) costs nothing,
 * the rest `rateMsat` per second, rounded up once. The reserve is not in it.
 */
export function sessionCost({ rateMsat, freeMs, durationMs, seconds, usedFreeMs = 0 }) {
  const played = Math.min(Math.round(seconds * 1000), durationMs);
  return totalDue(0n, rateMsat, chargedMs(usedFreeMs, played, freeMs));
}

// -- transactions: parse, serialise, BIP143 (protocol.md sections 2 and 3) ----------

/** Every bitcoin there will ever be, in satoshi: the largest amount (section 1). */
export const MAX_MONEY = 2_100_000_000_000_000;
/** nSequence of every refund: not final, so nLockTime applies (BIP65, section 2). */
export const REFUND_SEQUENCE = 0xfffffffe;
export const SIGHASH_ALL = 0x01;
/** The feerate (sat/vB) of the page's own refunds, on their exact vsize (docs/web.md). */
export const REFUND_FEERATE = 2;

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
  }

  take(n) {
    if (this.pos + n > this.bytes.length) throw new Error('not a serialised transaction');
    const out = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  u8() { return this.take(1)[0]; }

  u32() {
    this.take(4);
    return this.view.getUint32(this.pos - 4, true);
  }

  i64() {
    this.take(8);
    return this.view.getBigInt64(this.pos - 8, true);
  }

  varint() {
    const first = this.u8();
    if (first < 0xfd) return first;
    if (first === 0xfd) {
      this.take(2);
      return this.view.getUint16(this.pos - 2, true);
    }
    if (first === 0xfe) return this.u32();
    throw new Error('not a serialised transaction');
  }

  varBytes() { return this.take(this.varint()); }
}

/**
 * A transaction as plain data: `version`, `inputs` ({txid, vout, scriptSig,
 * sequence, witness: [bytes]}), `outputs` ({value, script}), `locktime`.
 * Throws unless `bytes` is exactly one serialised transaction (BIP144 too).
 */
export function parseTx(bytes) {
  const r = new Reader(bytes);
  const version = r.u32() | 0;
  let segwit = false;
  if (bytes[r.pos] === 0x00 && bytes[r.pos + 1] === 0x01) {
    segwit = true;
    r.take(2);
  }
  const inputs = [];
  for (let n = r.varint(), i = 0; i < n; i += 1) {
    const txid = bytesToHex(Uint8Array.from(r.take(32)).reverse());
    inputs.push({ txid, vout: r.u32(), scriptSig: r.varBytes(), sequence: r.u32(), witness: [] });
  }
  const outputs = [];
  for (let n = r.varint(), i = 0; i < n; i += 1) {
    const value = r.i64();
    if (value < 0n || value > BigInt(MAX_MONEY)) throw new Error('output amount out of range');
    outputs.push({ value: Number(value), script: r.varBytes() });
  }
  if (segwit) {
    for (const input of inputs) {
      for (let n = r.varint(), i = 0; i < n; i += 1) input.witness.push(r.varBytes());
    }
  }
  const locktime = r.u32();
  if (r.pos !== bytes.length) throw new Error('not a serialised transaction');
  return { version, inputs, outputs, locktime };
}

function i32le(n) {
  const out = new Uint8Array(4);
  new DataView(out.buffer).setInt32(0, n, true);
  return out;
}

const outputBytes = (out) => concatBytes(i64le(out.value), varBytes(out.script));

/** Serialise `tx` (parseTx's shape); with witnesses only if an input has one (BIP144). */
export function serializeTx(tx, { witness = true } = {}) {
  const segwit = witness && tx.inputs.some((i) => i.witness.length);
  const parts = [i32le(tx.version)];
  if (segwit) parts.push(Uint8Array.of(0x00, 0x01));
  parts.push(compactSize(tx.inputs.length));
  for (const i of tx.inputs) {
    parts.push(outpointBytes(i.txid, i.vout), varBytes(i.scriptSig), u32le(i.sequence));
  }
  parts.push(compactSize(tx.outputs.length), ...tx.outputs.map(outputBytes));
  if (segwit) {
    for (const i of tx.inputs) parts.push(compactSize(i.witness.length), ...i.witness.map(varBytes));
  }
  parts.push(u32le(tx.locktime));
  return concatBytes(...parts);
}

/** The txid (display hex, as RPC shows it) of a serialised transaction. */
export function txidOf(bytes) {
  return bytesToHex(sha256d(serializeTx(parseTx(bytes), { witness: false })).reverse());
}

/** Virtual size (BIP141): ceil((3 × stripped size + total size) / 4). */
export function vsizeOf(bytes) {
  const stripped = serializeTx(parseTx(bytes), { witness: false }).length;
  return Math.ceil((3 * stripped + bytes.length) / 4);
}

/**
 * The BIP143 SIGHASH_ALL digest of input `index` spending a channel output
 * of `value` (gateway/protocol/transactions.py sighash_all).
 */
export function sighashAll(tx, index, witnessScript, value) {
  const input = tx.inputs[index];
  return sha256d(concatBytes(
    i32le(tx.version),
    sha256d(concatBytes(...tx.inputs.map((i) => outpointBytes(i.txid, i.vout)))),
    sha256d(concatBytes(...tx.inputs.map((i) => u32le(i.sequence)))),
    outpointBytes(input.txid, input.vout),
    varBytes(witnessScript),
    i64le(value),
    u32le(input.sequence),
    sha256d(concatBytes(...tx.outputs.map(outputBytes))),
    u32le(tx.locktime),
    u32le(SIGHASH_ALL),
  ));
}

// -- refunds (protocol.md section 2) -----------------------------------------------------

/**
 * The unsigned refund (T2 for multisig, the cltv refund): version 2, one
 * input (the funding outpoint, nSequence 0xfffffffe), nLockTime = expiry,
 * one output of `value - fee` to `destScript` (transactions.py build_refund).
 */
export function buildRefund({ txid, vout, value, expiry, destScript, fee }) {
  if (!Number.isSafeInteger(fee) || fee < 0 || value - fee < DUST_LIMIT) {
    throw new Error('refund output would be dust');
  }
  return serializeTx({
    version: 2,
    inputs: [{ txid, vout, scriptSig: new Uint8Array(0), sequence: REFUND_SEQUENCE, witness: [] }],
    outputs: [{ value: value - fee, script: destScript }],
    locktime: expiry,
  });
}

function withWitness(unsigned, witness) {
  const tx = parseTx(unsigned);
  tx.inputs[0].witness = witness;
  return serializeTx(tx);
}

/** Sign a cltv refund: witness `<sig_K1> <> <script>` (section 2). */
export function finalizeCltvRefund(unsigned, witnessScript, value, secret) {
  const digest = sighashAll(parseTx(unsigned), 0, witnessScript, value);
  const sig = concatBytes(signDigest(secret, digest), Uint8Array.of(SIGHASH_ALL));
  return withWitness(unsigned, [sig, new Uint8Array(0), witnessScript]);
}

/** Sign T2: witness `<> <sig_K1> <sig_K2> <script>` (section 2). */
export function finalizeMultisigRefund(unsigned, witnessScript, value, secret, serverSig) {
  const digest = sighashAll(parseTx(unsigned), 0, witnessScript, value);
  const sig = concatBytes(signDigest(secret, digest), Uint8Array.of(SIGHASH_ALL));
  return withWitness(unsigned, [new Uint8Array(0), sig, serverSig, witnessScript]);
}

const HALF_ORDER = secp256k1.Point.CURVE().n >> 1n;

/** S of a strict-DER (BIP66) signature without its sighash byte; null if not strict DER. */
export function derS(der) {
  const size = der.length;
  if (size < 8 || size > 72 || der[0] !== 0x30 || der[1] !== size - 2) return null;
  const lenR = der[3];
  if (5 + lenR >= size) return null;
  const lenS = der[5 + lenR];
  if (lenR + lenS + 6 !== size) return null;
  if (der[2] !== 0x02 || lenR === 0 || der[4] & 0x80) return null;
  if (lenR > 1 && der[4] === 0x00 && !(der[5] & 0x80)) return null;
  if (der[4 + lenR] !== 0x02 || lenS === 0 || der[6 + lenR] & 0x80) return null;
  if (lenS > 1 && der[6 + lenR] === 0x00 && !(der[7 + lenR] & 0x80)) return null;
  return BigInt(`0x${bytesToHex(der.subarray(6 + lenR))}`);
}

/**
 * Check `refund_signed.sig` on T2 before T1 is broadcast (section 2): strict
 * DER, low S, SIGHASH_ALL, valid by K2 over T2's BIP143 digest for `value`
 * (transactions.py check_refund_t2_signature). Throws what is wrong.
 */
export function checkRefundSignature(unsigned, witnessScript, value, serverPub, sig) {
  const der = sig.subarray(0, sig.length - 1);
  const s = derS(der);
  if (s === null) throw new Error('refund_signed: the signature is not strict DER');
  if (s > HALF_ORDER) throw new Error('refund_signed: the signature has a high S');
  if (sig[sig.length - 1] !== SIGHASH_ALL) throw new Error('refund_signed: not SIGHASH_ALL');
  const digest = sighashAll(parseTx(unsigned), 0, witnessScript, value);
  if (!secp256k1.verify(der, digest, serverPub, { prehash: false, lowS: true, format: 'der' })) {
    throw new Error('refund_signed: the signature does not verify by the gateway key');
  }
}

/**
 * The vbytes of a refund with the largest signatures (the longest DER with
 * its sighash byte): what T2's fee is computed on, before the gateway signs it.
 */
export function refundVbytesMax(kind, witnessScript, destScript) {
  const stripped = 4 + 1 + 36 + 1 + 4 + 1 + 8 + varLen(destScript.length) + destScript.length + 4;
  const ws = witnessScript.length;
  const items = kind === 'cltv'
    ? (1 + 73) + 1 + (varLen(ws) + ws)
    : 1 + 2 * (1 + 73) + (varLen(ws) + ws);
  const witness = 2 + 1 + items; // marker and flag, the item count, the items
  return Math.ceil((4 * stripped + witness) / 4);
}

/**
 * The signed cltv refund paying `feerate` sat/vB on its own exact vsize:
 * signed again with the fee its signed size needs until that fee is paid
 * (RFC 6979 signatures are deterministic). {tx, txid, fee, vsize}.
 */
export function cltvRefund({ witnessScript, txid, vout, value, expiry, destScript, secret,
  feerate = REFUND_FEERATE }) {
  let fee = 0;
  for (;;) {
    const unsigned = buildRefund({ txid, vout, value, expiry, destScript, fee });
    const tx = finalizeCltvRefund(unsigned, witnessScript, value, secret);
    const vsize = vsizeOf(tx);
    const needed = Math.ceil(feerate * vsize);
    if (needed <= fee) return { tx, txid: txidOf(tx), fee, vsize };
    fee = needed;
  }
}

/** The multisig T2 (unsigned) at `feerate` sat/vB of its largest size. {tx, fee}. */
export function multisigRefund({ witnessScript, txid, vout, value, expiry, destScript,
  feerate = REFUND_FEERATE }) {
  const fee = Math.ceil(feerate * refundVbytesMax('multisig', witnessScript, destScript));
  return { tx: buildRefund({ txid, vout, value, expiry, destScript, fee }), fee };
}

/**
 * Whether a refund with nLockTime `expiry` can go into the next block
 * (section 2): a height expiry once the next block's height is above it, a
 * time expiry once the tip's median-time-past is.
 */
export function refundFinal(expiry, { height, medianTime }) {
  return expiry < 500_000_000 ? height + 1 > expiry : medianTime > expiry;
}

// -- checking a settlement (protocol.md section 3, "What a batch pays") -------------------

/**
 * Check a settlement of our channel (gateway/protocol/settlement.py
 * check_settlement): it spends our funding outpoint `txid:vout`; it pays
 * our last signed `balance` (if any) to `changeScript` at our input's
 * index; and, with every input's value (`spentValues`, in input order), its
 * feerate is at least the one our reserve was quoted at (`exitFee /
 * exitVbytes`): our reserve went to miners, to no one's output. Returns
 * {index, fee, vsize}; throws what is wrong.
 */
export function checkSettlement(bytes, { txid, vout, value, changeScript, balance, exitFee,
  exitVbytes, spentValues }) {
  const tx = parseTx(bytes);
  const index = tx.inputs.findIndex((i) => i.txid === txid && i.vout === vout);
  if (index < 0) throw new Error('the settlement does not spend our funding output');
  if (balance) {
    if (index >= tx.outputs.length) {
      throw new Error("the settlement has no output at our input's index");
    }
    const out = tx.outputs[index];
    if (bytesToHex(out.script) !== bytesToHex(changeScript) || out.value !== balance) {
      throw new Error('our change output is not our last signed balance');
    }
  }
  const vsize = vsizeOf(bytes);
  if (spentValues === undefined || spentValues === null) return { index, fee: null, vsize };
  if (spentValues.length !== tx.inputs.length || spentValues[index] !== value
      || !spentValues.every(Number.isSafeInteger)) {
    throw new Error('the input values do not match the settlement');
  }
  const fee = spentValues.reduce((a, b) => a + b, 0) - tx.outputs.reduce((a, o) => a + o.value, 0);
  // fee / vsize < exitFee / exitVbytes, in integers.
  if (BigInt(fee) * BigInt(exitVbytes) < BigInt(exitFee) * BigInt(vsize)) {
    throw new Error(`the settlement pays ${fee} sat for ${vsize} vB, below the quoted `
      + `${+(exitFee / exitVbytes).toPrecision(6)} sat/vB: our reserve did not all go to the fee`);
  }
  return { index, fee, vsize };
}

/** BIP21 URI for the funding QR code: amount in BTC, exact to the satoshi. */
export function bip21(address, sats) {
  const whole = Math.floor(sats / 1e8);
  const frac = String(sats % 1e8).padStart(8, '0').replace(/0+$/, '');
  return `bitcoin:${address}?amount=${whole}${frac ? `.${frac}` : ''}`;
}
