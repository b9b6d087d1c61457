// Web UI plugins, following Dicoogle's web core contract.
//
// GET /webui?slot-id=<slot> lists the plugins of a slot; GET /webui/module/<name> serves a module
// that registers its constructor in window.DicoogleWebcore.constructors[name]. The app creates a
// <dicoogle-slot data-slot-id=.. data-plugin-name=..> element, sets its `data`, and calls the
// instance's render(parent, slot) with that element as both. Slots:
//   menu            a sidebar entry and its page (#/ext/<name>)
//   result-options  (or result-option) a cell per result row; slot.data = {type: "patient", patientId, patientName}
//                   | {type: "study" | "series", uid} | {type: "image", uid, uri, instanceNumber}
//   result-batch    a button under the results; its dialog's slot gets data {query, queryProvider,
//                   results} and the event "result-selection-ready" with detail {search: {data},
//                   selected: {contents, level}}; the plugin may dispatch "hide" on the slot to close
//   settings        a panel per plugin under Management → Plugins; slot.data = {settings}
// A plugin with onResult(results) also gets the current results after render.

import * as api from "./api.js";
import { h, clear, message, modal } from "./dom.js";

window.DicoogleWebcore = window.DicoogleWebcore || {};
window.DicoogleWebcore.constructors = window.DicoogleWebcore.constructors || {};

/** The slot element plugins render into. */
class DicoogleSlot extends HTMLElement {
  get slotId() { return this.dataset.slotId; }
  get pluginName() { return this.dataset.pluginName; }
}
if (!customElements.get("dicoogle-slot")) customElements.define("dicoogle-slot", DicoogleSlot);

const modules = new Map();

/** The constructor of a plugin's module, loaded once (a classic script: the server wraps it). */
function loadModule(name) {
  if (!modules.has(name)) {
    modules.set(name, new Promise((resolve, reject) => {
      if (window.DicoogleWebcore.constructors[name]) return resolve(window.DicoogleWebcore.constructors[name]);
      const script = document.createElement("script");
      script.src = `/webui/module/${encodeURIComponent(name)}`;
      script.onload = () => {
        const constructor = window.DicoogleWebcore.constructors[name];
        constructor ? resolve(constructor) : reject(new Error(`the module of ${name} registered nothing`));
      };
      script.onerror = () => reject(new Error(`the module of ${name} cannot be loaded`));
      document.head.append(script);
    }).catch((error) => { modules.delete(name); throw error; }));
  }
  return modules.get(name);
}

/** Plugins of a slot, as /webui describes them. */
export async function pluginsFor(slot) {
  const { plugins } = await api.get("/webui", { "slot-id": slot });
  return plugins;
}

export const caption = (plugin) => (plugin.dicoogle && plugin.dicoogle.caption) || plugin.name;

/** A new slot element for a plugin, with its data. */
export function slotElement(slotId, plugin, data) {
  const slot = h("dicoogle-slot", { "data-slot-id": slotId, "data-plugin-name": plugin.name, class: `slot slot-${slotId}` });
  slot.data = data || {};
  return slot;
}

/** Create the plugin's instance and render it into the slot. A failing plugin shows its error in
 *  its slot and leaves the rest of the page alone. Returns the instance, or null. */
export async function mount(slot, plugin, results) {
  try {
    const Constructor = await loadModule(plugin.name);
    const instance = new Constructor();
    const rendered = await instance.render(slot, slot);
    slot.dispatchEvent(new CustomEvent("plugin-load", { detail: rendered }));
    if (results !== undefined && typeof instance.onResult === "function") instance.onResult(results);
    return instance;
  } catch (error) {
    clear(slot, h("span", { class: "plugin-error" }, `Plugin ${plugin.name}: ${error.message}`));
    return null;
  }
}

/** The page of a `menu` plugin. */
export async function menuPluginView(main, name) {
  const plugin = (await pluginsFor("menu")).find((p) => p.name === name);
  if (!plugin) return clear(main, h("h1", {}, name), message(`There is no menu plugin "${name}".`));
  const slot = slotElement("menu", plugin);
  clear(main, h("h1", {}, caption(plugin)), slot);
  await mount(slot, plugin);
}

/** result-options: a function giving each row its cell of plugin slots, or null without plugins. */
export async function resultOptions() {
  let plugins;
  try {
    plugins = await pluginsFor(["result-options", "result-option"]);  // Dicoogle's code says one, its README the other
  } catch {
    return null;
  }
  if (!plugins.length) return null;
  return (data) => plugins.map((plugin) => {
    const slot = slotElement(plugin.dicoogle["slot-id"], plugin, data);
    mount(slot, plugin, data);
    return slot;
  });
}

/** result-batch: one button per plugin; each opens a dialog where the plugin gets the selection. */
export async function resultBatchButtons(context) {
  let plugins;
  try {
    plugins = await pluginsFor("result-batch");
  } catch {
    return [];
  }
  return plugins.map((plugin) => h("button", { type: "button", class: "plugin-button", onclick: async () => {
    const { query, provider, search, selected } = context();
    const slot = slotElement("result-batch", plugin, { query, queryProvider: provider ? [provider] : [], results: search.results });
    const dialog = modal(caption(plugin), slot, { wide: true });
    slot.addEventListener("hide", () => dialog.close());
    await mount(slot, plugin, search.results);
    slot.dispatchEvent(new CustomEvent("result-selection-ready", { detail: { search: { data: search }, selected } }));
  } }, caption(plugin)));
}

/** settings: a panel per plugin, in Management → Plugins. */
export async function renderSettingsSlots(container) {
  const plugins = await pluginsFor("settings");
  for (const plugin of plugins) {
    const slot = slotElement("settings", plugin, { settings: plugin.settings || {} });
    container.append(h("section", { class: "card" }, h("h3", {}, caption(plugin)), slot));
    await mount(slot, plugin);
  }
  return plugins.length;
}
