// Web UI plugins, following Dicoogle's web core contract: /webui lists them by slot, and
// /webui/module/<name> serves a module that registers its constructor in DicoogleWebcore.

import * as api from "./api.js";
import { h, clear, message } from "./dom.js";

window.DicoogleWebcore = window.DicoogleWebcore || { constructors: {} };

async function loadModule(name) {
  if (window.DicoogleWebcore.constructors[name]) return window.DicoogleWebcore.constructors[name];
  await new Promise((resolve, reject) => {
    const script = h("script", { src: `/webui/module/${encodeURIComponent(name)}` });
    script.onload = resolve;
    script.onerror = () => reject(new Error(`cannot load the module of ${name}`));
    document.head.append(script);
  });
  return window.DicoogleWebcore.constructors[name];
}

export async function pluginsFor(slot) {
  const { plugins } = await api.get("/webui", { "slot-id": slot });
  return plugins;
}

/** Sidebar entries for `menu` plugins. */
export async function loadMenuPlugins(list, current) {
  for (const plugin of await pluginsFor("menu")) {
    const caption = (plugin.dicoogle && plugin.dicoogle.caption) || plugin.name;
    list.append(h("li", {}, h("a", { href: `#/ext/${plugin.name}`, "aria-current": current === "ext" && location.hash.includes(`/ext/${plugin.name}`) ? "page" : null }, caption)));
  }
}

/** The page of a `menu` plugin: its constructor's render(parent, slot). */
export async function menuPluginView(main, name) {
  const Constructor = await loadModule(name);
  if (!Constructor) return clear(main, message(`The plugin ${name} registered nothing.`));
  const slot = h("dicoogle-slot", { "data-slot-id": "menu", "data-plugin-name": name });
  clear(main, slot);
  const instance = new Constructor();
  await instance.render(slot, slot);
}

/** Render every plugin of a slot into a container; plugins with onResult get the results. */
export async function renderSlot(container, slotId, results) {
  for (const plugin of await pluginsFor(slotId)) {
    const Constructor = await loadModule(plugin.name);
    if (!Constructor) continue;
    const slot = h("dicoogle-slot", { "data-slot-id": slotId, "data-plugin-name": plugin.name });
    container.append(slot);
    const instance = new Constructor();
    await instance.render(slot, slot);
    if (results && instance.onResult) instance.onResult(results);
  }
}

if (!customElements.get("dicoogle-slot")) {
  customElements.define("dicoogle-slot", class extends HTMLElement {});
}
