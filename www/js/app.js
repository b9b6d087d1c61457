// dicoogled's web app: a hash router, the sidebar, login, and the screens. Standard ES modules, no build.
//
// Routes: #/search?q=..&patient=..&study=..&series=..  #/dump/<SOPInstanceUID>  #/dashboard
//         #/worklist  #/import  #/indexer  #/research  #/management?tab=..  #/audit?user=..&action=..
//         #/ext/<plugin>  (the hash never reaches the server)

import * as api from "./api.js";
import { h, clear, message, modal, field, notify } from "./dom.js";

const main = document.getElementById("main");
const sidebar = document.getElementById("sidebar");

/** Screens by route name: a module with render(main, {rest, params}), loaded on first use. */
const screens = {
  search: { label: "Search", shared: true, load: () => import("./search.js") },
  dashboard: { label: "Dashboard", load: () => import("./dashboard.js") },
  worklist: { label: "Worklist", load: () => import("./worklist.js") },
  import: { label: "Import", load: () => import("./import.js") },
  indexer: { label: "Indexer", admin: true, load: () => import("./indexer.js") },
  research: { label: "Research", admin: true, load: () => import("./research.js") },
  management: { label: "Management", admin: true, load: () => import("./management.js") },
  audit: { label: "Audit", admin: true, load: () => import("./audit.js") },
  dump: { label: null, shared: true, load: () => import("./dump.js") },
};

function parseHash() {
  const [path, query = ""] = location.hash.replace(/^#\/?/, "").split("?");
  const [name, ...rest] = path.split("/").map(decodeURIComponent);
  return { name: name || "search", rest, params: new URLSearchParams(query) };
}

let menuPlugins = null;

async function renderSidebar(current) {
  const admin = api.session.user && api.session.user.admin;
  const shared = api.session.user && api.session.user.shared;  // a share link's visitor: its studies only
  const links = Object.entries(screens)
    .filter(([, screen]) => screen.label && (!screen.admin || admin) && (!shared || screen.shared))
    .map(([name, screen]) => h("li", {}, h("a", { href: `#/${name}`, "aria-current": name === current.name ? "page" : null }, screen.label)));
  const pluginList = h("ul", { class: "menu-plugins", "aria-label": "Plugins" });
  links.push(h("li", {}, h("a", { href: "/learn/" }, "Course")));  // docs/learn/, served by the daemon
  clear(sidebar, h("ul", {}, links), pluginList);
  sidebar.hidden = false;
  try {
    const { pluginsFor } = await import("./plugins.js");
    menuPlugins = menuPlugins || pluginsFor("menu");
    for (const plugin of await menuPlugins) {
      const caption = (plugin.dicoogle && plugin.dicoogle.caption) || plugin.name;
      const here = current.name === "ext" && current.rest[0] === plugin.name;
      pluginList.append(h("li", {}, h("a", { href: `#/ext/${encodeURIComponent(plugin.name)}`, "aria-current": here ? "page" : null }, caption)));
    }
  } catch (error) {
    menuPlugins = null;
    pluginList.append(h("li", { class: "muted small" }, "Plugins unavailable: " + error.message));
  }
}

function loginView(note) {
  sidebar.hidden = true;
  const error = h("div", { "aria-live": "assertive" }, note ? message(note, "info") : null);
  const form = h("form", { class: "card login", onsubmit: async (event) => {
      event.preventDefault();
      const data = new FormData(form);
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        await api.login(data.get("username"), data.get("password"));
        showUser();
        route();
      } catch (failure) {
        const text = failure.status === 401 ? "Wrong username or password."
          : failure.status === 429 ? "Too many failed logins from this computer: wait a few minutes, then try again."
          : failure.message;
        clear(error, message(text));
        form.querySelector("input[name=password]").select();
      } finally {
        button.disabled = false;
      }
    } },
    h("h1", {}, "Log in to dicoogled"),
    field("Username", h("input", { name: "username", autocomplete: "username", required: true, autocapitalize: "none" })),
    field("Password", h("input", { name: "password", type: "password", autocomplete: "current-password", required: true })),
    error,
    h("button", { type: "submit", class: "primary" }, "Log in"));
  clear(main, form);
  form.querySelector("input").focus();
}

function showUser() {
  menuPlugins = null;  // another user may see other plugins (roles)
  const box = document.getElementById("user-box");
  box.hidden = !api.session.user;
  document.getElementById("user-name").textContent = api.session.user
    ? api.session.user.user + (api.session.user.admin ? " (administrator)" : "") : "";
  document.getElementById("account").disabled = Boolean(api.session.user && api.session.user.shared);
}

/** Change one's own password (POST /user/<name>/password). */
function accountDialog() {
  const user = api.session.user;
  const password = h("input", { type: "password", autocomplete: "new-password", required: true, minlength: 1 });
  const again = h("input", { type: "password", autocomplete: "new-password", required: true });
  const status = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "stack", onsubmit: async (event) => {
      event.preventDefault();
      if (password.value !== again.value) return clear(status, message("The two passwords differ."));
      try {
        await api.post(`/user/${encodeURIComponent(user.user)}/password`, { password: password.value });
        dialog.close();
        notify("Password changed.");
      } catch (error) {
        clear(status, message(error.message));
      }
    } },
    h("p", {}, `Logged in as ${user.user}${user.admin ? ", an administrator" : ""}.`),
    field("New password", password), field("New password again", again), status,
    h("div", { class: "button-row end" }, h("button", { type: "submit", class: "primary" }, "Change password")));
  const dialog = modal("Account", form);
}

let routing = 0;

async function route() {
  const generation = ++routing;
  if (!api.session.user) return loginView();
  const current = parseHash();
  await renderSidebar(current);
  if (generation !== routing) return;
  document.title = `${current.name === "ext" ? current.rest[0] : (screens[current.name] || {}).label || current.name} · dicoogled`;
  try {
    if (current.name === "ext") {
      const { menuPluginView } = await import("./plugins.js");
      return await menuPluginView(main, current.rest[0]);
    }
    const screen = screens[current.name];
    if (!screen) return clear(main, h("h1", {}, "Not found"), message(`There is no page "${current.name}".`));
    if (screen.admin && !api.session.user.admin) return clear(main, h("h1", {}, screen.label), message("This page needs an administrator."));
    if (api.session.user.shared && !screen.shared) return clear(main, h("h1", {}, screen.label || current.name), message("A share link shows only its studies: log in for the rest."));
    const module = await screen.load();
    if (generation !== routing) return;
    await module.render(main, { rest: current.rest, params: current.params });
    if (document.activeElement === document.body) main.focus({ preventScroll: true });  // a new screen: start from it
  } catch (error) {
    if (generation === routing) clear(main, h("h1", {}, "Something went wrong"), message(error.message));
  }
}

document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault();  // "#main" would be a route
  main.focus();
});
document.getElementById("logout").addEventListener("click", async () => {
  await api.logout();
  showUser();
  history.replaceState(null, "", "#/search");
  loginView("You are logged out.");
});
document.getElementById("account").addEventListener("click", accountDialog);
window.addEventListener("hashchange", route);
window.addEventListener("session-expired", () => {
  api.session.token = null;
  api.session.user = null;
  showUser();
  loginView("Your session has ended: log in again.");
});

await api.restoreSession();
showUser();
route();
