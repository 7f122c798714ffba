// The HTTP API (docs/protocol.md sections 2 and 18): tokens, JSON calls, uploads, file downloads.
//
// Tokens live in localStorage so a reload stays logged in. The refresh token is single use and a reused
// one revokes the whole session, so refreshing is serialised across the tabs of this browser with a Web
// Lock, and the tokens are also kept in a store every tab reads consistently (shared.js): a tab that gets
// the lock after another tab refreshed finds the new tokens there and takes them instead.

import { sharedGet, sharedSet } from "./shared.js";

const BASE = "/api/v1";
const AUTH_KEY = "im.auth";

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message || code || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code || "";
    /** Seconds to wait before trying again (429 and 503 answers that say so), else null. */
    this.retryAfter = retryAfter;
  }
}

/** The session is gone (refresh refused): the user must log in again. */
export class AuthLost extends ApiError {
  constructor(message = "your session has ended; please log in again") {
    super(401, "auth_failed", message);
    this.name = "AuthLost";
  }
}

function loadAuth() {
  try {
    const value = JSON.parse(localStorage.getItem(AUTH_KEY) || "null");
    return value && value.refresh ? value : null;
  } catch {
    return null;
  }
}

function storeAuth(tokens) {
  if (tokens) localStorage.setItem(AUTH_KEY, JSON.stringify(tokens));
  else localStorage.removeItem(AUTH_KEY);
}

function fromTokenResponse(body) {
  return {
    access: body.access_token,
    refresh: body.refresh_token,
    uid: body.uid,
    // Refresh at 80 % of the lifetime (section 2).
    refreshAt: Date.now() + body.expires_in * 800,
  };
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    /* not JSON */
  }
  const header = Number.parseInt(response.headers.get("retry-after") || "", 10);
  const retryAfter = typeof body.retry_after === "number" ? body.retry_after : Number.isNaN(header) ? null : header;
  return new ApiError(response.status, body.code, body.message, retryAfter);
}

export class Api {
  constructor() {
    this.tokens = loadAuth();
    this._refreshing = null;
    /** Called once when the session is lost (refresh refused). */
    this.onAuthLost = () => {};
  }

  get uid() {
    return this.tokens ? this.tokens.uid : null;
  }

  get loggedIn() {
    return this.tokens !== null;
  }

  // --- accounts -------------------------------------------------------------------------------------

  async register(username, password, displayName) {
    const body = { username, password };
    if (displayName) body.display_name = displayName;
    return this._json("POST", "/auth/register", body, { auth: false });
  }

  async login(username, password) {
    const body = await this._json("POST", "/auth/login", { username, password }, { auth: false });
    this.tokens = fromTokenResponse(body);
    storeAuth(this.tokens);
    await sharedSet(AUTH_KEY, this.tokens);
    return this.tokens.uid;
  }

  async logout() {
    try {
      if (this.tokens) await this._json("POST", "/auth/logout");
    } catch {
      /* logged out locally whatever the server says */
    } finally {
      await this.forget();
    }
  }

  /** Drop the tokens of this browser. */
  forget() {
    this.tokens = null;
    storeAuth(null);
    return sharedSet(AUTH_KEY, null);
  }

  /** An access token valid for a while yet, refreshing first if it is due. */
  async accessToken() {
    if (!this.tokens) throw new AuthLost();
    const stored = loadAuth();
    if (stored && stored.uid === this.tokens.uid && stored.refreshAt > this.tokens.refreshAt) {
      this.tokens = stored; // another tab refreshed
    }
    if (Date.now() >= this.tokens.refreshAt) await this.refresh();
    return this.tokens.access;
  }

  /** Exchange the refresh token for new tokens (once at a time, across tabs). */
  refresh() {
    if (!this._refreshing) {
      const used = this.tokens ? this.tokens.refresh : null;
      const run = () => this._refresh(used);
      const locked = navigator.locks ? navigator.locks.request("im-token-refresh", run) : run();
      this._refreshing = locked.finally(() => {
        this._refreshing = null;
      });
    }
    return this._refreshing;
  }

  async _refresh(used) {
    // Under the lock: if another tab refreshed meanwhile, its tokens are in the shared store; take them.
    const shared = await sharedGet(AUTH_KEY);
    if (shared && this.tokens && shared.uid === this.tokens.uid && used && shared.refresh !== used) {
      this.tokens = shared;
      storeAuth(shared);
      return;
    }
    const token = used || (shared && shared.refresh);
    if (!token) throw this._lost();
    const response = await fetch(`${BASE}/auth/refresh`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ refresh_token: token }),
    });
    if (response.status === 401 || response.status === 422) throw this._lost();
    if (!response.ok) throw await errorOf(response);
    this.tokens = fromTokenResponse(await response.json());
    await sharedSet(AUTH_KEY, this.tokens); // before the lock is released: the next holder must see it
    storeAuth(this.tokens);
  }

  _lost() {
    const wasLoggedIn = this.tokens !== null;
    const forgotten = this.forget();
    if (wasLoggedIn) forgotten.finally(() => this.onAuthLost());
    return new AuthLost();
  }

  // --- calls ----------------------------------------------------------------------------------------

  /** One authenticated request, refreshing and retrying once on `auth_failed`. */
  async _fetch(method, path, { body, headers = {}, auth = true } = {}) {
    for (let attempt = 0; ; attempt++) {
      const h = { ...headers };
      if (auth) h.Authorization = `Bearer ${await this.accessToken()}`;
      const response = await fetch(`${BASE}${path}`, { method, headers: h, body });
      if (auth && response.status === 401 && attempt === 0) {
        await this.refresh();
        continue;
      }
      if (auth && response.status === 401) throw this._lost();
      return response;
    }
  }

  async _json(method, path, body, { auth = true } = {}) {
    const init = { auth };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { "Content-Type": "application/json" };
    }
    const response = await this._fetch(method, path, init);
    if (!response.ok) throw await errorOf(response);
    return response.status === 204 ? null : response.json();
  }

  get(path) {
    return this._json("GET", path);
  }

  me() {
    return this.get("/users/me");
  }

  user(uid) {
    return this.get(`/users/${uid}`);
  }

  searchUsers(q, limit = 20) {
    return this.get(`/users?q=${encodeURIComponent(q)}&limit=${limit}`);
  }

  gateway() {
    return this.get("/gateway");
  }

  conversations() {
    return this.get("/conversations");
  }

  history(conv, { before, after, limit = 50 } = {}) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (before !== undefined) q.set("before", String(before));
    if (after !== undefined) q.set("after", String(after));
    return this.get(`/conversations/${encodeURIComponent(conv)}/messages?${q}`);
  }

  receipts(conv) {
    return this.get(`/conversations/${encodeURIComponent(conv)}/receipts`);
  }

  presence(uids) {
    return this.get(`/presence?uids=${uids.join(",")}`);
  }

  createGroup(name, members) {
    return this._json("POST", "/groups", { name, members });
  }

  group(gid) {
    return this.get(`/groups/${gid}`);
  }

  members(gid) {
    return this.get(`/groups/${gid}/members`);
  }

  addMembers(gid, uids) {
    return this._json("POST", `/groups/${gid}/members`, { uids });
  }

  removeMember(gid, uid) {
    return this._json("DELETE", `/groups/${gid}/members/${uid}`);
  }

  leaveGroup(gid) {
    return this._json("POST", `/groups/${gid}/leave`);
  }

  // --- files ----------------------------------------------------------------------------------------

  /** The file info if these bytes are already stored and readable by us (no upload needed), else null. */
  async fileByHash(sha256) {
    const response = await this._fetch("GET", `/files/by-hash/${sha256}`);
    if (response.status === 404) return null;
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  /** Upload with progress (fetch cannot report upload progress; XMLHttpRequest can). */
  async upload(file, onProgress) {
    const token = await this.accessToken();
    const form = new FormData();
    form.append("file", file, file.name || "file");
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `${BASE}/files`);
      xhr.setRequestHeader("Authorization", `Bearer ${token}`);
      xhr.responseType = "json";
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) onProgress(e.loaded / e.total);
      };
      xhr.onload = () => {
        const body = xhr.response || {};
        if (xhr.status === 200 || xhr.status === 201) resolve(body);
        else reject(new ApiError(xhr.status, body.code, body.message));
      };
      xhr.onerror = () => reject(new ApiError(0, "network", "the upload failed (network error)"));
      xhr.send(form);
    });
  }

  /** A file's bytes as a blob (the endpoint needs the bearer token, so no plain <img src>). */
  async fileBlob(fileId) {
    const response = await this._fetch("GET", `/files/${encodeURIComponent(fileId)}`);
    if (!response.ok) throw await errorOf(response);
    return response.blob();
  }
}

/** SHA-256 of a file as lowercase hex; null where WebCrypto is unavailable (not a secure context). */
export async function sha256Hex(file) {
  if (!globalThis.crypto || !crypto.subtle) return null;
  const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
