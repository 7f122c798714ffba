// A tiny key-value store shared by the tabs of this browser, with IndexedDB underneath.
//
// Why not localStorage alone: Chromium keeps a copy of localStorage per renderer and tells other tabs of a
// write asynchronously, so a tab may read a value another tab has already replaced. IndexedDB transactions
// are ordered by the browser: one that starts after another committed sees its writes. The token refresh
// (api.js) relies on that under its Web Lock. Without IndexedDB (some private modes) it falls back to
// localStorage.

const DB_NAME = "im";
const STORE = "kv";
let db = null;

function open() {
  if (!db) {
    db = new Promise((resolve, reject) => {
      const request = indexedDB.open(DB_NAME, 1);
      request.onupgradeneeded = () => request.result.createObjectStore(STORE);
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });
    db.catch(() => {
      db = null;
    });
  }
  return db;
}

async function run(mode, work) {
  const conn = await open();
  return new Promise((resolve, reject) => {
    const tx = conn.transaction(STORE, mode);
    const request = work(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(request.result);
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error);
  });
}

function fallbackKey(key) {
  return `im.shared.${key}`;
}

export async function sharedGet(key) {
  try {
    const value = await run("readonly", (store) => store.get(key));
    return value === undefined ? null : value;
  } catch {
    return JSON.parse(localStorage.getItem(fallbackKey(key)) || "null");
  }
}

/** Store `value` (null deletes); resolves once other tabs' later reads will see it. */
export async function sharedSet(key, value) {
  try {
    await run("readwrite", (store) => (value === null ? store.delete(key) : store.put(value, key)));
  } catch {
    if (value === null) localStorage.removeItem(fallbackKey(key));
    else localStorage.setItem(fallbackKey(key), JSON.stringify(value));
  }
}
