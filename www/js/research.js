// Research: de-identify a collection (a label) into a new one for a research project
// (POST /research/export, PS3.15 Basic Profile and the options the route takes), follow the export
// task (GET /index/task, polled while this page is shown), and the data custodian's side: the
// pseudonym map (GET /research/pseudonyms, a CSV download) and a UID look-up in both directions
// (GET /research/uids?uid=..|original=..). Administrators only: the map re-identifies patients.

import * as api from "./api.js";
import { h, clear, message, field, notify, plural, formatDate } from "./dom.js";
import { href } from "./nav.js";
import { renderTasks } from "./indexer.js";

const POLL_MS = 1500;
const MAP_PAGE = 50;  // patients of the map shown at a time
const LABEL_HINT = "Lower-case letters, digits, '.', '_' and '-', starting with a letter or digit.";
/** An export task's name, as the daemon gives it: "[research]export SOURCE into COPY". */
const EXPORT_TASK = /^\[research\]export (\S+) into (\S+)$/;

const searchLink = (label, text) => h("a", { href: href("search", { q: `label:${label}` }) }, text);

export async function render(main) {
  const collections = h("div", { "aria-live": "polite" });
  const tasks = h("div", { class: "tasks", "aria-live": "off" });
  const pseudonyms = h("div");
  const lookup = uidLookup();
  let labels = [];

  // ---- the export form ----
  const source = h("select", { name: "label", required: true });
  const into = h("input", { name: "into", required: true, autocomplete: "off", spellcheck: "false", maxlength: 64,
    placeholder: "neuro-research", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}", title: LABEL_HINT });
  const dates = h("select", { name: "retain_dates" },
    h("option", { value: "remove" }, "Removed (the profile's default)"),
    h("option", { value: "offset" }, "Moved by a number of days, the same for all of a patient's studies"),
    h("option", { value: "full" }, "Kept as they are"));
  const device = h("input", { type: "checkbox", name: "retain_device_identity" });
  const characteristics = h("input", { type: "checkbox", name: "retain_patient_characteristics" });
  const descriptors = h("input", { type: "checkbox", name: "clean_descriptors" });
  const formStatus = h("div", { "aria-live": "polite" });
  const start = h("button", { type: "submit", class: "primary" }, "De-identify");
  let started = null;  // {taskUid, into} of the export started here, to report its result

  const form = h("form", { class: "card stack", "aria-label": "De-identify a collection", onsubmit: async (event) => {
      event.preventDefault();
      start.disabled = true;
      try {
        const answer = await api.post("/research/export", {
          label: source.value, into: into.value.trim(), retain_dates: dates.value,
          retain_device_identity: String(device.checked), retain_patient_characteristics: String(characteristics.checked),
          clean_descriptors: String(descriptors.checked) });
        started = answer;
        clear(formStatus, message(`De-identifying ${answer.label} into ${answer.into}…`, "info"));
        poll();
      } catch (error) {
        clear(formStatus, message(error.message));
      } finally {
        start.disabled = !labels.length;
      }
    } },
    h("h2", {}, "De-identify a collection"),
    h("p", { class: "muted" }, "Every study carrying the label is copied through DICOM's Basic Application Level Confidentiality ",
      "Profile (PS3.15 Annex E): names, IDs, addresses, dates and free text removed, UIDs replaced, patients given pseudonyms. ",
      "The copies are new studies with a new label; researchers search that label, the originals stay as they are."),
    h("div", { class: "inline" }, field("Collection to de-identify", source), field("Label of the copies", into, LABEL_HINT)),
    field("Dates", dates),
    h("fieldset", { class: "stack" }, h("legend", {}, "Keep, as the profile's options allow"),
      field("Device identity (station names, serial numbers)", device),
      field("Patient characteristics (age, sex, size, weight)", characteristics),
      field("Descriptions, cleaned of names, IDs and dates", descriptors),
      h("small", { class: "muted" }, "Not Retain UIDs: copies with the originals' UIDs would be the originals in this archive.")),
    formStatus,
    h("div", { class: "button-row" }, start));

  clear(main,
    h("h1", {}, "Research"),
    form,
    h("section", { class: "card stack", "aria-labelledby": "research-tasks-heading" },
      h("h2", { id: "research-tasks-heading" }, "Exports"), tasks),
    h("section", { class: "card stack", "aria-labelledby": "collections-heading" },
      h("h2", { id: "collections-heading" }, "Collections"), collections),
    h("section", { class: "card stack", "aria-labelledby": "pseudonyms-heading" },
      h("div", { class: "section-head" }, h("h2", { id: "pseudonyms-heading" }, "Pseudonym map"),
        h("a", { class: "button", href: "/research/pseudonyms?format=csv", download: "pseudonyms.csv" }, "Download as CSV")),
      h("p", { class: "muted" }, "Who each pseudonym stands for: the same patient has the same pseudonym in every export. ",
        "It is kept apart from the archive (data/pseudonyms.sqlite); back it up, and share it with no one but the data custodian."),
      pseudonyms),
    lookup);

  async function loadLabels() {
    ({ labels } = await api.get("/labels"));
    const chosen = source.value;
    clear(source, labels.map((entry) => h("option", { value: entry.label }, `${entry.label} (${plural(entry.studies, "study", "studies")})`)));
    if (labels.some((entry) => entry.label === chosen)) source.value = chosen;
    start.disabled = !labels.length;
    clear(collections, labels.length
      ? h("div", { class: "table-wrap" }, h("table", { class: "plain" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Label"), h("th", { scope: "col" }, "Studies"))),
          h("tbody", {}, labels.map((entry) => h("tr", { dataset: { label: entry.label } },
            h("td", {}, searchLink(entry.label, entry.label)), h("td", {}, String(entry.studies)))))))
      : message("No study carries a label yet: label the studies of a collection in Search first.", "info"));
  }

  // ---- the export tasks ----
  let timer = null, finished = new Set();
  async function poll() {
    clearTimeout(timer);
    if (!tasks.isConnected) return;  // the page was left: stop polling
    try {
      const results = (await api.get("/index/task")).results.filter((task) => EXPORT_TASK.test(task.taskName));
      renderTasks(tasks, results, poll, {
        describe: (task) => [`${plural(task.nIndexed || 0, "instance")} de-identified`,
          task.nErrors ? `${plural(task.nErrors, "instance")} not exported` : null],
        empty: "No export yet. Exports stay listed after they finish, until closed." });
      const done = results.filter((task) => task.complete && !finished.has(task.taskUid));
      if (done.length) {
        done.forEach((task) => finished.add(task.taskUid));
        await Promise.all([loadLabels(), showPseudonyms(pseudonyms)]);
        const mine = started && done.find((task) => task.taskUid === started.taskUid);
        if (mine) reportResult(mine);
      }
    } catch (error) {
      clear(tasks, message(error.message));
    }
    clearTimeout(timer);  // one timer, even when the form polled while a poll was under way
    if (tasks.isConnected) timer = setTimeout(poll, POLL_MS);
  }

  function reportResult(task) {
    const copies = labels.find((entry) => entry.label === started.into);
    clear(formStatus, message([
      task.canceled ? `Stopped: ${plural(task.nIndexed, "instance")} de-identified into ` : `Done: ${plural(task.nIndexed, "instance")} de-identified into `,
      searchLink(started.into, started.into),
      copies ? ` (${plural(copies.studies, "study", "studies")})` : "",
      task.nErrors ? `; ${plural(task.nErrors, "instance")} not exported (see the log)` : "", "."], task.nErrors ? "error" : "info"));
    notify(`Research export into ${started.into} finished.`);
    started = null;
  }

  await Promise.all([loadLabels(), showPseudonyms(pseudonyms)]);
  // Exports already finished when the page opens are not news: only those finishing now are.
  try {
    (await api.get("/index/task")).results.filter((task) => task.complete).forEach((task) => finished.add(task.taskUid));
  } catch { /* poll() reports it */ }
  poll();
}

/** The pseudonym map, filtered as typed, a page at a time. */
async function showPseudonyms(container) {
  const { pseudonyms } = await api.get("/research/pseudonyms");
  if (!pseudonyms.length) return clear(container, h("p", { class: "muted" }, "The map is empty: no patient has been de-identified yet."));
  const previousFilter = container.querySelector("input");
  const filter = h("input", { type: "search", autocomplete: "off", spellcheck: "false", value: previousFilter ? previousFilter.value : "",
    oninput: () => { page = 0; draw(); } });
  const body = h("tbody");
  const pager = h("nav", { class: "pager", "aria-label": "Pages of the pseudonym map" });
  let page = 0;
  function draw() {
    const words = filter.value.trim().toLowerCase().split(/\s+/).filter(Boolean);
    const rows = pseudonyms.filter((row) => words.every((word) => [row.pseudonym, row.PatientID, row.IssuerOfPatientID, row.PatientName]
      .some((text) => (text || "").toLowerCase().includes(word))));
    const first = page * MAP_PAGE, last = Math.min(rows.length, first + MAP_PAGE);
    clear(body, rows.slice(first, last).map((row) => h("tr", {},
      h("td", { class: "uid" }, row.pseudonym), h("td", {}, row.PatientID), h("td", {}, row.IssuerOfPatientID),
      h("td", {}, row.PatientName), h("td", {}, formatDate(row.PatientBirthDate)), h("td", {}, String(row.dateOffsetDays)),
      h("td", {}, row.created.replace("T", " ").slice(0, 19)))));
    clear(pager,
      h("button", { type: "button", disabled: page === 0, onclick: () => { page -= 1; draw(); } }, "‹ Previous"),
      h("span", { class: "muted" }, rows.length ? `${first + 1}–${last} of ${plural(rows.length, "patient")}` : "No patient matches."),
      h("button", { type: "button", disabled: last >= rows.length, onclick: () => { page += 1; draw(); } }, "Next ›"));
  }
  draw();
  clear(container, field("Find a patient or a pseudonym", filter),
    h("div", { class: "table-wrap" }, h("table", { class: "plain pseudonyms" },
      h("thead", {}, h("tr", {}, ["Pseudonym", "Patient ID", "Issuer", "Patient name", "Birth date", "Date offset (days)", "Recorded"]
        .map((label) => h("th", { scope: "col" }, label)))),
      body)),
    pager);
}

/** Which UID a de-identified copy has for an original, or the original of a copy's UID. */
function uidLookup() {
  const input = h("input", { required: true, autocomplete: "off", spellcheck: "false", maxlength: 64, pattern: "[0-9.]+",
    placeholder: "1.2.826.0.1.3680043.8.498.…" });
  const answer = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "inline", onsubmit: async (event) => {
      event.preventDefault();
      const uid = input.value.trim();
      try {
        // A UID may be an original, a replacement, or both (a copy exported again).
        const [asReplacement, asOriginal] = await Promise.all([
          api.get("/research/uids", { uid }), api.get("/research/uids", { original: uid })]);
        const rows = [...asOriginal.uids, ...asReplacement.uids];
        clear(answer, rows.length
          ? h("div", { class: "table-wrap" }, h("table", { class: "plain uid-pairs" },
              h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Original"), h("th", { scope: "col" }, "Replacement"), h("th", { scope: "col" }, "Recorded"))),
              h("tbody", {}, rows.map((row) => h("tr", {},
                h("td", { class: "uid" }, row.original), h("td", { class: "uid" }, row.replacement),
                h("td", {}, row.created.replace("T", " ").slice(0, 19)))))))
          : message(`${uid} is neither an original nor a replacement UID of the map.`, "info"));
      } catch (error) {
        clear(answer, message(error.message));
      }
    } },
    field("Original or replacement UID", input), h("button", { type: "submit" }, "Look up"));
  return h("section", { class: "card stack", "aria-labelledby": "uid-lookup-heading" },
    h("h2", { id: "uid-lookup-heading" }, "UID look-up"),
    h("p", { class: "muted" }, "The copy of an object (study, series or instance UID), or the original of a copy's UID."),
    form, answer);
}
