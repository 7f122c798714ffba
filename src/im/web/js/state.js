// What the page knows: conversations, their messages (by seq), marks, members, users, presence, and the
// messages of this tab not yet stored (pending). Fed by the HTTP API and the connection's events; the UI
// listens for "list", "conv" (with the conv id), "users" and "presence" and re-renders.

import { randomHex } from "./dom.js";

const TYPING_MS = 5000;

export function convKind(conv) {
  return conv.startsWith("g:") ? "group" : "direct";
}

export function directConv(a, b) {
  return a < b ? `d:${a}:${b}` : `d:${b}:${a}`;
}

export class ChatState {
  constructor(api, me, device) {
    this.api = api;
    this.me = me; // {uid, username, display_name}
    this.device = device;
    /** conv -> conversation (see _ensure) */
    this.convs = new Map();
    /** uid -> {uid, username, display_name} */
    this.users = new Map([[me.uid, me]]);
    /** uid -> true/false */
    this.online = new Map();
    /** cmid -> {cmid, conv, type, body, createdAt, status: "sending"|"uploading"|"failed", progress, error, file} */
    this.pending = new Map();
    this._listeners = new Map();
    this._userFetches = new Map();
    this._cmidPrefix = randomHex(6);
    this._cmidCounter = 0;
    this._typingTimer = null;
  }

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, []);
    this._listeners.get(event).push(fn);
  }

  emit(event, value) {
    for (const fn of this._listeners.get(event) || []) fn(value);
  }

  changed(conv) {
    this.emit("conv", conv);
    this.emit("list");
  }

  // --- conversations --------------------------------------------------------------------------------

  _ensure(conv) {
    let c = this.convs.get(conv);
    if (!c) {
      const kind = convKind(conv);
      const ids = conv.split(":").slice(1).map(Number);
      c = {
        conv,
        kind,
        gid: kind === "group" ? ids[0] : null,
        peer: kind === "direct" ? (ids[0] === this.me.uid ? ids[1] : ids[0]) : null,
        title: "",
        lastSeq: 0,
        readSeq: 0,
        lastMessage: null,
        activity: 0,
        messages: new Map(),
        historyLoaded: false,
        hasOlder: false,
        loadingOlder: false,
        marks: new Map(),
        members: null,
        typing: new Map(),
        draft: false,
        left: false,
      };
      this.convs.set(conv, c);
      if (c.peer) this.user(c.peer);
    }
    return c;
  }

  get(conv) {
    return this.convs.get(conv);
  }

  title(c) {
    if (c.title) return c.title;
    if (c.kind === "direct") return this.name(c.peer);
    return `Group ${c.gid}`;
  }

  /** Conversations by latest activity, newest first. */
  sorted() {
    return [...this.convs.values()].sort((a, b) => b.activity - a.activity || (a.conv < b.conv ? -1 : 1));
  }

  unread(c) {
    return Math.max(0, c.lastSeq - c.readSeq);
  }

  /** Merge the server's list (titles, unread, last messages); local newer state wins. */
  async loadConversations() {
    const list = await this.api.conversations();
    for (const s of list) {
      const c = this._ensure(s.conv);
      c.kind = s.kind;
      c.title = s.title;
      c.peer = s.peer;
      c.draft = false;
      c.readSeq = Math.max(c.readSeq, s.read_seq);
      if (s.last_seq >= c.lastSeq) {
        c.lastSeq = s.last_seq;
        if (s.last_message) this._setLast(c, s.last_message);
      }
    }
    this.emit("list");
    return list;
  }

  _setLast(c, m) {
    if (!c.lastMessage || m.seq >= c.lastMessage.seq) {
      c.lastMessage = m;
      c.activity = Math.max(c.activity, m.ts);
    }
  }

  /** A direct conversation with `peer` (existing, or a draft until its first message). */
  openDirect(peer) {
    const conv = directConv(this.me.uid, peer.uid);
    this.users.set(peer.uid, peer);
    const existed = this.convs.has(conv);
    const c = this._ensure(conv);
    if (!existed) {
      c.draft = true;
      c.title = peer.display_name;
      c.activity = Date.now();
      c.historyLoaded = true; // nothing stored yet
    }
    this.emit("list");
    return c;
  }

  addGroup(group) {
    const c = this._ensure(group.conv);
    c.title = group.name;
    c.activity = Math.max(c.activity, group.created_at);
    this.emit("list");
    return c;
  }

  // --- messages -------------------------------------------------------------------------------------

  /** A stored message (live, replayed, or our own acked send). */
  applyMessage(m) {
    const c = this._ensure(m.conv);
    c.messages.set(m.seq, m);
    c.lastSeq = Math.max(c.lastSeq, m.seq);
    c.draft = false;
    this._setLast(c, m);
    if (m.from === this.me.uid) c.readSeq = Math.max(c.readSeq, m.seq); // sending moves the read mark
    if (m.from === this.me.uid && m.dev === this.device) this.pending.delete(m.cmid);
    if (m.type === "system") this._onSystem(c, m);
    if (c.typing.delete(m.from)) this._scheduleTypingSweep();
    this.changed(m.conv);
  }

  applyAck({ entry, ack }) {
    this.applyMessage({
      t: "msg", conv: ack.conv, seq: ack.seq, mid: ack.mid, from: this.me.uid, dev: this.device,
      cmid: ack.cmid, ts: ack.ts, type: entry.type, body: entry.body,
    });
  }

  applyFailed({ entry, code, message }) {
    const p = this.pending.get(entry.cmid) || { ...entry, createdAt: Date.now() };
    p.status = "failed";
    p.error = `Refused by the server: ${message || code}`;
    this.pending.set(entry.cmid, p);
    this.changed(entry.conv);
  }

  _onSystem(c, m) {
    const body = m.body || {};
    if (body.event === "group_created" && body.name && !c.title) c.title = body.name;
    for (const uid of [body.by, body.uid, body.new_owner, ...(body.uids || [])]) if (uid) this.user(uid);
    if (c.members) this.loadMembers(c.conv).catch(() => {});
    const gone = (body.event === "member_removed" || body.event === "member_left") && body.uid === this.me.uid;
    if (gone) c.left = true;
    if (body.event === "members_added" && (body.uids || []).includes(this.me.uid)) c.left = false;
  }

  /** A new cmid: unique per device forever (random per page load, then a counter). */
  newCmid() {
    this._cmidCounter += 1;
    return `w${this._cmidPrefix}-${Date.now().toString(36)}-${this._cmidCounter}`;
  }

  addPending(entry, extra = {}) {
    const p = { ...entry, createdAt: Date.now(), status: "sending", progress: 0, error: "", ...extra };
    this.pending.set(entry.cmid, p);
    const c = this._ensure(entry.conv);
    c.activity = Math.max(c.activity, p.createdAt);
    this.changed(entry.conv);
    return p;
  }

  updatePending(cmid, fields) {
    const p = this.pending.get(cmid);
    if (!p) return;
    Object.assign(p, fields);
    this.emit("conv", p.conv);
  }

  pendingOf(conv) {
    return [...this.pending.values()].filter((p) => p.conv === conv).sort((a, b) => a.createdAt - b.createdAt);
  }

  /** Messages of a conversation in seq order. */
  messagesOf(c) {
    return [...c.messages.values()].sort((a, b) => a.seq - b.seq);
  }

  async loadLatest(conv) {
    const c = this._ensure(conv);
    if (c.historyLoaded || c.draft) return;
    const page = await this.api.history(conv, { limit: 50 });
    for (const m of page.messages) c.messages.set(m.seq, m);
    c.historyLoaded = true;
    c.hasOlder = page.has_more;
    if (page.messages.length) {
      const last = page.messages[page.messages.length - 1];
      c.lastSeq = Math.max(c.lastSeq, last.seq);
      this._setLast(c, last);
    }
    for (const m of page.messages) {
      if (m.from === this.me.uid && m.dev === this.device) this.pending.delete(m.cmid);
      if (m.type === "system") this._onSystem(c, m);
      this.user(m.from);
    }
    this.changed(conv);
  }

  /** The page before the oldest message held; returns how many arrived. */
  async loadOlder(conv) {
    const c = this._ensure(conv);
    if (!c.hasOlder || c.loadingOlder) return 0;
    const seqs = [...c.messages.keys()];
    const oldest = seqs.length ? Math.min(...seqs) : c.lastSeq + 1;
    c.loadingOlder = true;
    try {
      const page = await this.api.history(conv, { before: oldest, limit: 50 });
      for (const m of page.messages) {
        c.messages.set(m.seq, m);
        this.user(m.from);
      }
      c.hasOlder = page.has_more;
      this.emit("conv", conv);
      return page.messages.length;
    } finally {
      c.loadingOlder = false;
    }
  }

  // --- marks, members, typing -----------------------------------------------------------------------

  applyReceipt(r) {
    const c = this.convs.get(r.conv);
    if (!c) return;
    const mark = c.marks.get(r.uid) || { read: 0, delivered: 0 };
    if (r.kind === "read") {
      mark.read = Math.max(mark.read, r.seq);
      mark.delivered = Math.max(mark.delivered, r.seq);
    } else if (r.kind === "delivered") {
      mark.delivered = Math.max(mark.delivered, r.seq);
    }
    c.marks.set(r.uid, mark);
    if (r.uid === this.me.uid && r.kind === "read") c.readSeq = Math.max(c.readSeq, r.seq);
    this.changed(r.conv);
  }

  async loadReceipts(conv) {
    const c = this._ensure(conv);
    if (c.draft) return;
    for (const r of await this.api.receipts(conv)) {
      this.applyReceipt({ conv, uid: r.uid, kind: "delivered", seq: r.delivered_seq });
      this.applyReceipt({ conv, uid: r.uid, kind: "read", seq: r.read_seq });
    }
  }

  async loadMembers(conv) {
    const c = this._ensure(conv);
    if (c.kind !== "group") {
      c.members = new Map([[this.me.uid, "member"], [c.peer, "member"]]);
      return c.members;
    }
    const list = await this.api.members(c.gid);
    c.members = new Map(list.map((m) => [m.uid, m.role]));
    c.left = !c.members.has(this.me.uid);
    for (const m of list) this.user(m.uid);
    this.emit("conv", conv);
    return c.members;
  }

  /** Other members (for "read by N of M"); null while unknown. */
  others(c) {
    if (c.kind === "direct") return [c.peer];
    if (!c.members) return null;
    return [...c.members.keys()].filter((u) => u !== this.me.uid);
  }

  applyTyping(t) {
    if (t.uid === this.me.uid) return;
    const c = this.convs.get(t.conv);
    if (!c) return;
    c.typing.set(t.uid, Date.now() + TYPING_MS);
    this.user(t.uid);
    this.emit("conv", t.conv);
    this._scheduleTypingSweep();
  }

  typers(c) {
    const now = Date.now();
    return [...c.typing.entries()].filter(([, until]) => until > now).map(([uid]) => uid);
  }

  _scheduleTypingSweep() {
    if (this._typingTimer) return;
    this._typingTimer = setTimeout(() => {
      this._typingTimer = null;
      const now = Date.now();
      let more = false;
      for (const c of this.convs.values()) {
        for (const [uid, until] of c.typing) {
          if (until <= now) {
            c.typing.delete(uid);
            this.emit("conv", c.conv);
          } else more = true;
        }
      }
      if (more) this._scheduleTypingSweep();
    }, 1000);
  }

  // --- users and presence ---------------------------------------------------------------------------

  name(uid) {
    if (uid === this.me.uid) return "You";
    const u = this.users.get(uid);
    return u ? u.display_name : `User ${uid}`;
  }

  /** The user if known; otherwise fetched in the background ("users" is emitted when it arrives). */
  user(uid) {
    if (!uid || this.users.has(uid) || this._userFetches.has(uid)) return this.users.get(uid);
    const fetching = this.api.user(uid).then(
      (u) => {
        this.users.set(uid, u);
        this.emit("users");
      },
      () => {},
    ).finally(() => this._userFetches.delete(uid));
    this._userFetches.set(uid, fetching);
    return undefined;
  }

  /** Ask which peers (direct conversations, and members of `activeConv`) are online. */
  async refreshPresence(activeConv) {
    const uids = new Set();
    for (const c of this.convs.values()) if (c.peer && !c.draft) uids.add(c.peer);
    const active = activeConv && this.convs.get(activeConv);
    if (active && active.members) for (const uid of active.members.keys()) uids.add(uid);
    uids.delete(this.me.uid);
    const list = [...uids].slice(0, 100);
    if (!list.length) return;
    for (const p of await this.api.presence(list)) this.online.set(p.uid, p.online);
    this.emit("presence");
  }
}
