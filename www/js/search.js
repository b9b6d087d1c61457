// Search: one box for free text or the query language, and results as Patient → Study → Series → Image.

import * as api from "./api.js";
import { h, clear, message, modal, confirmAction } from "./dom.js";
import { navigate } from "./app.js";

const PAGE = 25;
const EXAMPLES = [
  ["doe", "free text: any tag containing the word"],
  ["PatientName:DOE^JOHN", "a field, as DICOM keywords name them"],
  ["PatientName:doe*", "wildcards: * any run, ? one character"],
  ["Modality:CT AND StudyDate:[20200101 TO 20201231]", "ranges and boolean operators"],
  ['StudyDescription:"chest without"', "a phrase"],
  ["SliceLocation:Float:[-10 TO 10]", "numeric ranges on any tag"],
  ["*:*", "everything"],
];

/** The search page: #/search?q=...&level=...&patient=..&study=..&series=.. */
export async function searchView(main, { params }) {
  const query = params.get("q") || "";
  const form = searchForm(query, params.get("provider") || "");
  const results = h("section", { id: "results", "aria-live": "polite" });
  clear(main, h("h1", {}, "Search"), form, results);
  if (query) await showResults(results, params);
  else form.querySelector("input").focus();
}

function searchForm(query, provider) {
  const input = h("input", { type: "search", name: "q", value: query, "aria-label": "Query", placeholder: "Free text or a query such as PatientName:DOE*", autocomplete: "off", list: "field-names" });
  const providers = h("select", { name: "provider", "aria-label": "Query provider" }, h("option", { value: "" }, "All providers"));
  api.get("/providers").then((names) => names.forEach((name) =>
    providers.append(h("option", { value: name, selected: name === provider }, name)))).catch(() => {});
  const help = h("details", { class: "help" }, h("summary", {}, "Query syntax"),
    h("table", {}, h("tbody", {}, EXAMPLES.map(([example, text]) =>
      h("tr", {}, h("td", {}, h("button", { type: "button", class: "link", onclick: () => { input.value = example; input.focus(); } }, h("code", {}, example))), h("td", {}, text))))));
  return h("form", { class: "search", role: "search", onsubmit: (event) => {
      event.preventDefault();
      const q = input.value.trim() || "*:*";
      navigate("search", providers.value ? { q, provider: providers.value } : { q });
    } },
    h("div", { class: "search-row" }, input, providers, h("button", { type: "submit", class: "primary" }, "Search")),
    h("datalist", { id: "field-names" }), help);
}

async function showResults(container, params) {
  const query = params.get("q");
  const provider = params.get("provider");
  const wanted = { query, depth: "image", psize: 0 };
  if (provider) wanted.provider = provider;
  let data;
  try {
    data = await api.get("/searchDIM", wanted);
  } catch (error) {
    return clear(container, message(`Query error: ${error.message}`));
  }
  const patients = data.results || [];
  const selected = { patient: params.get("patient"), study: params.get("study"), series: params.get("series") };
  const patient = patients.find((p) => p.id === selected.patient || p.name === selected.patient);
  const study = patient && patient.studies.find((s) => s.studyInstanceUID === selected.study);
  const series = study && study.series.find((s) => s.serieInstanceUID === selected.series);
  const crumb = (label, extra) => h("a", { href: "#/search?" + new URLSearchParams({ ...Object.fromEntries(params), ...extra }).toString() }, label);
  const crumbs = [crumb(`${data.numResults} patients`, { patient: "", study: "", series: "" })];
  if (patient) crumbs.push(crumb(patient.name || patient.id, { study: "", series: "" }));
  if (study) crumbs.push(crumb(study.studyDescription || study.studyDate || "study", { series: "" }));
  if (series) crumbs.push(h("span", {}, series.serieDescription || `series ${series.serieNumber}`));
  const table = series ? imageTable(series) : study ? seriesTable(study, params) : patient ? studyTable(patient, params) : patientTable(patients, params);
  clear(container,
    h("nav", { class: "breadcrumbs", "aria-label": "Results" }, crumbs.flatMap((c, i) => (i ? [" › ", c] : [c]))),
    h("p", { class: "meta" }, `${data.elapsedTime} ms`),
    table);
}

function sortable(headers, rows) {
  // Click a column header to sort by it; rows are [cells, sortKeys].
  const tbody = h("tbody", {}, rows.map((r) => r[0]));
  let order = { column: -1, ascending: true };
  const head = h("tr", {}, headers.map((label, column) => h("th", { scope: "col" },
    h("button", { type: "button", class: "sort", onclick: () => {
        order = { column, ascending: order.column === column ? !order.ascending : true };
        const sorted = [...rows].sort((a, b) => String(a[1][column]).localeCompare(String(b[1][column]), undefined, { numeric: true }) * (order.ascending ? 1 : -1));
        clear(tbody, sorted.map((r) => r[0]));
      } }, label))));
  return h("table", { class: "results" }, h("thead", {}, head), tbody);
}

function link(params, extra, label) {
  return h("a", { href: "#/search?" + new URLSearchParams({ ...Object.fromEntries(params), ...extra }).toString() }, label || "—");
}

function patientTable(patients, params) {
  return sortable(["Patient ID", "Name", "Sex", "Studies"], patients.map((p) => [
    h("tr", {}, h("td", {}, p.id), h("td", {}, link(params, { patient: p.id || p.name }, p.name)), h("td", {}, p.gender), h("td", {}, p.nStudies)),
    [p.id, p.name, p.gender, p.nStudies]]));
}

function studyTable(patient, params) {
  return sortable(["Date", "Description", "Institution", "Modalities", "Series"], patient.studies.map((s) => [
    h("tr", {}, h("td", {}, s.studyDate), h("td", {}, link(params, { study: s.studyInstanceUID }, s.studyDescription)),
      h("td", {}, s.institutionName), h("td", {}, s.modalities), h("td", {}, s.series.length)),
    [s.studyDate, s.studyDescription, s.institutionName, s.modalities, s.series.length]]));
}

function seriesTable(study, params) {
  return sortable(["Number", "Modality", "Description", "Images"], study.series.map((s) => [
    h("tr", {}, h("td", {}, s.serieNumber), h("td", {}, s.serieModality), h("td", {}, link(params, { series: s.serieInstanceUID }, s.serieDescription)), h("td", {}, s.images.length)),
    [s.serieNumber, s.serieModality, s.serieDescription, s.images.length]]));
}

function imageTable(series) {
  return sortable(["", "Number", "File", "SOPInstanceUID", ""], series.images.map((image) => [
    h("tr", {},
      h("td", {}, h("img", { class: "thumb", loading: "lazy", alt: `Thumbnail of image ${image.number ?? ""}`, src: api.imageUrl(image.sopInstanceUID, { thumbnail: true }) })),
      h("td", {}, image.number ?? ""), h("td", {}, image.filename), h("td", { class: "uid" }, image.sopInstanceUID),
      h("td", { class: "actions" },
        h("button", { type: "button", onclick: () => preview(image) }, "Preview"),
        h("a", { class: "button", href: `#/dump/${image.sopInstanceUID}` }, "Dump"))),
    ["", image.number ?? 0, image.filename, image.sopInstanceUID, ""]]));
}

function preview(image) {
  modal(`Image ${image.number ?? ""}`, h("img", { class: "preview", alt: "Preview", src: api.imageUrl(image.sopInstanceUID) }));
}

export { confirmAction };
