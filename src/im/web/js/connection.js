// The chat connection (docs/protocol.md sections 3-14), mirroring the Python SDK (im.client.session and
// im.client.client): cursors and the outbox outlive the WebSocket, so a reconnect resumes where the last
// connection stopped and resends every unacked message with its original cmid (no duplicate, no gap).
//
// Rules kept:
// - per conversation, `cursors` holds the highest seq held (from `msg` and non-dup `ack`); a `msg` at or
//   below it is a duplicate and dropped; one past `held + 1` is a gap: reconnect stating the cursors.
// - every send stays in the outbox until its `ack` or a final refusal; after `auth_ok` the whole outbox is
//   written again in order; retryable refusals hold later sends back until a short delay has passed.
// - reconnect with jittered exponential back-off (a random 50-100 % of min(max, base * 2^n)), and never
//   sooner than the server asked: a refused login's `retry_after` (section 3, "Login admission"), an
//   HTTP 503's, or 5 s after a close 1013 (section 3, "Connection caps"), plus up to 20 % jitter; n counts
//   the attempts since the last auth_ok; each wait is said on the console (console.info). Ping after
//   heartbeat/2 of silence and drop a connection whose ping got nothing back.

const RETRYABLE = new Set(["unavailable", "rate_limited", "too_many_in_flight", "unauthenticated"]);
/** Seconds to wait at least after a close 1013 (docs/protocol.md section 3, "Connection caps"). */
const TRY_AGAIN_AFTER_S = 5;

/**
 * Why the chat address `wsUrl` (from GET /gateway) must not be used by a page loaded over `pageProtocol`,
 * or null when it may. A page served over HTTPS only ever connects to a wss:// address: a ws:// one would
 * send the login token and every message in clear (a misconfigured server), so it is refused with a
 * message the user can act on, never tried (the browser would block it with nothing but a console line).
 */
export function insecureGateway(wsUrl, pageProtocol) {
  let url;
  try {
    url = new URL(wsUrl);
  } catch {
    return `The server gave an invalid chat address (${wsUrl}).`;
  }
  if (url.protocol !== "ws:" && url.protocol !== "wss:") {
    return `The server gave a chat address that is not a WebSocket (${wsUrl}).`;
  }
  if (pageProtocol === "https:" && url.protocol !== "wss:") {
    return (
      `Not connecting: this page is encrypted (HTTPS) but the server offered an unencrypted chat address ` +
      `(${wsUrl}), which would send your messages in clear. Ask the administrator to turn on TLS for the gateway.`
    );
  }
  return null;
}

export class Connection {
  /**
   * @param {import("./api.js").Api} api
   * @param {object} options device (stable per tab), cursors (Map conv -> seq), outbox (entries to resend),
   *   backoffBase/backoffMax (ms), maxInFlight, onOutboxChange(entries) to persist the outbox.
   */
  constructor(api, { device, cursors = new Map(), outbox = [], backoffBase = 250, backoffMax = 5000,
    maxInFlight = 256, onOutboxChange = () => {} } = {}) {
    this.api = api;
    this.device = device;
    this.cursors = cursors;
    /** cmid -> {cmid, conv, type, body}, in send order. */
    this.outbox = new Map(outbox.map((e) => [e.cmid, e]));
    this.backoffBase = backoffBase;
    this.backoffMax = backoffMax;
    this.maxInFlight = maxInFlight;
    this.onOutboxChange = onOutboxChange;
    /** "connecting" | "open" | "offline" | "replaced" | "insecure" | "stopped" */
    this.state = "offline";
    this.synced = false;
    this.uid = null;
    this._handlers = new Map();
    this._ws = null;
    this._stopped = true;
    this._wake = null; // resolves the back-off sleep early
    this._refusal = null; // why the last gateway address was refused (state "insecure")
    this._retryAfter = null; // seconds the server asked this attempt to wait before the next one
    /** Connection attempts the server answered with a wait (for tests and diagnostics). */
    this.toldToWait = 0;
    this._unsent = [];
    this._inFlight = new Set();
    this._refused = [];
    this._retryWhenIdle = false;
    this._hold = false;
    this._recvSent = new Map();
    this._dirty = new Set();
    this._recvTimer = null;
    this._retryTimer = null;
    this._tickTimer = null;
  }

  // --- events ---------------------------------------------------------------------------------------

  /** Events: status {state, retryAt?, reason?}, open, synced, msg, ack, failed {entry, code, message},
   * receipt, typing, error (a refusal not tied to a send). */
  on(type, handler) {
    if (!this._handlers.has(type)) this._handlers.set(type, []);
    this._handlers.get(type).push(handler);
  }

  _emit(type, value) {
    for (const handler of this._handlers.get(type) || []) {
      try {
        handler(value);
      } catch (err) {
        console.error(`im: ${type} handler failed`, err);
      }
    }
  }

  _status(state, extra = {}) {
    this.state = state;
    this._emit("status", { state, ...extra });
  }

  // --- lifecycle ------------------------------------------------------------------------------------

  start() {
    if (!this._stopped) return;
    this._stopped = false;
    this._run();
  }

  stop() {
    this._stopped = true;
    this._drop("stopped");
    this._wakeUp();
    this._status("stopped");
  }

  /** Skip the rest of the back-off (the user asked, or the browser came back online). */
  retryNow() {
    if (this.state === "replaced" || this.state === "insecure") {
      this._status("offline");
    }
    this._wakeUp();
  }

  _wakeUp() {
    if (this._wake) this._wake();
  }

  async _run() {
    let attempt = 0;
    while (!this._stopped) {
      const reason = await this._connectOnce(() => {
        attempt = 0;
      });
      if (this._stopped) return;
      if (reason === "replaced") {
        // Another tab or window took over this device name: stay off until asked (section 14).
        this._status("replaced");
        await this._sleep(null);
        continue;
      }
      if (reason === "auth_lost") return; // the application shows the login screen
      if (reason === "insecure") {
        // A plaintext chat address for an HTTPS page: stay off until asked (the server must be fixed).
        console.error(`im: ${this._refusal}`);
        this._status("insecure", { reason: this._refusal });
        await this._sleep(null);
        continue;
      }
      let delay = Math.min(this.backoffMax, this.backoffBase * 2 ** attempt) * (0.5 + Math.random() * 0.5);
      if (this._retryAfter !== null) {
        // The server's wait, plus up to 20 % jitter, so a storm's clients come back spread out.
        this.toldToWait++;
        delay = Math.max(delay, this._retryAfter * 1000 * (1 + Math.random() * 0.2));
        this._retryAfter = null;
      }
      attempt = Math.min(attempt + 1, 30);
      // Said on the console (as information, not a failure): how long this page waits, and why.
      console.info(`im: ${reason}; reconnecting in ${(delay / 1000).toFixed(3)} s`);
      this._status("offline", { retryAt: Date.now() + delay, reason });
      await this._sleep(delay);
    }
  }

  _sleep(ms) {
    return new Promise((resolve) => {
      const timer = ms === null ? null : setTimeout(done, ms);
      const self = this;
      function done() {
        clearTimeout(timer);
        self._wake = null;
        resolve();
      }
      this._wake = done;
    });
  }

  /** One connection, from the gateway lookup to the close; resolves with why it ended. */
  async _connectOnce(onAuthOk) {
    this._status("connecting");
    this._retryAfter = null;
    let gateway;
    let token;
    try {
      token = await this.api.accessToken();
      gateway = await this.api.gateway();
    } catch (err) {
      if (err && err.name === "AuthLost") return "auth_lost";
      if (err && err.code === "auth_failed") return "auth_lost";
      if (err && typeof err.retryAfter === "number") this._retryAfter = err.retryAfter;
      return `gateway: ${err && err.message}`;
    }
    if (this._stopped) return "stopped";
    this._refusal = insecureGateway(gateway.ws, location.protocol);
    if (this._refusal) return "insecure";
    return new Promise((resolve) => {
      let ws;
      try {
        ws = new WebSocket(gateway.ws);
      } catch (err) {
        resolve(`websocket: ${err.message}`);
        return;
      }
      this._ws = ws;
      this._bye = null;
      this._rx = 0;
      this._txSinceTick = false;
      let authTimer = null;
      ws.onopen = () => {
        this._resetConnection();
        this._write({ t: "auth", token, device: this.device, cursors: Object.fromEntries(this.cursors) });
        authTimer = setTimeout(() => ws.close(4000, "no auth_ok"), 15000);
      };
      ws.onmessage = (event) => {
        this._rx++;
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch {
          return; // only text JSON frames are expected on a JSON connection
        }
        if (frame && frame.t === "auth_ok") {
          clearTimeout(authTimer);
          onAuthOk();
        }
        this._receive(frame);
      };
      ws.onclose = (event) => {
        clearTimeout(authTimer);
        if (this._ws === ws) this._ws = null;
        // 1013 "try again later": the gateway is over a connection cap (section 3); a close frame has no
        // Retry-After, the protocol asks for its 5 s. (A browser sees no status of a refused upgrade.)
        if (event && event.code === 1013 && this._retryAfter === null) this._retryAfter = TRY_AGAIN_AFTER_S;
        this._connectionLost();
        const bye = this._bye;
        if (bye && bye.code === "replaced") resolve("replaced");
        else if (bye && bye.code === "auth_failed") {
          // A revoked or expired token: refresh (or give up if the session is gone), then reconnect.
          this.api.refresh().then(() => resolve("auth_failed"), (err) =>
            resolve(err && err.name === "AuthLost" ? "auth_lost" : "auth_failed"));
        } else resolve(bye ? `bye ${bye.code}` : "connection closed");
      };
      ws.onerror = () => {
        /* onclose follows */
      };
    });
  }

  /** Close the current WebSocket (its close handler schedules the reconnect). */
  _drop(reason) {
    const ws = this._ws;
    if (ws) {
      this._ws = null;
      try {
        ws.close(4000, reason.slice(0, 100));
      } catch {
        /* already closing */
      }
      // Do not wait for the close handshake of a dead connection: report the loss now.
      ws.onclose && ws.onclose();
      ws.onclose = null;
      ws.onmessage = null;
    }
  }

  _resetConnection() {
    this.synced = false;
    this._unsent = [];
    this._inFlight.clear();
    this._refused = [];
    this._retryWhenIdle = false;
    this._hold = false;
    this._recvSent = new Map(this.cursors);
    this._dirty.clear();
  }

  _connectionLost() {
    clearTimeout(this._tickTimer);
    clearTimeout(this._retryTimer);
    clearTimeout(this._recvTimer);
    this._tickTimer = this._retryTimer = this._recvTimer = null;
    this._inFlight.clear();
    this._unsent = [];
    this._refused = [];
    this._retryWhenIdle = false;
    this.synced = false;
    if (this.state === "open") this._status("offline", { reason: "connection lost" });
  }

  _write(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    this._txSinceTick = true;
    return true;
  }

  // --- what the application calls -------------------------------------------------------------------

  /** Queue a message: {cmid, conv, type, body}. Written now if connected, else after the next auth_ok. */
  send(entry) {
    if (this.outbox.has(entry.cmid)) return;
    this.outbox.set(entry.cmid, entry);
    this.onOutboxChange([...this.outbox.values()]);
    this._unsent.push(entry.cmid);
    this._pump();
  }

  /** Read mark: the user has seen `conv` up to `seq` (clamped to what this device holds). */
  read(conv, seq) {
    const held = this.cursors.get(conv) || 0;
    seq = Math.min(seq, held);
    if (this.state === "open" && seq > 0) this._write({ t: "read", conv, seq });
  }

  typing(conv) {
    if (this.state === "open") this._write({ t: "typing", conv });
  }

  // --- frames in ------------------------------------------------------------------------------------

  _receive(frame) {
    switch (frame && frame.t) {
      case "auth_ok":
        this.uid = frame.uid;
        this._status("open");
        this._unsent = [...this.outbox.keys()]; // resend every unacked entry, in order (section 19)
        this._pump();
        this._scheduleTick((frame.heartbeat || 60) * 500);
        this._emit("open", frame);
        break;
      case "synced":
        this.synced = true;
        this._emit("synced", frame);
        break;
      case "msg":
        this._onMsg(frame);
        break;
      case "ack":
        this._onAck(frame);
        break;
      case "error":
        this._onError(frame);
        break;
      case "receipt":
        this._emit("receipt", frame);
        break;
      case "typing":
        this._emit("typing", frame);
        break;
      case "bye":
        this._bye = frame;
        break;
      default:
        break; // pong, or a kind this client does not know (ignored, section 4)
    }
  }

  _onMsg(msg) {
    const held = this.cursors.get(msg.conv) || 0;
    if (msg.seq <= held) return; // already held (replay overlap)
    if (held && msg.seq !== held + 1) {
      this._drop(`gap in ${msg.conv}: holding ${held}, got ${msg.seq}`); // the server replays the gap
      return;
    }
    this.cursors.set(msg.conv, msg.seq);
    this._delivered(msg.conv);
    this._emit("msg", msg);
  }

  _onAck(ack) {
    if (!ack.dup) {
      const held = this.cursors.get(ack.conv) || 0;
      if (ack.seq === held + 1 || (!held && ack.seq > held)) {
        this.cursors.set(ack.conv, ack.seq);
        this._delivered(ack.conv);
      } else if (ack.seq > held) {
        this._drop(`gap in ${ack.conv}: holding ${held}, acked ${ack.seq}`);
      }
    }
    const entry = this.outbox.get(ack.cmid);
    if (!entry) return; // answered twice (a resend): the first answer counted
    this.outbox.delete(ack.cmid);
    this._inFlight.delete(ack.cmid);
    this.onOutboxChange([...this.outbox.values()]);
    this._emit("ack", { entry, ack });
    if (this._retryWhenIdle && !this._inFlight.size) this._resendRefused();
    this._pump();
  }

  _onError(error) {
    // The answer to an auth frame whose token expired on the way (or was revoked): the bye that follows
    // makes the close handler refresh the token and reconnect, or show the login screen. Not an error.
    if (!error.ref && error.code === "auth_failed" && this.state !== "open") return;
    // A login the gateway would not start now (too many at once): the bye follows; wait as told.
    if (!error.ref && this.state !== "open" && typeof error.retry_after === "number") {
      this._retryAfter = error.retry_after;
      return;
    }
    const entry = error.ref ? this.outbox.get(error.ref) : null;
    if (!entry) {
      this._emit("error", error);
      return;
    }
    this._inFlight.delete(entry.cmid);
    if (RETRYABLE.has(error.code)) {
      // Later sends would meet the same limit: hold them all, then retry the refused ones first.
      this._refused.push(entry.cmid);
      this._hold = true;
      if (this._retryWhenIdle && !this._inFlight.size) {
        this._resendRefused();
      } else if (!this._retryTimer) {
        this._retryTimer = setTimeout(() => {
          this._retryTimer = null;
          this._resendRefused();
        }, 300 + Math.random() * 400);
      }
      return;
    }
    if (this._retryWhenIdle && !this._inFlight.size) this._resendRefused();
    this.outbox.delete(entry.cmid);
    this.onOutboxChange([...this.outbox.values()]);
    this._emit("failed", { entry, code: error.code, message: error.message });
    this._pump();
  }

  /** After a back-off: resend the refused sends, in the order they were made (the outbox's), not the order
   * of the refusals, then the rest; but only once every send in flight is answered (one may be refused
   * too): the server keeps a device's sends in its order only if refused ones go first (section 8). */
  _resendRefused() {
    if (this._inFlight.size) {
      this._retryWhenIdle = true;
      return;
    }
    this._retryWhenIdle = false;
    this._hold = false;
    const wanted = new Set(this._refused);
    const refused = [...this.outbox.keys()].filter((c) => wanted.has(c));
    this._refused = [];
    this._unsent = [...refused, ...this._unsent];
    this._pump();
  }

  /** Write waiting sends while the in-flight window has room. */
  _pump() {
    if (this.state !== "open" || this._hold) return;
    while (this._unsent.length && this._inFlight.size < this.maxInFlight) {
      const cmid = this._unsent.shift();
      const entry = this.outbox.get(cmid);
      if (!entry || this._inFlight.has(cmid)) continue;
      this._inFlight.add(cmid);
      this._write({ t: "send", cmid, conv: entry.conv, type: entry.type, body: entry.body });
    }
  }

  /** Report delivery (`recv`) shortly after messages arrive, one frame per conversation. */
  _delivered(conv) {
    this._dirty.add(conv);
    if (!this._recvTimer) {
      this._recvTimer = setTimeout(() => {
        this._recvTimer = null;
        if (this.state !== "open") return;
        for (const c of this._dirty) {
          const seq = this.cursors.get(c) || 0;
          if (seq > (this._recvSent.get(c) || 0)) {
            this._recvSent.set(c, seq);
            this._write({ t: "recv", conv: c, seq });
          }
        }
        this._dirty.clear();
      }, 50);
    }
  }

  /** Every heartbeat/2: ping after silence; a ping answered by nothing at all means a dead connection. */
  _scheduleTick(interval) {
    let rxAtTick = -1;
    let pinged = false;
    const tick = () => {
      if (this.state !== "open") return;
      if (pinged && this._rx === rxAtTick) {
        this._drop("no answer to ping");
        return;
      }
      pinged = false;
      if (!this._txSinceTick || this._rx === rxAtTick) {
        this._write({ t: "ping", id: Date.now() });
        pinged = true;
      }
      rxAtTick = this._rx;
      this._txSinceTick = false;
      this._tickTimer = setTimeout(tick, interval);
    };
    this._tickTimer = setTimeout(tick, interval);
  }
}
