// The catalog page (/): what each item costs is rendered by the gateway;
// this script lists the viewer's channels kept in this browser, follows them
// until their money is back (refunding those due, records.js) and offers the
// backup.

import * as records from './records.js';

const network = document.body.dataset.network;

async function main() {
  const secret = await records.loadKey();
  const state = records.startFollowing({ secret });
  window.paystreamRecords = state;
  document.getElementById('backup').addEventListener('click', () => {
    records.downloadBackup(secret, network).then((text) => { state.backup = text; })
      .catch((e) => state.errors.push(e.message));
  });
}

main().catch((e) => {
  document.getElementById('records-empty').textContent = `Error: ${e.message}`;
});
