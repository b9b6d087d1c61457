// Worklist: the Modality Worklist's entries (GET /worklist) with the state their modality reports
// by MPPS, a form that schedules one (POST /worklist, as DICOM JSON) and a delete button
// (DELETE /worklist/<id>); both are for administrators. Modalities read the list by C-FIND.

import * as api from "./api.js";
import { h, clear, message, field, notify, confirmDialog, actionButton } from "./dom.js";

const STATE_BADGES = { "IN PROGRESS": "running", COMPLETED: "finished", DISCONTINUED: "stopped" };

/** The first value of a DICOM JSON attribute, as text ("" if absent); a name's alphabetic form. */
function value(dataset, tag) {
  const first = ((dataset || {})[tag] || {}).Value?.[0];
  return first && typeof first === "object" ? first.Alphabetic || "" : first ?? "";
}
const step = (entry) => ((entry.dataset || {})["00400100"] || {}).Value?.[0] || {};  // the scheduled step

/** The form's fields as DICOM JSON (PS3.18 F.2): what a RIS would send. */
function entryJson(form) {
  const text = (vr, input) => (input.value.trim() ? { vr, Value: [input.value.trim()] } : undefined);
  return {
    "00100010": form.name.value.trim() ? { vr: "PN", Value: [{ Alphabetic: form.name.value.trim() }] } : undefined,
    "00100020": text("LO", form.patientId),
    "00080050": text("SH", form.accession),
    "00400100": { vr: "SQ", Value: [{
      "00400001": text("AE", form.station),
      "00080060": text("CS", form.modality),
      "00400002": form.date.value ? { vr: "DA", Value: [form.date.value.replaceAll("-", "")] } : undefined,
      "00400007": text("LO", form.description),
    }] },
  };
}

export async function render(main) {
  const admin = api.session.user && api.session.user.admin;
  const list = h("div", { "aria-live": "polite" });
  const status = h("div", { "aria-live": "polite" });
  const form = {
    name: h("input", { required: true, placeholder: "DOE^JOHN", autocomplete: "off" }),
    patientId: h("input", { required: true, autocomplete: "off" }),
    accession: h("input", { placeholder: "filled in if empty", autocomplete: "off" }),
    station: h("input", { placeholder: "CT01", maxlength: 16, autocomplete: "off" }),
    modality: h("input", { placeholder: "CT", maxlength: 16, autocomplete: "off" }),
    date: h("input", { type: "date", value: new Date().toISOString().slice(0, 10) }),
    description: h("input", { autocomplete: "off" }),
  };

  async function load() {
    const entries = await api.get("/worklist");
    if (!entries.length) return clear(list, h("p", { class: "muted" }, "The worklist is empty."));
    clear(list, h("div", { class: "table-wrap" }, h("table", { class: "plain" },
      h("thead", {}, h("tr", {}, ["Patient", "Patient ID", "Accession", "Station", "Modality", "Date", "State", ""]
        .map((label) => h("th", { scope: "col" }, label)))),
      h("tbody", {}, entries.map((entry) => h("tr", {},
        h("td", {}, value(entry.dataset, "00100010")),
        h("td", {}, value(entry.dataset, "00100020")),
        h("td", {}, entry.AccessionNumber),
        h("td", {}, value(step(entry), "00400001")),
        h("td", {}, value(step(entry), "00080060")),
        h("td", {}, value(step(entry), "00400002")),
        h("td", {}, h("span", { class: `badge ${STATE_BADGES[entry.state] || ""}` }, entry.state)),
        h("td", {}, admin ? actionButton("Delete", async () => {
          if (!await confirmDialog(`Delete ${entry.AccessionNumber}?`, "The modality will no longer find this step in its worklist.", { confirm: "Delete", danger: true })) return;
          await api.del(`/worklist/${entry.id}`);
          notify(`${entry.AccessionNumber} deleted.`);
          await load();
        }, { "aria-label": `Delete ${entry.AccessionNumber}` }) : null)))))));
  }

  async function add(event) {
    event.preventDefault();
    try {
      const { id } = await api.postJson("/worklist", entryJson(form));
      notify(`Scheduled (entry ${id}).`);
      for (const input of [form.name, form.patientId, form.accession, form.description]) input.value = "";
      clear(status);
      await load();
    } catch (error) {
      clear(status, message(error.message));
    }
  }

  clear(main,
    h("h1", {}, "Worklist"),
    h("p", { class: "muted" }, "Scheduled procedure steps: modalities find them by Modality Worklist C-FIND and report their progress by MPPS."),
    admin ? h("form", { class: "card stack", "aria-label": "Schedule a procedure step", onsubmit: add },
      h("h2", {}, "Schedule a procedure step"),
      h("div", { class: "inline" }, field("Patient name", form.name), field("Patient ID", form.patientId),
        field("Accession number", form.accession)),
      h("div", { class: "inline" }, field("Station AE title", form.station), field("Modality", form.modality),
        field("Date", form.date), field("Description", form.description)),
      status,
      h("div", { class: "button-row" }, h("button", { type: "submit", class: "primary" }, "Schedule"))) : null,
    h("section", { class: "card stack", "aria-label": "Worklist entries" }, list));
  await load();
}
