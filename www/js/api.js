// The REST API, as the web app uses it. Everything the app does goes through here, so anything it
// does can also be scripted against the same endpoints (GET /openapi.json lists them).
//
// Privacy: patient data never goes into a request URL, except the query of /searchDIM, which the
// API takes only there. Exports and anything else that can be a POST send a form body instead.

const TOKEN_KEY = "dicoogled.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
    // Search language errors end "at position N": where the offending text starts.
    const match = /at position (\d+)\s*$/.exec(message || "");
    this.position = match ? Number(match[1]) : null;
  }
}

/** The token lives in sessionStorage: it survives a reload, not the closing of the tab. */
export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(value) { value ? sessionStorage.setItem(TOKEN_KEY, value) : sessionStorage.removeItem(TOKEN_KEY); },
  user: null,
};

export function queryString(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null) continue;
    for (const item of Array.isArray(value) ? value : [value]) search.append(key, item);
  }
  const text = search.toString();
  return text ? "?" + text : "";
}

function formBody(form) {
  const body = new URLSearchParams();
  for (const [key, value] of Object.entries(form)) {
    if (value === undefined || value === null) continue;
    for (const item of Array.isArray(value) ? value : [value]) body.append(key, item);
  }
  return body;
}

/** fetch a path of the REST API; JSON answers are parsed, errors raise ApiError with the reason. */
export async function request(method, path, { params, form, json, raw } = {}) {
  const headers = {};
  const token = session.token;
  if (token) headers.Authorization = token;
  if (json !== undefined) headers["Content-Type"] = "application/json";
  const body = json !== undefined ? JSON.stringify(json) : form ? formBody(form) : undefined;
  let response;
  try {
    response = await fetch(path + queryString(params), { method, headers, body });
  } catch {
    throw new ApiError(0, "The server cannot be reached. Is dicoogled running?");
  }
  if (raw && response.ok) return response;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json().catch(() => null) : await response.text();
  if (!response.ok) {
    const reason = (data && typeof data.error === "string" && data.error) || `${response.status} ${response.statusText}`;
    // The session ended, unless this answer is to a request sent before a new login (a slow
    // one, under the old token): that must not end the new session.
    if (response.status === 401 && path !== "/login" && path !== "/shared" && session.token === token) {
      window.dispatchEvent(new CustomEvent("session-expired"));
    }
    throw new ApiError(response.status, reason);
  }
  return data;
}

export const get = (path, params) => request("GET", path, { params });
export const post = (path, form, params) => request("POST", path, { form: form || {}, params });
export const postJson = (path, json) => request("POST", path, { json });
export const put = (path, form) => request("PUT", path, { form: form || {} });
export const del = (path) => request("DELETE", path);

export async function login(username, password) {
  const result = await post("/login", { username, password });
  session.token = result.token;
  session.user = result;
  return result;
}

export async function restoreSession() {
  if (!session.token) return restoreShare();
  try {
    session.user = await get("/login");
  } catch {
    session.token = null;
    session.user = null;
    return restoreShare();
  }
  return session.user;
}

/** A share link's visitor (no account: a share session's cookie, set when the link was opened)
 *  sees the shared studies read-only; session.user then says shared: true. */
async function restoreShare() {
  try {
    const share = await get("/shared");
    session.user = share.shared ? { user: "Shared link", admin: false, roles: [], shared: true, share } : null;
  } catch {
    session.user = null;
  }
  return session.user;
}

export async function logout() {
  try { await post("/logout"); } catch { /* the token may be gone already */ }
  session.token = null;
  session.user = null;
}

/** The URL of a rendered frame, for <img> (which cannot send headers: the session cookie set at
 *  login authenticates it). Only the UID is in the URL. */
export function imageUrl(sopInstanceUID, { thumbnail = false, frame = 0, window = null } = {}) {
  return "/dic2png" + queryString({ SOPInstanceUID: sopInstanceUID, thumbnail: thumbnail ? "true" : undefined, frame: frame || undefined,
    windowCenter: window ? window[0] : undefined, windowWidth: window ? window[1] : undefined });
}

/** Fetch a file with the token and hand it to the browser as a download. */
export async function download(path, params, filename) {
  const response = await request("GET", path, { params, raw: true });
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob;
}

/** Whether the OHIF viewer is installed, asked once per page load: GET /health says so (older
 *  servers do not, and then GET /viewer/ answering 200 does). */
let viewerCheck = null;
export function viewerInstalled() {
  viewerCheck = viewerCheck || get("/health").then((health) => ("viewer" in health ? health.viewer
    : fetch("/viewer/", { method: "HEAD" }).then((r) => r.ok))).catch(() => false);
  return viewerCheck;
}

export const viewerUrl = (studyInstanceUID) => "/viewer/viewer" + queryString({ StudyInstanceUIDs: studyInstanceUID });

/** DICOM keywords for field pickers and the query box (GET /export/list), fetched once. */
let keywords = null;
export function fieldNames() {
  keywords = keywords || get("/export/list").catch(() => { keywords = null; return []; });
  return keywords;
}
