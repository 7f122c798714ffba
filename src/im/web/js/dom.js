// DOM helpers. User content only ever goes in as text nodes or attribute values (never innerHTML).

/**
 * Create an element: h("button", {class: "x", onclick: fn, "aria-label": "Send"}, "text", child).
 * Attribute values of null/undefined/false are skipped; `true` sets an empty attribute.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name in el && (name === "value" || name === "checked" || name === "disabled" || name === "hidden")) {
      el[name] = value;
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children (strings become text nodes; arrays are flattened; null/false skipped). */
export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace all children of `el`. */
export function setChildren(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export const $ = (selector, root = document) => root.querySelector(selector);

/**
 * Make `parent`'s children exactly `els`, in order, touching only what changed: kept nodes are not
 * re-inserted (no lost clicks or focus, and an aria-live region does not announce them again).
 */
export function reconcile(parent, els) {
  const keep = new Set(els);
  for (const child of [...parent.children]) if (!keep.has(child)) child.remove();
  let cursor = parent.firstElementChild;
  for (const el of els) {
    if (el === cursor) cursor = cursor.nextElementSibling;
    else parent.insertBefore(el, cursor);
  }
}

/**
 * Keyed rendering: `render(key, signature, make)` returns the element made last time for `key` when its
 * signature is unchanged, else a new one from `make()`. Call `done()` after a pass to forget unused keys.
 */
export class Keyed {
  constructor() {
    this._old = new Map();
    this._new = new Map();
  }

  render(key, signature, make) {
    const old = this._old.get(key);
    const el = old && old.signature === signature ? old.el : make();
    this._new.set(key, { el, signature });
    return el;
  }

  done() {
    this._old = this._new;
    this._new = new Map();
  }

  clear() {
    this._old.clear();
    this._new.clear();
  }
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

/** A short time for lists: "14:05" today, "Mar 3" before. */
export function shortTime(ms) {
  if (!ms) return "";
  const d = new Date(ms);
  return d.toDateString() === new Date().toDateString() ? timeFmt.format(d) : dayFmt.format(d);
}

export const clockTime = (ms) => (ms ? timeFmt.format(new Date(ms)) : "");
export const fullTime = (ms) => (ms ? fullFmt.format(new Date(ms)) : "");

export function formatBytes(n) {
  if (!Number.isFinite(n)) return "";
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** Initials for an avatar: "Alice Smith" -> "AS". */
export function initials(name) {
  const parts = String(name || "?").trim().split(/\s+/).filter(Boolean);
  const letters = parts.length > 1 ? parts[0][0] + parts[parts.length - 1][0] : (parts[0] || "?").slice(0, 2);
  return letters.toUpperCase();
}

/** A stable hue per id, for avatar colours (FNV-1a, spread by the golden angle so that neighbouring
 * ids such as uids 1, 2, 3 get clearly different colours). */
export function hue(id) {
  let x = 0x811c9dc5;
  for (const c of String(id)) x = Math.imul(x ^ c.charCodeAt(0), 0x01000193) >>> 0;
  return Math.round((x % 1000) * 137.508) % 360;
}

/** Random hex, from the CSPRNG (available without a secure context, unlike randomUUID). */
export function randomHex(bytes = 8) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Coalesce calls into one run shortly after (a timer, not requestAnimationFrame: that one stops in
 * background tabs, and the page must keep its state current there too). */
export function coalesce(fn, delay = 16) {
  let timer = null;
  return () => {
    if (timer !== null) return;
    timer = setTimeout(() => {
      timer = null;
      fn();
    }, delay);
  };
}
