// The conversation pane: header, message log (scrolls back by seq), typing line, composer, file drop.

import { ApiError } from "../api.js";
import { $, Keyed, coalesce, h, reconcile, setChildren } from "../dom.js";
import { icon } from "../icons.js";
import { describe, renderMessage } from "./messages.js";
import { avatar } from "./sidebar.js";

const NEAR_BOTTOM = 80; // px: closer than this to the end counts as "at the bottom"
const NEAR_TOP = 60; // px: closer than this to the start fetches the page before
const RETRY_OLDER = 1000; // ms before a failed fetch of older messages is first tried again; doubles each time
const RETRY_OLDER_MAX = 30000; // ms: the longest wait between two tries
const TYPING_EVERY = 3000; // ms between typing notices while the user types

export class ChatView {
  /** @param {{state, api, connection, sender, onBack, onMembers}} opts */
  constructor({ state, api, connection, sender, onBack, onMembers }) {
    this.state = state;
    this.api = api;
    this.connection = connection;
    this.sender = sender;
    this.conv = null;
    this.wrap = $("#messages-wrap");
    this.list = $("#messages");
    this.input = $("#message-input");
    this.older = $("#load-older");
    this._elements = new Keyed();
    this._typingSentAt = 0;
    this._stickToBottom = true;
    this._scrolledTo = 0; // where the last render left the pane: a different scrollTop means the user moved
    // A failed fetch of older messages: the conversation, the last wait (ms) and the timer of the next
    // try, or refused (a 4xx answer: only the user's click on "older" tries again). Renders and scrolls
    // fetch nothing meanwhile, so a server in trouble is asked once per wait, not once per render.
    this._olderFailure = null;
    this.render = coalesce(() => this._render());

    $("#back").replaceChildren(icon("back", { size: 22 }));
    $("#attach").replaceChildren(icon("attach", { size: 22 }));
    $("#back").onclick = onBack;
    $("#members-button").onclick = () => onMembers(this.conv);
    this.older.onclick = () => this.loadOlder({ asked: true });
    $("#composer").onsubmit = (e) => {
      e.preventDefault();
      this.submit();
    };
    this.input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.submit();
      }
    });
    this.input.addEventListener("input", () => {
      this._autosize();
      const now = Date.now();
      if (this.conv && this.input.value.trim() && now - this._typingSentAt > TYPING_EVERY) {
        this._typingSentAt = now;
        this.connection.typing(this.conv);
      }
    });
    this.input.addEventListener("paste", (e) => {
      const files = [...(e.clipboardData ? e.clipboardData.files : [])];
      if (files.length && this.conv) {
        e.preventDefault();
        for (const f of files) this.sender.sendFile(this.conv, f);
      }
    });
    const fileInput = $("#file-input");
    $("#attach").onclick = () => fileInput.click();
    fileInput.onchange = () => {
      for (const f of fileInput.files) this.sender.sendFile(this.conv, f);
      fileInput.value = "";
      this.input.focus();
    };
    this.wrap.addEventListener("scroll", () => {
      this._stickToBottom = this._atBottom();
      if (this.wrap.scrollTop < NEAR_TOP) this.loadOlder({ asked: false });
      if (this._stickToBottom) this.markRead();
    });
    this._setupDrop();
    // Shown after being hidden (the phone layout), or resized (a phone's keyboard): render again, which
    // keeps the log pinned to the bottom and fetches older messages if the top came into view.
    new ResizeObserver(() => {
      if (this.conv) this.render();
    }).observe(this.wrap);

    state.on("conv", (conv) => {
      if (conv === this.conv) this.render();
    });
    state.on("users", this.render);
    state.on("presence", this.render);
    connection.on("status", this.render);
  }

  _setupDrop() {
    const main = $("#chat-main");
    const overlay = $("#drop-overlay");
    let depth = 0;
    const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
    main.addEventListener("dragenter", (e) => {
      if (!hasFiles(e) || !this._canSend()) return;
      depth++;
      overlay.hidden = false;
    });
    main.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) overlay.hidden = true;
    });
    main.addEventListener("dragover", (e) => {
      if (hasFiles(e)) e.preventDefault();
    });
    main.addEventListener("drop", (e) => {
      if (!hasFiles(e)) return;
      e.preventDefault();
      depth = 0;
      overlay.hidden = true;
      if (!this._canSend()) return;
      for (const f of e.dataTransfer.files) this.sender.sendFile(this.conv, f);
    });
  }

  _canSend() {
    const c = this.conv && this.state.get(this.conv);
    return Boolean(c && !c.left);
  }

  /** Show a conversation (null: none). */
  async show(conv) {
    if (conv === this.conv) return;
    this.conv = conv;
    if (this._olderFailure) {
      clearTimeout(this._olderFailure.timer); // another conversation: its next visit starts afresh
      this._olderFailure = null;
    }
    this._elements.clear();
    this.list.replaceChildren();
    this._stickToBottom = true;
    this._scrolledTo = this.wrap.scrollTop;
    $("#chat-empty").hidden = Boolean(conv);
    $("#chat-main").hidden = !conv;
    if (!conv) return;
    this.input.value = "";
    this._autosize();
    this.render();
    const c = this.state.get(conv);
    const loads = [this.state.loadLatest(conv), this.state.loadMembers(conv)];
    if (!c.draft) loads.push(this.state.loadReceipts(conv));
    const results = await Promise.allSettled(loads);
    for (const r of results) if (r.status === "rejected") console.warn("im: loading the conversation failed", r.reason);
    if (this.conv === conv) {
      this.render();
      this.state.refreshPresence(conv).catch(() => {});
    }
  }

  focusInput() {
    this.input.focus();
  }

  submit() {
    if (!this._canSend()) return;
    const text = this.input.value;
    if (!text.trim()) return;
    this.sender.sendText(this.conv, text);
    this.input.value = "";
    this._autosize();
    this._typingSentAt = 0;
    this._stickToBottom = true;
  }

  /** Fetch the page before the oldest message shown. ``asked``: the user clicked "older" (this tries
   * again at once, even after a refusal); else a scroll or a render brought the top into view. */
  async loadOlder({ asked }) {
    const c = this.conv && this.state.get(this.conv);
    if (!c || !c.hasOlder || c.loadingOlder) return;
    const failure = this._olderFailure && this._olderFailure.conv === c.conv ? this._olderFailure : null;
    if (failure && !asked) return; // waiting to try again, or refused
    if (failure) clearTimeout(failure.timer);
    try {
      await this.state.loadOlder(c.conv);
      if (this._olderFailure && this._olderFailure.conv === c.conv) this._olderFailure = null;
    } catch (err) {
      const delay = this._olderFailed(c, err, failure);
      const next = delay === null ? "not trying again until asked" : `trying again in ${(delay / 1000).toFixed(2)} s`;
      console.warn(`im: loading older messages failed; ${next}:`, err);
    }
  }

  /** After a failed fetch: a refusal (4xx but 408 and 429) waits for the user; anything else is tried
   * again while the top stays in view (no scroll event will come), after a wait that doubles each time
   * (with up to a quarter more at random, so many pages do not come back at once), or the server's
   * retry_after if longer. Returns the delay (ms) of the next try, or null when none is planned. */
  _olderFailed(c, err, previous) {
    if (this.conv !== c.conv) return null; // left while it was fetched: the next visit starts afresh
    const status = err instanceof ApiError ? err.status : 0;
    if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
      this._olderFailure = { conv: c.conv, wait: 0, timer: null }; // refused: no timer
      return null;
    }
    const wait = previous && previous.wait ? Math.min(RETRY_OLDER_MAX, previous.wait * 2) : RETRY_OLDER;
    const delay = Math.max(wait * (1 + Math.random() / 4), (err.retryAfter || 0) * 1000);
    const failure = { conv: c.conv, wait, timer: null };
    failure.timer = setTimeout(() => {
      if (this._olderFailure === failure && this.conv === c.conv) this._loadOlderIfAtTop(c, { retry: true });
    }, delay);
    this._olderFailure = failure;
    return delay;
  }

  /** Fetch the page before when the top of the log is in view: scrolled there, or a page too short to
   * scroll. ``retry``: the timer of a failed fetch (see :meth:`_olderFailed`). */
  _loadOlderIfAtTop(c, { retry = false } = {}) {
    if (!c.hasOlder || !c.historyLoaded || c.loadingOlder) return;
    const w = this.wrap;
    if (w.clientHeight === 0) return; // hidden (the phone layout's other pane): nothing is in view
    if (w.scrollTop < NEAR_TOP || w.scrollHeight <= w.clientHeight) {
      this.loadOlder({ asked: retry });
    } else if (retry) {
      this._olderFailure = null; // scrolled away meanwhile: the next time the top comes into view fetches
    }
  }

  _atBottom() {
    const w = this.wrap;
    return w.scrollHeight - w.scrollTop - w.clientHeight < NEAR_BOTTOM;
  }

  /** Tell the server (and our other devices) we have seen the conversation up to its newest message. */
  markRead() {
    const c = this.conv && this.state.get(this.conv);
    if (!c || c.draft || document.visibilityState !== "visible" || !this._atBottom()) return;
    const held = this.connection.cursors.get(c.conv) || 0;
    const seq = Math.min(c.lastSeq, held);
    if (seq > c.readSeq && this.connection.state === "open") {
      this.connection.read(c.conv, seq);
      c.readSeq = seq;
      this.state.emit("list");
    }
  }

  _autosize() {
    this.input.style.height = "auto";
    this.input.style.height = `${Math.min(this.input.scrollHeight + 2, 140)}px`;
  }

  _render() {
    const c = this.conv && this.state.get(this.conv);
    if (!c) return;
    const state = this.state;
    this._renderHeader(c);

    // The flag keeps the log pinned while content grows (an image loads); a scroll position other than the
    // one the last render left means the user moved, even if the scroll event has not been dispatched yet.
    const moved = this.wrap.scrollTop !== this._scrolledTo;
    const wasAtBottom = this._atBottom() || (this._stickToBottom && !moved);
    const anchor = this.list.firstElementChild;
    const anchorTop = anchor ? anchor.offsetTop : 0;

    const ctx = {
      state, api: this.api, conv: c, online: this.connection.state === "open",
      onRetry: (p) => this.sender.retry(p),
    };
    const wanted = [];
    let prevFrom = null;
    for (const m of state.messagesOf(c)) {
      const showSender = c.kind === "group" && m.type !== "system" && m.from !== prevFrom;
      prevFrom = m.type === "system" ? null : m.from;
      wanted.push([`s${m.seq}`, m, false, showSender]);
    }
    for (const p of state.pendingOf(c.conv)) wanted.push([`p${p.cmid}`, p, true, false]);

    const els = wanted.map(([key, m, pending, showSender]) => {
      const mctx = { ...ctx, showSender };
      const d = describe(m, mctx, pending);
      return this._elements.render(key, d.signature, () => renderMessage(m, mctx, pending, d));
    });
    this._elements.done();
    reconcile(this.list, els); // minimal changes: the log is aria-live

    this.older.hidden = !c.hasOlder;
    if (wasAtBottom) this.wrap.scrollTop = this.wrap.scrollHeight;
    else if (anchor && anchor.isConnected) this.wrap.scrollTop += anchor.offsetTop - anchorTop;
    this._scrolledTo = this.wrap.scrollTop;
    this._stickToBottom = this._atBottom();
    // A scroll to the top may have come while a fetch was in flight, and a page too short to scroll
    // fires no scroll event at all: check after every render.
    this._loadOlderIfAtTop(c);

    const typers = state.typers(c).map((u) => state.name(u));
    $("#typing").textContent = typers.length === 0 ? ""
      : typers.length === 1 ? `${typers[0]} is typing…` : `${typers.join(" and ")} are typing…`;
    $("#left-note").hidden = !c.left;
    $("#composer").hidden = c.left;
    this.markRead();
  }

  _renderHeader(c) {
    const state = this.state;
    const title = state.title(c);
    $("#chat-title").textContent = title;
    const online = c.kind === "direct" ? state.online.get(c.peer) === true : null;
    $("#chat-avatar").replaceWith(Object.assign(avatar(title, c.conv, { group: c.kind === "group", online }),
      { id: "chat-avatar" }));
    const subtitle = $("#chat-subtitle");
    if (c.kind === "direct") {
      setChildren(subtitle, online ? h("span", { class: "online" }, "online") : c.draft ? "new conversation" : "offline");
    } else {
      const members = c.members ? c.members.size : 0;
      const on = c.members ? [...c.members.keys()].filter((u) => u !== state.me.uid && state.online.get(u)).length : 0;
      setChildren(subtitle, members ? `${members} members` : "", on ? h("span", { class: "online" }, ` · ${on} online`) : "");
    }
    $("#members-button").hidden = c.kind !== "group" || c.left;
  }
}
