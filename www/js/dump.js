// Dump: every element of one instance (GET /dump), sequences collapsible, with a filter box that
// keeps the elements whose keyword, tag or value contains the text (and the sequences holding them).

import * as api from "./api.js";
import { h, clear, message, plural } from "./dom.js";

export async function render(main, { rest }) {
  const uid = rest[0] || "";
  const heading = h("h1", {}, "All elements");
  clear(main, heading, h("p", { class: "muted", role: "status" }, "Loading…"));
  let data;
  try {
    data = await api.get("/dump", { uid });
  } catch (error) {
    return clear(main, heading, message(error.message));
  }
  const fields = data.results.fields;
  const rows = h("tbody");
  const count = h("p", { class: "meta", role: "status" });
  const filter = h("input", { type: "search", id: "dump-filter", placeholder: "Keyword, tag or value", autocomplete: "off", oninput: () => show() });
  const total = countElements(fields);
  const show = () => {
    const needle = filter.value.trim().toLowerCase();
    const shown = elementRows(fields, needle, 0);
    clear(rows, shown.length ? shown : h("tr", {}, h("td", { colspan: 2, class: "muted" }, "No element matches.")));
    count.textContent = needle ? `${plural(countMatches(fields, needle), "element")} of ${total} match` : `${plural(total, "element")}`;
  };
  show();
  const summary = ["PatientName", "PatientID", "StudyDate", "Modality", "SeriesDescription", "InstanceNumber"]
    .filter((k) => typeof fields[k] === "string" && fields[k]).map((k) => h("span", {}, h("strong", {}, k + " "), fields[k]));
  clear(main,
    h("nav", { class: "breadcrumbs", "aria-label": "Breadcrumbs" }, h("ol", {},
      h("li", {}, h("a", { href: "#/search", onclick: (event) => { if (history.length > 1) { event.preventDefault(); history.back(); } } }, "Back to the results")),
      h("li", {}, h("span", { "aria-current": "page" }, "All elements")))),
    heading,
    h("p", { class: "uid" }, uid),
    h("p", { class: "summary-line" }, summary),
    h("div", { class: "button-row" },
      h("a", { class: "button", href: "/legacy/file?uid=" + encodeURIComponent(uid), download: "" }, "Download the DICOM file"),
      h("button", { type: "button", onclick: () => import("./preview.js").then((m) => m.preview([{ sopInstanceUID: uid, filename: data.results.uri.split("/").pop(), number: Number(fields.InstanceNumber) || undefined }], 0)) }, "Preview"),
      h("button", { type: "button", onclick: () => toggleAll(rows, true) }, "Expand sequences"),
      h("button", { type: "button", onclick: () => toggleAll(rows, false) }, "Collapse sequences")),
    h("div", { class: "field inline-field" }, h("label", { for: filter.id }, "Filter"), filter),
    count,
    h("div", { class: "table-wrap" }, h("table", { class: "dump" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Element"), h("th", { scope: "col" }, "Value"))), rows)));
  filter.focus();
}

function toggleAll(rows, open) {
  rows.querySelectorAll("details").forEach((details) => { details.open = open; });
}

const isSequence = (value) => Array.isArray(value) && value.length > 0 && typeof value[0] === "object" && value[0] !== null;
const text = (value) => (Array.isArray(value) ? value.join(" \\ ") : String(value ?? ""));
const hits = (keyword, value, needle) => keyword.toLowerCase().includes(needle) || text(value).toLowerCase().includes(needle);

function countElements(fields) {
  let n = 0;
  for (const value of Object.values(fields)) {
    n += 1;
    if (isSequence(value)) for (const item of value) n += countElements(item);
  }
  return n;
}

function countMatches(fields, needle) {
  let n = 0;
  for (const [keyword, value] of Object.entries(fields)) {
    if (isSequence(value)) {
      if (keyword.toLowerCase().includes(needle)) n += 1;
      for (const item of value) n += countMatches(item, needle);
    } else if (hits(keyword, value, needle)) n += 1;
  }
  return n;
}

function elementRows(fields, needle, depth) {
  const out = [];
  for (const [keyword, value] of Object.entries(fields)) {
    const label = h("th", { scope: "row" }, /^[0-9A-F]{8}$/i.test(keyword) ? `(${keyword.slice(0, 4)},${keyword.slice(4)})` : keyword);
    if (isSequence(value)) {
      const own = needle && keyword.toLowerCase().includes(needle);
      const inside = needle && !own && value.some((item) => countMatches(item, needle) > 0);
      if (needle && !own && !inside) continue;
      const items = value.map((item, index) => {
        const nested = elementRows(item, own ? "" : needle, depth + 1);
        if (needle && !own && !nested.length) return null;
        return h("details", { open: Boolean(needle) || depth < 1 },
          h("summary", {}, `Item ${index + 1} (${plural(Object.keys(item).length, "element")})`),
          h("table", { class: "dump nested" }, h("tbody", {}, nested)));
      });
      out.push(h("tr", { class: "sequence" }, label, h("td", {}, h("span", { class: "muted small" }, plural(value.length, "item")), items)));
      continue;
    }
    if (needle && !hits(keyword, value, needle)) continue;
    out.push(h("tr", {}, label, h("td", { class: "value" }, text(value))));
  }
  return out;
}
