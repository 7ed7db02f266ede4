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
}

for (const [i, m] of vectors.meter.entries()) {
  test(`meter ${i}: the client's figure for every due, and the overcharge refused`, () => {
    const meter = new ps.ClientMeter();
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
    // The state survives a round trip through IndexedDB-style JSON.
    const copy = new ps.ClientMeter(JSON.parse(JSON.stringify(meter.toJSON())));
    assert.equal(copy.bill, meter.bill);
  });
}

test('BIP21 amounts are exact to the satoshi', () => {
  assert.equal(ps.bip21('bcrt1qx', 20_000), 'bitcoin:bcrt1qx?amount=0.0002');
  assert.equal(ps.bip21('bcrt1qx', 123_456_789), 'bitcoin:bcrt1qx?amount=1.23456789');
  assert.equal(ps.bip21('bcrt1qx', 100_000_000), 'bitcoin:bcrt1qx?amount=1');
});
