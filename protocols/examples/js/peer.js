// The edgebus conformance service in JavaScript, written from protocols/PROTOCOL.md alone
// (sections 2-7 and 12, 17, and the appendix "Conformance"): one DEALER to the kernel.
//
//   npm ci --prefix protocols/examples/js
//   edgebus conformance --peer 'node protocols/examples/js/peer.js'
//
// `--fault heartbeats` makes it deliberately wrong (no heartbeats, and deaf to the kernel's
// silence), for the suite's own tests.
"use strict"

const fs = require("fs")
const zmq = require("zeromq")
const { encode, decode } = require("@msgpack/msgpack")

const SIGNATURE = Buffer.from([0x45, 0x42, 1, 0]) // "EB", major 1, minor 0
const REQUEST = 1, REPLY = 2, ERROR = 3, EVENT = 4, CONTROL = 5
const EXIT_BUS = 3
const DTYPES = { bool: 1, int8: 1, uint8: 1, int16: 2, uint16: 2, int32: 4, uint32: 4, int64: 8, uint64: 8,
                 float16: 2, float32: 4, float64: 8 }
const FAULT = process.argv.includes("--fault") ? process.argv[process.argv.indexOf("--fault") + 1] : ""

const env = process.env
const name = env.EDGEBUS_SERVICE || "conformance"
const endpoint = env.EDGEBUS_BUS || `ipc://${env.EDGEBUS_RUN_DIR}/bus.sock`

function log(event, fields = {}) {
  console.log(JSON.stringify({ event, level: fields.level || "info", ...fields }))
}

function credential() { // 5.1: the inherited pipe, else the credential file
  if (env.EDGEBUS_CREDENTIAL_FD) {
    const fd = Number(env.EDGEBUS_CREDENTIAL_FD)
    delete env.EDGEBUS_CREDENTIAL_FD
    const text = fs.readFileSync(fd, "utf8")
    fs.closeSync(fd)
    return text.trim()
  }
  const file = env.EDGEBUS_CREDENTIAL_FILE || `${env.EDGEBUS_RUN_DIR}/credentials/${name}`
  return fs.readFileSync(file, "utf8").trim()
}

const sock = new zmq.Dealer({ linger: 0, sendHighWaterMark: 10000, receiveHighWaterMark: 10000 })
let sending = Promise.resolve(), busy = 0
function send(header, body, raw = []) { // one send at a time (zeromq.js); in order
  const frames = [SIGNATURE, encode(header), encode(body), ...raw]
  busy++
  sending = sending.then(() => sock.send(frames)).catch((e) => log("send_failed", { error: String(e) }))
    .finally(() => { busy-- })
  return sending
}
const isMap = (v) => v !== null && typeof v === "object" && !Array.isArray(v) && !(v instanceof Uint8Array)
const isInt = (v) => Number.isInteger(v) || typeof v === "bigint"
const isStr = (v) => typeof v === "string"

// -- receiving: section 2's layout, 3.2's header ---------------------------------------------
function parse(frames) {
  if (frames.length < 3) throw new Error(`${frames.length} frames`)
  const sig = frames[0]
  if (sig.length !== 4 || sig[0] !== 0x45 || sig[1] !== 0x42) throw new Error("not the signature")
  if (sig[2] !== 1) throw new Error(`protocol major ${sig[2]}`)
  if (frames.reduce((n, f) => n + f.length, 0) > maxSize) throw new Error("over max_message_size")
  const h = decode(frames[1])
  if (!isMap(h) || !isInt(h.k) || h.k < 1 || h.k > 5 || !isStr(h.t)) throw new Error("bad header")
  const header = { k: Number(h.k), t: h.t, d: h.d ?? "", i: h.i ?? 0, dl: h.dl ?? 0, s: h.s ?? "" }
  if (!isStr(header.d) || !isInt(header.i) || typeof header.dl !== "number" || !isStr(header.s)) throw new Error("bad header")
  return { header, body: frames[2], raw: frames.slice(3) }
}

// -- the conformance service's requests -------------------------------------------------------
class Refusal extends Error { constructor(code, message, capability = "") { super(message); this.code = code; this.capability = capability } }
const bad = (what) => { throw new Refusal("bad-message", what) }
const FIELDS = { // type -> field -> [check, required]
  Echo: { text: [isStr, false], tensors: [Array.isArray, false] },
  Sleep: { seconds: [(v) => typeof v === "number", true] },
  Publish: { topic: [isStr, true], text: [isStr, false] },
  Listen: { topics: [(v) => Array.isArray(v) && v.every(isStr), true] },
  Received: {},
  Fail: { code: [isStr, true], message: [isStr, false] },
}

function decodeBody(type, bytes) { // 3.3: a map, tag == the header's type, fields of the right types
  let body
  try { body = decode(bytes) } catch (e) { bad(`the body of ${type} is not msgpack: ${e.message}`) }
  if (!isMap(body)) bad(`the body of ${type} is not a map`)
  if (body.type !== type) bad(`the body's tag ${JSON.stringify(body.type)} is not the header's type ${type}`)
  for (const [field, [ok, required]] of Object.entries(FIELDS[type])) {
    if (body[field] === undefined) { if (required) bad(`${type} lacks ${field}`) } else if (!ok(body[field])) bad(`${type}.${field} has the wrong type`)
  }
  return body
}

function checkTensor(t, raw) { // 3.4, in the reference decoder's order
  if (!isMap(t) || !isStr(t.dtype) || !Array.isArray(t.shape) || !t.shape.every(isInt)) bad("a tensor that is not a Tensor map")
  const frame = t.frame ?? 0
  if (!isInt(frame) || frame < 0 || frame >= raw.length) bad(`tensor frame ${frame} does not exist`)
  if (!(t.dtype in DTYPES)) bad(`dtype ${t.dtype} is not a protocol dtype`)
  if (t.shape.length > 32 || t.shape.some((d) => d < 0 || d > 2 ** 40)) bad(`shape ${t.shape} is not a tensor shape`)
  const need = t.shape.reduce((n, d) => n * Number(d), DTYPES[t.dtype])
  if (raw[frame].length !== need) bad(`frame ${frame} holds ${raw[frame].length} bytes, not ${need}`)
}

let notes = [], prefixes = new Set(), controls = new Map(), draining = false, inFlight = 0

async function handle(header, body, raw) {
  switch (header.t) {
    case "Echo": {
      const tensors = body.tensors ?? []
      tensors.forEach((t) => checkTensor(t, raw))
      const reply = { type: "Echoed" }
      if (body.text) reply.text = body.text
      if (tensors.length) reply.tensors = tensors
      if (header.s) reply.sender = header.s
      return [reply, raw]
    }
    case "Sleep": {
      const left = header.dl ? header.dl * 1000 - Date.now() : Infinity
      await new Promise((r) => setTimeout(r, Math.min(body.seconds * 1000, left)))
      if (body.seconds * 1000 > left) throw new Refusal("timeout", `the deadline passed during Sleep ${body.seconds}`)
      return [{ type: "Slept", seconds: body.seconds }]
    }
    case "Publish":
      await send({ k: EVENT, t: "Note", d: body.topic }, body.text ? { type: "Note", text: body.text } : { type: "Note" })
      return [{ type: "Published", topic: body.topic }]
    case "Listen": {
      const id = nextId++
      const answer = new Promise((resolve) => controls.set(id, resolve))
      await send({ k: CONTROL, t: "Subscribe", i: id }, { type: "Subscribe", topics: body.topics })
      const { header: h, body: b } = await answer
      const m = decode(b)
      if (h.k === ERROR) throw new Refusal(m.code, m.message, m.capability || "")
      m.topics.forEach((t) => prefixes.add(t))
      return [{ type: "Listening", topics: m.topics }]
    }
    case "Received": {
      const reply = { type: "Notes", notes }
      notes = []
      return [reply]
    }
    case "Fail":
      throw new Refusal(body.code, body.message || `asked to fail with ${body.code}`)
  }
  throw new Refusal("unknown-type", `${name} does not serve ${header.t}`)
}

async function serve(header, bodyBytes, raw) {
  inFlight++
  try {
    let answer
    try {
      if (draining) throw new Refusal("unavailable", `${name} is stopping`)
      if (!(header.t in FIELDS)) throw new Refusal("unknown-type", `${name} does not serve ${header.t}`)
      const body = decodeBody(header.t, bodyBytes)
      if (header.dl && header.dl * 1000 <= Date.now()) throw new Refusal("timeout", `${header.t} arrived after its deadline`)
      const [reply, frames = []] = await handle(header, body, raw)
      answer = send({ k: REPLY, t: reply.type, i: header.i }, reply, frames)
    } catch (e) {
      const err = e instanceof Refusal ? e : new Refusal("internal", String(e))
      const msg = { type: "Error", code: err.code, message: err.message }
      if (err.capability) msg.capability = err.capability
      answer = send({ k: ERROR, t: "Error", i: header.i }, msg)
    }
    await answer
  } finally { inFlight-- }
}

// -- the session --------------------------------------------------------------------------------
let nextId = 1, lastRx = Date.now(), interval = 1.0, liveness = 3, maxSize = 67108864

function quit(status, why) {
  log("exiting", { status, reason: why, level: status ? "error" : "info" })
  sock.close()
  process.exit(status)
}

function onMessage(header, body, raw) {
  if (header.k === ERROR) {
    const waiting = controls.get(header.i)
    if (waiting) { controls.delete(header.i); lastRx = Date.now(); return waiting({ header, body }) }
    let err = {}
    try { err = decode(body) } catch (e) { /* logged below */ }
    if (err.code === "unauthenticated") quit(EXIT_BUS, `the kernel ended the session: ${err.message}`)
    return log("error_from_bus", { level: "warning", code: err.code, message: err.message }) // never answered (12)
  }
  lastRx = Date.now()
  if (header.k === REQUEST) serve(header, body, raw)
  else if (header.k === REPLY) { const w = controls.get(header.i); if (w) { controls.delete(header.i); w({ header, body }) } }
  else if (header.k === EVENT) {
    let m
    try { m = decode(body) } catch (e) { return log("event_dropped", { level: "warning", topic: header.d }) }
    if (!isMap(m) || header.t !== "Note" || m.type !== "Note" || (m.text !== undefined && !isStr(m.text))) {
      return log("event_dropped", { level: "warning", topic: header.d, problem: "not a Note, or its tag is not its type" })
    }
    notes.push(m.text ? { topic: header.d, sender: header.s, text: m.text } : { topic: header.d, sender: header.s })
  } // CONTROL from the kernel: Heartbeat, a sign of life only
}

async function main() {
  sock.connect(endpoint)
  const helloId = nextId++
  await send({ k: CONTROL, t: "Hello", i: helloId }, {
    type: "Hello", service: name, credential: credential(), pid: process.pid, types: Object.keys(FIELDS),
    publishes: ["conformance.*"],
  })
  const timer = setTimeout(() => quit(EXIT_BUS, "no answer to Hello within 10s"), 10000)
  for (;;) { // 5.2: wait for the answer to Hello; nothing else is sent meanwhile
    const msg = parse(await sock.receive())
    if (msg.header.i !== helloId) continue
    if (msg.header.k !== REPLY || msg.header.t !== "Welcome") {
      const err = decode(msg.body)
      quit(EXIT_BUS, `the kernel refused Hello: ${err.code}: ${err.message}`)
    }
    const w = decode(msg.body)
    interval = w.heartbeat_interval ?? 1.0
    liveness = w.heartbeat_liveness ?? 3
    maxSize = w.max_message_size ?? 67108864
    if (isMap(w.settings) && Object.keys(w.settings).length) {
      log("settings_invalid", { level: "error", key: Object.keys(w.settings)[0] })
      process.exit(78)
    }
    break
  }
  clearTimeout(timer)
  lastRx = Date.now()
  await send({ k: CONTROL, t: "Ready" }, { type: "Ready" })
  log("service_ready", { name })
  if (FAULT !== "heartbeats") {
    setInterval(() => { // 5.4: beat without waiting behind other traffic; watch the kernel's silence
      if (Date.now() - lastRx > interval * liveness * 1000) quit(EXIT_BUS, "no message from the kernel for interval x liveness")
      if (!busy) send({ k: CONTROL, t: "Heartbeat" }, { type: "Heartbeat" })
    }, interval * 1000)
  }
  process.on("SIGTERM", async () => { // 5.5: refuse new work, finish what runs, Bye, exit 0
    draining = true
    const end = Date.now() + 5000
    while (inFlight && Date.now() < end) await new Promise((r) => setTimeout(r, 20))
    await Promise.race([send({ k: CONTROL, t: "Bye" }, { type: "Bye", reason: "SIGTERM" }), new Promise((r) => setTimeout(r, 1000))])
    quit(0, "SIGTERM")
  })
  for (;;) {
    const frames = await sock.receive()
    let msg
    try { msg = parse(frames) } catch (e) { log("bad_message_from_kernel", { level: "warning", problem: e.message }); continue }
    onMessage(msg.header, msg.body, msg.raw)
  }
}

main().catch((e) => quit(EXIT_BUS, String(e)))
