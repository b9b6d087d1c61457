// The REST API, as the web app uses it. Everything the app does goes through here, so anything it
// does can also be scripted against the same endpoints.

const TOKEN_KEY = "dicoogled.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export const session = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set token(value) { value ? sessionStorage.setItem(TOKEN_KEY, value) : sessionStorage.removeItem(TOKEN_KEY); },
  user: null,
};

function queryString(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params || {})) {
    if (value === undefined || value === null) continue;
    for (const item of Array.isArray(value) ? value : [value]) search.append(key, item);
  }
  const text = search.toString();
  return text ? "?" + text : "";
}

/** fetch a path of the REST API; JSON answers are parsed, errors raise ApiError with the reason. */
export async function request(method, path, { params, form, raw } = {}) {
  const headers = {};
  if (session.token) headers.Authorization = session.token;
  let body;
  if (form) {
    body = new URLSearchParams();
    for (const [key, value] of Object.entries(form)) {
      for (const item of Array.isArray(value) ? value : [value]) body.append(key, item);
    }
  }
  const response = await fetch(path + queryString(params), { method, headers, body });
  if (raw && response.ok) return response;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok || (data && data.error && typeof data.error === "string")) {
    const reason = (data && data.error) || `${response.status} ${response.statusText}`;
    if (response.status === 401 && path !== "/login") window.dispatchEvent(new CustomEvent("session-expired"));
    throw new ApiError(response.status, reason);
  }
  return data;
}

export const get = (path, params) => request("GET", path, { params });
export const post = (path, form, params) => request("POST", path, { form, params });

export async function login(username, password) {
  const result = await post("/login", { username, password });
  session.token = result.token;
  session.user = result;
  return result;
}

export async function restoreSession() {
  if (!session.token) return null;
  try {
    session.user = await get("/login");
  } catch {
    session.token = null;
    session.user = null;
  }
  return session.user;
}

export async function logout() {
  try { await post("/logout"); } catch { /* the token may be gone already */ }
  session.token = null;
  session.user = null;
}

/** A URL carrying the token, for <img> and downloads (which cannot send headers). The session
 *  cookie set at login authenticates those requests; UIDs are the only data in the URL. */
export function imageUrl(sopInstanceUID, { thumbnail = false, frame = 0 } = {}) {
  return "/dic2png" + queryString({ SOPInstanceUID: sopInstanceUID, thumbnail: thumbnail ? "true" : undefined, frame: frame || undefined });
}
