// The viewer's channels kept in this browser, on every page of the gateway
// (catalog and watch): K1 and one record per channel in IndexedDB, followed
// until the channel's money is back (docs/web.md, "Never forget money").
//
// Money rules kept here: a record is written before its channel is funded
// (it holds the witness script and expiry: without them K1 alone cannot spend
// the funding output) and deleted only once the funding output is spent to
// the viewer's satisfaction — its settlement confirmed and checked
// (protocol.md section 3, "What a batch pays"), or its refund confirmed. A
// channel nothing will settle is refunded by the page once its expiry has
// passed (section 2). Every write merges into the stored record in one
// IndexedDB transaction, so the session's payments and the follower's
// states never overwrite each other.

import * as ps from './paystream.js';

const DB_VERSION = 2;
/** How often the follower looks at the chain and the records (ms). */
const FOLLOW_MS = 2000;
/** Entries kept in the history of channels done (settled or refunded). */
const HISTORY_KEPT = 20;

/** Record states (`status`), each with what the page says about it. */
export const STATUS = {
  unfunded: 'not funded yet',
  open: 'open at the gateway',
  closing: 'closed, settlement pending',
  settling: 'settlement broadcast',
  check_failed: 'settlement check failed',
  refund_wait: 'nothing to settle: refund after expiry',
  refund_sent: 'refund broadcast',
  unknown: 'unknown to this gateway',
  void: 'funding vanished',
};

// -- IndexedDB ----------------------------------------------------------------------

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('paystream', DB_VERSION);
    req.onupgradeneeded = (ev) => {
      const db = req.result;
      if (!db.objectStoreNames.contains('kv')) db.createObjectStore('kv');
      if (!db.objectStoreNames.contains('channels')) {
        db.createObjectStore('channels', { keyPath: 'key' });
      }
      if (!db.objectStoreNames.contains('history')) {
        db.createObjectStore('history', { autoIncrement: true });
      }
      if (ev.oldVersion === 1) migrateV1(req.transaction);
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/**
 * Version 1 kept one channel per host under `channel:<host>` in `kv`: move it
 * into `channels` (never drop it: it may be the only copy of its script).
 */
function migrateV1(tx) {
  const kv = tx.objectStore('kv');
  const channels = tx.objectStore('channels');
  kv.openCursor().onsuccess = (ev) => {
    const cursor = ev.target.result;
    if (!cursor) return;
    const old = cursor.value;
    if (String(cursor.key).startsWith('channel:') && old && old.channel_id) {
      const [txid, vout] = old.channel_id.split(':');
      channels.put({
        ...old, ...v1Scripts(old), key: old.channel_id, txid, vout: Number(vout),
        status: 'open', gateway_url: location.origin, created_at: Date.now() / 1000,
        note: 'Kept from an earlier version of this page.',
      });
      cursor.delete();
    }
    cursor.continue();
  };
}

/** What version 1 did not store, from its cltv witness script (section 2) and meter. */
function v1Scripts(old) {
  const ws = ps.hexToBytes(old.witness_script);
  const spk = ps.p2wshScript(ws);
  return {
    server_pubkey: ps.bytesToHex(ws.subarray(2, 35)), // OP_IF <K2> ...
    client_pubkey: ps.bytesToHex(ws.subarray(ws.length - 34, ws.length - 1)), // <K1> CHECKSIG
    funding_script: ps.bytesToHex(spk),
    funding_address: ps.segwitAddress(old.network, spk.subarray(2)),
    exit_fee: old.meter?.reserve ?? 0,
    exit_vbytes: ps.exitVbytes(old.kind, ws, ps.hexToBytes(old.change_script)),
  };
}

let dbPromise = null;
const db = () => (dbPromise ??= openDb());

/** Run `fn(stores)` in one IndexedDB transaction; resolves with its result once committed. */
async function inTx(names, mode, fn) {
  const handle = await db();
  return new Promise((resolve, reject) => {
    const tx = handle.transaction(names, mode);
    const stores = Object.fromEntries(names.map((n) => [n, tx.objectStore(n)]));
    let result;
    Promise.resolve(fn(stores, (r) => { result = r; })).catch(reject);
    tx.oncomplete = () => resolve(result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error ?? new Error('IndexedDB transaction aborted'));
  });
}

const request = (req) => new Promise((resolve, reject) => {
  req.onsuccess = () => resolve(req.result);
  req.onerror = () => reject(req.error);
});

/** K1: made on first use, kept in IndexedDB, never sent anywhere. */
export async function loadKey() {
  const hex = await inTx(['kv'], 'readwrite', async ({ kv }, done) => {
    let stored = await request(kv.get('k1'));
    if (!stored) {
      stored = ps.bytesToHex(ps.newSecret());
      kv.put(stored, 'k1');
    }
    done(stored);
  });
  return ps.hexToBytes(hex);
}

export const getRecord = (key) => inTx(['channels'], 'readonly',
  async ({ channels }, done) => done(await request(channels.get(key))));

export const allRecords = () => inTx(['channels'], 'readonly',
  async ({ channels }, done) => done(await request(channels.getAll())));

export const history = () => inTx(['history'], 'readonly',
  async ({ history: h }, done) => done((await request(h.getAll())).reverse()));

/** Write a new record (its `key`), failing if one exists: nothing is overwritten. */
export const addRecord = (record) => inTx(['channels'], 'readwrite', ({ channels }) => {
  channels.add({ ...record, updated_at: Date.now() / 1000 });
});

/**
 * Merge `patch` into the stored record `key` in one transaction and return
 * the result; with `newKey`, move it there (a channel gets its id once funded).
 * `patch` may be a function of the stored record (read and written at once).
 */
export const patchRecord = (key, patch, newKey = null) => inTx(['channels'], 'readwrite',
  async ({ channels }, done) => {
    const old = await request(channels.get(key));
    if (!old) throw new Error(`no channel record ${key}`);
    const delta = typeof patch === 'function' ? patch(old) : patch;
    const merged = { ...old, ...delta, updated_at: Date.now() / 1000 };
    if (newKey && newKey !== key) {
      merged.key = newKey;
      channels.delete(key);
    }
    channels.put(merged);
    done(merged);
  });

/** The money is back: delete the record and say how in the history, at once. */
const finishRecord = (key, entry) => inTx(['channels', 'history'], 'readwrite',
  async ({ channels, history: h }) => {
    channels.delete(key);
    h.add({ ...entry, at: Date.now() / 1000 });
    const keys = await request(h.getAllKeys());
    for (const old of keys.slice(0, Math.max(0, keys.length - HISTORY_KEPT))) h.delete(old);
  });

// -- what the page knows of the chain -------------------------------------------------

/** GET /api/chain: {height, median_time, feerate, exit}; null when the gateway is away. */
export async function chainNow() {
  try {
    const res = await fetch('/api/chain');
    return res.ok ? await res.json() : null;
  } catch {
    return null;
  }
}

const isHeight = (expiry) => expiry < 500_000_000;

/** "block 1234" or a local date: when a refund becomes possible (section 2). */
export function expiryText(expiry) {
  return isHeight(expiry) ? `block ${expiry}` : new Date(expiry * 1000).toLocaleString();
}

function refundDue(rec, chain) {
  return chain !== null && ps.refundFinal(rec.expiry, { height: chain.height,
    medianTime: chain.median_time });
}

// -- the refund a record keeps ----------------------------------------------------------

/**
 * A funded cltv record's refund, signed now and kept (section 2: it is valid
 * only after the expiry): the page, the backup and any node can broadcast it.
 */
export function cltvRefundFields(rec, secret) {
  const refund = ps.cltvRefund({
    witnessScript: ps.hexToBytes(rec.witness_script), txid: rec.txid, vout: rec.vout,
    value: rec.value, expiry: rec.expiry, destScript: ps.hexToBytes(rec.change_script), secret,
  });
  return { signed_refund: ps.bytesToHex(refund.tx), refund_fee: refund.fee,
    refund_txid: null, refund_of: refund.txid };
}

const refundOutput = (rec) => ps.parseTx(ps.hexToBytes(rec.signed_refund)).outputs[0];

/** POST /api/refund with the record's signed refund; the record after it. */
export async function refundNow(rec) {
  const url = `/api/refund?tx=${rec.signed_refund}&channel=${encodeURIComponent(rec.channel_id)}`;
  let body;
  let ok = false;
  try {
    const res = await fetch(url, { method: 'POST' });
    body = await res.json();
    ok = res.ok;
  } catch (e) {
    body = { error: e.message };
  }
  if (!ok) {
    return patchRecord(rec.key, { refund_error: body.reason ?? body.error,
      refund_tried_at: Date.now() / 1000 });
  }
  const out = refundOutput(rec);
  return patchRecord(rec.key, {
    status: 'refund_sent', refund_txid: body.txid, refund_value: out.value, refund_error: null,
    note: `Refund ${body.txid} broadcast: ${out.value} sat back to your key once it confirms.`,
  });
}

// -- following a record ------------------------------------------------------------------

/**
 * Check a settlement as section 3 promises (paystream.js checkSettlement):
 * what the check found, for the page to say.
 */
export function checkOurSettlement(rec, api) {
  const s = api.settlement;
  // The gateway may lack our last increment (lost in flight): it then
  // settles a higher balance than ours — in our favour. Never a lower one.
  const ours = rec.balance ?? rec.value;
  const balance = Math.max(ours, api.balance ?? 0);
  try {
    const found = ps.checkSettlement(ps.hexToBytes(s.tx), {
      txid: rec.txid, vout: rec.vout, value: rec.value,
      changeScript: ps.hexToBytes(rec.change_script), balance, exitFee: rec.exit_fee,
      exitVbytes: rec.exit_vbytes, spentValues: s.input_values,
    });
    return { ok: true, change: balance, index: found.index, fee: found.fee, vsize: found.vsize,
      feerate: found.fee / found.vsize, quoted: rec.exit_fee / rec.exit_vbytes };
  } catch (e) {
    return { ok: false, error: e.message };
  }
}

/** What the page says of a check that passed: every number from the transaction. */
export function checkText(check) {
  if (!check.ok) return `Check FAILED: ${check.error}.`;
  return `Checked: it spends our funding output, pays our change ${check.change} sat at `
    + `output ${check.index}, and its feerate ${check.feerate.toFixed(2)} sat/vB `
    + `(fee ${check.fee} sat for ${check.vsize} vB) is at least the quoted `
    + `${check.quoted.toFixed(2)} sat/vB: our reserve went to the fee.`;
}

/**
 * One look at a record: ask the gateway (GET /api/channel) where its money
 * is, check a settlement, refund when due, delete the record once its
 * money is back. Returns the record as it is now (null once deleted).
 */
export async function follow(rec, chain, secret) {
  if (!rec.channel_id) return rec;
  let res;
  try {
    res = await fetch(`/api/channel/${encodeURIComponent(rec.channel_id)}`);
  } catch {
    return rec; // the gateway is away: look again later
  }
  let api = null;
  if (res.status === 404) {
    if (rec.status === 'unfunded') {
      return patchRecord(rec.key, { note: 'Not funded as far as this gateway knows: its '
        + 'funding transaction was not broadcast, or not seen yet.' });
    }
    if (!rec.signed_refund && rec.kind === 'cltv' && rec.value != null && secret) {
      rec = await patchRecord(rec.key, cltvRefundFields(rec, secret));
    }
    if (!rec.signed_refund) {
      return patchRecord(rec.key, { status: 'unknown', note: 'This gateway does not know '
        + `the channel: after ${expiryText(rec.expiry)}, spend it with your backup.` });
    }
    // The gateway never saw this funding (the page left first): nothing will
    // settle it, and the gateway relays its refund by its script.
  } else if (!res.ok) {
    return rec;
  } else {
    api = await res.json();
  }
  const patch = api ? { gateway_state: api.state, settle_by: api.settle_by } : {};
  if (api && rec.value == null && api.value) {
    // Funded from another wallet: the value comes with the channel.
    Object.assign(patch, { value: api.value, balance: rec.balance ?? api.value });
  }
  const known = { ...rec, ...patch };
  if (known.kind === 'cltv' && known.value != null && !known.signed_refund && secret) {
    // Its refund, signed now (a record funded elsewhere, or kept from version 1).
    Object.assign(patch, cltvRefundFields(known, secret));
  }
  rec = { ...rec, ...patch };
  const s = api?.settlement;
  if (s && s.state !== 'abandoned') {
    const check = checkOurSettlement(rec, api);
    const confirmations = s.confirmations ?? 0;
    if (check.ok && confirmations >= 1) {
      await finishRecord(rec.key, { channel_id: rec.channel_id, outcome: 'settled',
        txid: s.txid, amount: check.change, paid: rec.value - check.change,
        text: `Settled in ${s.txid} (${confirmations} confirmation${confirmations > 1 ? 's' : ''}): `
          + `${check.change} sat back to your key, ${rec.value - check.change} sat paid. `
          + checkText(check) });
      return null;
    }
    return patchRecord(rec.key, { ...patch, status: check.ok ? 'settling' : 'check_failed',
      settlement: { txid: s.txid, confirmations, check },
      note: `Settlement ${s.txid}, ${confirmations} confirmation${confirmations === 1 ? '' : 's'}`
        + `${check.ok ? `: ${check.change} sat come back to your key once it confirms` : ''}. `
        + checkText(check) });
  }
  if (rec.refund_txid) {
    let r = null;
    try {
      const answer = await fetch(`/api/refund?txid=${rec.refund_txid}`);
      if (answer.ok) r = await answer.json();
    } catch {
      return rec;
    }
    if (r && r.seen && r.value === rec.refund_value && r.script === rec.change_script) {
      if (r.confirmations >= 1) {
        await finishRecord(rec.key, { channel_id: rec.channel_id, outcome: 'refunded',
          txid: rec.refund_txid, amount: r.value, paid: rec.value - r.value,
          text: `Refunded in ${rec.refund_txid} (${r.confirmations} confirmation`
            + `${r.confirmations > 1 ? 's' : ''}): ${r.value} sat back to your key (the `
            + `network fee was ${rec.value - r.value} sat).` });
        return null;
      }
      return patchRecord(rec.key, { ...patch, status: 'refund_sent' });
    }
    if (r && (!api || api.funding.unspent)) {
      return refundNow({ ...rec, ...patch }); // dropped from the mempool: send it again
    }
    return patchRecord(rec.key, { ...patch, note: 'The funding output is spent, but not by '
      + 'a settlement of this gateway and no unspent output of our refund is seen: if you '
      + 'refunded from your backup elsewhere, check that wallet.' });
  }
  if (api?.state === 'refunded') {
    // The gateway saw the funding spent by another transaction, deep: only
    // our key can spend it alone, so that was our refund (from a backup).
    await finishRecord(rec.key, { channel_id: rec.channel_id, outcome: 'refunded',
      txid: null, amount: null, text: 'Refunded (the gateway saw the funding output spent by '
        + 'your refund).' });
    return null;
  }
  if (api?.state === 'void') {
    return patchRecord(rec.key, { ...patch, status: 'void', note: 'The funding transaction '
      + 'left the chain (double-spent?): there is nothing to settle or refund.' });
  }
  if (api?.state === 'funding' || api?.state === 'ready') {
    return patchRecord(rec.key, { ...patch, status: 'open', note: 'Open at the gateway: it '
      + 'settles what was paid after the resume grace, or resume it on its watch page.' });
  }
  if (api?.state === 'closing') {
    const by = api.settle_by ? new Date(api.settle_by * 1000).toLocaleTimeString() : 'soon';
    return patchRecord(rec.key, { ...patch, status: 'closing',
      note: `Closed: ${api.paid} sat paid (exit reserve included); the settlement goes out `
        + `by ${by}.` });
  }
  // Closed with nothing to broadcast (nothing paid), or a funding the gateway
  // never saw: ours to refund at expiry.
  const why = api ? 'Nothing was paid, so nothing will be settled'
    : 'The gateway never saw this funding, so nothing will settle it';
  rec = await patchRecord(rec.key, { ...patch, status: 'refund_wait',
    note: `${why}: the page refunds the whole ${rec.value} sat (less a network fee of `
      + `${rec.refund_fee ?? '?'} sat) after ${expiryText(rec.expiry)}.` });
  if (rec.signed_refund && refundDue(rec, chain)) return refundNow(rec);
  return rec;
}

// -- the list on the page -------------------------------------------------------------

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text ?? '–';
  if (cls) td.className = cls;
  return td;
}

/** Fill #records-table (and #history) with the records and what the page knows of each. */
export async function render({ chain, live = null, onRefund }) {
  const table = document.getElementById('records-table');
  if (!table) return;
  const records = (await allRecords()).sort((a, b) => a.created_at - b.created_at);
  const body = table.tBodies[0];
  body.replaceChildren();
  for (const rec of records) {
    const row = body.insertRow();
    row.dataset.key = rec.key;
    row.dataset.status = rec.status;
    cell(row, rec.channel_id ?? rec.funding_address).className = 'txid';
    cell(row, rec.kind);
    cell(row, rec.value ?? '–', 'num');
    cell(row, rec.value == null ? '–' : rec.value - (rec.balance ?? rec.value), 'num');
    cell(row, expiryText(rec.expiry));
    const here = live && rec.key === live;
    const state = cell(row, here ? 'open: playing on this page'
      : `${STATUS[rec.status] ?? rec.status}. ${rec.note ?? ''}`
        + (rec.refund_error ? ` Last refund attempt: ${rec.refund_error}.` : ''));
    if (rec.status === 'check_failed') state.className = 'bad';
    const act = row.insertCell();
    if (!here && rec.signed_refund && refundDue(rec, chain)
        && ['refund_wait', 'refund_sent'].includes(rec.status)) {
      const button = document.createElement('button');
      Object.assign(button, { type: 'button', textContent: 'Refund now', className: 'refund' });
      button.addEventListener('click', () => onRefund(rec));
      act.append(button);
    }
  }
  table.hidden = records.length === 0;
  const empty = document.getElementById('records-empty');
  if (empty) empty.hidden = records.length > 0;
  const list = document.getElementById('history');
  if (list) {
    list.replaceChildren(...(await history()).map((h) => {
      const li = document.createElement('li');
      li.textContent = `${h.channel_id}: ${h.text}`;
      return li;
    }));
  }
}

// -- the backup -------------------------------------------------------------------------

const BACKUP_STATE = {
  unfunded: 'open', open: 'ready', closing: 'closing', settling: 'closing',
  check_failed: 'closing', refund_wait: 'closed', unknown: 'closed', void: 'closed',
  refund_sent: 'refunded',
};

/**
 * The backup: K1 and every channel record with its signed refund, so that a
 * person can refund without this browser (any node takes the refund after
 * the expiry); the field names are the Python player's keystore's
 * (player/keystore.py), so that importing it there is a copy.
 */
export async function backupText(secret, network) {
  const records = await allRecords();
  const pub = ps.publicKey(secret);
  const change = ps.p2wpkhScript(pub);
  return JSON.stringify({
    format: 'paystream-web-backup/1',
    warning: 'SECRET: k1_secret spends the change of every channel here. Keep this file '
      + 'private; delete it once every channel is settled or refunded.',
    gateway_url: location.origin,
    network,
    made_at: new Date().toISOString(),
    k1_secret: ps.bytesToHex(secret),
    k1_pubkey: ps.bytesToHex(pub),
    change_script: ps.bytesToHex(change),
    change_address: ps.segwitAddress(network, change.subarray(2)),
    channels: records.map((r) => ({
      channel_id: r.channel_id ?? null,
      state: BACKUP_STATE[r.status] ?? r.status,
      page_status: r.status,
      gateway_url: r.gateway_url,
      network: r.network,
      kind: r.kind,
      server_pubkey: r.server_pubkey,
      client_pubkey: r.client_pubkey,
      expiry: r.expiry,
      expiry_is_height: isHeight(r.expiry),
      witness_script: r.witness_script,
      funding_script: r.funding_script,
      funding_address: r.funding_address,
      change_script: r.change_script,
      refund_script: r.change_script,
      txid: r.txid ?? null,
      vout: r.vout ?? null,
      value: r.value ?? null,
      exit_fee: r.exit_fee,
      exit_vbytes: r.exit_vbytes,
      seq: r.seq ?? 0,
      balance: r.balance ?? null,
      refund_fee: r.refund_fee ?? null,
      refund_server_sig: r.refund_server_sig ?? null,
      signed_refund: r.signed_refund ?? null,
      refund_txid: r.refund_txid ?? null,
      closing_txid: r.settlement?.txid ?? null,
      created_at: r.created_at,
      how_to_refund: r.signed_refund
        ? `After ${isHeight(r.expiry) ? `block ${r.expiry}` : `median-time-past ${r.expiry}`}, `
          + 'broadcast signed_refund with any node (sendrawtransaction): it pays value - '
          + 'refund_fee to change_script, your key. Not needed once the channel is settled.'
        : 'Not funded as far as this page knows: nothing to refund unless you paid '
          + 'funding_address; then spend it with k1_secret and witness_script after the expiry.',
    })),
  }, null, 1);
}

/** Download the backup as a file (it never leaves the browser otherwise). */
export async function downloadBackup(secret, network) {
  const text = await backupText(secret, network);
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([text], { type: 'application/json' }));
  a.download = `paystream-backup-${location.host.replace(/[^a-z0-9.-]/gi, '_')}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  return text;
}

// -- the follower --------------------------------------------------------------------------

/**
 * Follow every record but the page's live channel (`live()` names it) every
 * FOLLOW_MS, render the list, and call `onChain(chain)` with each look at
 * the chain. Returns the state the tests read (window.paystreamRecords).
 */
export function startFollowing({ secret, live = () => null, onChain = () => {} }) {
  const state = { chain: null, rounds: 0, errors: [], busy: false, records: allRecords,
    history };
  const refund = async (rec) => {
    await refundNow(rec);
    await render({ chain: state.chain, live: live(), onRefund: refund });
  };
  const round = async () => {
    if (state.busy) return;
    state.busy = true;
    try {
      state.chain = (await chainNow()) ?? state.chain;
      onChain(state.chain);
      for (const rec of await allRecords()) {
        if (rec.key === live()) continue;
        try {
          await follow(rec, state.chain, secret);
        } catch (e) {
          state.errors.push(`${rec.key}: ${e.message}`);
        }
      }
      await render({ chain: state.chain, live: live(), onRefund: refund });
      state.rounds += 1;
    } finally {
      state.busy = false;
    }
  };
  state.now = round;
  round();
  setInterval(round, FOLLOW_MS);
  return state;
}
