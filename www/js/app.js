// dicoogled's web app: a hash router, the sidebar, and the screens. Standard ES modules, no build.

import * as api from "./api.js";
import { h, clear, message } from "./dom.js";
import { searchView } from "./search.js";
import { dumpView } from "./dump.js";

const main = document.getElementById("main");
const sidebar = document.getElementById("sidebar");

/** Screens by route name; modules loaded on first use keep the first page light. */
const screens = {
  search: { label: "Search", render: (args) => searchView(main, args) },
  dump: { label: null, render: (args) => dumpView(main, args) },
  indexer: { label: "Indexer", admin: true, load: () => import("./indexer.js") },
  dashboard: { label: "Dashboard", load: () => import("./dashboard.js") },
  management: { label: "Management", admin: true, load: () => import("./management.js") },
};

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/");
  return { name: name || "search", rest, params: new URLSearchParams(query) };
}

export function navigate(name, params = {}, rest = []) {
  const query = new URLSearchParams(params).toString();
  location.hash = `#/${[name, ...rest].join("/")}${query ? "?" + query : ""}`;
}

async function renderSidebar() {
  const current = parseHash().name;
  const links = Object.entries(screens)
    .filter(([, screen]) => screen.label && (!screen.admin || (api.session.user && api.session.user.admin)))
    .map(([name, screen]) => h("a", { href: `#/${name}`, "aria-current": name === current ? "page" : null }, screen.label));
  clear(sidebar, h("ul", {}, links.map((link) => h("li", {}, link))), h("ul", { id: "menu-plugins" }));
  sidebar.hidden = false;
  try {
    const { loadMenuPlugins } = await import("./plugins.js");
    await loadMenuPlugins(document.getElementById("menu-plugins"), current);
  } catch (error) {
    console.warn("menu plugins:", error.message);
  }
}

function loginView() {
  sidebar.hidden = true;
  const error = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "card login", onsubmit: async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      try {
        await api.login(data.get("username"), data.get("password"));
        showUser();
        route();
      } catch (failure) {
        clear(error, message(failure.status === 401 ? "Wrong username or password." : failure.message));
      }
    } },
    h("h1", {}, "Log in to dicoogled"),
    h("label", {}, "Username", h("input", { name: "username", autocomplete: "username", required: true })),
    h("label", {}, "Password", h("input", { name: "password", type: "password", autocomplete: "current-password", required: true })),
    error,
    h("button", { type: "submit", class: "primary" }, "Log in"));
  clear(main, form);
  form.querySelector("input").focus();
}

function showUser() {
  const box = document.getElementById("user-box");
  box.hidden = !api.session.user;
  document.getElementById("user-name").textContent = api.session.user ? api.session.user.user : "";
}

async function route() {
  if (!api.session.user) return loginView();
  const { name, rest, params } = parseHash();
  await renderSidebar();
  const screen = screens[name];
  try {
    if (name === "ext") {
      const { menuPluginView } = await import("./plugins.js");
      return await menuPluginView(main, rest[0]);
    }
    if (!screen) return clear(main, message(`There is no page "${name}".`));
    if (screen.admin && !api.session.user.admin) return clear(main, message("This page needs an administrator."));
    if (screen.load) return (await screen.load()).render(main, { rest, params });
    return await screen.render({ rest, params });
  } catch (error) {
    clear(main, message(error.message));
  }
}

document.getElementById("logout").addEventListener("click", async () => {
  await api.logout();
  showUser();
  location.hash = "#/search";
  route();
});
window.addEventListener("hashchange", route);
window.addEventListener("session-expired", () => { api.session.token = null; api.session.user = null; showUser(); route(); });

await api.restoreSession();
showUser();
route();
