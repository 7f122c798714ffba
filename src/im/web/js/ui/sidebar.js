// The sidebar: who is logged in, the search box (conversations and people), the conversation list.

import { $, Keyed, coalesce, h, hue, initials, reconcile, setChildren, shortTime } from "../dom.js";
import { preview } from "./messages.js";

export function avatar(label, id, { group = false, online = null } = {}) {
  const el = h("span", { class: group ? "avatar group" : "avatar", "aria-hidden": "true" }, initials(label));
  el.style.setProperty("--hue", String(hue(id)));
  if (online !== null) el.append(h("span", { class: online ? "dot online" : "dot" }));
  return el;
}

export class Sidebar {
  /** @param {{state, api, onSelect: (conv) => void, onNewGroup: () => void, onLogout: () => void}} opts */
  constructor({ state, api, onSelect, onNewGroup, onLogout }) {
    this.state = state;
    this.api = api;
    this.onSelect = onSelect;
    this.active = null;
    this.list = $("#conv-list");
    this.search = $("#search");
    this.people = $("#people");
    this.render = coalesce(() => this._render());
    this._query = "";
    this._searchSeq = 0;
    this._items = new Keyed();

    const me = state.me;
    $("#me-name").textContent = me.display_name;
    $("#me-username").textContent = `@${me.username}`;
    $("#me-avatar").replaceWith(Object.assign(avatar(me.display_name, me.uid), { id: "me-avatar" }));
    $("#new-group").onclick = onNewGroup;
    $("#logout").onclick = onLogout;

    let timer = null;
    this.search.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => this._search(this.search.value.trim()), 200);
      this._query = this.search.value.trim().toLowerCase();
      this.render();
    });
    this.search.addEventListener("keydown", (e) => {
      if (e.key === "Escape") this.clearSearch();
      if (e.key === "ArrowDown") {
        e.preventDefault();
        const first = $(".lists button");
        if (first) first.focus();
      }
    });
    // Up/Down move between entries of the lists.
    $(".lists").addEventListener("keydown", (e) => {
      if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return;
      const buttons = [...document.querySelectorAll(".lists button")];
      const i = buttons.indexOf(document.activeElement);
      if (i < 0) return;
      e.preventDefault();
      const next = buttons[i + (e.key === "ArrowDown" ? 1 : -1)];
      if (next) next.focus();
      else if (e.key === "ArrowUp") this.search.focus();
    });
    state.on("list", this.render);
    state.on("users", this.render);
    state.on("presence", this.render);
  }

  setActive(conv) {
    this.active = conv;
    this.render();
  }

  clearSearch() {
    this.search.value = "";
    this._query = "";
    this._searchSeq++;
    $("#people-section").hidden = true;
    this.render();
  }

  async _search(q) {
    const seq = ++this._searchSeq;
    if (!q) {
      $("#people-section").hidden = true;
      return;
    }
    let users = [];
    try {
      users = await this.api.searchUsers(q, 10);
    } catch {
      users = [];
    }
    if (seq !== this._searchSeq) return; // a newer search is under way
    users = users.filter((u) => u.uid !== this.state.me.uid);
    setChildren(this.people, users.length
      ? users.map((u) => h("li", {}, h("button", {
        type: "button", class: "person", "aria-label": `Chat with ${u.display_name} (@${u.username})`,
        onclick: () => {
          const c = this.state.openDirect(u);
          this.clearSearch();
          this.onSelect(c.conv);
        },
      }, avatar(u.display_name, u.uid), h("span", { class: "conv-body" },
        h("span", { class: "conv-title" }, u.display_name), h("span", { class: "muted" }, `@${u.username}`)))))
      : h("li", { class: "empty-note" }, "No one found."));
    $("#people-section").hidden = false;
  }

  _render() {
    const state = this.state;
    const q = this._query;
    const convs = state.sorted().filter((c) => !q || state.title(c).toLowerCase().includes(q));
    $("#chats-heading").hidden = !q;
    $("#conv-empty").hidden = state.convs.size > 0;
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.conv : null;
    // Unchanged items are kept as they are: replacing an item between mousedown and mouseup loses a click.
    reconcile(this.list, convs.map((c) => this._item(c)));
    this._items.done();
    const unread = [...state.convs.values()].reduce((n, c) => n + state.unread(c), 0);
    document.title = unread ? `(${unread}) im chat` : "im chat";
    if (focused) {
      const again = this.list.querySelector(`[data-conv="${CSS.escape(focused)}"]`);
      if (again && again !== document.activeElement) again.focus();
    }
  }

  _item(c) {
    const state = this.state;
    const title = state.title(c);
    const unread = state.unread(c);
    const online = c.kind === "direct" ? state.online.get(c.peer) === true : null;
    const last = c.lastMessage;
    const text = last ? preview(state, last) : c.draft ? "New conversation" : "";
    const label = [title, online ? "online" : "", unread ? `${unread} unread` : "", text].filter(Boolean).join(", ");
    const active = c.conv === this.active;
    const signature = JSON.stringify([label, active, last ? last.ts : 0, c.kind]);
    return this._items.render(c.conv, signature, () => h("li", {}, h("button", {
      type: "button",
      class: unread ? "conv unread" : "conv",
      "aria-current": active ? "true" : null,
      "aria-label": label,
      dataset: { conv: c.conv },
      onclick: () => this.onSelect(c.conv),
    },
    avatar(title, c.conv, { group: c.kind === "group", online }),
    h("span", { class: "conv-body" },
      h("span", { class: "conv-top" },
        h("span", { class: "conv-title" }, title),
        h("time", { class: "conv-time" }, shortTime(last ? last.ts : 0))),
      h("span", { class: "conv-bottom" },
        h("span", { class: "conv-preview" }, text),
        unread ? h("span", { class: "badge" }, unread > 99 ? "99+" : String(unread)) : null)))));
  }
}
