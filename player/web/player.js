// The browser player (/watch/<id>): one WebSocket session of protocol.md,
// MediaSource playback of the chunks it delivers, K1 and the channel records
// in IndexedDB (records.js). A live item plays over WebRTC when the browser
// can (`play.webrtc`, protocol.md section 11: the media on a peer connection,
// each live second paid on the session), else over MediaSource like a file
// (`?mse=1` forces it).
//
// Money rules kept here (design.md, docs/web.md): the viewer confirms a
// budget before any funding, after seeing what a session costs and what
// leaving costs; the channel's record (its script and expiry) is stored
// before it is funded, and a multisig channel's gateway-signed refund before
// its funding is broadcast (protocol.md section 2); each `due` is checked
// against the page's own section 7 bill (paystream.js ClientMeter) and an
// overcharge closes the channel; the page pays for the next chunk only when
// less than LEAD_S seconds of media is left to play; every signed state is
// stored before its `pay` leaves; a record is deleted only once its money is
// back (records.js).

import qrcode from 'qrcode-generator';
import * as ps from './paystream.js';
import * as records from './records.js';

const $ = (id) => document.getElementById(id);
const video = $('video');
const params = new URLSearchParams(location.search);
/**
 * The page pays for the next chunk only when less than this many seconds of
 * delivered media are left to play: what was paid and not watched is lost on
 * leaving, so the lead is small (`?lead=N` in the URL changes it).
 */
const LEAD_S = Number(params.get('lead')) > 0 ? Number(params.get('lead')) : 1;
/** The longest chunk (protocol.md section 7): the most a `pay` adds beyond the lead. */
const CHUNK_MAX_S = 2;
/** `?expiry_blocks=N`: a height expiry N blocks ahead instead of a day's time expiry. */
const EXPIRY_BLOCKS = Number(params.get('expiry_blocks')) > 0
  ? Math.floor(Number(params.get('expiry_blocks'))) : null;
const AGENT = 'paystream-web/0.2';
/** Live items go over WebRTC unless the browser has none or `?mse=1`. */
const RTC_WANTED = typeof RTCPeerConnection === 'function' && params.get('mse') !== '1';
const RESUME_FAILURES = new Set(['channel_unknown', 'channel_closed', 'channel_expiring',
  'bad_signature', 'session_replaced']);

/** Page state, also read by the browser tests (window.paystream). */
const app = {
  state: 'starting', network: document.body.dataset.network, media: document.body.dataset.media,
  key: null, kind: 'cltv', channelId: null, value: null, balance: null, seq: 0, budget: null,
  expiry: null, exitFee: 0, exitVbytes: 0, paid: 0, rateMsat: null, freeMs: null, stream: null,
  closed: null, overcharged: null, errors: [], resumed: false, funding: null, faucet: null,
  plays: [], lead: LEAD_S, freeLeftMs: null, reorgs: 0, payBinary: false, binaryPays: 0,
  live: document.body.dataset.live === '1', transport: null, intervals: 0, framesDecoded: 0,
  ended: false, watching: false, deliveredMs: 0,
};
window.paystream = app;

let secret;
let clientPub;
let changeScript;
let ws = null;
let hello = null;
let template = null;
let meter = new ps.ClientMeter();
let pendingChunk = null;
let pendingDue = null;
// The `pay` being stored and sent: a `close` goes after it, so the gateway
// settles the page's last figure (protocol.md section 8: the last pay it received).
let paying = null;
let queue = Promise.resolve();
let leaving = false;
let deliveredEndMs = 0;
// Between a `play` and its `stream`, dues of the stream being replaced are not paid.
let awaitingStream = false;
// Where the current stream started and how much of its free allowance was left then.
let streamStartMs = 0;
let catalog = [];
/** The live item's peer connection (WebRTC transport), if any. */
let rtc = null;
let rtcWanted = RTC_WANTED;
let chain = null;
let follower = null;
/** Records this page will not resume again (refused, or playing in another tab). */
const skipResume = new Set();

// -- the channel record (records.js) ------------------------------------------------

/** The live channel's own fields, merged into its record before each `pay`. */
const sessionFields = () => ({
  balance: app.balance, seq: app.seq, meter: meter.toJSON(), media: app.media,
  budget: app.budget,
});
const saveChannel = () => records.patchRecord(app.key, sessionFields());

/**
 * The funding output is known (txid:vout, and its value once known): the
 * record moves under the channel id and, for cltv, keeps a signed refund.
 */
async function fundedRecord(txid, vout, value) {
  const channelId = `${txid}:${vout}`;
  const rec = await records.getRecord(app.key);
  const patch = { txid, vout, channel_id: channelId };
  if (value != null && rec.value == null) {
    Object.assign(patch, { value, balance: rec.balance ?? value });
    if (rec.kind === 'cltv') Object.assign(patch, records.cltvRefundFields({ ...rec, ...patch }, secret));
  }
  if (rec.status === 'unfunded' && rec.kind === 'cltv') patch.status = 'open';
  await records.patchRecord(app.key, patch, channelId);
  app.key = channelId;
  app.channelId = channelId;
}

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

const later = (fn) => {
  queue = queue.then(fn).catch((e) => fail(`player error: ${e.message}`));
  return queue;
};

function connect() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  ws = new WebSocket(`${scheme}://${location.host}/paystream/2`);
  ws.binaryType = 'arraybuffer';
  ws.onopen = () => send({ type: 'hello', version: 2, agent: AGENT });
  ws.onmessage = (ev) => later(() => onMessage(ev.data));
  ws.onclose = () => {
    const socket = ws;
    later(() => onSocketClosed(socket));
  };
}

async function onSocketClosed(socket) {
  if (socket !== ws || leaving || app.closed || app.overcharged) return;
  if (['ready', 'reorg'].includes(app.state)) {
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

/** The newest record of this gateway the page may resume: funded, open at the gateway. */
async function resumable() {
  const all = await records.allRecords();
  return all.filter((r) => r.status === 'open' && r.channel_id && r.value != null
    && r.gateway_url === location.origin && !skipResume.has(r.key))
    .sort((a, b) => b.created_at - a.created_at)[0] ?? null;
}

function sendResume() {
  send({ type: 'resume', channel_id: app.channelId,
    proof: ps.bytesToHex(ps.resumeProof(secret, app.channelId, hello.nonceBytes)) });
}

const HANDLERS = {
  async hello(msg) {
    hello = msg;
    hello.nonceBytes = ps.hexToBytes(msg.nonce);
    app.payBinary = (msg.features ?? []).includes(ps.FEATURE_PAY_BINARY);
    if (msg.network !== app.network) throw new Error('the gateway changed network');
    if (app.state === 'reconnecting' && app.channelId) {
      sendResume();
      return;
    }
    const stored = await resumable();
    if (stored) {
      restoreChannel(stored);
      app.state = 'resuming';
      status(`Resuming channel ${stored.channel_id}…`);
      sendResume();
      return;
    }
    showBudget();
  },

  async terms(msg) {
    const kind = app.kind;
    const script = ps.checkTerms(msg, { kind, clientPub, expiry: app.expiry,
      network: app.network, changeScript });
    app.witnessScript = ps.bytesToHex(script);
    app.exitFee = msg.exit_fee;
    app.exitVbytes = msg.exit_vbytes;
    meter.reserve = msg.exit_fee;
    app.key = `unfunded:${msg.funding_address}`;
    // The record first: once money reaches the address, only it (the
    // witness script and expiry) lets K1 spend it.
    await records.addRecord({
      key: app.key, status: 'unfunded', kind, network: app.network,
      gateway_url: location.origin, created_at: Date.now() / 1000, expiry: app.expiry,
      client_pubkey: ps.bytesToHex(clientPub), server_pubkey: msg.server_pubkey,
      witness_script: app.witnessScript, funding_script: msg.funding_script,
      funding_address: msg.funding_address, change_script: ps.bytesToHex(changeScript),
      exit_fee: msg.exit_fee, exit_vbytes: msg.exit_vbytes, channel_id: null, txid: null,
      vout: null, value: null, balance: null, seq: 0, budget: app.budget, media: app.media,
      note: `Waiting for ${app.budget} sat at ${msg.funding_address}.`,
    });
    app.state = 'funding';
    app.funding = { address: msg.funding_address, script: msg.funding_script,
      amount: app.budget };
    if (kind === 'cltv') {
      // Fund without txid: the gateway watches the address (protocol.md
      // section 5), so any wallet can pay it.
      send({ type: 'fund' });
    }
    showFunding(msg, app.budget);
  },

  async refund_signed(msg) {
    const rec = await records.getRecord(app.key);
    const unsigned = ps.hexToBytes(rec.refund_unsigned);
    const sig = ps.hexToBytes(msg.sig);
    const script = ps.hexToBytes(rec.witness_script);
    ps.checkRefundSignature(unsigned, script, rec.value, ps.hexToBytes(rec.server_pubkey), sig);
    const signed = ps.finalizeMultisigRefund(unsigned, script, rec.value, secret, sig);
    // Stored before T1 is broadcast (section 2): from now on the money can
    // only come back, by the settlement or by this refund after expiry.
    await records.patchRecord(app.key, { signed_refund: ps.bytesToHex(signed),
      refund_server_sig: msg.sig, note: 'The gateway signed the refund; funding now.' });
    app.refundSigned = true;
    status('The gateway signed the refund (checked); the gateway broadcasts the funding…');
    send({ type: 'fund', txid: rec.txid, vout: rec.vout, tx: app.t1 });
  },

  async funding(msg) {
    app.fundingSeen = msg; // the gateway has the funding output
    if (app.key && app.key.startsWith('unfunded:')) await fundedRecord(msg.txid, msg.vout, null);
    app.channelId = `${msg.txid}:${msg.vout}`;
    status(app.state === 'reorg'
      ? `The funding lost its confirmations (reorg): waiting, ${msg.confirmations}/`
        + `${msg.needed} confirmations`
      : `Funding ${msg.txid}:${msg.vout}: ${msg.confirmations}/${msg.needed} confirmations`);
  },

  async ready(msg) {
    if (['resuming', 'reconnecting', 'reorg'].includes(app.state)) {
      // The gateway may lack our last increment (lost in flight): its balance
      // may be higher than ours, never lower; we keep ours.
      if (msg.channel_id !== app.channelId || msg.value !== app.value
          || msg.expiry !== app.expiry || msg.exit_fee !== meter.reserve
          || msg.balance < app.balance) {
        throw new Error('ready: the gateway does not agree on the channel');
      }
      app.resumed = app.resumed || app.state !== 'reorg';
    } else {
      const [txid, vout] = msg.channel_id.split(':');
      await fundedRecord(txid, Number(vout), msg.value);
      app.value = msg.value;
      app.balance = msg.value;
      app.budget = Math.min(app.budget, msg.value);
      makeTemplate(txid, Number(vout));
      await records.patchRecord(app.key, { status: 'open', note: null, ...sessionFields() });
    }
    app.state = 'ready';
    $('funding').hidden = true;
    $('budget').hidden = true;
    $('channel-controls').hidden = false;
    status(`Channel ${app.channelId} ready`);
    showLead();
    await play(app.media, Math.floor((video.currentTime || 0) * 1000));
  },

  async stream(msg) {
    awaitingStream = false;
    meter.onStream(msg);
    const fresh = !app.stream || app.stream.media !== msg.media;
    app.stream = msg;
    app.media = msg.media;
    app.rateMsat = msg.rate_msat;
    app.freeMs = msg.free_ms;
    app.freeAtStartMs = msg.free_ms - msg.free_used_ms;
    pendingDue = null;
    $('title').textContent = msg.title;
    document.title = `${msg.title} · Paystream`;
    if (msg.live && app.transport === 'webrtc') {
      // The media comes on the peer connection (webrtc_answer), not as chunks.
    } else if (fresh || msg.live) {
      newMediaSource(msg.mime);
    }
    showLead();
    status(`Playing ${msg.title}`);
  },

  async chunk(msg) {
    pendingChunk = msg;
  },

  async webrtc_answer(msg) {
    if (!rtc || msg.media !== app.media) return;
    await rtc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
  },

  async interval(msg) {
    // A live second flows on the peer connection: metered as a chunk (section 11).
    meter.onChunk(msg);
    app.intervals += 1;
    app.deliveredMs += msg.duration_ms;
    deliveredEndMs = msg.start_ms + msg.duration_ms;
    if (app.key) await saveChannel();
    updateOverlay();
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
    if (msg.reason === 'finished' && msg.media === app.media) {
      mse.ending = true;
      if (app.stream?.live) {
        app.ended = true;
        closeRtc();
        status(`${app.stream.title}: the live stream ended`);
      }
    }
    pump();
  },

  async closed(msg) {
    app.closed = msg;
    app.state = 'closed';
    $('channel-controls').hidden = true;
    const reserve = Math.min(msg.paid, msg.exit_fee);
    const paidLine = `Channel closed: paid ${msg.paid} sat (exit reserve ${reserve} + media `
      + `${msg.paid - reserve}).`;
    let patch;
    if (msg.txid) {
      patch = { status: 'settling', settlement: { txid: msg.txid, confirmations: 0 },
        note: `Settlement ${msg.txid} broadcast.` };
      status(`${paidLine} Settlement ${msg.txid} broadcast: your change ${msg.balance} sat `
        + 'comes back when it confirms; the page checks it (below).');
    } else if (msg.settle_by) {
      patch = { status: 'closing', settle_by: msg.settle_by };
      status(`${paidLine} The settlement goes out by `
        + `${new Date(msg.settle_by * 1000).toLocaleTimeString()}: your change `
        + `${msg.balance} sat comes back then.`);
    } else {
      const rec = await records.getRecord(app.key);
      patch = { status: 'refund_wait' };
      status(`${paidLine} Nothing was paid, so nothing is settled: this page refunds your `
        + `${msg.balance} sat (less a network fee of ${rec.refund_fee ?? '?'} sat) after `
        + `${records.expiryText(app.expiry)}. Keep this browser's data or download the backup.`);
    }
    await records.patchRecord(app.key, { ...patch, ...sessionFields() });
    follower?.now();
  },

  async error(msg) {
    if (['resuming', 'reconnecting'].includes(app.state) && RESUME_FAILURES.has(msg.code)) {
      // Not resumable here: keep the record (the follower finds where its
      // money is) and open a new channel.
      skipResume.add(app.key);
      if (msg.code !== 'session_replaced') {
        const note = `Resume refused (${msg.code}).`;
        // The follower may have found its settlement already: keep what it saw.
        await records.patchRecord(app.key, (rec) => (rec.settlement ? { note }
          : { status: msg.code === 'channel_unknown' ? 'unknown' : 'closing', note }));
      }
      forgetChannel();
      status(`Previous channel not resumable (${msg.code}); open a new one`);
      app.state = 'starting';
      ws.onclose = null;
      ws.close();
      connect();
      return;
    }
    if (msg.code === 'funding_lost') {
      // Section 4: no media and no payments until `ready` comes again.
      app.state = 'reorg';
      app.reorgs += 1;
      pendingDue = null;
      awaitingStream = true;
      status('The funding lost its confirmations (reorg): waiting');
      return;
    }
    if (msg.code === 'bad_message' && app.transport === 'webrtc' && app.state === 'ready') {
      // The gateway cannot take this browser's offer: watch over MediaSource.
      rtcWanted = false;
      await play(app.media, 0);
      return;
    }
    if (msg.code === 'session_replaced') {
      app.state = 'replaced';
      $('channel-controls').hidden = true;
      status('This channel is now playing in another tab or window');
      return;
    }
    fail(`gateway error ${msg.code}: ${msg.message}`);
  },
};

function restoreChannel(c) {
  Object.assign(app, { key: c.key, channelId: c.channel_id, value: c.value, balance: c.balance,
    seq: c.seq, budget: c.budget, expiry: c.expiry, witnessScript: c.witness_script,
    kind: c.kind, exitFee: c.exit_fee, exitVbytes: c.exit_vbytes });
  meter = new ps.ClientMeter(c.meter ?? { reserve: c.exit_fee });
  meter.reserve = c.exit_fee;
  makeTemplate(c.txid, c.vout);
  updateOverlay();
}

function forgetChannel() {
  Object.assign(app, { key: null, channelId: null, value: null, balance: null, seq: 0,
    budget: null, expiry: null, witnessScript: null, exitFee: 0, exitVbytes: 0 });
  meter = new ps.ClientMeter();
  template = null;
}

function makeTemplate(txid, vout) {
  template = new ps.PaymentTemplate(ps.hexToBytes(app.witnessScript), txid, vout, app.value,
    changeScript);
}

async function play(media, startMs = 0) {
  deliveredEndMs = startMs;
  streamStartMs = startMs;
  awaitingStream = true;
  pendingDue = null;
  closeRtc();
  const live = Boolean(catalog.find((i) => i.id === media)?.live);
  app.plays.push({ media, start_ms: startMs });
  if (live && rtcWanted) {
    app.transport = 'webrtc';
    send({ type: 'play', media, start_ms: startMs, webrtc: await rtcOffer() });
  } else {
    app.transport = 'mse';
    send({ type: 'play', media, start_ms: startMs });
  }
}

// -- WebRTC (live items) -------------------------------------------------------------

/** A receive-only peer connection's complete offer (no trickle: section 11). */
async function rtcOffer() {
  const pc = new RTCPeerConnection({ iceServers: [] });
  rtc = pc;
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.addTransceiver('audio', { direction: 'recvonly' });
  const stream = new MediaStream();
  pc.addEventListener('track', (ev) => {
    stream.addTrack(ev.track);
    if (video.srcObject !== stream) {
      video.removeAttribute('src');
      video.srcObject = stream;
    }
    startPlayback();
  });
  pc.addEventListener('connectionstatechange', () => {
    if (pc === rtc && pc.connectionState === 'failed' && app.state === 'ready' && !app.ended) {
      // No path for media (a firewall, no common address): MediaSource instead.
      rtcWanted = false;
      later(() => play(app.media, 0));
    }
  });
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== 'complete') {
    await new Promise((resolve) => {
      pc.addEventListener('icegatheringstatechange', () => {
        if (pc.iceGatheringState === 'complete') resolve();
      });
    });
  }
  return pc.localDescription.sdp;
}

function closeRtc() {
  if (!rtc) return;
  rtc.close();
  rtc = null;
}

/** Video frames decoded so far (getStats), for the overlay and the tests. */
async function pollRtcStats() {
  if (!rtc) return;
  const stats = await rtc.getStats();
  stats.forEach((report) => {
    if (report.type === 'inbound-rtp' && report.kind === 'video') {
      app.framesDecoded = report.framesDecoded ?? 0;
    }
  });
}

// -- paying ------------------------------------------------------------------------

async function tryPay() {
  const due = pendingDue;
  if (!due || app.state !== 'ready' || !template) return;
  // Pay as you watch: the next chunk only once less than LEAD_S of media is left.
  // Over WebRTC the gateway asks for a live second only as it reaches it;
  // a viewer who paused stops paying (and the gateway stops the media).
  if (app.transport === 'webrtc' ? app.watching && video.paused : leadS() >= LEAD_S) return;
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
  const seq = app.seq;
  paying = (async () => {
    await saveChannel(); // durable before it leaves: never sign this seq twice
    if (app.payBinary) {
      // The compact frame the gateway offered: no hex, no JSON (section 5a).
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(ps.encodePayBinary(seq, balance, sig));
      app.binaryPays += 1;
    } else {
      send({ type: 'pay', seq, balance, sig: ps.bytesToHex(sig) });
    }
  })();
  try {
    await paying;
  } finally {
    paying = null;
  }
  updateOverlay();
}

/** Seconds of delivered media left to play. */
function leadS() {
  if (app.stream?.live) {
    // A live fragment's media time is the packager's, not live time: the buffer says.
    const n = video.buffered.length;
    return n ? video.buffered.end(n - 1) - video.currentTime : 0;
  }
  return deliveredEndMs / 1000 - video.currentTime;
}

function overcharged(e) {
  app.overcharged = { total: e.due.total, figure: e.figure };
  pendingDue = null;
  fail(`Refused: ${e.message}. Closing the channel.`);
  closeChannel();
}

async function closeChannel() {
  if (app.closed || !app.channelId) return;
  app.state = 'closing'; // no new pay from here
  if (paying) await paying.catch(() => {});
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
  video.srcObject = null;
  mse.open = new Promise((resolve) => source.addEventListener('sourceopen', resolve,
    { once: true }));
  video.src = URL.createObjectURL(source);
}

async function onMedia(chunk, bytes) {
  if (chunk.size !== bytes.length) throw new Error('chunk size mismatch');
  meter.onChunk(chunk);
  if (chunk.index >= 0) {
    deliveredEndMs = chunk.start_ms + chunk.duration_ms;
    app.deliveredMs += chunk.duration_ms;
  }
  // A chunk sent without a due is billed too: keep the bill a reload resumes from.
  if (app.key && chunk.index >= 0) await saveChannel();
  mse.queue.push(bytes);
  await mse.open;
  if (!mse.buffer) {
    // The whole length, so that the controls show it and a seek past what
    // was delivered is not clamped to the buffered end.
    if (app.stream && !app.stream.live && Number.isNaN(mse.source.duration)) {
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
  if (app.stream?.live && video.buffered.length && video.currentTime < video.buffered.start(0)) {
    video.currentTime = video.buffered.start(0); // live: start at the first fragment
  }
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
  if (app.state === 'ready' && app.stream && !app.stream.live && !isBuffered(video.currentTime)) {
    mse.ending = false;
    play(app.media, Math.floor(video.currentTime * 1000));
  }
});
video.addEventListener('pause', () => {
  if (app.state === 'ready' && !video.ended) status('Paused');
});
video.addEventListener('playing', () => {
  app.watching = true;
  if (app.state === 'ready' && app.stream) status(`Playing ${app.stream.title}`);
});

// -- the page ---------------------------------------------------------------------

/** Free media left to *play* (section 7 counts delivered media; the viewer counts watched). */
function freeLeftMs() {
  if (!app.stream) return null;
  const played = Math.max(0, video.currentTime * 1000 - streamStartMs);
  return Math.max(0, app.freeAtStartMs - played);
}

function updateOverlay() {
  $('o-time').textContent = video.currentTime.toFixed(1);
  app.freeLeftMs = freeLeftMs();
  $('o-free').textContent = app.freeLeftMs === null ? '-' : (app.freeLeftMs / 1000).toFixed(1);
  app.paid = app.value === null || app.balance === null ? 0 : app.value - app.balance;
  app.reservePaid = Math.min(app.paid, app.exitFee);
  app.mediaPaid = app.paid - app.reservePaid;
  $('o-media').textContent = String(app.mediaPaid);
  $('o-reserve').textContent = String(app.reservePaid);
  $('o-balance').textContent = app.balance === null ? '-' : String(app.balance);
  $('o-rate').textContent = app.rateMsat === null ? '-' : String(app.rateMsat / 1000);
}

function showLead() {
  const rate = app.rateMsat ?? catalog.find((i) => i.id === app.media)?.rate_msat;
  const most = rate == null ? '' : `, at most ${Math.ceil(rate * (LEAD_S + CHUNK_MAX_S) / 1000)} `
    + 'sat at this rate';
  $('lead').textContent = `The page pays for the next chunk only when less than ${LEAD_S} s of `
    + `media is left to play: at most ${LEAD_S} s plus one chunk (${LEAD_S + CHUNK_MAX_S} s`
    + `${most}) is paid ahead of what you watched, and lost if you leave.`;
}

/** What a session costs before funding (protocol.md sections 3 and 7). */
/** A live item has no length: priced as if it lasted this long (seconds). */
const LIVE_PRICED_S = 3600;

function costsText(item, exit) {
  const length = item.live ? LIVE_PRICED_S * 1000 : item.duration_ms;
  const cost = (seconds) => ps.sessionCost({ rateMsat: item.rate_msat,
    freeMs: Math.round(item.free_seconds * 1000), durationMs: length, seconds });
  const whole = Math.ceil(length / 1000);
  const spans = [5, 30].filter((m) => m * 60 < whole)
    .map((m) => `${m} min costs ${cost(m * 60)} sat`);
  spans.push(item.live ? `an hour of this live item ${cost(whole)} sat`
    : `the whole item (${whole} s) ${cost(whole)} sat`);
  const leaving = exit ? `about ${exit.fee} sat now (${exit.vbytes} vB at ${chain.feerate} sat/vB)`
    : 'not known now';
  return `This item: the first ${item.free_seconds} s are free, then ${item.rate_msat / 1000} `
    + `sat/s. Watching from the start, ${spans.join(', ')} for media. Each channel also pays `
    + `its exit reserve first, once: the network fee that returns your change, ${leaving}. `
    + 'Leaving early costs the reserve and what you watched; the rest comes back to your key.';
}

function suggestedBudget(item, reserve) {
  const limits = hello.limits;
  // A live item: five minutes of it (the viewer may raise it).
  const length = item?.live ? 300_000 : item?.duration_ms;
  const full = item ? ps.sessionCost({ rateMsat: item.rate_msat,
    freeMs: Math.round(item.free_seconds * 1000), durationMs: length,
    seconds: length / 1000 }) : 0;
  return Math.min(limits.max_value, Math.max(limits.min_value, full + reserve + 1000));
}

function showCosts() {
  const item = catalog.find((i) => i.id === app.media);
  const exit = chain?.exit?.[$('kind').value] ?? null;
  app.costs = item ? costsText(item, exit) : '';
  $('costs').textContent = app.costs;
  return { item, exit };
}

function showBudget() {
  const limits = hello.limits;
  app.state = 'budget';
  $('budget').hidden = false;
  $('channel-controls').hidden = true;
  const { item, exit } = showCosts();
  const input = $('budget-sat');
  input.min = String(limits.min_value);
  input.max = String(limits.max_value);
  input.value = String(suggestedBudget(item, exit?.fee ?? 0));
  $('budget-hint').textContent = `Between ${limits.min_value} and ${limits.max_value} sat: `
    + 'the most this channel can ever pay.';
  status('Confirm a budget to start');
}

function openChannel(budget, kind) {
  const limits = hello.limits;
  app.budget = budget;
  app.kind = kind;
  if (EXPIRY_BLOCKS !== null) {
    if (!chain) return fail('The chain tip is not known yet: try again in a moment');
    app.expiry = chain.height + EXPIRY_BLOCKS;
  } else {
    // A day, inside the advertised window and well clear of the settle margin.
    const seconds = Math.min(Math.max(86_400, limits.min_expiry_s + 600,
      limits.settle_margin_s + 3600), limits.max_expiry_s - 600);
    app.expiry = Math.floor(Date.now() / 1000) + seconds;
  }
  app.state = 'opening';
  $('budget').hidden = true;
  send({ type: 'open', kind, client_pubkey: ps.bytesToHex(clientPub), expiry: app.expiry,
    change_script: ps.bytesToHex(changeScript) });
  status('Opening a channel…');
}

function showFunding(terms, sats) {
  const feerate = terms.exit_fee / terms.exit_vbytes;
  let reserve = `Exit reserve: ${terms.exit_fee} sat (${terms.exit_vbytes} vB at `
    + `${+feerate.toFixed(2)} sat/vB), the gateway's exact figure for this channel. It is paid `
    + 'first, before any media, and pays the network fee that returns your change when you '
    + `leave. It expires ${records.expiryText(terms.expiry)}.`;
  if (sats - terms.exit_fee < ps.DUST_LIMIT) {
    reserve += ' This budget cannot pay the reserve and keep a change output: its change '
      + 'comes back only by the refund after expiry.';
  }
  $('reserve-line').textContent = reserve;
  app.reserveLine = reserve;
  const cltv = app.kind === 'cltv';
  $('fund-address-panel').hidden = !cltv;
  $('fund-t1-panel').hidden = cltv;
  if (cltv) {
    const uri = ps.bip21(terms.funding_address, sats);
    $('fund-address').textContent = terms.funding_address;
    $('fund-amount').textContent = (sats / 1e8).toFixed(8);
    $('fund-uri').textContent = uri;
    const qr = qrcode(0, 'M');
    qr.addData(uri);
    qr.make();
    $('fund-qr').src = qr.createDataURL(4, 8);
  } else {
    $('t1-amount').textContent = String(sats);
    $('t1-address').textContent = terms.funding_address;
  }
  $('faucet').hidden = app.network !== 'regtest';
  $('funding').hidden = false;
  status(cltv ? 'Waiting for the funding transaction…' : 'Waiting for a signed T1…');
}

/**
 * Multisig: T1 (signed, not broadcast) pays the funding script. Check it,
 * record it, and ask the gateway to sign T2 (section 2); `refund_signed`
 * then stores T2 and sends `fund`.
 */
async function useT1(txHex) {
  const bytes = ps.hexToBytes(txHex);
  const tx = ps.parseTx(bytes);
  const vout = tx.outputs.findIndex((o) => ps.bytesToHex(o.script) === app.funding.script);
  if (vout < 0) throw new Error('T1 does not pay the funding script');
  if (!tx.inputs.every((i) => i.witness.length && !i.scriptSig.length)) {
    // Section 2: only segwit inputs fix T1's txid before it is broadcast.
    throw new Error('T1 must spend native segwit outputs only (signed, with witnesses)');
  }
  const value = tx.outputs[vout].value;
  const txid = ps.txidOf(bytes);
  const rec = await records.getRecord(app.key);
  const t2 = ps.multisigRefund({ witnessScript: ps.hexToBytes(rec.witness_script), txid, vout,
    value, expiry: rec.expiry, destScript: changeScript });
  const channelId = `${txid}:${vout}`;
  await records.patchRecord(app.key, { txid, vout, channel_id: channelId, value,
    balance: value, refund_unsigned: ps.bytesToHex(t2.tx), refund_fee: t2.fee,
    note: 'Waiting for the gateway to sign the refund; T1 is not broadcast yet.' }, channelId);
  app.key = channelId;
  app.channelId = channelId;
  app.t1 = txHex;
  app.value = value;
  send({ type: 'refund', tx: ps.bytesToHex(t2.tx), value });
  status('Asking the gateway to sign the refund (T2)…');
}

async function faucet() {
  $('faucet').disabled = true;
  const { address, amount } = app.funding;
  const multisig = app.kind === 'multisig';
  const url = `/api/faucet?address=${encodeURIComponent(address)}&amount=${amount}`
    + (multisig ? '&broadcast=0' : '');
  const res = await fetch(url, { method: 'POST' });
  const body = await res.json();
  if (!res.ok) {
    $('faucet').disabled = false;
    return fail(`faucet: ${body.error}`);
  }
  app.faucet = body;
  if (multisig) return later(() => useT1(body.tx));
  status(`Faucet paid ${body.txid}:${body.vout}; waiting for the gateway…`);
  return later(() => (app.value === null && app.key
    ? fundedRecord(body.txid, body.vout, body.amount) : null));
}

function onLeave() {
  // Leaving settles the channel at once (protocol.md section 8). Unticked,
  // the channel stays open for the resume grace and a reload resumes it.
  if (leaving) return;
  leaving = true;
  if ($('close-on-leave').checked && app.channelId && !app.closed
      && ['ready', 'funding', 'reorg', 'reconnecting'].includes(app.state)) {
    send({ type: 'close' });
    if (app.state !== 'funding') {
      // Funding: the follower finds out whether the gateway had it.
      records.patchRecord(app.key, { status: 'closing', note: 'Closed on leaving the page.' })
        .catch(() => {});
    }
  }
}

async function main() {
  secret = await records.loadKey();
  clientPub = ps.publicKey(secret);
  changeScript = ps.p2wpkhScript(clientPub);
  catalog = await (await fetch('/api/catalog')).json();
  const select = $('switch');
  for (const item of catalog) {
    const option = new Option(`Switch to: ${item.title}`, item.id, false, item.id === app.media);
    select.add(option);
  }
  select.addEventListener('change', () => {
    if (app.state === 'ready' && select.value !== app.media) {
      history.replaceState(null, '', `/watch/${encodeURIComponent(select.value)}`);
      later(() => play(select.value, 0));
    }
  });
  $('kind').addEventListener('change', showCosts);
  $('budget-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const budget = Number($('budget-sat').value);
    const { min_value: lo, max_value: hi } = hello.limits;
    if (!Number.isSafeInteger(budget) || budget < lo || budget > hi) {
      return fail(`The budget must be between ${lo} and ${hi} sat`);
    }
    openChannel(budget, $('kind').value);
  });
  $('faucet').addEventListener('click', () => faucet().catch((e) => fail(e.message)));
  $('t1-use').addEventListener('click', () => later(() => useT1($('t1-hex').value.trim())));
  $('stop').addEventListener('click', () => { if (app.state === 'ready') send({ type: 'stop' }); });
  $('leave').addEventListener('click', closeChannel);
  $('backup').addEventListener('click', () => records.downloadBackup(secret, app.network)
    .then((text) => { app.backup = text; }).catch((e) => fail(e.message)));
  window.addEventListener('pagehide', onLeave);
  window.addEventListener('beforeunload', onLeave);
  video.addEventListener('timeupdate', () => later(tryPay));
  setInterval(() => { updateOverlay(); later(tryPay); pollRtcStats().catch(() => {}); }, 250);
  chain = await records.chainNow();
  // Every other channel of this browser is followed from here too; the live
  // one is the session's own until it closes.
  follower = records.startFollowing({
    secret,
    live: () => (['ready', 'resuming', 'reconnecting', 'reorg', 'funding', 'opening',
      'closing'].includes(app.state) ? app.key : null),
    onChain: (c) => {
      chain = c ?? chain;
      if (app.state === 'budget') showCosts();
    },
  });
  window.paystreamRecords = follower;
  connect();
}

main().catch((e) => fail(`player error: ${e.message}`));
