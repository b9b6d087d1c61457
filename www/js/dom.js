// Small helpers to build DOM without a framework, and the app's dialogs.

/** h("button", {class: "primary", onclick: f}, "Save") -> an element; children may be nested arrays.
 *  Text always goes in as text nodes, so values from the archive can never become HTML. */
export function h(tag, attributes = {}, ...children) {
  const element = tag.includes(":") ? document.createElementNS("http://www.w3.org/2000/svg", tag.split(":")[1]) : document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "class") element.setAttribute("class", value);
    else if (name === "dataset") Object.assign(element.dataset, value);
    else if (name === "value" || name === "checked" || name === "indeterminate") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

/** svg("rect", {...}) -> an SVG element. */
export const svg = (tag, attributes, ...children) => h("svg:" + tag, attributes, ...children);

export function clear(element, ...children) {
  element.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

/** A status line for errors and progress, announced to screen readers. */
export function message(text, kind = "error") {
  return h("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** A short notice at the bottom of the screen (announced), gone after a few seconds. */
export function notify(text, kind = "info") {
  const region = document.getElementById("notices");
  const item = h("p", { class: `notice ${kind}` }, text);
  region.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 9000 : 5000);
}

const FOCUSABLE = 'a[href], button:not([disabled]), input:not([disabled]), select:not([disabled]), textarea:not([disabled]), [tabindex]:not([tabindex="-1"])';

/** A modal dialog: {element, body, close, closed}. Focus stays inside it (Tab cycles), Escape
 *  or the × closes it, and focus returns to where it was. */
export function modal(title, content, { wide = false, onClose } = {}) {
  const previous = document.activeElement;
  const root = document.getElementById("modal-root");
  let resolveClosed;
  const closed = new Promise((resolve) => { resolveClosed = resolve; });
  const headingId = "modal-title-" + Math.random().toString(36).slice(2);
  const body = h("div", { class: "modal-body" }, content);
  const dialog = h("section", { class: "modal" + (wide ? " wide" : ""), role: "dialog", "aria-modal": "true", "aria-labelledby": headingId },
    h("header", {}, h("h2", { id: headingId }, title), h("button", { type: "button", class: "icon", "aria-label": "Close", onclick: () => close() }, "×")),
    body);
  const backdrop = h("div", { class: "modal-backdrop", onmousedown: (e) => { if (e.target === backdrop) close(); } }, dialog);
  function close(value) {
    if (!backdrop.isConnected) return;
    backdrop.remove();
    document.removeEventListener("keydown", onKey, true);
    if (onClose) onClose(value);
    resolveClosed(value);
    if (previous && previous.isConnected && previous.focus) previous.focus();
  }
  function onKey(event) {
    if (!backdrop.isConnected || root.lastElementChild !== backdrop) return;
    if (event.key === "Escape") { event.preventDefault(); close(); return; }
    if (event.key !== "Tab") return;
    const items = [...dialog.querySelectorAll(FOCUSABLE)].filter((e) => e.offsetParent !== null);
    if (!items.length) return;
    const first = items[0], last = items[items.length - 1];
    if (event.shiftKey && document.activeElement === first) { event.preventDefault(); last.focus(); }
    else if (!event.shiftKey && document.activeElement === last) { event.preventDefault(); first.focus(); }
    else if (!dialog.contains(document.activeElement)) { event.preventDefault(); first.focus(); }
  }
  document.addEventListener("keydown", onKey, true);
  root.append(backdrop);
  const visible = (selector, within) => [...within.querySelectorAll(selector)].find((e) => e.offsetParent !== null);
  const autofocus = visible("[autofocus]", dialog) || visible(FOCUSABLE, body) || dialog.querySelector("button");
  autofocus.focus();
  return { element: dialog, body, close, closed };
}

/** Ask before doing something: resolves true when the user confirms. */
export function confirmDialog(title, text, { confirm = "Confirm", danger = false } = {}) {
  const yes = h("button", { type: "button", class: danger ? "danger solid" : "primary", onclick: () => dialog.close(true) }, confirm);
  const no = h("button", { type: "button", onclick: () => dialog.close(false), autofocus: true }, "Cancel");
  const dialog = modal(title, [h("p", {}, text), h("div", { class: "button-row end" }, no, yes)]);
  return dialog.closed.then((value) => value === true);
}

/** A labelled form field: field("Port", h("input", ...), "hint"). */
export function field(label, control, hint) {
  const id = control.id || (control.id = "f-" + Math.random().toString(36).slice(2));
  const hintId = hint ? id + "-hint" : null;
  if (hintId) control.setAttribute("aria-describedby", hintId);
  if (control.type === "checkbox") {
    return h("div", { class: "field checkbox" }, control, h("label", { for: id }, label), hint && h("small", { id: hintId }, hint));
  }
  return h("div", { class: "field" }, h("label", { for: id }, label), control, hint && h("small", { id: hintId }, hint));
}

/** A button that shows it is busy while its async action runs, and reports a failure. */
export function actionButton(label, action, attributes = {}) {
  const button = h("button", { type: "button", ...attributes, onclick: async () => {
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    try {
      await action(button);
    } catch (error) {
      notify(error.message, "error");
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  } }, label);
  return button;
}

export function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "—";
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let value = bytes, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${unit ? value.toFixed(value < 10 ? 1 : 0) : value} ${units[unit]}`;
}

/** A DICOM date (YYYYMMDD) as YYYY-MM-DD. */
export function formatDate(date) {
  return /^\d{8}$/.test(date || "") ? `${date.slice(0, 4)}-${date.slice(4, 6)}-${date.slice(6)}` : date || "";
}

/** A DICOM person name (DOE^JOHN^B=山田^太郎) as "DOE, JOHN B" (its first, alphabetic group). */
export function formatName(name) {
  const [family = "", given = "", middle = "", prefix = "", suffix = ""] = (name || "").split("=")[0].split("^");
  const rest = [prefix, given, middle, suffix].filter(Boolean).join(" ");
  return family && rest ? `${family}, ${rest}` : family || rest || name || "";
}

export function plural(count, one, many = one + "s") {
  return `${count} ${count === 1 ? one : many}`;
}
