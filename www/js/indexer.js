// Indexer: index a folder in place (POST /management/tasks/index), watch the tasks' progress
// (GET /index/task, polled every 1.5 s while this page is shown), stop or close them
// (POST /index/task), and the watched folders with their state (GET /management/settings/index,
// GET /health's watch section), which can be changed here (POST /management/settings/index).

import * as api from "./api.js";
import { h, clear, message, field, notify, plural } from "./dom.js";

const POLL_MS = 1500;

/** A folder path, or a file: URI as typed, as the file: URI the API takes. */
export function fileUri(text) {
  const value = text.trim();
  if (/^file:/i.test(value)) return value;
  return "file:" + value.split("/").map(encodeURIComponent).join("/");
}

export async function render(main) {
  const path = h("input", { id: "index-path", required: true, placeholder: "/srv/dicom/incoming", autocomplete: "off", spellcheck: "false" });
  const formStatus = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "card stack", onsubmit: async (event) => {
      event.preventDefault();
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      try {
        const { tasks } = await api.post("/management/tasks/index", { uri: fileUri(path.value) });
        clear(formStatus, message(`Indexing started: ${tasks.map((t) => t.name).join(", ")}`, "info"));
        path.value = "";
        poll();
      } catch (error) {
        clear(formStatus, message(error.message));
      } finally {
        button.disabled = false;
      }
    } },
    h("h2", {}, "Index a folder"),
    h("p", { class: "muted" }, "Every DICOM file under the folder is indexed where it is, nothing is copied. The folder must be on the server."),
    h("div", { class: "inline" }, field("Folder or file: URI", path), h("button", { type: "submit", class: "primary" }, "Index")),
    formStatus);
  const tasks = h("div", { class: "tasks", "aria-live": "off" });
  const tasksSection = h("section", { class: "card stack", "aria-labelledby": "tasks-heading" },
    h("div", { class: "section-head" }, h("h2", { id: "tasks-heading" }, "Tasks"),
      h("button", { type: "button", onclick: closeFinished }, "Close finished")), tasks);
  const watched = h("section", { class: "card stack", "aria-labelledby": "watch-heading" }, h("h2", { id: "watch-heading" }, "Watched folders"));
  clear(main, h("h1", {}, "Indexer"), form, tasksSection, watched);

  let timer = null, shown = [];
  async function poll() {
    clearTimeout(timer);
    if (!tasks.isConnected) return;  // the page was left: stop polling
    try {
      const { results } = await api.get("/index/task");
      shown = results;
      renderTasks(tasks, results, poll);
    } catch (error) {
      clear(tasks, message(error.message));
    }
    if (tasks.isConnected) timer = setTimeout(poll, POLL_MS);
  }
  async function closeFinished() {
    for (const task of shown.filter((t) => t.complete)) await api.post("/index/task", { uid: task.taskUid, type: "close" }).catch(() => {});
    poll();
  }
  poll();
  renderWatched(watched);
  path.focus();
}

/** What an index task did, for its line under the bar. */
const indexedDetails = (task) => [plural(task.nIndexed || 0, "file") + " indexed", task.nErrors ? plural(task.nErrors, "error") : null];

/** Tasks, updated in place: a button keeps its focus while the list refreshes. describe(task)
 *  gives the first parts of a task's line, empty the text for no task (the research screen
 *  shows its exports with these). */
export function renderTasks(container, results, refresh,
  { describe = indexedDetails, empty = "No tasks. Tasks stay listed after they finish, until closed." } = {}) {
  if (!results.length) return clear(container, h("p", { class: "muted" }, empty));
  const existing = new Map([...container.querySelectorAll("[data-task]")].map((e) => [e.dataset.task, e]));
  const items = results.map((task) => {
    let item = existing.get(task.taskUid);
    if (!item) {
      const act = async (type) => {
        try {
          await api.post("/index/task", { uid: task.taskUid, type });
          refresh();
        } catch (error) {
          notify(error.message, "error");
        }
      };
      item = h("article", { class: "task", dataset: { task: task.taskUid }, "aria-label": task.taskName },
        h("div", { class: "task-head" }, h("strong", { class: "task-name" }, task.taskName), h("span", { class: "badge" })),
        h("div", { class: "task-progress" }, h("progress", { max: 1, "aria-label": `Progress of ${task.taskName}` }), h("span", { class: "percent" })),
        h("div", { class: "task-foot" }, h("span", { class: "muted details" }),
          h("span", { class: "actions" }, h("button", { type: "button", class: "stop", onclick: () => act("stop") }, "Stop"),
            h("button", { type: "button", onclick: () => act("close") }, "Close"))));
    }
    const known = task.taskProgress >= 0;
    const state = task.canceled ? "stopped" : task.complete ? "finished" : "running";
    const bar = item.querySelector("progress");
    if (known) bar.value = task.taskProgress;
    else bar.removeAttribute("value");  // indeterminate
    item.querySelector(".percent").textContent = known ? `${Math.round(task.taskProgress * 100)}%` : "…";
    const badge = item.querySelector(".badge");
    badge.className = `badge ${state}`;
    badge.textContent = state;
    item.querySelector(".details").textContent = [...describe(task),
      task.elapsedTime !== undefined ? `${(task.elapsedTime / 1000).toFixed(1)} s` : null,
      "started " + task.taskTimeCreated.replace("T", " ").slice(0, 19)].filter(Boolean).join(" · ");
    const stop = item.querySelector("button.stop");
    if (task.complete && stop) {
      if (document.activeElement === stop) stop.nextSibling.focus();
      stop.remove();
    }
    return item;
  });
  if (items.length !== container.children.length || items.some((item, i) => container.children[i] !== item)) clear(container, items);
}

async function renderWatched(section) {
  const heading = section.firstChild;
  let settings, health;
  try {
    [settings, health] = await Promise.all([api.get("/management/settings/index"), api.get("/health")]);
  } catch (error) {
    return clear(section, heading, message(error.message));
  }
  const folders = settings.path ? settings.path.split(":").filter(Boolean) : [];
  const watching = new Set(health.watch.folders);
  const state = (folder) => !settings.watcher ? "watcher off"
    : !watching.has(folder) ? "not watched"
    : health.watch.reconciling ? "reconciling" : health.watch.pending ? `${plural(health.watch.pending, "file")} pending` : "watching";
  const table = folders.length
    ? h("div", { class: "table-wrap" }, h("table", { class: "plain" },
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Folder"), h("th", { scope: "col" }, "State"), h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Actions")))),
        h("tbody", {}, folders.map((folder) => h("tr", {}, h("td", { class: "path" }, folder),
          h("td", {}, h("span", { class: `badge ${state(folder) === "watching" ? "running" : "idle"}` }, state(folder))),
          h("td", {}, h("button", { type: "button", onclick: () => save(folders.filter((f) => f !== folder), settings.watcher) }, "Stop watching")))))))
    : h("p", { class: "muted" }, "No folder is watched.");
  const add = h("input", { id: "watch-add", placeholder: "/srv/dicom-inbox", autocomplete: "off", spellcheck: "false" });
  const status = h("div", { "aria-live": "polite" });
  const switchBox = h("input", { type: "checkbox", id: "watch-enabled", checked: settings.watcher, onchange: () => save(folders, switchBox.checked) });
  async function save(list, watcher) {
    try {
      await api.post("/management/settings/index", { path: list.join(":"), watcher: String(watcher) });
      notify("Watched folders saved.");
      renderWatched(section);
    } catch (error) {
      clear(status, message(error.message));
    }
  }
  clear(section, heading,
    h("p", { class: "muted" }, "Files written into a watched folder are indexed once complete, re-indexed when replaced and unindexed when deleted."),
    field("Watch these folders", switchBox), table,
    h("form", { class: "inline", onsubmit: (event) => { event.preventDefault(); if (add.value.trim()) save([...folders, add.value.trim()], settings.watcher); } },
      field("Add a folder", add), h("button", { type: "submit" }, "Watch")),
    status);
}
