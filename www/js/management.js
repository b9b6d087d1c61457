// Management (administrators): the DICOM service, move destinations, transfer syntaxes, Q/R
// limits, plugins, users and the log — each tab one part of the /management REST API.

import * as api from "./api.js";
import { h, clear, message, field, notify, confirmDialog, actionButton, modal, plural } from "./dom.js";
import { navigate } from "./nav.js";

const TABS = [
  ["services", "DICOM service", services],
  ["destinations", "Move destinations", destinations],
  ["transfer", "Transfer syntaxes", transferSyntaxes],
  ["limits", "Q/R limits", limits],
  ["plugins", "Plugins", plugins],
  ["users", "Users", users],
  ["log", "Log", logTail],
];

export async function render(main, { params }) {
  const current = TABS.find(([id]) => id === params.get("tab")) ? params.get("tab") : TABS[0][0];
  const panel = h("div", { class: "tab-panel", role: "tabpanel", id: "management-panel", tabindex: "0", "aria-labelledby": `tab-${current}` });
  const tabs = TABS.map(([id, label]) => h("button", {
    type: "button", role: "tab", id: `tab-${id}`, "aria-selected": String(id === current), "aria-controls": "management-panel",
    tabindex: id === current ? "0" : "-1", onclick: () => navigate("management", { tab: id }),
  }, label));
  const tablist = h("div", { class: "tabs", role: "tablist", "aria-label": "Management" }, tabs);
  tablist.addEventListener("keydown", (event) => {  // arrow keys move between tabs (ARIA tabs pattern)
    const index = tabs.indexOf(document.activeElement);
    if (index < 0) return;
    const next = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: tabs.length - 1 }[event.key];
    if (next === undefined) return;
    event.preventDefault();
    const tab = tabs[(next + tabs.length) % tabs.length];
    tab.focus();
    tab.click();
  });
  clear(main, h("h1", {}, "Management"), tablist, panel);
  if (document.activeElement === document.body || !main.contains(document.activeElement)) {
    if (params.get("tab")) tabs.find((t) => t.getAttribute("aria-selected") === "true").focus();
  }
  const [, , show] = TABS.find(([id]) => id === current);
  try {
    await show(panel);
  } catch (error) {
    clear(panel, message(error.message));
  }
}

function statusLine() {
  return h("div", { class: "status-line", "aria-live": "polite" });
}

const say = (line, text, kind = "info") => clear(line, message(text, kind));

// ---- the DICOM service ----------------------------------------------------------------------------

async function services(panel) {
  const [service, aet] = await Promise.all([api.get("/management/dicom/storage"), api.get("/management/settings/dicom")]);
  const status = statusLine();
  const port = h("input", { type: "number", min: 1, max: 65535, value: service.port, required: true });
  const hostname = h("input", { value: service.hostname || "", placeholder: "every interface" });
  const autostart = h("input", { type: "checkbox", checked: service.autostart });
  const title = h("input", { value: aet.aetitle, maxlength: 16, required: true, spellcheck: "false" });
  const running = service.isRunning;
  clear(panel,
    h("section", { class: "card stack" },
      h("h2", {}, "DICOM listener"),
      h("p", {}, "Storage (C-STORE), query (C-FIND) and retrieve (C-MOVE, C-GET) share one listener. It is ",
        h("span", { class: `badge ${running ? "running" : "stopped"}` }, running ? "running" : "stopped"),
        ` on ${service.hostname || "0.0.0.0"}:${service.port}.`),
      h("div", { class: "button-row" },
        actionButton(running ? "Stop the listener" : "Start the listener", async () => {
          if (running && !await confirmDialog("Stop the DICOM listener?", "Modalities and viewers cannot store, query or retrieve until it is started again. Transfers under way finish first.", { confirm: "Stop", danger: true })) return;
          const result = await api.post("/management/dicom/storage", { running: String(!running) });
          notify(result.warning || (running ? "The DICOM listener is stopped." : "The DICOM listener is running."));
          services(panel);
        }, { class: running ? "danger" : "primary" })),
      h("form", { class: "stack", onsubmit: async (event) => {
          event.preventDefault();
          try {
            await api.post("/management/dicom/storage", { port: port.value, hostname: hostname.value, autostart: String(autostart.checked) });
            notify("DICOM listener settings saved.");
            services(panel);
          } catch (error) {
            say(status, error.message, "error");
          }
        } },
        h("div", { class: "inline" }, field("Port", port), field("Listen on", hostname, "An address of this server; empty for all.")),
        field("Start the listener when dicoogled starts", autostart),
        h("div", {}, h("button", { type: "submit" }, "Save listener settings")))),
    h("form", { class: "card stack", onsubmit: async (event) => {
        event.preventDefault();
        try {
          await api.put("/management/settings/dicom", { aetitle: title.value.trim() });
          notify(`The AE title is now ${title.value.trim()}.`);
        } catch (error) {
          say(status, error.message, "error");
        }
      } },
      h("h2", {}, "AE title"),
      h("div", { class: "inline" }, field("This archive's AE title", title, "1 to 16 characters; viewers and modalities call it by this name."),
        h("button", { type: "submit" }, "Save AE title"))),
    status);
}

// ---- move destinations -------------------------------------------------------------------------------

async function destinations(panel) {
  const list = await api.get("/management/settings/storage/dicom");
  const status = statusLine();
  const aet = h("input", { name: "aetitle", required: true, maxlength: 16, spellcheck: "false", autocomplete: "off" });
  const host = h("input", { name: "ip", required: true, placeholder: "192.168.1.20", spellcheck: "false", autocomplete: "off" });
  const port = h("input", { name: "port", type: "number", min: 1, max: 65535, required: true, value: "104" });
  const description = h("input", { name: "description", autocomplete: "off" });
  const rows = list.map((destination) => {
    const result = h("span", { class: "echo-result", "aria-live": "polite" });
    return h("tr", {},
      h("td", {}, h("strong", {}, destination.AETitle)), h("td", {}, destination.ipAddrs), h("td", { class: "number" }, destination.port),
      h("td", {}, destination.description), h("td", {}, result),
      h("td", { class: "actions" },
        actionButton("Test", async () => {
          clear(result, "testing…");
          const answer = await api.post("/management/dicom/echo", { aetitle: destination.AETitle }).catch((error) => ({ success: false, error: error.message }));
          clear(result, answer.success ? h("span", { class: "badge running" }, "✓ answers C-ECHO") : h("span", { class: "badge stopped", title: answer.error }, "✗ " + answer.error));
        }, { "aria-label": `Test ${destination.AETitle} with a C-ECHO` }),
        actionButton("Remove", async () => {
          if (!await confirmDialog(`Remove ${destination.AETitle}?`, `C-MOVE requests to ${destination.AETitle} will be refused (status 0xA801) until it is added again.`, { confirm: "Remove", danger: true })) return;
          await api.post("/management/settings/storage/dicom", { type: "remove", aetitle: destination.AETitle, port: destination.port });
          notify(`${destination.AETitle} removed.`);
          destinations(panel);
        }, { class: "danger", "aria-label": `Remove ${destination.AETitle}` })));
  });
  clear(panel,
    h("section", { class: "card stack" },
      h("h2", {}, "Move destinations"),
      h("p", { class: "muted" }, "Viewers and workstations that may ask this archive to send them studies (C-MOVE). Test sends a C-ECHO."),
      list.length ? h("div", { class: "table-wrap" }, h("table", { class: "plain" },
        h("thead", {}, h("tr", {}, ["AE title", "Host", "Port", "Description", "Test result", "Actions"].map((label) => h("th", { scope: "col" }, label)))),
        h("tbody", {}, rows))) : h("p", { class: "muted" }, "No destination yet.")),
    h("form", { class: "card stack", onsubmit: async (event) => {
        event.preventDefault();
        try {
          await api.post("/management/settings/storage/dicom", { type: "add", aetitle: aet.value.trim(), ip: host.value.trim(), port: port.value, description: description.value });
          notify(`${aet.value.trim()} added.`);
          await destinations(panel);
        } catch (error) {
          say(status, error.message, "error");
        }
      } },
      h("h2", {}, "Add a destination"),
      h("div", { class: "inline" }, field("AE title", aet), field("Host", host), field("Port", port), field("Description", description)),
      h("div", {}, h("button", { type: "submit", class: "primary" }, "Add destination")), status));
}

// ---- transfer syntaxes ---------------------------------------------------------------------------------

async function transferSyntaxes(panel) {
  const classes = await api.get("/management/settings/transfer");
  const filter = h("input", { type: "search", placeholder: "CT, MR, Secondary…", autocomplete: "off" });
  const select = h("select", { size: 12, class: "sop-classes" });
  const options = h("fieldset", { class: "syntaxes" });
  const status = statusLine();
  const restricted = (sop) => sop.options.some((o) => !o.value);
  const fill = () => {
    const needle = filter.value.trim().toLowerCase();
    const chosen = select.value;
    clear(select, classes.filter((c) => !needle || c.sop_name.toLowerCase().includes(needle) || c.uid.includes(needle))
      .map((c) => h("option", { value: c.uid, selected: c.uid === chosen }, (restricted(c) ? "● " : "") + c.sop_name)));
    if (!select.value && select.options.length) select.options[0].selected = true;
    show();
  };
  const show = () => {
    const sop = classes.find((c) => c.uid === select.value);
    if (!sop) return clear(options);
    clear(options, h("legend", {}, `${sop.sop_name} (${sop.uid}) is accepted in`),
      sop.options.map((option) => {
        const box = h("input", { type: "checkbox", checked: option.value, onchange: async () => {
          try {
            await api.post("/management/settings/transfer", { uid: sop.uid, option: option.name, value: String(box.checked) });
            option.value = box.checked;
            say(status, `${sop.sop_name}: ${option.name} ${box.checked ? "accepted" : "refused"}.`);
            const selected = select.selectedOptions[0];
            if (selected) selected.textContent = (restricted(sop) ? "● " : "") + sop.sop_name;
          } catch (error) {
            box.checked = !box.checked;
            say(status, error.message, "error");
          }
        } });
        return field(`${option.name} (${option.uid})`, box);
      }));
  };
  filter.addEventListener("input", fill);
  select.addEventListener("change", show);
  clear(panel, h("section", { class: "card stack" },
    h("h2", {}, "Transfer syntaxes per SOP class"),
    h("p", { class: "muted" }, "By default every storage SOP class is accepted in every transfer syntax, as sent. Unticking one limits that class; ● marks the limited classes."),
    h("div", { class: "columns" },
      h("div", { class: "stack" }, field("Find a SOP class", filter), field("SOP class", select)),
      options),
    status));
  fill();
}

// ---- Q/R limits --------------------------------------------------------------------------------------------

const LIMITS = [
  ["maxAssociations", "Simultaneous associations", ""],
  ["acceptTimeout", "Association negotiation timeout", "seconds"],
  ["connectionTimeout", "Connection timeout (C-MOVE, sending)", "seconds"],
  ["idleTimeout", "Idle association timeout", "seconds"],
  ["responseTimeout", "DIMSE response timeout", "seconds"],
  ["maxPduReceive", "Largest PDU received", "bytes, 0 = unlimited"],
  ["maxPduSend", "Largest PDU sent", "bytes, 0 = as the peer accepts"],
];

async function limits(panel) {
  const values = await api.get("/management/settings/dicom/query");
  const inputs = Object.fromEntries(LIMITS.map(([name]) => [name, h("input", { type: "number", min: 0, step: 1, value: values[name] ?? "", name })]));
  const status = statusLine();
  clear(panel, h("form", { class: "card stack", onsubmit: async (event) => {
      event.preventDefault();
      const changed = Object.fromEntries(Object.entries(inputs).filter(([name, input]) => String(values[name]) !== input.value).map(([name, input]) => [name, input.value]));
      if (!Object.keys(changed).length) return say(status, "Nothing changed.");
      try {
        await api.post("/management/settings/dicom/query", changed);
        Object.assign(values, changed);
        say(status, "Saved: they apply to associations from now on.");
      } catch (error) {
        say(status, error.message, "error");
      }
    } },
    h("h2", {}, "Query/retrieve limits and timeouts"),
    h("div", { class: "grid-fields" }, LIMITS.map(([name, label, hint]) => field(label, inputs[name], hint))),
    h("div", {}, h("button", { type: "submit", class: "primary" }, "Save limits")), status));
}

// ---- plugins --------------------------------------------------------------------------------------------------

async function plugins(panel) {
  const listing = await api.get("/plugins");
  const status = statusLine();
  const byName = new Map();
  for (const entry of listing.plugins) {
    const known = byName.get(entry.name) || { ...entry, types: [] };
    known.types.push(entry.type);
    byName.set(entry.name, known);
  }
  const settingsSlots = h("div", { class: "stack" });
  const rows = [...byName.values()].sort((a, b) => a.name.localeCompare(b.name)).map((plugin) => h("tr", {},
    h("td", {}, h("strong", {}, plugin.name), plugin.builtin ? h("span", { class: "muted small" }, " built in") : null),
    h("td", {}, plugin.types.join(", ")),
    h("td", {}, plugin.description || ""),
    h("td", {}, h("span", { class: `badge ${plugin.enabled ? "running" : "idle"}` }, plugin.enabled ? "enabled" : "disabled")),
    h("td", { class: "actions" }, plugin.builtin ? null : [
      actionButton(plugin.enabled ? "Disable" : "Enable", async () => {
        await api.post(`/plugins/${encodeURIComponent(plugin.types[0])}/${encodeURIComponent(plugin.name)}/${plugin.enabled ? "disable" : "enable"}`);
        notify(`${plugin.name} ${plugin.enabled ? "disabled" : "enabled"}.`);
        plugins(panel);
      }, { "aria-label": `${plugin.enabled ? "Disable" : "Enable"} ${plugin.name}` }),
      actionButton("Settings", () => pluginSettings(plugin.name), { "aria-label": `Settings of ${plugin.name}` })])));
  clear(panel,
    h("section", { class: "card stack" }, h("h2", {}, "Plugins"),
      h("div", { class: "table-wrap" }, h("table", { class: "plain" },
        h("thead", {}, h("tr", {}, ["Name", "Provides", "Description", "State", "Actions"].map((label) => h("th", { scope: "col" }, label)))),
        h("tbody", {}, rows)))),
    listing.dead.length ? h("section", { class: "card stack dead" }, h("h2", {}, `Dead plugins (${listing.dead.length})`),
      h("p", { class: "muted" }, "These failed to load; fix the file and it is reloaded."),
      h("ul", {}, listing.dead.map((dead) => h("li", {}, h("strong", {}, dead.name), h("pre", { class: "error-text" }, dead.cause.message))))) : null,
    h("section", { class: "stack", "aria-label": "Settings panels of web UI plugins" }, settingsSlots),
    status);
  const { renderSettingsSlots } = await import("./plugins.js");
  await renderSettingsSlots(settingsSlots).catch((error) => settingsSlots.append(message(`Settings panels unavailable: ${error.message}`)));
}

async function pluginSettings(name) {
  const settings = await api.get(`/plugins/${encodeURIComponent(name)}/settings`);
  const status = statusLine();
  const inputs = Object.entries(settings).map(([key, value]) => {
    const input = typeof value === "boolean" ? h("input", { type: "checkbox", name: key, checked: value })
      : typeof value === "number" ? h("input", { type: "number", name: key, value: String(value), step: "any" })
      : h("input", { name: key, value: typeof value === "string" ? value : JSON.stringify(value) });
    return [key, input];
  });
  const form = h("form", { class: "stack", onsubmit: async (event) => {
      event.preventDefault();
      const values = Object.fromEntries(inputs.map(([key, input]) => [key, input.type === "checkbox" ? String(input.checked) : input.value]));
      try {
        await api.post(`/plugins/${encodeURIComponent(name)}/settings`, values);
        dialog.close();
        notify(`Settings of ${name} saved.`);
      } catch (error) {
        say(status, error.message, "error");
      }
    } },
    inputs.length ? inputs.map(([key, input]) => field(key, input)) : h("p", { class: "muted" }, "This plugin has no settings."),
    status,
    h("div", { class: "button-row end" }, h("button", { type: "submit", class: "primary", disabled: !inputs.length }, "Save settings")));
  const dialog = modal(`Settings of ${name}`, form);
}

// ---- users ----------------------------------------------------------------------------------------------------------

async function users(panel) {
  const { users: list } = await api.get("/user");
  const me = api.session.user.user;
  const status = statusLine();
  const username = h("input", { name: "username", required: true, autocomplete: "off", spellcheck: "false" });
  const password = h("input", { name: "password", type: "password", required: true, autocomplete: "new-password" });
  const admin = h("input", { type: "checkbox", name: "admin" });
  const rows = list.map((user) => h("tr", {},
    h("td", {}, h("strong", {}, user.username), user.username === me ? h("span", { class: "muted small" }, " (you)") : null),
    h("td", {}, user.admin ? "administrator" : "user"),
    h("td", {}, (user.roles || []).join(", ")),
    h("td", { class: "actions" },
      h("button", { type: "button", onclick: () => groupsDialog(user, () => users(panel)), "aria-label": `Groups of ${user.username}` }, "Groups"),
      h("button", { type: "button", onclick: () => passwordDialog(user.username), "aria-label": `Change the password of ${user.username}` }, "Change password"),
      user.username === me ? null : actionButton("Delete", async () => {
        if (!await confirmDialog(`Delete ${user.username}?`, `${user.username} can no longer log in; their presets are deleted.`, { confirm: "Delete", danger: true })) return;
        const { success } = await api.del(`/user/${encodeURIComponent(user.username)}`);
        notify(success ? `${user.username} deleted.` : `${user.username} was not deleted (the last administrator stays).`, success ? "info" : "error");
        users(panel);
      }, { class: "danger", "aria-label": `Delete ${user.username}` }))));
  clear(panel,
    h("section", { class: "card stack" }, h("h2", {}, `Users (${list.length})`),
      h("div", { class: "table-wrap" }, h("table", { class: "plain" },
        h("thead", {}, h("tr", {}, ["Name", "Kind", "Groups (roles)", "Actions"].map((label) => h("th", { scope: "col" }, label)))),
        h("tbody", {}, rows)))),
    h("form", { class: "card stack", onsubmit: async (event) => {
        event.preventDefault();
        try {
          const { success } = await api.post("/user", { username: username.value.trim(), password: password.value, admin: String(admin.checked) });
          if (!success) return say(status, `There is already a user ${username.value.trim()}.`, "error");
          notify(`User ${username.value.trim()} created.`);
          users(panel);
        } catch (error) {
          say(status, error.message, "error");
        }
      } },
      h("h2", {}, "Create a user"),
      h("div", { class: "inline" }, field("Username", username), field("Password", password)),
      field("Administrator (may manage the archive, index and delete)", admin),
      h("div", {}, h("button", { type: "submit", class: "primary" }, "Create user")), status),
    await collectionsCard(list, () => users(panel)),
    await sharesCard(() => users(panel)));
}

/** Share links (made from the search's Share… button): their state, and revoking them. */
async function sharesCard(done) {
  const { shares } = await api.get("/share");
  const rows = shares.map((link) => h("tr", {},
    h("td", {}, link.label ? `collection ${link.label}` : plural(link.studies.length, "study", "studies")),
    h("td", {}, link.createdBy), h("td", {}, link.expires || "no date"),
    h("td", {}, `${link.uses}${link.usesAllowed ? " of " + link.usesAllowed : ""}`), h("td", {}, link.state),
    h("td", { class: "actions" }, link.state === "revoked" ? null : actionButton("Revoke", async () => {
      await api.del(`/share/${encodeURIComponent(link.id)}`);
      notify("The share link is revoked.");
      done();
    }, { "aria-label": `Revoke share link ${link.id}` }))));
  return h("section", { class: "card stack" }, h("h2", {}, `Share links (${shares.length})`),
    rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "plain" },
      h("thead", {}, h("tr", {}, ["Shares", "Made by", "Expires", "Opened", "State", "Actions"].map((text) => h("th", { scope: "col" }, text)))),
      h("tbody", {}, rows))) : h("p", { class: "muted" }, "No share link yet: select studies in a search, then Share…."));
}

/** A user's groups (its roles): collections are given to groups by these names. */
function groupsDialog(user, done) {
  const groups = h("input", { value: (user.roles || []).join(", "), autocomplete: "off", spellcheck: "false" });
  const status = statusLine();
  const dialog = modal(`Groups of ${user.username}`, h("form", { class: "stack", onsubmit: async (event) => {
      event.preventDefault();
      try {
        await api.post(`/user/${encodeURIComponent(user.username)}`, { roles: groups.value });
        dialog.close();
        notify(`The groups of ${user.username} are changed.`);
        done();
      } catch (error) {
        say(status, error.message, "error");
      }
    } }, field("Groups, separated by commas", groups, "A group's collections are its members' (they log in again)."), status,
    h("div", { class: "button-row end" }, h("button", { type: "submit", class: "primary" }, "Save groups"))));
}

/** Collections: each label with the users and groups that may read (or write) it. A user with
 *  any collection sees only its collections' studies; administrators see everything. */
async function collectionsCard(userList, done) {
  const [{ labels }, { members: grants }] = await Promise.all([api.get("/labels"), api.get("/collections/members")]);
  const status = statusLine();
  const label = h("input", { name: "label", required: true, autocomplete: "off", spellcheck: "false", list: "collection-labels" });
  const kind = h("select", { name: "kind" }, h("option", { value: "user" }, "user"), h("option", { value: "group" }, "group"));
  const member = h("input", { name: "member", required: true, autocomplete: "off", spellcheck: "false", list: "collection-users" });
  const access = h("select", { name: "access" }, h("option", { value: "read" }, "read"), h("option", { value: "write" }, "write"));
  const path = (name, who, isGroup) =>
    `/labels/${encodeURIComponent(name)}/access/${isGroup ? "group/" : ""}${encodeURIComponent(who)}`;
  const rows = grants.map((grant) => {
    const name = grant.label;
    const isGroup = "group" in grant;
    const who = isGroup ? grant.group : grant.user;
    return h("tr", {}, h("td", {}, h("strong", {}, name)), h("td", {}, isGroup ? `group ${who}` : who), h("td", {}, grant.access),
      h("td", { class: "actions" }, actionButton("Revoke", async () => {
        await api.del(path(name, who, isGroup));
        notify(`${who} no longer has access to ${name}.`);
        done();
      }, { "aria-label": `Revoke ${who}'s access to ${name}` })));
  });
  return h("section", { class: "card stack" },
    h("h2", {}, "Collections"),
    h("p", { class: "muted small" }, "A user given access to a collection (a label) sees only the studies of its collections, " +
      "on the web, DICOMweb and mapped DICOM AEs; write lets it label within them. Administrators see everything."),
    rows.length ? h("div", { class: "table-wrap" }, h("table", { class: "plain" },
      h("thead", {}, h("tr", {}, ["Collection", "Member", "Access", "Actions"].map((text) => h("th", { scope: "col" }, text)))),
      h("tbody", {}, rows))) : h("p", { class: "muted" }, "No collection has members yet."),
    h("datalist", { id: "collection-labels" }, labels.map(({ label: name }) => h("option", { value: name }))),
    h("datalist", { id: "collection-users" }, userList.map((user) => h("option", { value: user.username }))),
    h("form", { class: "stack", onsubmit: async (event) => {
        event.preventDefault();
        try {
          await api.put(path(label.value.trim(), member.value.trim(), kind.value === "group"), { access: access.value });
          notify(`${member.value.trim()} may ${access.value} ${label.value.trim()}.`);
          done();
        } catch (error) {
          say(status, error.message, "error");
        }
      } },
      h("div", { class: "inline" }, field("Collection (label)", label), field("Member is a", kind), field("User or group", member),
        field("Access", access)),
      h("div", {}, h("button", { type: "submit", class: "primary" }, "Give access")), status));
}

function passwordDialog(username) {
  const password = h("input", { type: "password", required: true, autocomplete: "new-password" });
  const status = statusLine();
  const dialog = modal(`Password of ${username}`, h("form", { class: "stack", onsubmit: async (event) => {
      event.preventDefault();
      try {
        await api.post(`/user/${encodeURIComponent(username)}/password`, { password: password.value });
        dialog.close();
        notify(`The password of ${username} is changed.`);
      } catch (error) {
        say(status, error.message, "error");
      }
    } }, field("New password", password), status,
    h("div", { class: "button-row end" }, h("button", { type: "submit", class: "primary" }, "Change password"))));
}

// ---- the log -------------------------------------------------------------------------------------------------------

async function logTail(panel) {
  const pre = h("pre", { class: "log", tabindex: "0", "aria-label": "Server log" });
  const filter = h("input", { type: "search", placeholder: "Show lines containing…", autocomplete: "off" });
  const level = h("select", {}, ["all levels", "WARNING", "ERROR"].map((name) => h("option", { value: name }, name)));
  const count = h("span", { class: "muted", role: "status" });
  let lines = [];
  const show = () => {
    const needle = filter.value.trim().toLowerCase();
    const minimum = level.value === "ERROR" ? ["ERROR", "CRITICAL"] : level.value === "WARNING" ? ["WARNING", "ERROR", "CRITICAL"] : null;
    const shown = lines.filter((line) => (!needle || line.toLowerCase().includes(needle)) && (!minimum || minimum.some((l) => line.includes(` ${l} `))));
    pre.textContent = shown.join("\n");
    count.textContent = `${plural(shown.length, "line")} of ${lines.length}`;
    pre.scrollTop = pre.scrollHeight;
  };
  const load = async () => {
    lines = (await api.get("/logger")).split("\n").filter(Boolean);
    show();
  };
  filter.addEventListener("input", show);
  level.addEventListener("change", show);
  clear(panel, h("section", { class: "card stack" },
    h("div", { class: "section-head" }, h("h2", {}, "Log"), count),
    h("div", { class: "inline" }, field("Filter", filter), field("Level", level), actionButton("Refresh", load)),
    pre));
  await load();
}
