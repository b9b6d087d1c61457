// Audit: who searched, viewed, downloaded, sent, stored, deleted or changed what, and when
// (GET /audit, newest first, a page at a time), filtered by user, action and dates, and the same
// selection downloaded as CSV (GET /audit.csv). For administrators. Entries hold UIDs, never names.

import * as api from "./api.js";
import { href } from "./nav.js";
import { h, clear, message, field, notify, actionButton, plural } from "./dom.js";

const PAGE = 50;
const RESULT_BADGES = { ok: "finished", refused: "stopped", failed: "failed" };

/** Who: the user, else the calling AE; with the share link when one opened the data. */
function who(entry) {
  const name = entry.user || (entry.calling_aet ? `AE ${entry.calling_aet}` : "—");
  return entry.share_link ? `${name} (share link ${entry.share_link})` : name;
}

/** What: the studies (each a link to a search for it), else the series or instances, and the count. */
function what(entry) {
  const studies = entry.studies.slice(0, 3).map((uid) =>
    h("a", { href: href("search", { q: `StudyInstanceUID:${uid}` }), class: "uid", title: uid }, uid));
  const others = entry.studies.length ? [] : (entry.series.length ? entry.series : entry.instances).slice(0, 3)
    .map((uid) => h("span", { class: "uid", title: uid }, uid));
  const more = Math.max(entry.studies.length, entry.series.length, entry.instances.length) > 3 ? "…" : null;
  const count = entry.count === null || entry.count === undefined ? null : h("span", { class: "muted small" }, `(${entry.count})`);
  return [studies, others, more, count].flat().filter(Boolean).flatMap((part, i) => (i ? [" ", part] : [part]));
}

export async function render(main, { params }) {
  const form = {
    user: h("input", { name: "user", autocomplete: "off", value: params.get("user") || "" }),
    action: h("select", { name: "action" }, h("option", { value: "" }, "any")),
    since: h("input", { name: "since", type: "date", value: params.get("since") || "" }),
    until: h("input", { name: "until", type: "date", value: params.get("until") || "" }),
  };
  const list = h("div", { "aria-live": "polite" });
  const pager = h("div", { class: "button-row" });
  let offset = Number(params.get("offset")) || 0;

  /** The filters as GET /audit takes them; "until" a date includes that whole day. */
  function filters() {
    let until = form.until.value;
    if (until) until = new Date(Date.parse(until + "T00:00:00Z") + 86_400_000).toISOString().slice(0, 10);
    return { user: form.user.value.trim() || undefined, action: form.action.value || undefined,
             since: form.since.value || undefined, until: until || undefined };
  }

  async function load() {
    let page;
    try {
      page = await api.get("/audit", { ...filters(), offset, psize: PAGE });
    } catch (error) {
      return clear(list, message(error.message));
    }
    if (form.action.options.length === 1) {
      for (const [name, doc] of Object.entries(page.actions)) form.action.append(h("option", { value: name, title: doc }, name));
      form.action.value = params.get("action") || "";
    }
    if (!page.results.length) {
      clear(list, h("p", { class: "muted" }, "No audit entries match."));
    } else {
      clear(list, h("p", { class: "muted small" }, `${plural(page.numResults, "entry", "entries")}, newest first; ${offset + 1}–${offset + page.results.length} shown.`),
        h("div", { class: "table-wrap" }, h("table", { class: "plain audit" },
          h("thead", {}, h("tr", {}, ["Time (UTC)", "Who", "Address", "Action", "Result", "Request", "What", "Detail"]
            .map((label) => h("th", { scope: "col" }, label)))),
          h("tbody", {}, page.results.map((entry) => h("tr", {},
            h("td", { class: "nowrap" }, entry.time.replace("T", " ").slice(0, 19)),
            h("td", {}, who(entry)),
            h("td", {}, entry.address),
            h("td", {}, entry.action),
            h("td", {}, h("span", { class: `badge ${RESULT_BADGES[entry.result] || ""}`, title: entry.status }, `${entry.result} ${entry.status}`)),
            h("td", { class: "small" }, entry.request),
            h("td", { class: "small" }, what(entry)),
            h("td", { class: "small" }, entry.detail)))))));
    }
    clear(pager,
      offset > 0 ? h("button", { type: "button", onclick: () => { offset = Math.max(0, offset - PAGE); load(); } }, "Newer") : null,
      offset + PAGE < page.numResults ? h("button", { type: "button", onclick: () => { offset += PAGE; load(); } }, "Older") : null);
  }

  clear(main,
    h("h1", {}, "Audit"),
    h("p", { class: "muted" }, "Every access to patient data and every change: who, what (UIDs only), how, when and the result. Entries are kept for [audit] retention_days."),
    h("form", { class: "card stack", "aria-label": "Audit filters", onsubmit: (event) => { event.preventDefault(); offset = 0; load(); } },
      h("div", { class: "inline" }, field("User", form.user), field("Action", form.action),
        field("From", form.since), field("To", form.until)),
      h("div", { class: "button-row" },
        h("button", { type: "submit", class: "primary" }, "Show"),
        actionButton("Download CSV", async () => {
          await api.download("/audit.csv", filters(), "audit.csv");
          notify("The CSV file is downloading.");
        }))),
    h("section", { class: "card stack", "aria-label": "Audit entries" }, list, pager));
  await load();
}
