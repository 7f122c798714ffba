// One message as a list item: text, image, file or system line, with its time and delivery status.

import { clockTime, formatBytes, fullTime, h } from "../dom.js";
import { icon } from "../icons.js";

/** file_id -> Promise<blob URL>: each file is downloaded once per page (with the bearer token). */
const blobUrls = new Map();

export function fileUrl(api, fileId) {
  if (!blobUrls.has(fileId)) {
    const p = api.fileBlob(fileId).then((blob) => URL.createObjectURL(blob));
    p.catch(() => blobUrls.delete(fileId)); // let a later render try again
    blobUrls.set(fileId, p);
  }
  return blobUrls.get(fileId);
}

/** Use a local blob URL for a file this page just uploaded (no download of our own bytes). */
export function seedFileUrl(fileId, url) {
  if (!blobUrls.has(fileId)) blobUrls.set(fileId, Promise.resolve(url));
}

/** Save a file through a blob URL and a temporary download link. */
export async function downloadFile(api, fileId, name) {
  const url = await fileUrl(api, fileId);
  const a = h("a", { href: url, download: name || "file", hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}

/** The words of a system message ("Alice added Bob"). */
export function systemText(state, body) {
  const n = (uid) => state.name(uid);
  const list = (uids) => (uids || []).map(n).join(", ");
  switch (body && body.event) {
    case "group_created":
      return `${n(body.by)} created the group “${body.name}”`;
    case "members_added":
      return `${n(body.by)} added ${list(body.uids)}`;
    case "member_removed":
      return `${n(body.by)} removed ${n(body.uid)}`;
    case "member_left":
      return body.new_owner ? `${n(body.uid)} left; ${n(body.new_owner)} is now the owner` : `${n(body.uid)} left`;
    case "role_changed":
      return `${n(body.by)} made ${n(body.uid)} ${body.role === "admin" ? "an admin" : "a member"}`;
    default:
      return "Group updated";
  }
}

/** A one-line preview for the conversation list. */
export function preview(state, m) {
  if (!m) return "";
  const group = m.conv.startsWith("g:");
  const who = m.from === state.me.uid ? "You: " : group ? `${state.name(m.from)}: ` : "";
  const body = m.body || {};
  switch (m.type) {
    case "system":
      return systemText(state, body);
    case "image":
      return `${who}Photo`;
    case "file":
      return `${who}File: ${body.name || "file"}`;
    default:
      return `${who}${textOf(m)}`;
  }
}

function textOf(m) {
  const body = m.body;
  if (body && typeof body === "object" && typeof body.text === "string") return body.text;
  if (typeof body === "string") return body;
  return m.type === "text" ? JSON.stringify(body) : `[${m.type}]`;
}

/** The delivery status of one of our stored messages: {label, level: "sent"|"delivered"|"read"}. */
export function statusOf(state, c, seq) {
  const others = state.others(c);
  if (!others || !others.length) return { label: "Sent", level: "sent" };
  const marks = others.map((u) => c.marks.get(u) || { read: 0, delivered: 0 });
  const read = marks.filter((m) => m.read >= seq).length;
  const delivered = marks.filter((m) => m.delivered >= seq).length;
  if (c.kind === "direct") {
    if (read) return { label: "Read", level: "read" };
    return delivered ? { label: "Delivered", level: "delivered" } : { label: "Sent", level: "sent" };
  }
  const total = others.length;
  if (read) return { label: `Read by ${read} of ${total}`, level: read === total ? "read" : "delivered" };
  if (delivered) return { label: `Delivered to ${delivered} of ${total}`, level: "delivered" };
  return { label: "Sent", level: "sent" };
}

const ICONS = { sent: "check", delivered: "checks", read: "checks", sending: "clock", failed: "alert" };

/**
 * What a message shows besides its content: {system text | status, sender, signature}. `m` is a stored
 * message or a pending one (`pending` true); `ctx` is {state, api, conv, online (connection open),
 * showSender, onRetry}. The signature changes exactly when the rendering would: callers re-render on that.
 */
export function describe(m, ctx, pending = false) {
  const { state, conv: c } = ctx;
  if (!pending && m.type === "system") {
    const text = systemText(state, m.body);
    return { system: text, signature: `sys|${text}` };
  }
  const mine = pending || m.from === state.me.uid;
  let status = null;
  if (pending) {
    if (m.status === "failed") status = { label: "Not sent", level: "failed" };
    else if (m.status === "uploading") status = { label: `Uploading ${Math.round(m.progress * 100)} %`, level: "sending" };
    else status = { label: ctx.online ? "Sending…" : "Waiting for connection…", level: "sending" };
  } else if (mine) {
    status = statusOf(state, c, m.seq);
  }
  const sender = !mine && ctx.showSender ? state.name(m.from) : "";
  const signature = [m.type, status && status.label, sender, m.error || "", pending ? m.cmid : m.seq,
    pending && m.body ? "b" : ""].join("|");
  return { mine, status, sender, signature };
}

/** Render a message as a list item (see describe for the arguments). */
export function renderMessage(m, ctx, pending, d = describe(m, ctx, pending)) {
  const { api } = ctx;
  if (d.system !== undefined) {
    return h("li", { class: "msg system", dataset: { seq: m.seq } }, h("span", {}, d.system));
  }
  const { mine, status, sender } = d;
  const bubble = h("div", { class: "bubble" });
  if (sender) bubble.append(h("div", { class: "sender" }, sender));
  bubble.append(content(m, api, pending));
  if (pending && m.status === "uploading") {
    bubble.append(h("progress", { class: "upload", max: "100", value: String(Math.round(m.progress * 100)),
      "aria-label": "Upload progress" }));
  }
  const meta = h("div", { class: "meta" });
  const ts = pending ? m.createdAt : m.ts;
  meta.append(h("time", { datetime: new Date(ts).toISOString(), title: fullTime(ts) }, clockTime(ts)));
  if (status) {
    meta.append(h("span", { class: `status ${status.level}`, title: status.label },
      icon(ICONS[status.level] || "check", { size: 14 }), h("span", {}, status.label)));
  }
  bubble.append(meta);
  if (pending && m.status === "failed") {
    bubble.append(h("div", { class: "failed", role: "alert" },
      h("span", {}, m.error || "It could not be sent."),
      h("button", { type: "button", class: "link", onclick: () => ctx.onRetry(m) }, "Retry")));
  }
  const cls = ["msg", mine ? "mine" : "theirs", pending ? "pending" : "", m.type === "image" ? "has-image" : ""];
  return h("li", { class: cls.filter(Boolean).join(" "), dataset: pending ? { cmid: m.cmid } : { seq: m.seq } }, bubble);
}

function content(m, api, pending) {
  const body = m.body && typeof m.body === "object" ? m.body : {};
  if (m.type === "image" || (pending && m.file && m.file.isImage)) {
    const img = h("img", { class: "image", alt: body.name || (m.file && m.file.name) || "image", decoding: "async" });
    const w = body.width || (m.file && m.file.width);
    const hgt = body.height || (m.file && m.file.height);
    if (w && hgt) {
      img.width = w;
      img.height = hgt;
    }
    const link = h("a", { class: "image-link", target: "_blank", rel: "noopener", "aria-label": `Open ${img.alt}` }, img);
    if (m.file && m.file.localUrl) {
      img.src = m.file.localUrl;
      link.href = m.file.localUrl;
    } else if (body.file_id) {
      fileUrl(api, body.file_id).then((url) => {
        img.src = url;
        link.href = url;
      }, () => img.replaceWith(h("span", { class: "broken" }, "Image unavailable")));
    }
    return h("figure", { class: "figure" }, link, body.caption ? h("figcaption", {}, body.caption) : null);
  }
  if (m.type === "file" || (pending && m.file)) {
    const name = body.name || (m.file && m.file.name) || "file";
    const size = body.size || (m.file && m.file.size);
    const button = body.file_id
      ? h("button", { type: "button", class: "download", onclick: () => downloadFile(api, body.file_id, name).catch(() => {}) },
        "Download")
      : null;
    return h("div", { class: "file" }, icon("file", { size: 22 }),
      h("span", { class: "file-name" }, name), h("span", { class: "file-size" }, formatBytes(size)), button);
  }
  return h("div", { class: "text" }, textOf(m));
}
