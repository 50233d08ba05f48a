// HTTP/2 CONNECT client built on Node's own http2 module (nghttp2 inside), for interop tests.
//
// usage: node node_connect_client.js CONFIG.json
// CONFIG: {url, authority, ca, cert?, key?, serverIdentity, payload, output, headers?,
//          extraStreams?}
//   payload/output: file paths; the payload is sent on the CONNECT stream, the stream is
//   half-closed (END_STREAM), and everything received until the peer's END_STREAM is
//   written to output. extraStreams: that many more CONNECT streams on the same session,
//   concurrently, each sending the payload; "extraOk" counts those whose echo matched.
// Prints one JSON line on stdout: {"ok": true, "status": 200, "received": N} or
// {"ok": false, "stage": "...", "status": S|null, "error": "...", "received": N}; what was
// received is written to output either way; exit code 0
// unless the script itself is misused (2).
'use strict';

const fs = require('fs');
const http2 = require('http2');

const chunks = [];
let finished = false;

function finish(result) {
  if (finished) return;
  finished = true;
  const body = Buffer.concat(chunks);
  fs.writeFileSync(cfg.output, body);
  result.received = body.length;
  process.stdout.write(JSON.stringify(result) + '\n');
  process.exit(0);
}

if (process.argv.length !== 3) {
  process.stderr.write('usage: node node_connect_client.js CONFIG.json\n');
  process.exit(2);
}
const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const options = {
  ca: fs.readFileSync(cfg.ca),
  // The mesh identity is the URI SAN; there is no DNS name to check.
  checkServerIdentity: (host, cert) => {
    const sans = (cert.subjectaltname || '').split(', ');
    if (!sans.includes('URI:' + cfg.serverIdentity)) {
      return new Error('server presented ' + cert.subjectaltname + ', expected ' + cfg.serverIdentity);
    }
    return undefined;
  },
  minVersion: 'TLSv1.3',
};
if (cfg.cert) options.cert = fs.readFileSync(cfg.cert);
if (cfg.key) options.key = fs.readFileSync(cfg.key);

let stage = 'connect';
let status = null;
const payload = fs.readFileSync(cfg.payload);
const extraStreams = cfg.extraStreams || 0;
let pending = 1 + extraStreams;
let extraOk = 0;

function streamDone() {
  pending -= 1;
  if (pending === 0) {
    stage = 'done';
    clearTimeout(timer);
    client.close();
    finish({ ok: true, status, extraOk });
  }
}
const timer = setTimeout(() => finish({ ok: false, stage, status, error: 'timed out' }), 15000);

const client = http2.connect(cfg.url, options);
client.on('error', (err) => finish({ ok: false, stage, status, error: String(err.code || err.message) }));
client.on('goaway', (code) => { if (stage !== 'done') stage = 'goaway:' + code; });

const headers = Object.assign({ ':method': 'CONNECT', ':authority': cfg.authority }, cfg.headers || {});
const req = client.request(headers, { endStream: false });
stage = 'request';
req.on('response', (h) => {
  status = h[':status'];
  stage = 'response';
  if (status !== 200) {
    clearTimeout(timer);
    client.close();
    finish({ ok: false, stage, status, error: 'status ' + status });
    return;
  }
  stage = 'tunnel';
  req.end(payload);
});
req.on('data', (chunk) => chunks.push(chunk));
req.on('end', () => {
  if (status !== 200) {
    finish({ ok: false, stage, status, error: 'stream ended before a 200 response' });
    return;
  }
  streamDone();
});
for (let i = 0; i < extraStreams; i++) {
  const extra = client.request(headers, { endStream: false });
  const got = [];
  extra.on('response', (h) => {
    if (h[':status'] !== 200) {
      finish({ ok: false, stage: 'extra stream', status: h[':status'], error: 'status ' + h[':status'] });
      return;
    }
    extra.end(payload);
  });
  extra.on('data', (chunk) => got.push(chunk));
  extra.on('end', () => {
    if (Buffer.concat(got).equals(payload)) extraOk += 1;
    streamDone();
  });
  extra.on('error', (err) => finish({ ok: false, stage: 'extra stream', status, error: String(err.code || err.message) }));
}
// The event loop may run dry without any handler above deciding (e.g. the session was
// torn down silently): still report, so the caller never sees an empty answer.
process.on('exit', () => {
  if (!finished) {
    finished = true;
    process.stdout.write(JSON.stringify({ ok: false, stage, status, error: 'no result before exit', received: 0 }) + '\n');
  }
});
req.on('error', (err) => finish({ ok: false, stage, status, error: String(err.code || err.message) }));
req.on('close', () => {
  if (stage !== 'done' && status === 200 && req.rstCode) {
    finish({ ok: false, stage, status, error: 'stream reset, code ' + req.rstCode });
  }
});
