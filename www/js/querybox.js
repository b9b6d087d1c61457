// The search box: free text or the query language, with field names offered after AND / OR / NOT
// (an ARIA combobox), a syntax help popover, and the API's errors shown under it with the
// offending part of the query marked.

import { h, clear } from "./dom.js";
import { fieldNames } from "./api.js";

/** Fields most searched, offered first (Dicoogle's DIM fields). */
const COMMON = ["PatientName", "PatientID", "PatientSex", "PatientBirthDate", "StudyDate", "StudyDescription",
  "Modality", "ModalitiesInStudy", "AccessionNumber", "InstitutionName", "ReferringPhysicianName", "StudyInstanceUID",
  "SeriesInstanceUID", "SeriesDescription", "SeriesNumber", "SOPInstanceUID", "BodyPartExamined", "StationName",
  "Manufacturer", "StudyID", "InstanceNumber", "SliceLocation"];

export const EXAMPLES = [
  ["doe", "free text: a word in any attribute"],
  ["PatientName:doe*", "one field, with a wildcard (* any run, ? one character)"],
  ["Modality:CT AND StudyDate:[20200101 TO 20201231]", "AND, OR, NOT and date ranges"],
  ['StudyDescription:"chest without"', "a phrase, in quotes"],
  ["doe -Modality:MR", "+ must match, - must not"],
  ["(Modality:CT OR Modality:MR) AND InstitutionName:general", "parentheses group terms"],
  ["SliceLocation:Float:[-10 TO 10]", "a numeric range on any tag"],
  ["label:neuro-course AND Modality:MR", "studies or series carrying a label (label:neuro* too)"],
  ["*:*", "everything"],
];

const OPERATOR = /(?:^|[\s(])(?:AND|OR|NOT|&&|\|\|)\s+\(?$/;

/** The word being typed at the caret, if field names fit there: {start, word}. */
function fieldPosition(text, caret) {
  const before = text.slice(0, caret);
  const match = /[+-]?([A-Za-z][A-Za-z0-9]*)$/.exec(before);
  if (!match) return null;
  const start = caret - match[1].length;
  const head = before.slice(0, start).replace(/[+-]$/, "");
  if (!OPERATOR.test(head)) return null;
  if (/^[A-Za-z0-9]/.test(text.slice(caret))) return null;  // in the middle of a word
  return { start, word: match[1] };
}

let counter = 0;

/** The query box: returns {element, input, showError(error, query), clearError()}. */
export function queryBox({ value = "", onSubmit, extra = [] }) {
  const id = ++counter;
  const listId = `query-fields-${id}`, errorId = `query-error-${id}`, helpId = `query-help-${id}`;
  const input = h("input", {
    type: "search", name: "q", value, id: `query-${id}`, autocomplete: "off", spellcheck: "false",
    placeholder: "A name, an ID, or a query such as Modality:CT AND StudyDate:[20200101 TO 20201231]",
    role: "combobox", "aria-autocomplete": "list", "aria-expanded": "false", "aria-controls": listId,
    "aria-describedby": `${errorId} ${helpId}-hint`,
  });
  const list = h("ul", { id: listId, role: "listbox", class: "suggestions", hidden: true, "aria-label": "Field names" });
  const error = h("div", { id: errorId, class: "query-error", "aria-live": "assertive" });
  let options = [], active = -1, position = null;

  function close() {
    list.hidden = true;
    input.setAttribute("aria-expanded", "false");
    input.removeAttribute("aria-activedescendant");
    options = [];
    active = -1;
  }

  function highlight(index) {
    active = index;
    [...list.children].forEach((item, i) => item.setAttribute("aria-selected", String(i === index)));
    if (index >= 0) {
      input.setAttribute("aria-activedescendant", list.children[index].id);
      list.children[index].scrollIntoView({ block: "nearest" });
    } else input.removeAttribute("aria-activedescendant");
  }

  function accept(index) {
    const name = options[index];
    if (!name || !position) return close();
    const text = input.value;
    const end = position.start + position.word.length;
    input.value = text.slice(0, position.start) + name + ":" + text.slice(end);
    const caret = position.start + name.length + 1;
    input.setSelectionRange(caret, caret);
    close();
    input.focus();
  }

  async function suggest() {
    position = fieldPosition(input.value, input.selectionStart);
    if (!position) return close();
    const word = position.word.toLowerCase();
    const names = await fieldNames();
    const seen = new Set();
    options = [...COMMON, ...names].filter((name) => name.toLowerCase().startsWith(word) && !seen.has(name) && seen.add(name)).slice(0, 8);
    if (!options.length || (options.length === 1 && options[0].toLowerCase() === word && input.value[input.selectionStart] === ":")) return close();
    clear(list, options.map((name, i) => h("li", {
      id: `${listId}-${i}`, role: "option", "aria-selected": "false",
      onmousedown: (event) => { event.preventDefault(); accept(i); },
    }, h("strong", {}, name.slice(0, word.length)), name.slice(word.length))));
    list.hidden = false;
    input.setAttribute("aria-expanded", "true");
    highlight(-1);
  }

  input.addEventListener("input", () => { clearError(); suggest(); });
  input.addEventListener("blur", () => setTimeout(close, 100));
  input.addEventListener("keydown", (event) => {
    if (list.hidden) return;
    if (event.key === "ArrowDown") { event.preventDefault(); highlight((active + 1) % options.length); }
    else if (event.key === "ArrowUp") { event.preventDefault(); highlight(active <= 0 ? options.length - 1 : active - 1); }
    else if ((event.key === "Enter" || event.key === "Tab") && active >= 0) { event.preventDefault(); accept(active); }
    else if (event.key === "Escape") { event.preventDefault(); close(); }
  });

  const help = h("div", { id: helpId, class: "popover help", popover: "auto", role: "dialog", "aria-label": "Query syntax" },
    h("h2", {}, "Query syntax"),
    h("p", {}, "Type words to search every attribute, or use DICOM keywords as fields. After AND, OR or NOT, field names are offered as you type; choose with the arrow keys and Enter."),
    h("table", {}, h("tbody", {}, EXAMPLES.map(([example, text]) => h("tr", {},
      h("td", {}, h("button", { type: "button", class: "link", onclick: () => { input.value = example; help.hidePopover(); input.focus(); } }, h("code", {}, example))),
      h("td", {}, text))))),
    h("p", { class: "muted small" }, "Names match without regard to case or accents: muller* finds MÜLLER^JÜRGEN."));
  const helpButton = h("button", { type: "button", popovertarget: helpId, "aria-label": "Query syntax help" }, "?");

  function clearError() {
    clear(error);
    input.removeAttribute("aria-invalid");
  }

  /** Show the API's error; "at position N" marks where the offending text starts. */
  function showError(failure, query) {
    input.setAttribute("aria-invalid", "true");
    const at = failure.position;
    const parts = [h("strong", {}, "Query error: "), failure.message];
    if (at !== null && at !== undefined && at <= query.length) {
      const quoted = /unexpected '([^']*)'/.exec(failure.message);
      const length = quoted && query.startsWith(quoted[1], at) ? Math.max(1, quoted[1].length) : Math.max(1, Math.min(query.length - at, 1));
      const marked = at < query.length ? query.slice(at, at + length) : "\u00a0";
      parts.push(h("code", { class: "query-echo" }, query.slice(0, at),
        h("mark", { title: "here", class: at >= query.length ? "end" : null }, marked), query.slice(at + length)));
      input.focus();
      input.setSelectionRange(at, Math.min(query.length, at + length));
    }
    clear(error, h("p", { class: "message error", role: "alert" }, parts));
  }

  const element = h("form", { class: "search", role: "search", onsubmit: (event) => { event.preventDefault(); close(); onSubmit(input.value.trim()); } },
    h("label", { for: input.id, class: "visually-hidden" }, "Search"),
    h("div", { class: "search-row" },
      h("div", { class: "combo" }, input, list), extra, helpButton,
      h("button", { type: "submit", class: "primary" }, "Search")),
    h("small", { id: `${helpId}-hint`, class: "muted" }, "Free text or the query language; empty finds everything."),
    error, help);
  return { element, input, showError, clearError };
}
