// The "Go live" page (/golive/<live-id>): the publisher's camera and
// microphone to the gateway over WHIP (RFC 9725), with the publisher's
// bearer token (`gateway publisher token ID`). One POST with the complete
// offer (candidates gathered first: the gateway does not take trickle ICE),
// the answer back, and DELETE on the session's Location to stop.

const $ = (id) => document.getElementById(id);
const liveId = document.body.dataset.live;
/** Page state, read by the browser tests (window.golive). */
const state = { status: 'off', location: null, error: null, pc: null };
window.golive = state;

function say(text) {
  $('golive-status').textContent = text;
}

async function gathered(pc) {
  if (pc.iceGatheringState === 'complete') return;
  await new Promise((resolve) => {
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') resolve();
    });
  });
}

async function start(token) {
  say('Asking for the camera and microphone…');
  const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
  $('preview').srcObject = media;
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.pc = pc;
  for (const track of media.getTracks()) pc.addTransceiver(track, { direction: 'sendonly' });
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const res = await fetch(`/whip/${encodeURIComponent(liveId)}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${token}` },
    body: pc.localDescription.sdp,
  });
  if (res.status !== 201) {
    const body = await res.json().catch(() => ({}));
    pc.close();
    media.getTracks().forEach((t) => t.stop());
    throw new Error(`the gateway refused (${res.status}): ${body.error ?? res.statusText}`);
  }
  state.location = res.headers.get('Location');
  await pc.setRemoteDescription({ type: 'answer', sdp: await res.text() });
  pc.addEventListener('connectionstatechange', () => {
    if (['failed', 'closed'].includes(pc.connectionState)) {
      state.status = 'off';
      say(`Off air (connection ${pc.connectionState}).`);
    }
  });
  state.status = 'live';
  state.token = token;
  $('golive-start').hidden = true;
  $('golive-stop').hidden = false;
  say('On air.');
}

async function stop() {
  if (state.location) {
    await fetch(state.location, { method: 'DELETE',
      headers: { Authorization: `Bearer ${state.token}` } });
  }
  state.pc?.close();
  $('preview').srcObject?.getTracks().forEach((t) => t.stop());
  Object.assign(state, { status: 'off', location: null, pc: null });
  $('golive-start').hidden = false;
  $('golive-stop').hidden = true;
  say('Off air.');
}

$('golive-url').textContent = `${location.origin}/whip/${liveId}`;
$('golive-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  start($('golive-token').value.trim()).catch((e) => {
    state.error = e.message;
    say(e.message);
  });
});
$('golive-stop').addEventListener('click', () => stop().catch((e) => say(e.message)));
window.addEventListener('pagehide', () => { if (state.location) stop(); });
