// Search: one box for free text or the query language, and the results as
// Patient → Study → Series → Image, with breadcrumbs, counts, sorting, paging and selection.
//
// The hash holds where you are: #/search?q=..&provider=..&offset=..&patient=..&study=..&series=..
// Each level asks /searchDIM only for what it shows: a page of patients (psize/offset), then the
// query narrowed to one patient, study or series by its ID or UID.

import * as api from "./api.js";
import { h, clear, message, notify, confirmDialog, modal, field, formatDate, formatName, plural } from "./dom.js";
import { navigate, href } from "./nav.js";
import { queryBox } from "./querybox.js";

const PATIENTS_PER_PAGE = 25;
const ROWS_PER_PAGE = 50;
const LEVELS = ["patient", "study", "series", "image"];
const LEVEL_NAMES = { patient: ["patient", "patients"], study: ["study", "studies"], series: ["series", "series"], image: ["image", "images"] };

let providers = null;

export async function render(main, { params }) {
  const query = params.get("q");
  const provider = params.get("provider") || "";
  const providerSelect = h("select", { name: "provider", "aria-label": "Query provider" }, h("option", { value: "" }, "All providers"));
  providers = providers || api.get("/providers").catch(() => []);
  providers.then((names) => names.forEach((name) => providerSelect.append(h("option", { value: name, selected: name === provider }, name))));
  // The label filter: every label with how many studies carry it; choosing one adds label:NAME
  // to the query, so the query shows (and teaches) what is searched.
  const labelSelect = h("select", { name: "label", "aria-label": "Label filter", onchange: () => {
    const label = labelSelect.value, text = box.input.value.trim();
    if (!label) return;
    navigate("search", { q: text && text !== "*:*" ? `(${text}) AND label:${label}` : `label:${label}`, provider: providerSelect.value });
  } }, h("option", { value: "" }, "Filter by label…"));
  api.get("/labels").then(({ labels }) => labels.forEach((entry) => labelSelect.append(
    h("option", { value: entry.label }, `${entry.label} (${plural(entry.studies, "study", "studies")})`)))).catch(() => {});
  const box = queryBox({
    value: query || "",
    extra: [providerSelect, labelSelect],
    onSubmit: (text) => navigate("search", { q: text || "*:*", provider: providerSelect.value }),
  });
  const results = h("section", { class: "results-area", "aria-label": "Results", tabindex: "-1" });
  clear(main, h("h1", {}, "Search"), box.element, results);
  if (query === null) {
    results.append(introduction());
    box.input.focus();
    return;
  }
  await showResults(results, params, box);
}

function introduction() {
  return h("div", { class: "card intro" },
    h("h2", {}, "Find a study"),
    h("p", {}, "Type part of a patient's name or ID and press Enter, or search with fields: ", h("code", {}, "PatientName:doe*"), ", ",
      h("code", {}, "Modality:MR AND StudyDate:[20230101 TO 20231231]"), ". The ? button explains the syntax."),
    h("p", {}, "Results open patient by patient: choose a patient, then a study, then a series, to see its images; ",
      "Preview shows an image and its frames, Dump every element."),
    h("p", {}, h("a", { href: href("search", { q: "*:*" }) }, "Show every patient")));
}

// ---- queries ------------------------------------------------------------------------------------

/** A value as a phrase of the query language. */
const phrase = (value) => '"' + value.replace(/["\\]/g, "\\$&") + '"';

function patientTerm(patient) {
  return patient.id ? `PatientID:${phrase(patient.id)}` : `PatientName:${phrase(patient.name)}`;
}

/** The query, narrowed to some rows of a level (by ID or UID, each an OR'ed term). */
function narrowed(query, terms) {
  if (!terms.length) return query;
  return `(${query}) AND ${terms.length > 1 ? "(" + terms.join(" OR ") + ")" : terms[0]}`;
}

const termOf = {
  patient: (row) => patientTerm(row),
  study: (row) => `StudyInstanceUID:${row.studyInstanceUID}`,
  series: (row) => `SeriesInstanceUID:${row.serieInstanceUID}`,
  image: (row) => `SOPInstanceUID:${row.sopInstanceUID}`,
};

async function searchDIM(query, provider, depth, extra = {}) {
  return api.get("/searchDIM", { query, provider: provider || undefined, depth, ...extra });
}

/** Where the hash points: {level, data, patient, study, series, query (of this view)}. */
async function load(params) {
  const query = params.get("q"), provider = params.get("provider") || "";
  const wanted = { patient: params.get("patient"), patientName: params.get("patientName"), study: params.get("study"), series: params.get("series") };
  if (wanted.series) {
    const view = narrowed(query, [`SeriesInstanceUID:${wanted.series}`]);
    const data = await searchDIM(view, provider, "image");
    for (const patient of data.results) for (const study of patient.studies) for (const series of study.series)
      if (series.serieInstanceUID === wanted.series) return { level: "image", data, patient, study, series, query: view };
    return { level: "image", data, missing: "series" };
  }
  if (wanted.study) {
    const view = narrowed(query, [`StudyInstanceUID:${wanted.study}`]);
    const data = await searchDIM(view, provider, "image");
    for (const patient of data.results) for (const study of patient.studies)
      if (study.studyInstanceUID === wanted.study) return { level: "series", data, patient, study, query: view };
    return { level: "series", data, missing: "study" };
  }
  if (wanted.patient !== null || wanted.patientName !== null) {
    const target = { id: wanted.patient || "", name: wanted.patientName || "" };
    const matches = (p) => (target.id ? p.id === target.id : !p.id && p.name === target.name);
    const view = narrowed(query, [patientTerm(target)]);
    let data = await searchDIM(view, provider, "series");
    let patient = data.results.find(matches);
    if (!patient) {  // an ID the language cannot spell: the whole query, picked out here
      data = await searchDIM(query, provider, "series");
      patient = data.results.find(matches);
    }
    return patient ? { level: "study", data, patient, query: view } : { level: "study", data, missing: "patient" };
  }
  const offset = Math.max(0, Number(params.get("offset")) || 0);
  const data = await searchDIM(query, provider, "patient", { psize: PATIENTS_PER_PAGE, offset });
  return { level: "patient", data, offset, query };
}

// ---- the results view ---------------------------------------------------------------------------

async function showResults(container, params, box) {
  const query = params.get("q"), provider = params.get("provider") || "";
  clear(container, h("p", { class: "muted", role: "status" }, "Searching…"));
  let view;
  try {
    view = await load(params);
  } catch (error) {
    clear(container);
    if (error.status === 400) return box.showError(error, query);
    return clear(container, message(error.message));
  }
  if (view.missing) {
    return clear(container, breadcrumbs(params, view), message(`That ${view.missing} is not among this query's results any more.`, "info"));
  }
  const admin = api.session.user && api.session.user.admin;
  const [options, viewer] = await Promise.all([import("./plugins.js").then((p) => p.resultOptions()), api.viewerInstalled()]);
  const selection = new Map();
  const rows = rowsOf(view);
  const level = view.level;
  const [one, many] = LEVEL_NAMES[level];

  const selectedCount = h("span", { class: "selected-count", "aria-live": "polite" });
  const needSelection = [];
  const updateSelection = () => {
    selectedCount.textContent = selection.size ? `${plural(selection.size, one, many)} selected` : `Nothing selected`;
    needSelection.forEach((button) => { button.disabled = !selection.size; });
  };

  const scope = () => selection.size
    ? { query: narrowed(view.query, [...selection.values()].map(termOf[level])), words: `the ${plural(selection.size, "selected " + one, "selected " + many)}` }
    : { query: view.query, words: level === "patient" ? `every result of "${query}"` : `everything shown under ${crumbLabel(view)}` };

  const toolbar = h("div", { class: "toolbar", role: "toolbar", "aria-label": "Actions on results" }, selectedCount,
    h("button", { type: "button", onclick: async () => {
      const { exportDialog } = await import("./export.js");
      const { query: scoped, words } = scope();
      exportDialog({ query: scoped, provider, scope: words });
    } }, "Export CSV…"));
  if (admin) {
    for (const [kind, label] of [["unindex", "Unindex…"], ["remove", "Remove…"]]) {
      const button = h("button", { type: "button", class: kind === "remove" ? "danger" : null, disabled: true,
        onclick: () => removeSelected(kind, level, selection, view, provider) }, label);
      needSelection.push(button);
      toolbar.append(button);
    }
  }
  if (api.session.user && !api.session.user.shared && (level === "study" || level === "series")) {
    // Labels (any logged-in user): put one on every selected study or series, or take it off.
    for (const [adding, caption] of [[true, "Label…"], [false, "Remove label…"]]) {
      const button = h("button", { type: "button", disabled: true, onclick: () => labelSelected(adding, level, selection) }, caption);
      needSelection.push(button);
      toolbar.append(button);
    }
  }
  if (level === "study" || view.study) {
    // Downloads go through the browser's own (the session cookie authenticates the link), so a
    // large ZIP file streams to disk instead of into this page's memory.
    for (const [media, caption] of [[false, "Download ZIP"], [true, "Download as media"]]) {
      const link = h("a", { class: "button", href: "#", download: "" }, caption);
      link.addEventListener("click", () => { link.href = downloadUrl(level, selection, rows, view, media); });
      toolbar.append(link);
    }
  }
  if (api.session.user && !api.session.user.shared && level === "study") {
    // Share (an administrator, or a writer of the studies' collection): a link without an account.
    const button = h("button", { type: "button", disabled: true, onclick: () => shareSelected([...selection.values()]) }, "Share…");
    needSelection.push(button);
    toolbar.append(button);
  }
  if (viewer && view.study) {
    toolbar.append(h("a", { class: "button", href: api.viewerUrl(view.study.studyInstanceUID), target: "_blank", rel: "noopener" }, "Open study in viewer"));
  }
  const { resultBatchButtons } = await import("./plugins.js");
  const batch = await resultBatchButtons(() => ({
    query: view.query, provider,
    search: { results: view.data.results, elapsedTime: view.data.elapsedTime, numResults: view.data.numResults },
    selected: { contents: [...selection.values()], level },
  }));
  if (batch.length) toolbar.append(h("span", { class: "toolbar-group", role: "group", "aria-label": "Plugins" }, batch));

  const table = resultTable(level, rows, { params, selection, onSelect: updateSelection, options, viewer, images: view.series && view.series.images });
  const pager = level === "patient" ? patientPager(params, view) : null;
  clear(container,
    breadcrumbs(params, view),
    h("p", { class: "meta" }, summary(view), ` · ${view.data.elapsedTime} ms`),
    toolbar, table.element, pager || table.pager);
  updateSelection();
  // The link followed is gone: keyboard users go on from the results, not from the top.
  if (document.activeElement === document.body || document.activeElement === null) container.focus({ preventScroll: true });
}

/** Where a download of the selected studies or series is, or else of everything listed: a
 *  patient's studies, the whole study shown, or the series whose images are shown (GET /archive,
 *  /studies/{uid}/archive). */
function downloadUrl(level, selection, rows, view, media) {
  const chosen = [...selection.values()];
  if (level === "study") {
    return "/archive" + api.queryString({ study: (chosen.length ? chosen : rows).map((s) => s.studyInstanceUID), media: media ? "true" : undefined });
  }
  if ((level === "series" && chosen.length) || level === "image") {
    const series = level === "image" ? [view.series.serieInstanceUID] : chosen.map((s) => s.serieInstanceUID);
    return "/archive" + api.queryString({ series, media: media ? "true" : undefined });
  }
  return `/studies/${encodeURIComponent(view.study.studyInstanceUID)}/${media ? "media" : "archive"}`;
}

function rowsOf(view) {
  if (view.level === "patient") return view.data.results;
  if (view.level === "study") return view.patient.studies;
  if (view.level === "series") return view.study.series;
  return [...view.series.images].sort((a, b) => (a.number ?? Infinity) - (b.number ?? Infinity));
}

function summary(view) {
  if (view.level === "patient") return plural(view.data.numResults, "patient");
  if (view.level === "study") {
    const series = view.patient.studies.reduce((n, s) => n + s.series.length, 0);
    return `${plural(view.patient.studies.length, "study", "studies")} · ${plural(series, "series", "series")}`;
  }
  if (view.level === "series") {
    const images = view.study.series.reduce((n, s) => n + s.images.length, 0);
    return `${plural(view.study.series.length, "series", "series")} · ${plural(images, "image")}`;
  }
  return plural(view.series.images.length, "image");
}

function crumbLabel(view) {
  if (view.series) return `series ${view.series.serieNumber} ${view.series.serieDescription}`.trim();
  if (view.study) return view.study.studyDescription || formatDate(view.study.studyDate) || "this study";
  if (view.patient) return formatName(view.patient.name) || view.patient.id;
  return "";
}

function breadcrumbs(params, view) {
  const base = { q: params.get("q"), provider: params.get("provider") };
  const patientParams = view.patient ? (view.patient.id ? { patient: view.patient.id } : { patientName: view.patient.name }) : {};
  const crumbs = [["Patients", href("search", { ...base, offset: view.level === "patient" ? params.get("offset") : null })]];
  if (view.patient) crumbs.push([formatName(view.patient.name) || view.patient.id || "(no name)", href("search", { ...base, ...patientParams })]);
  if (view.study) crumbs.push([`${formatDate(view.study.studyDate)} ${view.study.studyDescription}`.trim() || "Study", href("search", { ...base, ...patientParams, study: view.study.studyInstanceUID })]);
  if (view.series) crumbs.push([`Series ${view.series.serieNumber}${view.series.serieDescription ? " · " + view.series.serieDescription : ""}`, null]);
  return h("nav", { class: "breadcrumbs", "aria-label": "Breadcrumbs" }, h("ol", {}, crumbs.map(([label, link], i) =>
    h("li", {}, i === crumbs.length - 1 ? h("span", { "aria-current": "page" }, label) : h("a", { href: link }, label)))));
}

function patientPager(params, view) {
  const total = view.data.numResults, offset = view.offset;
  if (total <= PATIENTS_PER_PAGE && !offset) return null;
  const base = Object.fromEntries(params);
  const last = Math.min(total, offset + PATIENTS_PER_PAGE);
  return h("nav", { class: "pager", "aria-label": "Pages of patients" },
    offset > 0 ? h("a", { class: "button", href: href("search", { ...base, offset: Math.max(0, offset - PATIENTS_PER_PAGE) }) }, "‹ Previous") : h("span", { class: "button disabled", "aria-disabled": "true" }, "‹ Previous"),
    h("span", {}, `Patients ${total ? offset + 1 : 0}–${last} of ${total}`),
    last < total ? h("a", { class: "button", href: href("search", { ...base, offset: offset + PATIENTS_PER_PAGE }) }, "Next ›") : h("span", { class: "button disabled", "aria-disabled": "true" }, "Next ›"));
}

// ---- tables of each level -----------------------------------------------------------------------

function columnsOf(level, params, context) {
  const base = { q: params.get("q"), provider: params.get("provider") };
  const patientParams = Object.fromEntries(["patient", "patientName"].filter((k) => params.get(k) !== null).map((k) => [k, params.get(k)]));
  if (level === "patient") return [
    { label: "Patient ID", key: (p) => p.id, cell: (p) => p.id },
    { label: "Name", key: (p) => p.name, cell: (p) => h("a", { href: href("search", { ...base, ...(p.id ? { patient: p.id } : { patientName: p.name }) }), title: p.name }, formatName(p.name) || "(no name)") },
    { label: "Sex", key: (p) => p.gender, cell: (p) => p.gender },
    { label: "Studies", key: (p) => p.nStudies, cell: (p) => p.nStudies, class: "number" },
  ];
  if (level === "study") return [
    { label: "Date", key: (s) => s.studyDate, cell: (s) => formatDate(s.studyDate) },
    { label: "Description", key: (s) => s.studyDescription, cell: (s) => h("a", { href: href("search", { ...base, ...patientParams, study: s.studyInstanceUID }) }, s.studyDescription || "(no description)") },
    { label: "Institution", key: (s) => s.institutionName, cell: (s) => s.institutionName },
    { label: "Modalities", key: (s) => s.modalities, cell: (s) => s.modalities.replaceAll(",", ", ") },
    { label: "Series", key: (s) => (s.series || []).length, cell: (s) => (s.series || []).length, class: "number" },
    { label: "Labels", key: (s) => (s.labels || []).join(" "), cell: (s) => labelChips("study", s.studyInstanceUID, s.labels) },
    ...(context.viewer ? [{ label: "Viewer", key: null, cell: (s) => h("a", { href: api.viewerUrl(s.studyInstanceUID), target: "_blank", rel: "noopener", "aria-label": `Open ${s.studyDescription || "study"} in the viewer` }, "Open") }] : []),
  ];
  if (level === "series") return [
    { label: "Number", key: (s) => s.serieNumber, cell: (s) => s.serieNumber, class: "number" },
    { label: "Modality", key: (s) => s.serieModality, cell: (s) => s.serieModality },
    { label: "Description", key: (s) => s.serieDescription, cell: (s) => h("a", { href: href("search", { ...base, ...patientParams, study: params.get("study"), series: s.serieInstanceUID }) }, s.serieDescription || `Series ${s.serieNumber}`) },
    { label: "Images", key: (s) => s.images.length, cell: (s) => s.images.length, class: "number" },
    { label: "Labels", key: (s) => (s.labels || []).join(" "), cell: (s) => labelChips("series", s.serieInstanceUID, s.labels) },
  ];
  return [
    { label: "Image", key: null, cell: (image) => h("button", { type: "button", class: "thumb-button", "aria-label": `Preview image ${image.number ?? image.filename}`, onclick: () => context.preview(image) },
      h("img", { class: "thumb", loading: "lazy", alt: "", width: 64, height: 64, src: api.imageUrl(image.sopInstanceUID, { thumbnail: true }) })) },
    { label: "Number", key: (image) => image.number ?? -1, cell: (image) => image.number ?? "", class: "number" },
    // The file name only where it says more than the UID (objects received are stored as <uid>.dcm).
    ...(context.images.some((image) => image.filename !== `${image.sopInstanceUID}.dcm`)
      ? [{ label: "File", key: (image) => image.filename, cell: (image) => h("span", { class: "path" }, image.filename) }] : []),
    { label: "SOP Instance UID", key: (image) => image.sopInstanceUID, cell: (image) => h("span", { class: "uid" }, image.sopInstanceUID) },
    { label: "Actions", key: null, cell: (image) => h("span", { class: "actions" },
      h("button", { type: "button", onclick: () => context.preview(image) }, "Preview"),
      h("a", { class: "button", href: `#/dump/${encodeURIComponent(image.sopInstanceUID)}` }, "Dump")) },
  ];
}

const rowLabel = {
  patient: (p) => formatName(p.name) || p.id,
  study: (s) => `${formatDate(s.studyDate)} ${s.studyDescription}`.trim(),
  series: (s) => `series ${s.serieNumber} ${s.serieDescription}`.trim(),
  image: (i) => `image ${i.number ?? i.filename}`,
};
const rowKey = {
  patient: (p) => `${p.id}\u0000${p.name}`, study: (s) => s.studyInstanceUID, series: (s) => s.serieInstanceUID, image: (i) => i.sopInstanceUID,
};
const slotData = {
  patient: (p) => ({ type: "patient", patientId: p.id, patientName: p.name }),
  study: (s) => ({ type: "study", uid: s.studyInstanceUID }),
  series: (s) => ({ type: "series", uid: s.serieInstanceUID }),
  image: (i) => ({ type: "image", uid: i.sopInstanceUID, uri: i.uri, instanceNumber: i.number }),
};

/** A sortable table with row selection: {element, pager}. Rows below patients page here. */
function resultTable(level, rows, { params, selection, onSelect, options, viewer, images }) {
  let order = rows, page = 0;
  const context = { viewer, images: images || [], preview: (image) => import("./preview.js").then((m) => m.preview(order, order.indexOf(image))) };
  const columns = columnsOf(level, params, context);
  if (options) columns.push({ label: "Plugins", key: null, cell: (row) => h("span", { class: "slots" }, options(slotData[level](row))) });
  const tbody = h("tbody");
  const pager = h("nav", { class: "pager", "aria-label": `Pages of ${LEVEL_NAMES[level][1]}` });
  const all = h("input", { type: "checkbox", "aria-label": `Select every ${LEVEL_NAMES[level][0]} on this page`, onchange: () => {
    for (const row of pageRows()) all.checked ? selection.set(rowKey[level](row), row) : selection.delete(rowKey[level](row));
    renderRows();
    onSelect();
  } });
  const headers = columns.map((column, index) => {
    if (!column.key) return h("th", { scope: "col" }, column.label === "Image" || column.label === "Actions" || column.label === "Plugins"
      ? h("span", { class: "visually-hidden" }, column.label) : column.label);
    const th = h("th", { scope: "col", class: column.class, "aria-sort": "none" },
      h("button", { type: "button", class: "sort", onclick: () => sortBy(index, th) }, column.label, h("span", { class: "sort-mark", "aria-hidden": "true" })));
    return th;
  });
  let sorted = { index: -1, ascending: true };

  function sortBy(index, th) {
    sorted = { index, ascending: sorted.index === index ? !sorted.ascending : true };
    const key = columns[index].key;
    order = [...rows].sort((a, b) => {
      const x = key(a), y = key(b);
      const c = typeof x === "number" && typeof y === "number" ? x - y : String(x ?? "").localeCompare(String(y ?? ""), undefined, { numeric: true, sensitivity: "base" });
      return sorted.ascending ? c : -c;
    });
    headers.forEach((header) => header.getAttribute("aria-sort") !== null && header.setAttribute("aria-sort", "none"));
    th.setAttribute("aria-sort", sorted.ascending ? "ascending" : "descending");
    page = 0;
    renderRows();
  }

  const paged = level !== "patient";
  const pageRows = () => (paged ? order.slice(page * ROWS_PER_PAGE, (page + 1) * ROWS_PER_PAGE) : order);

  function renderRows() {
    const shown = pageRows();
    clear(tbody, shown.map((row) => {
      const key = rowKey[level](row);
      const box = h("input", { type: "checkbox", checked: selection.has(key), "aria-label": `Select ${rowLabel[level](row)}`, onchange: () => {
        box.checked ? selection.set(key, row) : selection.delete(key);
        tr.classList.toggle("selected", box.checked);
        all.checked = shown.every((r) => selection.has(rowKey[level](r)));
        onSelect();
      } });
      const tr = h("tr", { class: selection.has(key) ? "selected" : null }, h("td", { class: "select" }, box),
        columns.map((column) => h("td", { class: column.class }, column.cell(row))));
      return tr;
    }));
    all.checked = shown.length > 0 && shown.every((r) => selection.has(rowKey[level](r)));
    renderPager();
  }

  function renderPager() {
    const pages = Math.ceil(order.length / ROWS_PER_PAGE);
    if (!paged || pages <= 1) return clear(pager);
    clear(pager,
      h("button", { type: "button", disabled: page === 0, onclick: () => { page -= 1; renderRows(); } }, "‹ Previous"),
      h("span", {}, `${LEVEL_NAMES[level][1][0].toUpperCase() + LEVEL_NAMES[level][1].slice(1)} ${page * ROWS_PER_PAGE + 1}–${Math.min(order.length, (page + 1) * ROWS_PER_PAGE)} of ${order.length}`),
      h("button", { type: "button", disabled: page >= pages - 1, onclick: () => { page += 1; renderRows(); } }, "Next ›"));
  }

  renderRows();
  const caption = h("caption", { class: "visually-hidden" },
    `${LEVEL_NAMES[level][1]}; the column headers sort${level === "patient" ? " this page" : ""}`);
  const element = h("div", { class: "table-wrap" }, h("table", { class: `results level-${level}` }, caption,
    h("thead", {}, h("tr", {}, h("th", { scope: "col", class: "select" }, all), headers)), tbody));
  return { element, pager };
}

// ---- labels ---------------------------------------------------------------------------------------

const LABEL_PATTERN = /^[a-z0-9][a-z0-9._-]{0,63}$/;
const labelPath = (level, uid, label) => `/${level === "study" ? "studies" : "series"}/${encodeURIComponent(uid)}/labels/${encodeURIComponent(label)}`;
const reload = () => navigate("search", Object.fromEntries(new URLSearchParams(location.hash.split("?")[1] || "")));

/** A row's labels as chips; a logged-in user takes one off with its ×. */
function labelChips(level, uid, labels) {
  return h("ul", { class: "chips labels" }, (labels || []).map((label) => h("li", { class: "chip label" },
    h("a", { href: href("search", { q: `label:${label}` }), title: `Everything labelled ${label}` }, label),
    api.session.user && !api.session.user.shared ? h("button", { type: "button", class: "icon", "aria-label": `Remove label ${label}`, onclick: async () => {
      try {
        await api.del(labelPath(level, uid, label));
        reload();
      } catch (error) {
        notify(error.message, "error");
      }
    } }, "×") : null)));
}

/** Put a label on (or take it off) every selected study or series, asking for its name. */
async function labelSelected(adding, level, selection) {
  const rows = [...selection.values()];
  const [one, many] = LEVEL_NAMES[level];
  const input = h("input", { type: "text", name: "label", autocomplete: "off", spellcheck: "false", required: true, autofocus: true, maxlength: 64 });
  const hint = "Lower-case letters, digits, '.', '_' and '-' (case does not matter).";
  const apply = h("button", { type: "submit", class: "primary" }, adding ? "Label" : "Remove");
  const form = h("form", {}, field("Label", input, hint), h("div", { class: "button-row end" }, apply));
  const dialog = modal(`${adding ? "Label" : "Remove a label from"} ${plural(rows.length, one, many)}`, form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const label = input.value.trim().toLowerCase();
    if (!LABEL_PATTERN.test(label)) {
      input.setCustomValidity(hint);
      input.reportValidity();
      return;
    }
    apply.disabled = true;
    try {
      for (const row of rows) {
        const path = labelPath(level, rowKey[level](row), label);
        await (adding ? api.put(path) : api.del(path));
      }
      dialog.close(true);
      notify(`${adding ? "Labelled" : "Took the label off"} ${plural(rows.length, one, many)}: ${label}.`);
      reload();
    } catch (error) {
      apply.disabled = false;
      notify(error.message, "error");
    }
  });
  input.addEventListener("input", () => input.setCustomValidity(""));
}

// ---- share links --------------------------------------------------------------------------------

/** Make a share link to the selected studies: read-only, no account, until a date or a number of openings. */
function shareSelected(rows) {
  const days = h("input", { type: "number", name: "days", min: "1", max: "365", value: "7", required: true });
  const uses = h("input", { type: "number", name: "uses", min: "1", placeholder: "no limit" });
  const deidentify = h("input", { type: "checkbox", name: "deidentify" });
  const result = h("div", { class: "stack", "aria-live": "polite" });
  const form = h("form", { class: "stack" }, field("Days the link works", days), field("Openings allowed", uses, "Empty: as often as wanted until it expires."),
    field("De-identified copies", deidentify, "The link shows copies with pseudonyms, made now by a research export; the map re-identifies them."),
    h("div", { class: "button-row end" }, h("button", { type: "submit", class: "primary" }, "Make the link")), result);
  modal(`Share ${plural(rows.length, "study", "studies")}`, form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const expires = new Date(Date.now() + Number(days.value) * 86_400_000).toISOString();
    try {
      const link = await api.post("/share", { study: rows.map(rowKey.study), expires, uses: uses.value || undefined,
        deidentify: deidentify.checked ? "true" : undefined });
      const url = h("input", { type: "text", readonly: true, value: link.url, "aria-label": "Share link" });
      const what = link.deidentified ? `de-identified copies of these studies (label ${link.label}, made as you read this)` : "these studies";
      clear(result, message(`Anyone with this link sees ${what}, read-only, until it expires; it is shown only now.`, "info"), url);
      url.select();
    } catch (error) {
      clear(result, message(error.message));
    }
  });
}

// ---- unindex and remove -------------------------------------------------------------------------

const PARAMETER = { patient: "StudyInstanceUID", study: "StudyInstanceUID", series: "SeriesInstanceUID", image: "SOPInstanceUID" };

async function removeSelected(kind, level, selection, view, provider) {
  const rows = [...selection.values()];
  const [one, many] = LEVEL_NAMES[level];
  const what = plural(rows.length, one, many);
  const confirmed = await confirmDialog(kind === "unindex" ? `Unindex ${what}?` : `Remove ${what}?`,
    kind === "unindex"
      ? `The index forgets the ${what}: searches and DICOM queries stop finding them. Their files stay on disk; indexing their folder again brings them back.`
      : `The files of the ${what} are deleted from disk, and the index forgets them. This cannot be undone.`,
    { confirm: kind === "unindex" ? "Unindex" : "Delete the files", danger: kind === "remove" });
  if (!confirmed) return;
  try {
    let uids;
    if (level === "patient") {  // a patient is its studies
      const data = await searchDIM(narrowed(view.query, rows.map(termOf.patient)), provider, "study");
      const keys = new Set(rows.map(rowKey.patient));
      uids = data.results.filter((p) => keys.has(rowKey.patient(p))).flatMap((p) => p.studies.map((s) => s.studyInstanceUID));
    } else {
      uids = rows.map((row) => rowKey[level](row));
    }
    const result = await api.post(`/management/tasks/${kind}`, { [PARAMETER[level]]: uids });
    const done = kind === "unindex" ? result.indexed : result.removed;
    notify(`${kind === "unindex" ? "Unindexed" : "Removed"} ${plural(done, "image")}` + (result.failed ? `; ${result.failed} failed` : "") + (result.notFound ? `; ${result.notFound} not found` : "") + ".",
      result.failed ? "error" : "info");
    navigate("search", Object.fromEntries(new URLSearchParams(location.hash.split("?")[1] || "")));
  } catch (error) {
    notify(error.message, "error");
  }
}

export { LEVELS };
