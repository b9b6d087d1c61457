// Export to CSV: pick the fields (DICOM keywords from GET /export/list), load or save them as a
// preset (GET/POST /presets/<user>[/<name>]), then POST /exportFile (the query goes in the body)
// and download GET /exportFile?UID=<uid>. One line per instance, as Dicoogle writes it.

import * as api from "./api.js";
import { h, clear, modal, message, field, notify } from "./dom.js";

const DEFAULT_FIELDS = ["PatientName", "PatientID", "StudyDate", "StudyDescription", "Modality", "SeriesDescription", "SOPInstanceUID"];
const LAST_FIELDS = "dicoogled.export.fields";

/** Open the export dialog for a query; `scope` says in words what it covers. */
export async function exportDialog({ query, provider, scope }) {
  const user = api.session.user.user;
  let fields = JSON.parse(localStorage.getItem(LAST_FIELDS) || "null") || [...DEFAULT_FIELDS];
  const chips = h("ul", { class: "chips", "aria-label": "Fields to export, in order" });
  const status = h("div", { "aria-live": "polite" });
  const adder = h("input", { list: "export-field-names", placeholder: "A DICOM keyword, e.g. AccessionNumber", autocomplete: "off", spellcheck: "false" });
  const names = h("datalist", { id: "export-field-names" });
  const presets = h("select", {}, h("option", { value: "" }, "Choose a preset…"));
  const presetName = h("input", { placeholder: "Preset name", maxlength: 128 });
  let known = new Set();

  function renderChips() {
    clear(chips, fields.map((name, index) => h("li", { class: "chip" },
      h("span", {}, name),
      h("button", { type: "button", class: "icon small", "aria-label": `Move ${name} earlier`, disabled: index === 0, onclick: () => move(index, -1) }, "↑"),
      h("button", { type: "button", class: "icon small", "aria-label": `Remove ${name}`, onclick: () => { fields.splice(index, 1); renderChips(); } }, "×"))));
    if (!fields.length) chips.append(h("li", { class: "muted" }, "No fields yet: add at least one."));
  }

  function move(index, by) {
    const [name] = fields.splice(index, 1);
    fields.splice(index + by, 0, name);
    renderChips();
    chips.querySelectorAll("button")[Math.max(0, (index + by) * 2)]?.focus();
  }

  function add() {
    const wanted = adder.value.split(/[\s,;]+/).filter(Boolean);
    const unknown = wanted.filter((name) => known.size && !known.has(name) && !/^[0-9A-Fa-f]{8}$/.test(name));
    if (unknown.length) return clear(status, message(`Not a DICOM keyword: ${unknown.join(", ")}`));
    for (const name of wanted) if (!fields.includes(name)) fields.push(name);
    adder.value = "";
    clear(status);
    renderChips();
  }
  adder.addEventListener("keydown", (event) => { if (event.key === "Enter") { event.preventDefault(); add(); } });

  let saved = [];
  async function loadPresets(select) {
    try {
      saved = await api.get(`/presets/${encodeURIComponent(user)}`);
    } catch (error) {
      saved = [];
      clear(status, message(`Presets unavailable: ${error.message}`));
    }
    clear(presets, h("option", { value: "" }, saved.length ? "Choose a preset…" : "No presets saved yet"),
      saved.map((preset) => h("option", { value: preset.name, selected: preset.name === select }, preset.name)));
  }
  presets.addEventListener("change", () => {
    const preset = saved.find((p) => p.name === presets.value);
    if (preset) { fields = [...preset.fields]; presetName.value = preset.name; renderChips(); }
  });

  async function savePreset() {
    const name = presetName.value.trim();
    if (!name || !fields.length) return clear(status, message("A preset needs a name and at least one field."));
    try {
      await api.post(`/presets/${encodeURIComponent(user)}/${encodeURIComponent(name)}`, { field: fields });
      await loadPresets(name);
      clear(status, message(`Preset "${name}" saved.`, "info"));
    } catch (error) {
      clear(status, message(error.message));
    }
  }

  async function run(button) {
    if (!fields.length) return clear(status, message("Add at least one field."));
    button.disabled = true;
    clear(status, message("Exporting…", "info"));
    try {
      const form = { query, fields: JSON.stringify(fields) };
      if (provider) form.providers = provider;
      const { uid } = await api.post("/exportFile", form);
      await api.download("/exportFile", { UID: uid }, "QueryResultsExport.csv");
      localStorage.setItem(LAST_FIELDS, JSON.stringify(fields));
      dialog.close();
      notify("The CSV file is downloading.");
    } catch (error) {
      clear(status, message(error.message));
    } finally {
      button.disabled = false;
    }
  }

  const exportButton = h("button", { type: "button", class: "primary", onclick: () => run(exportButton) }, "Export CSV");
  const content = h("div", { class: "stack export" },
    h("p", {}, `Exports ${scope}: one line per image, with the fields below as columns.`),
    h("fieldset", {}, h("legend", {}, "Fields"), chips,
      h("div", { class: "inline" }, field("Add a field", adder), h("button", { type: "button", onclick: add }, "Add")), names),
    h("fieldset", {}, h("legend", {}, "Presets"),
      h("div", { class: "inline" }, field("Load", presets), field("Save these fields as", presetName),
        h("button", { type: "button", onclick: savePreset }, "Save preset"))),
    status,
    h("div", { class: "button-row end" }, h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"), exportButton));
  const dialog = modal("Export to CSV", content, { wide: true });
  renderChips();
  loadPresets();
  const list = await api.fieldNames();
  known = new Set(list);
  names.append(...list.map((name) => h("option", { value: name })));
}
