// Checks player/web/paystream.js against the Python core's vectors
// (tests/vectors/t3.json, made by tests/test_js_vectors.py). Run from
// player/web: `node --test test/` (pytest runs it too).
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import * as ps from '../paystream.js';

const path = process.env.PAYSTREAM_VECTORS
  ?? fileURLToPath(new URL('../../../tests/vectors/t3.json', import.meta.url));
const vectors = JSON.parse(readFileSync(path, 'utf8'));
const hex = ps.bytesToHex;
const bytes = ps.hexToBytes;

for (const [i, c] of vectors.channels.entries()) {
  test(`channel ${i} (${c.kind}, expiry ${c.expiry}): scripts, T3 signatures, resume proof`, () => {
    const secret = bytes(c.client_secret);
    const clientPub = ps.publicKey(secret);
    assert.equal(hex(clientPub), c.client_pubkey);
    const serverPub = bytes(c.server_pubkey);
    const ws = c.kind === 'cltv'
      ? ps.cltvWitnessScript(clientPub, serverPub, c.expiry)
      : ps.multisigWitnessScript(clientPub, serverPub);
    assert.equal(hex(ws), c.witness_script);
    const spk = ps.p2wshScript(ws);
    assert.equal(hex(spk), c.funding_script);
    for (const [net, addr] of Object.entries(c.addresses)) {
      assert.equal(ps.segwitAddress(net, spk.subarray(2)), addr);
    }
    const changeScript = bytes(c.change_script);
    assert.equal(ps.exitVbytes(c.kind, ws, changeScript), c.exit_vbytes);
    const terms = {
      kind: c.kind, expiry: c.expiry, server_pubkey: c.server_pubkey, witness_script: c.witness_script,
      funding_script: c.funding_script, funding_address: c.addresses.regtest,
      exit_vbytes: c.exit_vbytes, exit_fee: 2 * c.exit_vbytes,
    };
    const proposed = { kind: c.kind, clientPub, expiry: c.expiry, network: 'regtest', changeScript };
    ps.checkTerms(terms, proposed);
    assert.throws(() => ps.checkTerms({ ...terms, expiry: c.expiry + 1 }, proposed));
    assert.throws(() => ps.checkTerms({ ...terms, exit_vbytes: c.exit_vbytes - 1 }, proposed));
    assert.throws(() => ps.checkTerms({ ...terms, exit_fee: 21 * c.exit_vbytes }, proposed));
    if (i % 3 === 0) { // the P2WPKH-of-K1 change script the browser uses
      assert.equal(hex(ps.p2wpkhScript(clientPub)), c.change_script);
    }
    const template = new ps.PaymentTemplate(ws, c.txid, c.vout, c.value, bytes(c.change_script));
    for (const p of c.payments) {
      assert.equal(hex(template.digest(p.balance)), p.digest, `digest for balance ${p.balance}`);
      assert.equal(hex(template.sign(secret, p.balance)), p.sig, `sig for balance ${p.balance}`);
    }
    assert.throws(() => template.digest(545));
    assert.throws(() => template.digest(c.value + 1));
    const r = c.resume;
    assert.equal(hex(ps.resumeDigest(r.channel_id, bytes(r.nonce))), r.digest);
    assert.equal(hex(ps.resumeProof(secret, r.channel_id, bytes(r.nonce))), r.proof);
  });

  test(`channel ${i} (${c.kind}): the refund, built, signed and checked as the Python core does`, () => {
    const secret = bytes(c.client_secret);
    const ws = bytes(c.witness_script);
    const dest = bytes(c.change_script);
    const f = c.refund;
    const where = { txid: c.txid, vout: c.vout, value: c.value, expiry: c.expiry, destScript: dest };
    const unsigned = ps.buildRefund({ ...where, fee: f.fee });
    assert.equal(hex(unsigned), f.unsigned);
    assert.equal(ps.refundVbytesMax(c.kind, ws, dest), f.vbytes_max);
    assert.equal(ps.txidOf(bytes(f.signed)), f.txid);
    assert.equal(ps.vsizeOf(bytes(f.signed)), f.vsize);
    assert.equal(hex(ps.serializeTx(ps.parseTx(bytes(f.signed)))), f.signed);
    assert.throws(() => ps.parseTx(bytes(`${f.signed}00`)));
    assert.throws(() => ps.buildRefund({ ...where, fee: c.value - 545 }));
    if (c.kind === 'cltv') {
      assert.equal(hex(ps.finalizeCltvRefund(unsigned, ws, c.value, secret)), f.signed);
      const auto = ps.cltvRefund({ ...where, witnessScript: ws, secret,
        feerate: vectors.refund_feerate });
      assert.deepEqual({ ...auto, tx: hex(auto.tx) }, f.auto);
    } else {
      const serverSig = bytes(f.server_sig);
      const serverPub = bytes(c.server_pubkey);
      ps.checkRefundSignature(unsigned, ws, c.value, serverPub, serverSig);
      // BIP143 commits to the value: the signature is not valid for another.
      assert.throws(() => ps.checkRefundSignature(unsigned, ws, c.value - 1, serverPub, serverSig),
        /does not verify/);
      const other = ps.buildRefund({ ...where, fee: f.fee + 1 });
      assert.throws(() => ps.checkRefundSignature(other, ws, c.value, serverPub, serverSig),
        /does not verify/);
      const typed = Uint8Array.from(serverSig);
      typed[typed.length - 1] = 0x81;
      assert.throws(() => ps.checkRefundSignature(unsigned, ws, c.value, serverPub, typed),
        /SIGHASH_ALL/);
      assert.throws(() => ps.checkRefundSignature(unsigned, ws, c.value, serverPub,
        ps.hexToBytes(`31${f.server_sig.slice(2)}`)), /strict DER/);
      assert.equal(hex(ps.finalizeMultisigRefund(unsigned, ws, c.value, secret, serverSig)),
        f.signed);
      const t2 = ps.multisigRefund({ ...where, witnessScript: ws, feerate: vectors.refund_feerate });
      assert.equal(t2.fee, Math.ceil(vectors.refund_feerate * f.vbytes_max));
    }
  });
}

for (const [i, s] of vectors.settlements.entries()) {
  test(`settlement check ${i}: ${s.error ?? 'passes'}`, () => {
    const a = s.args;
    const check = () => ps.checkSettlement(bytes(s.tx), {
      txid: a.txid, vout: a.vout, value: a.value, changeScript: bytes(a.change_script),
      balance: a.balance, exitFee: a.exit_fee, exitVbytes: a.exit_vbytes,
      spentValues: a.spent_values,
    });
    if (s.error === null) {
      const found = check();
      assert.equal(found.fee, s.fee);
      assert.equal(found.vsize, s.vsize);
    } else {
      // The same words as check_settlement, up to the feerate's formatting.
      assert.throws(check, (e) => e.message.startsWith(s.error.split(', below')[0]));
    }
  });
}

for (const [i, m] of vectors.meter.entries()) {
  test(`meter ${i} (reserve ${m.reserve}): the client's figure for every due, and the overcharge refused`, () => {
    const meter = new ps.ClientMeter({ reserve: m.reserve });
    meter.onStream(m.stream);
    let overcharges = 0;
    for (const e of m.events) {
      if (e.chunk) meter.onChunk(e.chunk);
      else if ('overcharge' in e) {
        assert.throws(() => meter.checkDue(e.due), ps.OverchargeError);
        overcharges += 1;
      } else {
        assert.equal(meter.checkDue(e.due), e.figure);
        meter.paid(e.due);
      }
    }
    assert.equal(overcharges, 1);
    assert.equal(meter.bill.toString(), m.bill);
    assert.equal(meter.figure, m.figure);
    // The state survives a round trip through IndexedDB-style JSON.
    const copy = new ps.ClientMeter(JSON.parse(JSON.stringify(meter.toJSON())));
    assert.equal(copy.bill, meter.bill);
  });
}

test('a session costs its charged media, rounded up once, never the free part', () => {
  const item = { rateMsat: 300_000, freeMs: 3000, durationMs: 12_000 };
  assert.equal(ps.sessionCost({ ...item, seconds: 2 }), 0);
  assert.equal(ps.sessionCost({ ...item, seconds: 5 * 60 }), 2700); // the whole item
  assert.equal(ps.sessionCost({ ...item, seconds: 4.001 }), 301); // a fraction: rounded up
  assert.equal(ps.sessionCost({ ...item, seconds: 5, usedFreeMs: 3000 }), 1500);
});

test('a refund is final in the next block once the expiry is passed (section 2)', () => {
  assert.equal(ps.refundFinal(110, { height: 108, medianTime: 0 }), false);
  assert.equal(ps.refundFinal(110, { height: 109, medianTime: 0 }), false);
  assert.equal(ps.refundFinal(110, { height: 110, medianTime: 0 }), true);
  assert.equal(ps.refundFinal(1_700_000_000, { height: 1e6, medianTime: 1_700_000_000 }), false);
  assert.equal(ps.refundFinal(1_700_000_000, { height: 0, medianTime: 1_700_000_001 }), true);
});

test('BIP21 amounts are exact to the satoshi', () => {
  assert.equal(ps.bip21('bcrt1qx', 20_000), 'bitcoin:bcrt1qx?amount=0.0002');
  assert.equal(ps.bip21('bcrt1qx', 123_456_789), 'bitcoin:bcrt1qx?amount=1.23456789');
  assert.equal(ps.bip21('bcrt1qx', 100_000_000), 'bitcoin:bcrt1qx?amount=1');
});

test('binary pay frames (protocol.md section 5a) as the Python core writes them', () => {
  assert.ok(vectors.pay_binary.length >= 4);
  for (const v of vectors.pay_binary) {
    assert.equal(hex(ps.encodePayBinary(v.seq, v.balance, bytes(v.sig))), v.frame);
  }
});
