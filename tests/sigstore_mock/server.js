// A local Sigstore for provenance's tests: @sigstore/mock's CA, CT log and transparency log
// served over HTTP on 127.0.0.1. It prints one JSON line with its port and a client trust
// config, then serves until killed (or for at most MAX_SECONDS). Never listens elsewhere.
'use strict';
const http = require('http');
const crypto = require('crypto');
const mock = require('@sigstore/mock');

const MAX_SECONDS = Number(process.env.MOCK_MAX_SECONDS || 600);

function keyPair() {
  return crypto.generateKeyPairSync('ec', { namedCurve: 'prime256v1' });
}

function spki(key) {
  return key.export({ format: 'der', type: 'spki' });
}

// sigstore-python sends the OIDC token as a bearer header and the CSR as base64 of its PEM;
// the mock expects both in the body, the CSR as PEM text.
function fulcioRequest(body, headers) {
  const json = JSON.parse(body);
  const auth = headers.authorization || '';
  json.credentials = { oidcIdentityToken: auth.replace(/^Bearer\s+/i, '') };
  if (json.certificateSigningRequest && !json.certificateSigningRequest.startsWith('-----')) {
    json.certificateSigningRequest = Buffer.from(json.certificateSigningRequest, 'base64').toString('utf8');
  }
  return JSON.stringify(json);
}

// Rekor v1 stores a dsse entry in canonical form (hashes and signatures, not the envelope);
// sigstore-python checks that form, so rewrite the proposed entry as Rekor would.
function rekorRequest(body) {
  const entry = JSON.parse(body);
  if (entry.kind !== 'dsse' || !entry.spec || !entry.spec.proposedContent) return body;
  const envText = entry.spec.proposedContent.envelope;
  const env = JSON.parse(envText);
  const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');
  const verifier = entry.spec.proposedContent.verifiers[0];
  return JSON.stringify({
    apiVersion: '0.0.1',
    kind: 'dsse',
    spec: {
      envelopeHash: { algorithm: 'sha256', value: sha(Buffer.from(envText)) },
      payloadHash: { algorithm: 'sha256', value: sha(Buffer.from(env.payload, 'base64')) },
      signatures: env.signatures.map((s) => ({ signature: s.sig, verifier })),
    },
  });
}

async function main() {
  const caKeys = keyPair();
  const tlogKeys = keyPair();
  const ctlog = await mock.initializeCTLog(caKeys);
  const ca = await mock.initializeCA(caKeys, ctlog);
  const fulcio = mock.fulcioHandler(ca);
  let rekor = null;

  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', async () => {
      const body = Buffer.concat(chunks).toString('utf8');
      try {
        let result;
        if (req.method === 'POST' && req.url === fulcio.path) {
          result = await fulcio.fn(fulcioRequest(body, req.headers));
        } else if (req.method === 'POST' && rekor && req.url === rekor.path) {
          result = await rekor.fn(rekorRequest(body));
        } else {
          result = { statusCode: 404, response: `no mock route for ${req.method} ${req.url}` };
        }
        res.writeHead(result.statusCode, { 'Content-Type': result.contentType || 'text/plain' });
        res.end(result.response);
      } catch (e) {
        res.writeHead(500, { 'Content-Type': 'text/plain' });
        res.end(String(e && e.stack || e));
      }
    });
  });

  server.listen(0, '127.0.0.1', async () => {
    const base = `http://127.0.0.1:${server.address().port}`;
    const tlog = await mock.initializeTLog(base, tlogKeys);
    rekor = mock.rekorHandler(tlog);
    const start = '2020-01-01T00:00:00Z';
    const service = (url) => ({ url, majorApiVersion: 1, validFor: { start }, operator: 'provenance-test-mock' });
    const b64 = (buf) => Buffer.from(buf).toString('base64');
    const trustedRoot = {
      mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1',
      tlogs: [{
        baseUrl: base, hashAlgorithm: 'SHA2_256',
        publicKey: { rawBytes: b64(spki(tlogKeys.publicKey)), keyDetails: 'PKIX_ECDSA_P256_SHA_256', validFor: { start } },
        logId: { keyId: b64(crypto.createHash('sha256').update(spki(tlogKeys.publicKey)).digest()) },
      }],
      certificateAuthorities: [{
        subject: { organization: 'sigstore.mock', commonName: 'sigstore' }, uri: base,
        certChain: { certificates: [{ rawBytes: b64(Buffer.from(ca.rootCertificate.buffer)) }] },
        validFor: { start },
      }],
      ctlogs: [{
        baseUrl: base, hashAlgorithm: 'SHA2_256',
        publicKey: { rawBytes: b64(ctlog.publicKey), keyDetails: 'PKIX_ECDSA_P256_SHA_256', validFor: { start } },
        logId: { keyId: b64(Buffer.from(ctlog.logID.buffer)) },
      }],
      timestampAuthorities: [],
    };
    const trustConfig = {
      mediaType: 'application/vnd.dev.sigstore.clienttrustconfig.v0.1+json',
      trustedRoot,
      signingConfig: {
        mediaType: 'application/vnd.dev.sigstore.signingconfig.v0.2+json',
        caUrls: [service(base)], oidcUrls: [service(base)], rekorTlogUrls: [service(base)], tsaUrls: [],
        rekorTlogConfig: { selector: 'ANY' }, tsaConfig: { selector: 'ANY' },
      },
    };
    process.stdout.write(JSON.stringify({ port: server.address().port, trustConfig }) + '\n');
  });
  setTimeout(() => process.exit(0), MAX_SECONDS * 1000).unref();
}

main().catch((e) => { console.error(e); process.exit(1); });
