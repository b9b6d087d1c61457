// Navigation by the hash (#/screen/part?name=value): the hash never reaches the server, so a
// query typed in the search box stays out of every log.

/** Go to a screen: navigate("search", {q: "doe"}). The same hash again renders it again. */
export function navigate(name, params = {}, rest = []) {
  const hash = href(name, params, rest);
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent("hashchange"));
  else location.hash = hash;
}

/** The href of a screen, for links. Empty parameters are left out. */
export function href(name, params = {}, rest = []) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== "")).toString();
  return `#/${[name, ...rest.map(encodeURIComponent)].join("/")}${query ? "?" + query : ""}`;
}
