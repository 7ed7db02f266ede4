// The browser player (/watch/<id>): one WebSocket session of protocol.md,
// MediaSource playback of the chunks it delivers, K1 kept in IndexedDB.
//
// Money rules kept here (design.md): the viewer confirms a budget before any
// funding; each `due` is checked against the page's own section 7 bill
// (paystream.js ClientMeter) and an overcharge closes the channel; the page
// pays only while the media it has is less than AHEAD_S seconds ahead of
// playback; the key and every signed state are stored before a `pay` leaves.

import qrcode from 'qrcode-generator';
import * as ps from './paystream.js';

const $ = (id) => document.getElementById(id);
const video = $('video');
const params = new URLSearchParams(location.search);
/** Seconds of media the page may hold beyond playback before it pays for more. */
const AHEAD_S = Number(params.get('ahead')) > 0 ? Number(params.get('ahead')) : 8;
const AGENT = 'paystream-web/0.1';
const RESUME_FAILURES = new Set(['channel_unknown', 'channel_closed', 'channel_expiring',
  'bad_signature', 'session_replaced']);

/** Page state, also read by the browser tests (window.paystream). */
const app = {
  state: 'starting', network: document.body.dataset.network, media: document.body.dataset.media,
  channelId: null, value: null, balance: null, seq: 0, budget: null, expiry: null,
  paid: 0, rateMsat: null, freeMs: null, stream: null, closed: null, overcharged: null,
  errors: [], resumed: false, funding: null, faucet: null, plays: [],
};
window.paystream = app;

let secret;
let clientPub;
let ws = null;
let hello = null;
let template = null;
let meter = new ps.ClientMeter();
let pendingChunk = null;
let pendingDue = null;
let queue = Promise.resolve();
let leaving = false;
let deliveredEndMs = 0;
// Between a `play` and its `stream`, dues of the stream being replaced are not paid.
let awaitingStream = false;
let catalog = [];

// -- IndexedDB: the key and the channel survive reloads; nothing leaves the page

function idb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open('paystream', 1);
    req.onupgradeneeded = () => req.result.createObjectStore('kv');
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}
const dbp = idb();
async function kv(mode, fn) {
  const db = await dbp;
  return new Promise((resolve, reject) => {
    const tx = db.transaction('kv', mode);
    const req = fn(tx.objectStore('kv'));
    tx.oncomplete = () => resolve(req.result);
    tx.onerror = () => reject(tx.error);
  });
}
const dbGet = (key) => kv('readonly', (s) => s.get(key));
const dbPut = (key, value) => kv('readwrite', (s) => s.put(value, key));
const dbDel = (key) => kv('readwrite', (s) => s.delete(key));
const CHANNEL_KEY = `channel:${location.host}`;

async function loadKey() {
  let hex = await dbGet('k1');
  if (!hex) {
    hex = ps.bytesToHex(ps.newSecret());
    await dbPut('k1', hex);
  }
  return ps.hexToBytes(hex);
}

/** Everything needed to resume, refund or audit the channel (stored before each pay). */
function channelRecord() {
  return {
    channel_id: app.channelId, kind: 'cltv', expiry: app.expiry, value: app.value,
    balance: app.balance, seq: app.seq, budget: app.budget, network: app.network,
    witness_script: app.witnessScript, change_script: ps.bytesToHex(ps.p2wpkhScript(clientPub)),
    meter: meter.toJSON(), media: app.media,
  };
}
const saveChannel = () => dbPut(CHANNEL_KEY, channelRecord());

// -- the session ------------------------------------------------------------------

function status(text) {
  $('status').textContent = text;
}

function fail(text) {
  app.errors.push(text);
  status(text);
}

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

function connect() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  ws = new WebSocket(`${scheme}://${location.host}/paystream/2`);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => send({ type: 'hello', version: 2, agent: AGENT });
  ws.onmessage = (ev) => {
    queue = queue.then(() => onMessage(ev.data)).catch((e) => fail(`player error: ${e.message}`));
  };
  ws.onclose = () => {
    const socket = ws;
    queue = queue.then(() => onSocketClosed(socket));
  };
}

async function onSocketClosed(socket) {
  if (socket !== ws || leaving || app.closed || app.overcharged) return;
  if (app.state === 'ready') {
    // A dropped connection: the gateway keeps the channel for resume_grace_s.
    status('Connection lost; resuming the channel…');
    app.state = 'reconnecting';
    setTimeout(connect, 1000);
  }
}

async function onMessage(data) {
  if (typeof data !== 'string') {
    if (!pendingChunk) throw new Error('binary frame without a chunk message');
    const chunk = pendingChunk;
    pendingChunk = null;
    return onMedia(chunk, new Uint8Array(data));
  }
  const msg = JSON.parse(data);
  const handler = HANDLERS[msg.type];
  if (handler) await handler(msg);
}

const HANDLERS = {
  async hello(msg) {
    hello = msg;
    hello.nonceBytes = ps.hexToBytes(msg.nonce);
    if (msg.network !== app.network) throw new Error('the gateway changed network');
    const stored = await dbGet(CHANNEL_KEY);
    if (stored && stored.channel_id) {
      restoreChannel(stored);
      app.state = 'resuming';
      status(`Resuming channel ${stored.channel_id}…`);
      send({ type: 'resume', channel_id: stored.channel_id,
        proof: ps.bytesToHex(ps.resumeProof(secret, stored.channel_id, hello.nonceBytes)) });
      return;
    }
    if (app.state === 'reconnecting') return;
    showBudget();
  },

  async terms(msg) {
    app.witnessScript = ps.bytesToHex(ps.checkTerms(msg, { kind: 'cltv', clientPub,
      expiry: app.expiry, network: app.network, changeScript: ps.p2wpkhScript(clientPub) }));
    app.exitFee = msg.exit_fee;
    meter.reserve = msg.exit_fee;
    app.state = 'funding';
    app.funding = { address: msg.funding_address, amount: app.budget };
    // Fund without txid: the gateway watches the address (protocol.md section 5),
    // so any wallet can pay it.
    send({ type: 'fund' });
    showFunding(msg.funding_address, app.budget);
  },

  async funding(msg) {
    status(`Funding ${msg.txid}:${msg.vout}: ${msg.confirmations}/${msg.needed} confirmations`);
  },

  async ready(msg) {
    if (app.state === 'resuming' || app.state === 'reconnecting') {
      // The gateway may lack our last increment (lost in flight): its balance
      // may be higher than ours, never lower; we keep ours.
      if (msg.channel_id !== app.channelId || msg.value !== app.value
          || msg.expiry !== app.expiry || msg.exit_fee !== meter.reserve
          || msg.balance < app.balance) {
        throw new Error('ready: the gateway does not agree on the channel');
      }
      app.resumed = true;
    } else {
      const [txid, vout] = msg.channel_id.split(':');
      app.channelId = msg.channel_id;
      app.value = msg.value;
      app.balance = msg.value;
      app.budget = Math.min(app.budget, msg.value);
      makeTemplate(txid, Number(vout));
      await saveChannel();
    }
    app.state = 'ready';
    $('funding').hidden = true;
    $('budget').hidden = true;
    status(`Channel ${app.channelId} ready`);
    play(app.media, Math.floor((video.currentTime || 0) * 1000));
  },

  async stream(msg) {
    awaitingStream = false;
    meter.onStream(msg);
    const fresh = !app.stream || app.stream.media !== msg.media;
    app.stream = msg;
    app.media = msg.media;
    app.rateMsat = msg.rate_msat;
    app.freeMs = msg.free_ms;
    pendingDue = null;
    $('title').textContent = msg.title;
    document.title = `${msg.title} · Paystream`;
    if (fresh) newMediaSource(msg.mime);
    status(`Playing ${msg.title}`);
  },

  async chunk(msg) {
    pendingChunk = msg;
  },

  async due(msg) {
    if (awaitingStream) return; // that stream is being replaced
    pendingDue = msg;
    await tryPay();
  },

  async paid(msg) {
    if (msg.seq > app.seq || msg.balance < app.balance) {
      throw new Error('paid: not an increment this page signed');
    }
  },

  async end(msg) {
    if (msg.reason === 'finished' && msg.media === app.media) mse.ending = true;
    pump();
  },

  async closed(msg) {
    app.closed = msg;
    app.state = 'closed';
    await dbDel(CHANNEL_KEY);
    status(`Channel closed: paid ${msg.paid} sat`
      + (msg.txid ? `, settlement ${msg.txid}` : ', nothing to settle'));
  },

  async error(msg) {
    if (app.state === 'resuming' && RESUME_FAILURES.has(msg.code)) {
      // The channel is gone (settled, unknown or expiring): start over.
      await dbDel(CHANNEL_KEY);
      forgetChannel();
      status(`Previous channel not resumable (${msg.code}); open a new one`);
      app.state = 'starting';
      ws.onclose = null;
      ws.close();
      connect();
      return;
    }
    fail(`gateway error ${msg.code}: ${msg.message}`);
  },
};

function restoreChannel(c) {
  app.channelId = c.channel_id;
  app.value = c.value;
  app.balance = c.balance;
  app.seq = c.seq;
  app.budget = c.budget;
  app.expiry = c.expiry;
  app.witnessScript = c.witness_script;
  meter = new ps.ClientMeter(c.meter);
  const [txid, vout] = c.channel_id.split(':');
  makeTemplate(txid, Number(vout));
  updateOverlay();
}

function forgetChannel() {
  Object.assign(app, { channelId: null, value: null, balance: null, seq: 0, budget: null,
    expiry: null, witnessScript: null });
  meter = new ps.ClientMeter();
  template = null;
}

function makeTemplate(txid, vout) {
  template = new ps.PaymentTemplate(ps.hexToBytes(app.witnessScript), txid, vout, app.value,
    ps.p2wpkhScript(clientPub));
}

function play(media, startMs = 0) {
  deliveredEndMs = startMs;
  awaitingStream = true;
  pendingDue = null;
  app.plays.push({ media, start_ms: startMs });
  send({ type: 'play', media, start_ms: startMs });
}

// -- paying ------------------------------------------------------------------------

function scheduleTryPay() {
  queue = queue.then(tryPay).catch((e) => fail(`player error: ${e.message}`));
}

async function tryPay() {
  const due = pendingDue;
  if (!due || app.state !== 'ready' || !template) return;
  // Pay as you watch: not more than AHEAD_S seconds of media ahead of playback.
  if (deliveredEndMs / 1000 - video.currentTime > AHEAD_S) return;
  try {
    meter.checkDue(due);
  } catch (e) {
    if (e instanceof ps.OverchargeError) return overcharged(e);
    throw e;
  }
  const paid = app.value - app.balance;
  let balance = app.value - due.total;
  if (due.total <= paid) {
    balance = app.balance; // after a resume: re-send our last state with a new seq
  } else if (due.total > app.budget) {
    pendingDue = null;
    status(`Budget of ${app.budget} sat reached: closing the channel`);
    return closeChannel();
  } else if (balance > 0 && balance < ps.DUST_LIMIT) {
    balance = 0; // a balance of 1-545 sat cannot exist (section 3): the rest is dust
  }
  const sig = template.sign(secret, balance);
  app.seq += 1;
  app.balance = balance;
  meter.paid(due);
  pendingDue = null;
  await saveChannel(); // durable before it leaves: never sign this seq twice
  send({ type: 'pay', seq: app.seq, balance, sig: ps.bytesToHex(sig) });
  updateOverlay();
}

function overcharged(e) {
  app.overcharged = { total: e.due.total, figure: e.figure };
  pendingDue = null;
  fail(`Refused: ${e.message}. Closing the channel.`);
  closeChannel();
}

function closeChannel() {
  if (app.closed) return;
  app.state = 'closing';
  send({ type: 'close' });
}

// -- MediaSource playback --------------------------------------------------------

const mse = { source: null, buffer: null, mime: null, queue: [], ending: false, open: null };

function newMediaSource(mime) {
  if (!window.MediaSource || !MediaSource.isTypeSupported(mime)) {
    throw new Error(`this browser cannot play ${mime} through MediaSource`);
  }
  const source = new MediaSource();
  Object.assign(mse, { source, buffer: null, mime, queue: [], ending: false });
  autoplayTried = false;
  mse.open = new Promise((resolve) => source.addEventListener('sourceopen', resolve,
    { once: true }));
  video.src = URL.createObjectURL(source);
}

async function onMedia(chunk, bytes) {
  if (chunk.size !== bytes.length) throw new Error('chunk size mismatch');
  meter.onChunk(chunk);
  if (chunk.index >= 0) deliveredEndMs = chunk.start_ms + chunk.duration_ms;
  // A chunk sent without a due is billed too: keep the bill a reload resumes from.
  if (app.channelId && chunk.index >= 0) await saveChannel();
  mse.queue.push(bytes);
  await mse.open;
  if (!mse.buffer) {
    // The whole length, so that the controls show it and a seek past what
    // was delivered is not clamped to the buffered end.
    if (app.stream && Number.isNaN(mse.source.duration)) {
      mse.source.duration = app.stream.duration_ms / 1000;
    }
    mse.buffer = mse.source.addSourceBuffer(mse.mime);
    mse.buffer.addEventListener('updateend', pump);
  }
  pump();
  if (chunk.index >= 0) startPlayback();
  updateOverlay();
}

function pump() {
  const { buffer, source } = mse;
  if (!buffer || buffer.updating) return;
  if (mse.queue.length) {
    buffer.appendBuffer(mse.queue.shift());
  } else if (mse.ending && source.readyState === 'open') {
    source.endOfStream();
  }
}

let autoplayTried = false;
function startPlayback() {
  if (autoplayTried) return;
  autoplayTried = true;
  video.play().catch(() => {
    // Autoplay with sound needs a user gesture: start muted instead.
    video.muted = true;
    return video.play();
  }).catch(() => status('Press play to start'));
}

function isBuffered(t) {
  for (let i = 0; i < video.buffered.length; i += 1) {
    if (video.buffered.start(i) <= t + 0.05 && t < video.buffered.end(i) - 0.05) return true;
  }
  return false;
}

video.addEventListener('seeking', () => {
  // Seek outside what was delivered: restart the stream there (the gateway
  // meters by media delivered, so a re-delivered chunk is paid again).
  if (app.state === 'ready' && app.stream && !isBuffered(video.currentTime)) {
    mse.ending = false;
    play(app.media, Math.floor(video.currentTime * 1000));
  }
});

// -- the page ---------------------------------------------------------------------

function updateOverlay() {
  $('o-time').textContent = video.currentTime.toFixed(1);
  const used = app.stream ? meter.used[app.stream.media] ?? 0 : 0;
  $('o-free').textContent = app.freeMs === null ? '-'
    : (Math.max(0, app.freeMs - used) / 1000).toFixed(1);
  app.paid = app.value === null ? 0 : app.value - app.balance;
  $('o-paid').textContent = String(app.paid);
  $('o-balance').textContent = app.balance === null ? '-' : String(app.balance);
  $('o-rate').textContent = app.rateMsat === null ? '-' : String(app.rateMsat / 1000);
}

function suggestedBudget(item) {
  const limits = hello.limits;
  const full = item ? Math.ceil(item.rate_msat * Math.max(0, item.duration_ms
    - item.free_seconds * 1000) / 1e6) : 0;
  return Math.min(limits.max_value, Math.max(limits.min_value, full + 1000));
}

function showBudget() {
  const limits = hello.limits;
  const item = catalog.find((i) => i.id === app.media);
  app.state = 'budget';
  $('budget').hidden = false;
  const input = $('budget-sat');
  input.min = String(limits.min_value);
  input.max = String(limits.max_value);
  input.value = String(suggestedBudget(item));
  $('budget-hint').textContent = `Between ${limits.min_value} and ${limits.max_value} sat. `
    + (item ? `The whole of this item costs about ${Math.ceil(item.rate_msat
      * Math.max(0, item.duration_ms - item.free_seconds * 1000) / 1e6)} sat.` : '');
  status('Confirm a budget to start');
}

function openChannel(budget) {
  const limits = hello.limits;
  const now = Math.floor(Date.now() / 1000);
  // A day, inside the advertised window and well clear of the settle margin.
  const seconds = Math.min(Math.max(86_400, limits.min_expiry_s + 600,
    limits.settle_margin_s + 3600), limits.max_expiry_s - 600);
  app.budget = budget;
  app.expiry = now + seconds;
  app.state = 'opening';
  $('budget').hidden = true;
  send({ type: 'open', kind: 'cltv', client_pubkey: ps.bytesToHex(clientPub),
    expiry: app.expiry, change_script: ps.bytesToHex(ps.p2wpkhScript(clientPub)) });
  status('Opening a channel…');
}

function showFunding(address, sats) {
  const uri = ps.bip21(address, sats);
  $('fund-address').textContent = address;
  $('fund-amount').textContent = (sats / 1e8).toFixed(8);
  $('fund-uri').textContent = uri;
  const qr = qrcode(0, 'M');
  qr.addData(uri);
  qr.make();
  $('fund-qr').src = qr.createDataURL(4, 8);
  $('faucet').hidden = app.network !== 'regtest';
  $('funding').hidden = false;
  status('Waiting for the funding transaction…');
}

async function faucet() {
  $('faucet').disabled = true;
  const { address, amount } = app.funding;
  const url = `/api/faucet?address=${encodeURIComponent(address)}&amount=${amount}`;
  const res = await fetch(url, { method: 'POST' });
  const body = await res.json();
  if (!res.ok) {
    $('faucet').disabled = false;
    return fail(`faucet: ${body.error}`);
  }
  app.faucet = body;
  status(`Faucet paid ${body.txid}:${body.vout}; waiting for the gateway…`);
}

async function exportKey() {
  const record = { network: app.network, k1_secret: ps.bytesToHex(secret),
    k1_pubkey: ps.bytesToHex(clientPub), channel: app.channelId ? channelRecord() : null };
  const text = JSON.stringify(record, null, 1);
  $('export-out').textContent = text;
  $('export-out').hidden = false;
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([text], { type: 'application/json' }));
  a.download = 'paystream-key.json';
  a.click();
}

function onLeave() {
  // Leaving settles the channel at once (protocol.md section 8). Unticked,
  // the channel stays open for the resume grace and a reload resumes it.
  if (leaving) return;
  leaving = true;
  if ($('close-on-leave').checked && app.channelId && !app.closed) send({ type: 'close' });
}

async function main() {
  secret = await loadKey();
  clientPub = ps.publicKey(secret);
  catalog = await (await fetch('/api/catalog')).json();
  const select = $('switch');
  for (const item of catalog) {
    const option = new Option(`Switch to: ${item.title}`, item.id, false, item.id === app.media);
    select.add(option);
  }
  select.addEventListener('change', () => {
    if (app.state === 'ready' && select.value !== app.media) {
      history.replaceState(null, '', `/watch/${encodeURIComponent(select.value)}`);
      play(select.value, 0);
    }
  });
  $('budget-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const budget = Number($('budget-sat').value);
    const { min_value: lo, max_value: hi } = hello.limits;
    if (!Number.isSafeInteger(budget) || budget < lo || budget > hi) {
      return fail(`The budget must be between ${lo} and ${hi} sat`);
    }
    openChannel(budget);
  });
  $('faucet').addEventListener('click', () => faucet().catch((e) => fail(e.message)));
  $('stop').addEventListener('click', () => { if (app.state === 'ready') send({ type: 'stop' }); });
  $('leave').addEventListener('click', closeChannel);
  $('export').addEventListener('click', () => exportKey().catch((e) => fail(e.message)));
  window.addEventListener('pagehide', onLeave);
  window.addEventListener('beforeunload', onLeave);
  video.addEventListener('timeupdate', scheduleTryPay);
  setInterval(() => { updateOverlay(); scheduleTryPay(); }, 250);
  connect();
}

main().catch((e) => fail(`player error: ${e.message}`));
