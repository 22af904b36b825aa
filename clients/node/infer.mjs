#!/usr/bin/env node
// A minimal mlfleet inference client, written from docs/protocol.md alone (protocol version 2).
// Usage: node infer.mjs [--timeout-ms N] <coordinator-endpoint> <deployment-id> <docs-json | ->
// Docs are JSON maps; every nested list of numbers becomes a float32 array ({"inputs": [a, b]}
// is a list of arrays). Prints {"inference_results": [...]} with arrays as nested lists.
import { Dealer } from "zeromq";
import { encode, decode } from "@msgpack/msgpack";
import { readFileSync } from "node:fs";

const MAX_MESSAGE_BYTES = 64 * 1024 * 1024; // §1.1
const MAX_ATTEMPTS = 3;                      // §11.3 step 5: retry only `retryable` errors

class ApiError extends Error {
  constructor(status, body) { super(body?.error?.reason ?? `status ${status}`); this.status = status; this.body = body; }
}

function fail(body) {
  process.stderr.write(JSON.stringify(body) + "\n");
  process.exit(1);
}

// ---- one DEALER per peer; a header frame (a msgpack map), then payload frames (§1.3, §3) ----
const VERSION = 2;
let nextId = 1;
async function request(sock, op, body, timeoutMs, payload = []) {
  const id = nextId++;
  await sock.send([encode({ v: VERSION, op, id, body }), ...payload]);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    sock.receiveTimeout = Math.max(1, deadline - Date.now());
    let frames;
    try { frames = await sock.receive(); } catch (e) {
      if (e.code === "EAGAIN") throw new ApiError(503, { error: { type: "transport_exception",
        reason: `no reply to [${op}] within ${timeoutMs}ms` }, status: 503 });
      throw e;
    }
    const reply = decode(frames[0]);
    if (reply?.id !== id) continue;          // a late reply to something else: drop it (§3.3)
    if (reply.status !== 200) throw new ApiError(reply.status, reply.body);
    reply.payload = frames.slice(1);
    return reply;
  }
}

function dealer(endpoint) {
  const s = new Dealer({ linger: 0, maxMessageSize: MAX_MESSAGE_BYTES }); // no routing id (§1.2)
  s.connect(endpoint);
  return s;
}

// ---- arrays: {dtype, shape, data} with little-endian C-order bytes (§5.1) ------------------
function shapeOf(x) { return Array.isArray(x) ? [x.length, ...(x.length ? shapeOf(x[0]) : [])] : []; }

function encodeArray(nested) {
  const shape = shapeOf(nested);
  const flat = nested.flat(Infinity);
  if (flat.length !== shape.reduce((a, b) => a * b, 1) || flat.some((v) => typeof v !== "number"))
    throw new Error(`not a rectangular list of numbers: ${JSON.stringify(nested).slice(0, 80)}`);
  const dv = new DataView(new ArrayBuffer(flat.length * 4));
  flat.forEach((v, i) => dv.setFloat32(i * 4, v, true));
  return { dtype: "float32", shape, data: new Uint8Array(dv.buffer) };
}

const isNumList = (x) => Array.isArray(x) && x.length > 0 && x.flat(Infinity).every((v) => typeof v === "number");
function encodeDoc(doc) {
  return Object.fromEntries(Object.entries(doc).map(([k, v]) =>
    [k, k === "inputs" && Array.isArray(v) ? v.map(encodeArray) : isNumList(v) ? encodeArray(v) : v]));
}

// dtype names mean little-endian here; typestrs such as "<f4", ">i8", "|b1" are also read.
const NAMES = { float32: "f4", float64: "f8", int8: "i1", int16: "i2", int32: "i4", int64: "i8",
                uint8: "u1", uint16: "u2", uint32: "u4", uint64: "u8", bool: "b1" };
const GETTERS = { f4: "getFloat32", f8: "getFloat64", i1: "getInt8", i2: "getInt16", i4: "getInt32",
                  i8: "getBigInt64", u1: "getUint8", u2: "getUint16", u4: "getUint32", u8: "getBigUint64", b1: "getUint8" };
function decodeArray({ dtype, shape, data }) {
  const m = /^([<>|=]?)([a-z]\d+)$/.exec(NAMES[dtype] ?? dtype);
  const getter = m && GETTERS[m[2]];
  if (!getter) throw new Error(`unsupported dtype [${dtype}]`);
  const size = Number(m[2].slice(1)), little = m[1] !== ">";
  const dv = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const conv = m[2] === "b1" ? (v) => v !== 0 : getter.includes("Big") ? Number : (v) => v;
  let i = 0;
  const build = (dims) => dims.length === 0 ? conv(dv[getter]((i++) * size, little))
    : Array.from({ length: dims[0] }, () => build(dims.slice(1)));
  return build(shape);
}

// A payload is a tree frame and the frames of its large arrays, which the tree refers to as
// {dtype, shape, frame: k} (§5.2). This client sends its arrays inline (always allowed) and
// reads both forms.
function decodeTree(x, frames) {
  if (Array.isArray(x)) return x.map((v) => decodeTree(v, frames));
  if (x instanceof Uint8Array) return Buffer.from(x).toString("base64");
  if (x && typeof x === "object") {
    const keys = Object.keys(x).sort().join();
    if (keys === "data,dtype,shape") return decodeArray(x);
    if (keys === "dtype,frame,shape") {
      const f = frames[x.frame];
      if (!f || x.frame < 1) throw new Error(`a result refers to payload frame [${x.frame}], which is not there`);
      return decodeArray({ dtype: x.dtype, shape: x.shape, data: new Uint8Array(f.buffer, f.byteOffset, f.byteLength) });
    }
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, decodeTree(v, frames)]));
  }
  return x;
}

// ---- routing (§7.11, §11.3) ----------------------------------------------------------------
function pickRoute(routes, tried) {
  const usable = routes.filter((r) => r.current_allocations > 0 && !tried.has(r.address));
  const started = usable.filter((r) => r.routing_state === "started");
  const cands = started.length ? started : usable;
  let n = Math.random() * cands.reduce((a, r) => a + r.current_allocations, 0);
  for (const r of cands) if ((n -= r.current_allocations) < 0) return r;
  return cands.at(-1);
}

async function main() {
  const args = process.argv.slice(2);
  let timeoutMs = 10000;
  const t = args.indexOf("--timeout-ms");
  if (t >= 0) timeoutMs = parseInt(args.splice(t, 2)[1], 10);
  if (args.length !== 3) fail({ error: { reason: "usage: infer.mjs [--timeout-ms N] <endpoint> <deployment-id> <docs-json|->" } });
  const [endpoint, deploymentId, docsArg] = args;
  const docs = JSON.parse(docsArg === "-" ? readFileSync(0, "utf8") : docsArg).map(encodeDoc);

  const coord = dealer(endpoint);
  const sockets = [coord];
  try {
    const tried = new Set();
    for (let attempt = 1; ; attempt++) {
      const routing = (await request(coord, "get_routing", { deployment_id: deploymentId }, 20000)).body;
      const route = pickRoute(routing.routes, tried);
      if (!route) throw new ApiError(503, { error: { type: "status_exception",
        reason: `Trained model deployment [${deploymentId}] is not allocated to any nodes` }, status: 503 });
      const agent = dealer(route.address);
      sockets.push(agent);
      try {
        const reply = await request(agent, "infer", { deployment_id: deploymentId, timeout_ms: timeoutMs },
          timeoutMs + 5000, [encode(docs)]);
        const results = decode(reply.payload[0]);  // a 200's results: the payload's tree frame
        process.stdout.write(JSON.stringify({ inference_results: decodeTree(results, reply.payload) }) + "\n");
        return;
      } catch (e) {
        if (!(e instanceof ApiError && e.body?.error?.retryable === true && attempt < MAX_ATTEMPTS)) throw e;
        tried.add(route.address);
      }
    }
  } catch (e) {
    if (e instanceof ApiError) fail(e.body);
    fail({ error: { type: "client_exception", reason: String(e?.message ?? e) } });
  } finally {
    for (const s of sockets) s.close();
  }
}

await main();
