// Tiny helpers to build DOM without a framework.

/** h("button", {class: "primary", onclick: f}, "Save") -> an element; children may be nested arrays. */
export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

export function clear(element, ...children) {
  element.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

/** A status line for errors and progress, announced to screen readers. */
export function message(text, kind = "error") {
  return h("p", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** A modal dialog; returns {element, close}. Escape closes it and focus returns where it was. */
export function modal(title, ...content) {
  const previous = document.activeElement;
  const root = document.getElementById("modal-root");
  const close = () => { dialog.remove(); previous && previous.focus && previous.focus(); };
  const dialog = h("div", { class: "modal-backdrop", onclick: (e) => e.target === dialog && close() },
    h("section", { class: "modal", role: "dialog", "aria-modal": "true", "aria-label": title },
      h("header", {}, h("h2", {}, title), h("button", { type: "button", class: "icon", "aria-label": "Close", onclick: close }, "×")),
      h("div", { class: "modal-body" }, content)));
  dialog.addEventListener("keydown", (event) => { if (event.key === "Escape") close(); });
  root.append(dialog);
  dialog.querySelector("button").focus();
  return { element: dialog, close };
}

export function confirmAction(text) {
  return window.confirm(text);
}
