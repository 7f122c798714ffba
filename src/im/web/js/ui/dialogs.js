// Dialogs: create a group; see, add and remove a group's members, or leave it. <dialog> gives focus
// trapping and Escape-to-close.

import { $, h, setChildren } from "../dom.js";
import { avatar } from "./sidebar.js";

/** A search box that lists matching users with one action button each. */
function userPicker(api, state, input, results, { actionLabel, exclude, onPick }) {
  let timer = null;
  let seq = 0;
  async function run() {
    const q = input.value.trim();
    const mine = ++seq;
    if (!q) {
      results.replaceChildren();
      return;
    }
    let users = [];
    try {
      users = await api.searchUsers(q, 8);
    } catch {
      users = [];
    }
    if (mine !== seq) return;
    users = users.filter((u) => u.uid !== state.me.uid && !exclude().has(u.uid));
    setChildren(results, users.length ? users.map((u) => h("li", {}, h("button", {
      type: "button", class: "person", "aria-label": `${actionLabel} ${u.display_name} (@${u.username})`,
      onclick: () => {
        state.users.set(u.uid, u);
        onPick(u);
        input.value = "";
        results.replaceChildren();
        input.focus();
      },
    }, avatar(u.display_name, u.uid), h("span", { class: "conv-body" }, h("span", { class: "conv-title" }, u.display_name),
      h("span", { class: "muted" }, `@${u.username}`)), h("span", { class: "secondary small", "aria-hidden": "true" }, actionLabel))))
      : h("li", { class: "empty-note" }, "No one found."));
  }
  input.oninput = () => {
    clearTimeout(timer);
    timer = setTimeout(run, 200);
  };
  input.onkeydown = (e) => {
    if (e.key === "Enter") {
      e.preventDefault(); // Enter in the search box must not submit the dialog's form
      const first = results.querySelector("button");
      if (first) first.click();
    }
  };
}

function wireClose(dialog) {
  for (const b of dialog.querySelectorAll("[data-close]")) b.onclick = () => dialog.close();
}

export class GroupDialog {
  constructor({ api, state, onCreated }) {
    this.dialog = $("#group-dialog");
    this.selected = new Map();
    this.api = api;
    this.state = state;
    wireClose(this.dialog);
    userPicker(api, state, $("#group-search"), $("#group-results"), {
      actionLabel: "Add",
      exclude: () => this.selected,
      onPick: (u) => {
        this.selected.set(u.uid, u);
        this._chips();
      },
    });
    $("#group-form").onsubmit = async (e) => {
      e.preventDefault();
      const name = $("#group-name").value.trim();
      const error = $("#group-error");
      if (!name) {
        error.textContent = "Give the group a name.";
        $("#group-name").focus();
        return;
      }
      $("#group-create").disabled = true;
      try {
        const group = await api.createGroup(name, [...this.selected.keys()]);
        this.dialog.close();
        onCreated(group);
      } catch (err) {
        error.textContent = err.message || "The group could not be created.";
      } finally {
        $("#group-create").disabled = false;
      }
    };
  }

  open() {
    this.selected.clear();
    $("#group-name").value = "";
    $("#group-search").value = "";
    $("#group-results").replaceChildren();
    $("#group-error").textContent = "";
    this._chips();
    this.dialog.showModal();
    $("#group-name").focus();
  }

  _chips() {
    setChildren($("#group-chips"), [...this.selected.values()].map((u) => h("li", { class: "chip" }, u.display_name,
      h("button", { type: "button", "aria-label": `Remove ${u.display_name}`, onclick: () => {
        this.selected.delete(u.uid);
        this._chips();
      } }, "×"))));
  }
}

export class MembersDialog {
  constructor({ api, state }) {
    this.dialog = $("#members-dialog");
    this.api = api;
    this.state = state;
    this.conv = null;
    wireClose(this.dialog);
    userPicker(api, state, $("#members-search"), $("#members-results"), {
      actionLabel: "Add",
      exclude: () => this._members(),
      onPick: (u) => this._act(() => api.addMembers(this._gid(), [u.uid])),
    });
    $("#leave-group").onclick = () => {
      if (!confirm("Leave this group? You will stop receiving its messages.")) return;
      this._act(() => api.leaveGroup(this._gid())).then(() => this.dialog.close());
    };
    state.on("conv", (conv) => {
      if (conv === this.conv && this.dialog.open) this._render();
    });
    state.on("users", () => this.dialog.open && this._render());
    state.on("presence", () => this.dialog.open && this._render());
  }

  _gid() {
    return this.state.get(this.conv).gid;
  }

  _members() {
    const c = this.state.get(this.conv);
    return c && c.members ? c.members : new Map();
  }

  async _act(fn) {
    const error = $("#members-error");
    error.textContent = "";
    try {
      await fn();
      await this.state.loadMembers(this.conv);
    } catch (err) {
      error.textContent = err.message || "That did not work.";
    }
  }

  async open(conv) {
    this.conv = conv;
    const c = this.state.get(conv);
    $("#members-dialog-title").textContent = `Members of ${this.state.title(c)}`;
    $("#members-search").value = "";
    $("#members-results").replaceChildren();
    $("#members-error").textContent = "";
    this._signature = null;
    this._render();
    this.dialog.showModal();
    try {
      await this.state.loadMembers(conv);
    } catch (err) {
      $("#members-error").textContent = err.message;
    }
  }

  _render() {
    const state = this.state;
    const members = this._members();
    const myRole = members.get(state.me.uid);
    const canRemove = (uid, role) => uid !== state.me.uid && role !== "owner"
      && (myRole === "owner" || (myRole === "admin" && role === "member"));
    const order = { owner: 0, admin: 1, member: 2 };
    const sorted = [...members.entries()].sort((a, b) => order[a[1]] - order[b[1]] || a[0] - b[0]);
    // Re-render only on a visible change (a list rebuilt under the pointer loses clicks).
    const signature = JSON.stringify([myRole, sorted.map(([uid, role]) => [uid, role, state.name(uid),
      state.online.get(uid) === true])]);
    if (signature === this._signature) return;
    this._signature = signature;
    setChildren($("#members-list"), sorted.map(([uid, role]) => {
      const mine = uid === state.me.uid;
      const plain = mine ? state.me.display_name : state.name(uid);
      const name = mine ? `${plain} (you)` : plain;
      const online = mine ? true : state.online.get(uid) === true;
      return h("li", { class: "member" }, avatar(plain, uid, { online }),
        h("span", { class: "member-name" }, h("span", {}, name), " ", h("span", { class: "role" }, role)),
        canRemove(uid, role) ? h("button", { type: "button", class: "ghost small", "aria-label": `Remove ${name}`,
          onclick: () => this._act(() => this.api.removeMember(this._gid(), uid)) }, "Remove") : null);
    }));
    $("#members-add").hidden = !(myRole === "owner" || myRole === "admin");
  }
}
