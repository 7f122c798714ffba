// Sending: text at once (shown as pending until acked), files after an upload with progress.

import { sha256Hex } from "./api.js";
import { seedFileUrl } from "./ui/messages.js";

/** Natural size of an image file, or null (not decodable here). */
async function imageSize(file) {
  if (!globalThis.createImageBitmap) return null;
  try {
    const bitmap = await createImageBitmap(file);
    const size = { width: bitmap.width, height: bitmap.height };
    bitmap.close();
    return size;
  } catch {
    return null;
  }
}

export class Sender {
  constructor({ state, api, connection }) {
    this.state = state;
    this.api = api;
    this.connection = connection;
  }

  sendText(conv, text) {
    text = text.replace(/\s+$/u, "");
    if (!text.trim()) return;
    const entry = { cmid: this.state.newCmid(), conv, type: "text", body: { text } };
    this.state.addPending(entry);
    this.connection.send(entry);
  }

  async sendFile(conv, file) {
    const isImage = file.type.startsWith("image/");
    const size = isImage ? await imageSize(file) : null;
    const localUrl = isImage && size ? URL.createObjectURL(file) : null;
    const entry = { cmid: this.state.newCmid(), conv, type: isImage ? "image" : "file", body: null };
    this.state.addPending(entry, {
      status: "uploading",
      file: { blob: file, name: file.name, size: file.size, isImage: Boolean(localUrl), localUrl, ...size },
    });
    await this._upload(entry.cmid);
  }

  async _upload(cmid) {
    const p = this.state.pending.get(cmid);
    if (!p) return;
    const file = p.file.blob;
    this.state.updatePending(cmid, { status: "uploading", progress: 0, error: "" });
    try {
      const sha = await sha256Hex(file);
      let info = sha ? await this.api.fileByHash(sha) : null;
      if (!info) info = await this.api.upload(file, (progress) => this.state.updatePending(cmid, { progress }));
      this.state.updatePending(cmid, { progress: 1 });
      const type = info.content_type.startsWith("image/") ? "image" : "file";
      const body = { file_id: info.file_id, name: file.name || info.name || "file", size: info.size,
        content_type: info.content_type };
      if (type === "image" && info.width && info.height) {
        body.width = info.width;
        body.height = info.height;
        if (p.file.localUrl) seedFileUrl(info.file_id, p.file.localUrl);
      }
      const entry = { cmid, conv: p.conv, type, body };
      this.state.updatePending(cmid, { type, body, status: "sending" });
      this.connection.send(entry);
    } catch (err) {
      // fetch and XMLHttpRequest fail with a TypeError / status 0 when the network is gone.
      const offline = err instanceof TypeError || err.status === 0;
      const reason = offline ? "The upload failed: no connection to the server." : `The upload failed: ${err.message}`;
      this.state.updatePending(cmid, { status: "failed", error: reason });
    }
  }

  /** Try a failed message again: the upload if it never finished, else the send (same cmid: a refused
   * cmid was not stored and may be reused, docs/protocol.md section 7). */
  retry(p) {
    if (!p.body && p.file) {
      this._upload(p.cmid);
      return;
    }
    this.state.updatePending(p.cmid, { status: "sending", error: "" });
    this.connection.send({ cmid: p.cmid, conv: p.conv, type: p.type, body: p.body });
  }
}
