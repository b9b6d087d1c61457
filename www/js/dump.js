// Dump: every element of one instance, sequences collapsible, with a filter box.

import * as api from "./api.js";
import { h, clear, message } from "./dom.js";

export async function dumpView(main, { rest }) {
  const uid = rest[0];
  let data;
  try {
    data = await api.get("/dump", { uid });
  } catch (error) {
    return clear(main, h("h1", {}, "Dump"), message(error.message));
  }
  const rows = h("tbody");
  const filter = h("input", { type: "search", "aria-label": "Filter elements", placeholder: "Filter by keyword or value", oninput: () => render() });
  const render = () => clear(rows, elementRows(data.results.fields, filter.value.trim().toLowerCase(), 0));
  render();
  clear(main, h("h1", {}, "Dump"), h("p", { class: "uid" }, uid), h("p", {}, h("a", { href: "/legacy/file?uid=" + encodeURIComponent(uid), download: "" }, "Download the DICOM file")),
    filter, h("table", { class: "dump" }, h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Element"), h("th", { scope: "col" }, "Value"))), rows));
}

function elementRows(fields, needle, depth) {
  const out = [];
  for (const [keyword, value] of Object.entries(fields)) {
    if (Array.isArray(value) && value.length && typeof value[0] === "object") {
      const items = value.map((item, index) => h("details", { open: depth < 1 }, h("summary", {}, `Item ${index + 1}`),
        h("table", { class: "dump nested" }, h("tbody", {}, elementRows(item, needle, depth + 1)))));
      if (!needle || keyword.toLowerCase().includes(needle) || JSON.stringify(value).toLowerCase().includes(needle))
        out.push(h("tr", {}, h("th", { scope: "row" }, keyword), h("td", {}, items)));
      continue;
    }
    const text = Array.isArray(value) ? value.join(" \\ ") : String(value);
    if (needle && !keyword.toLowerCase().includes(needle) && !text.toLowerCase().includes(needle)) continue;
    out.push(h("tr", {}, h("th", { scope: "row" }, keyword), h("td", {}, text)));
  }
  return out;
}
