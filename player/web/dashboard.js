// The publisher/operator dashboard (/dashboard): earnings are private, so
// every /api/dashboard/* call carries the operator token, kept in this tab's
// sessionStorage only (docs/web.md).

const $ = (id) => document.getElementById(id);
const TOKEN = 'paystream-operator-token';
const SVG = 'http://www.w3.org/2000/svg';

/** Page state for the browser tests (window.paystreamDashboard). */
const dash = { loaded: 0, error: null, data: {} };
window.paystreamDashboard = dash;

async function api(name, { method = 'GET', query = '' } = {}) {
  const res = await fetch(`/api/dashboard/${name}${query}`, {
    method, headers: { Authorization: `Bearer ${sessionStorage.getItem(TOKEN)}` },
  });
  const body = await res.json();
  if (res.status === 401) {
    sessionStorage.removeItem(TOKEN);
    showLogin('The token was refused');
    throw new Error('unauthorized');
  }
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text ?? '–';
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, rows, render) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const r of rows) render(body.insertRow(), r);
}

const when = (t) => (t ? new Date(t * 1000).toLocaleString() : '–');

/**
 * Earnings over time as a small inline SVG (no library): the cumulative sat
 * paid by viewers of settled channels (a step at each settlement), and
 * billed-not-yet-settled sat as its own series.
 */
function plot(series, unsettled, now) {
  const w = 600;
  const h = 200;
  const pad = 36;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.setAttribute('role', 'img');
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    svg.append(el);
    return el;
  };
  add('line', { class: 'axis', x1: pad, y1: h - pad, x2: w - 8, y2: h - pad });
  add('line', { class: 'axis', x1: pad, y1: 8, x2: pad, y2: h - pad });
  const pending = unsettled.filter((p) => p.unsettled > 0);
  if (!series.length && !pending.length) {
    add('text', { x: w / 2, y: h / 2, 'text-anchor': 'middle' }, 'No earnings yet');
    $('plot').replaceChildren(svg);
    return;
  }
  // From a little before the first point to now, so one point is not a wall.
  const first = Math.min(...series.map((p) => p.t), ...pending.map((p) => p.t));
  const t1 = Math.max(now, ...series.map((p) => p.t), ...unsettled.map((p) => p.t));
  const t0 = first - Math.max(60, (t1 - first) * 0.05);
  const settledTop = series.length ? series[series.length - 1].total : 0;
  const top = Math.max(settledTop, ...unsettled.map((p) => p.unsettled), 1);
  const x = (t) => pad + ((t - t0) / (t1 - t0)) * (w - pad - 8);
  const y = (v) => h - pad - (v / top) * (h - pad - 8);
  if (series.length) {
    // A step line: earnings jump at each settlement.
    let d = `M ${x(t0)} ${y(0)}`;
    for (const p of series) d += ` L ${x(p.t)} ${y(p.total - p.paid)} L ${x(p.t)} ${y(p.total)}`;
    d += ` L ${x(t1)} ${y(settledTop)}`;
    add('path', { class: 'line', d });
    for (const p of series) add('circle', { class: 'dot', cx: x(p.t), cy: y(p.total), r: 3 });
  }
  if (unsettled.length) {
    // Billed, not yet settled: a step line of its own, held until the next change.
    let d = `M ${x(t0)} ${y(0)}`;
    let last = 0;
    for (const p of unsettled) {
      d += ` L ${x(p.t)} ${y(last)} L ${x(p.t)} ${y(p.unsettled)}`;
      last = p.unsettled;
    }
    d += ` L ${x(t1)} ${y(last)}`;
    add('path', { class: 'line unsettled', d });
  }
  add('text', { x: pad - 4, y: 14, 'text-anchor': 'end' }, String(top));
  add('text', { x: pad - 4, y: h - pad, 'text-anchor': 'end' }, '0');
  add('text', { x: pad, y: h - pad + 16 }, new Date(t0 * 1000).toLocaleTimeString());
  add('text', { x: w - 8, y: h - pad + 16, 'text-anchor': 'end' },
    new Date(t1 * 1000).toLocaleTimeString());
  add('text', { x: w / 2, y: h - 6, 'text-anchor': 'middle' },
    'sat paid by viewers of settled channels, cumulative (solid); billed, not yet settled (dashed)');
  $('plot').replaceChildren(svg);
}

async function editRate(id, rateInput, freeInput) {
  const query = `?item=${encodeURIComponent(id)}&rate=${encodeURIComponent(rateInput.value)}`
    + `&free_seconds=${encodeURIComponent(freeInput.value)}`;
  try {
    await api('rate', { method: 'POST', query });
    await load();
    $('dash-status').textContent = `Rate of ${id} saved: applies to new plays`;
  } catch (e) {
    $('dash-status').textContent = `Rate not saved: ${e.message}`;
  }
}

async function load() {
  const [earnings, channels, settlements, rates] = await Promise.all(
    ['earnings', 'channels', 'settlements', 'rates'].map((n) => api(n)),
  );
  dash.data = { earnings, channels, settlements, rates };
  await loadLive();
  fill('publishers', earnings.publishers, (r, p) => {
    cell(r, p.name);
    for (const k of ['billed_sat', 'unsettled_sat', 'lost_sat', 'settled_sat', 'fees_sat',
      'paid_out_sat']) cell(r, p[k], 'num');
    cell(r, p.seconds.toFixed(1), 'num');
  });
  fill('items', earnings.items, (r, i) => {
    cell(r, i.title ?? i.media);
    cell(r, i.publisher);
    for (const k of ['billed_sat', 'unsettled_sat', 'lost_sat', 'settled_sat', 'fees_sat']) {
      cell(r, i[k], 'num');
    }
    cell(r, i.seconds.toFixed(1), 'num');
    cell(r, i.channels, 'num');
  });
  fill('rates', rates.items, (r, i) => {
    cell(r, i.title);
    const rate = document.createElement('input');
    Object.assign(rate, { className: 'rate', value: String(i.rate), name: `rate-${i.id}` });
    r.insertCell().append(rate);
    const free = document.createElement('input');
    Object.assign(free, { className: 'rate', value: String(i.free_ms / 1000), name: `free-${i.id}` });
    r.insertCell().append(free);
    const save = document.createElement('button');
    Object.assign(save, { type: 'button', textContent: 'Save', name: `save-${i.id}` });
    save.addEventListener('click', () => editRate(i.id, rate, free));
    r.insertCell().append(save);
  });
  fill('channels', channels.channels, (r, c) => {
    cell(r, c.channel_id);
    cell(r, c.state);
    cell(r, c.value, 'num');
    cell(r, c.paid, 'num');
    cell(r, c.expiry > 500_000_000 ? when(c.expiry) : `block ${c.expiry}`);
    cell(r, c.connected ? 'connected' : 'away');
  });
  fill('settlements', settlements.settlements, (r, s) => {
    cell(r, when(s.created_at));
    cell(r, s.txid).className = 'txid';
    const list = cell(r, String(s.channel_count), 'num');
    list.title = s.channels.join('\n');
    cell(r, s.paid, 'num');
    cell(r, s.fee, 'num');
    cell(r, s.feerate, 'num');
    cell(r, s.confirmations ?? 0, 'num');
    cell(r, s.state);
  });
  plot(settlements.series, settlements.unsettled_series, settlements.now);
  dash.loaded += 1;
  $('dash-status').textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

/** The live items' figures, as they happen (refreshed every two seconds). */
async function loadLive() {
  const live = await api('live');
  dash.data.live = live;
  fill('live', live.items, (r, i) => {
    cell(r, i.title);
    cell(r, i.on_air ? 'on air' : 'off air');
    cell(r, i.viewers, 'num');
    cell(r, i.paid_seconds.toFixed(0), 'num');
    cell(r, i.earned_sat, 'num');
    cell(r, `${location.origin}${i.whip}`).className = 'txid';
    cell(r, i.token).className = 'txid';
    const go = document.createElement('a');
    Object.assign(go, { href: `/golive/${encodeURIComponent(i.id)}`, textContent: 'Go live' });
    r.insertCell().append(go);
  });
}

setInterval(() => {
  if (!$('dash').hidden && dash.data.live) loadLive().catch(() => {});
}, 2000);

$('live-add').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const q = new URLSearchParams({ id: $('live-id').value.trim(),
    title: $('live-title-in').value.trim(), publisher: $('live-publisher').value.trim(),
    rate: $('live-rate').value.trim(), free_seconds: $('live-free').value.trim(),
    record: $('live-record').checked ? '1' : '0' });
  try {
    await api('live_add', { method: 'POST', query: `?${q}` });
    await loadLive();
    $('dash-status').textContent = `Live item ${q.get('id')} added`;
  } catch (e) {
    $('dash-status').textContent = `Live item not added: ${e.message}`;
  }
});

function showLogin(message) {
  $('dash').hidden = true;
  $('login').hidden = false;
  $('dash-status').textContent = message || '';
}

async function start() {
  $('login').hidden = true;
  $('dash').hidden = false;
  try {
    await load();
  } catch (e) {
    dash.error = e.message;
    if (e.message !== 'unauthorized') $('dash-status').textContent = `Error: ${e.message}`;
  }
}

$('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN, $('token').value.trim());
  start();
});
$('logout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN);
  showLogin('Signed out');
});
$('refresh').addEventListener('click', start);
if (sessionStorage.getItem(TOKEN)) start();
else showLogin();
