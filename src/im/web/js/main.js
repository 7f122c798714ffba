// The page: log in (or resume the stored session), then wire the connection, the state and the views.

import { Api, AuthLost } from "./api.js";
import { Connection } from "./connection.js";
import { $, coalesce, randomHex } from "./dom.js";
import { Sender } from "./sender.js";
import { ChatState } from "./state.js";
import { ChatView } from "./ui/chat.js";
import { GroupDialog, MembersDialog } from "./ui/dialogs.js";
import { showLogin } from "./ui/login.js";
import { Sidebar } from "./ui/sidebar.js";

const PRESENCE_EVERY = 12000; // ms between presence polls while the page is visible
const NOTICE_KEY = "im.notice";

/** This tab's device name: kept across reloads of the tab (sessionStorage), distinct per tab, so two tabs
 * never replace each other's connection and a reload resends its outbox under the same device. */
function deviceName() {
  let device = sessionStorage.getItem("im.device");
  if (!device) {
    device = `web-${randomHex(6)}`;
    sessionStorage.setItem("im.device", device);
  }
  return device;
}

function outboxKey(uid, device) {
  return `im.outbox.${uid}.${device}`;
}

function loadOutbox(key) {
  try {
    const entries = JSON.parse(sessionStorage.getItem(key) || "[]");
    return Array.isArray(entries) ? entries.filter((e) => e && e.cmid && e.conv && e.type) : [];
  } catch {
    return [];
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class Banner {
  constructor() {
    this.el = $("#banner");
    this.text = $("#banner-text");
    this.action = $("#banner-action");
    this._timer = null;
    this._wasOpen = false;
  }

  show(text, { action = null, onAction = null, info = false } = {}) {
    this.el.hidden = false;
    this.el.classList.toggle("info", info);
    this.text.textContent = text;
    this.action.hidden = !action;
    this.action.textContent = action || "";
    this.action.onclick = onAction;
  }

  hide() {
    clearInterval(this._timer);
    clearTimeout(this._timer);
    this.el.hidden = true;
  }

  /** Follow the connection's status. */
  connection(status, connection) {
    clearInterval(this._timer);
    clearTimeout(this._timer);
    if (status.state === "open") {
      this._wasOpen = true;
      this.hide();
    } else if (status.state === "connecting") {
      if (this._wasOpen) this.show("Reconnecting…");
      else this._timer = setTimeout(() => this.show("Connecting…", { info: true }), 800); // not for a blink
    } else if (status.state === "offline") {
      const update = () => {
        const left = status.retryAt ? Math.max(0, Math.ceil((status.retryAt - Date.now()) / 1000)) : 0;
        const text = this._wasOpen ? "Connection lost. Reconnecting" : "Cannot reach the server. Retrying";
        this.show(left > 0 ? `${text} in ${left} s…` : `${text}…`,
          { action: "Retry now", onAction: () => connection.retryNow() });
      };
      update();
      this._timer = setInterval(update, 1000);
    } else if (status.state === "insecure") {
      this.show(status.reason, { action: "Retry", onAction: () => connection.retryNow() });
    } else if (status.state === "replaced") {
      this.show("This chat was opened again in another window.", { action: "Use here", onAction: () => connection.retryNow() });
    }
  }
}

async function main() {
  const api = new Api();
  const banner = new Banner();
  const notice = sessionStorage.getItem(NOTICE_KEY) || "";
  sessionStorage.removeItem(NOTICE_KEY);
  api.onAuthLost = () => {
    sessionStorage.setItem(NOTICE_KEY, "Your session has ended. Please log in again.");
    location.reload();
  };

  let me = null;
  while (!me) {
    if (!api.loggedIn) await showLogin(api, notice);
    try {
      me = await api.me();
      banner.hide();
    } catch (err) {
      if (err instanceof AuthLost || err.status === 401) {
        await api.forget();
        continue;
      }
      banner.show("Cannot reach the server. Retrying…");
      await sleep(2000);
    }
  }
  await startApp(api, me, banner);
}

async function startApp(api, me, banner) {
  const device = deviceName();
  const key = outboxKey(me.uid, device);
  const state = new ChatState(api, me, device);
  const connection = new Connection(api, {
    device,
    outbox: loadOutbox(key),
    onOutboxChange: (entries) => sessionStorage.setItem(key, JSON.stringify(entries)),
  });
  for (const entry of connection.outbox.values()) state.addPending(entry);
  const sender = new Sender({ state, api, connection });

  const app = $("#app-view");
  let active = null;
  const select = (conv, { focus = true } = {}) => {
    active = conv;
    sidebar.setActive(conv);
    app.classList.toggle("chat-open", Boolean(conv));
    history.replaceState(null, "", conv ? `#/c/${encodeURIComponent(conv)}` : location.pathname);
    chat.show(conv);
    // Not on a phone: focusing the message box there would cover half the screen with the keyboard.
    if (conv && focus && !matchMedia("(max-width: 720px)").matches) chat.focusInput();
  };
  const sidebar = new Sidebar({
    state, api,
    onSelect: (conv) => select(conv),
    onNewGroup: () => groupDialog.open(),
    onLogout: async () => {
      connection.stop();
      sessionStorage.removeItem(key);
      await api.logout();
      location.hash = "";
      location.reload();
    },
  });
  const chat = new ChatView({
    state, api, connection, sender,
    onBack: () => {
      select(null);
      const item = document.querySelector(".conv[aria-current='true'], .conv");
      if (item) item.focus();
    },
    onMembers: (conv) => membersDialog.open(conv),
  });
  const groupDialog = new GroupDialog({
    api, state, onCreated: (group) => select(state.addGroup(group).conv),
  });
  const membersDialog = new MembersDialog({ api, state });

  connection.on("status", (status) => banner.connection(status, connection));
  connection.on("msg", (m) => state.applyMessage(m));
  connection.on("ack", (a) => state.applyAck(a));
  connection.on("failed", (f) => state.applyFailed(f));
  connection.on("receipt", (r) => state.applyReceipt(r));
  connection.on("typing", (t) => state.applyTyping(t));
  connection.on("error", (e) => console.warn("im: refused", e.code, e.message));
  connection.on("synced", async () => {
    // Caught up: refresh titles and unread counts, and what we missed of the open conversation's marks.
    try {
      await state.loadConversations();
      if (active && !state.get(active).draft) await state.loadReceipts(active);
      await state.refreshPresence(active);
    } catch (err) {
      console.warn("im: refresh after sync failed", err);
    }
  });

  app.hidden = false;
  $("#login-view").hidden = true;

  // The conversation list first: its heads become the cursors, so the connection replays only what
  // arrives from now on (history is paged over HTTP when a conversation is opened).
  for (let attempt = 0; ; attempt++) {
    try {
      const list = await state.loadConversations();
      for (const c of list) if (!connection.cursors.has(c.conv)) connection.cursors.set(c.conv, c.last_seq);
      break;
    } catch (err) {
      if (err instanceof AuthLost) return;
      banner.show("Cannot reach the server. Retrying…");
      await sleep(Math.min(10000, 500 * 2 ** attempt));
    }
  }
  banner.hide();
  connection.start();

  const fromHash = decodeURIComponent((location.hash.match(/^#\/c\/(.+)$/) || [])[1] || "");
  if (fromHash && state.get(fromHash)) select(fromHash, { focus: false });
  else select(null);

  // A new direct conversation brings a new peer to show a dot for: ask soon rather than at the next poll.
  let peers = "";
  const peersChanged = coalesce(() => {
    const now = [...state.convs.values()].filter((c) => c.peer && !c.draft).map((c) => c.peer).sort().join(",");
    if (now !== peers && connection.state === "open") {
      peers = now;
      state.refreshPresence(active).catch(() => {});
    }
  }, 500);
  state.on("list", peersChanged);

  addEventListener("online", () => connection.retryNow());
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
      chat.markRead();
      state.refreshPresence(active).catch(() => {});
    }
  });
  setInterval(() => {
    if (document.visibilityState === "visible" && connection.state === "open") {
      state.refreshPresence(active).catch(() => {});
    }
  }, PRESENCE_EVERY);
  addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !document.querySelector("dialog[open]") && app.classList.contains("chat-open")
      && matchMedia("(max-width: 720px)").matches) select(null);
  });
}

main().catch((err) => {
  console.error("im: the page failed to start", err);
  const banner = $("#banner");
  banner.hidden = false;
  $("#banner-text").textContent = "Something went wrong. Reload the page to try again.";
});
