// Import: a ZIP file of DICOM files, or DICOM media with its DICOMDIR, sent to POST /import; the
// server imports each file in the background, as if it had been sent by C-STORE, and this page
// follows the task (GET /import/<uid>, polled every 1.5 s) up to its report of failures.

import * as api from "./api.js";
import { h, clear, message, field } from "./dom.js";

const POLL_MS = 1500;

export async function render(main) {
  const file = h("input", { id: "import-file", type: "file", accept: ".zip,application/zip", required: true });
  const progress = h("div", { class: "import-progress", "aria-live": "polite" });
  const form = h("form", { class: "card stack", onsubmit: async (event) => {
      event.preventDefault();
      const chosen = file.files[0];
      if (!chosen) return;
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      clear(progress, message(`Sending ${chosen.name}…`, "info"));
      try {
        // The ZIP file is the body itself: no form encoding, so the server spools it as it comes.
        const response = await fetch("/import", { method: "POST", body: chosen,
          headers: { "Content-Type": "application/zip", ...(api.session.token ? { Authorization: api.session.token } : {}) } });
        const task = await response.json();
        if (!response.ok) throw new Error(task.error || `${response.status} ${response.statusText}`);
        follow(task.taskUid, progress);
      } catch (error) {
        clear(progress, message(error.message));
      } finally {
        button.disabled = false;
      }
    } },
    h("h2", {}, "Import a ZIP file"),
    h("p", { class: "muted" }, "A ZIP file of DICOM files, or of DICOM media with a DICOMDIR (as the Download buttons of the search make). ",
      "Each file is stored as if a modality had sent it; files that are not DICOM are listed, not fatal."),
    h("div", { class: "inline" }, field("ZIP file", file), h("button", { type: "submit", class: "primary" }, "Import")),
    progress);
  clear(main, h("h1", {}, "Import"), form);
}

/** Poll an import task until it is complete, showing its progress, then its report. */
async function follow(uid, container) {
  let task;
  try {
    task = await api.get(`/import/${encodeURIComponent(uid)}`);
  } catch (error) {
    clear(container, message(error.message));
    return;
  }
  const percent = Math.round(task.taskProgress * 100);
  const bar = h("progress", { max: 100, value: percent, "aria-label": "Import progress" }, `${percent}%`);
  const counts = h("p", {}, `${task.nDone} of ${task.nFiles} files: ${task.nIndexed} imported, ${task.nErrors} failed`,
    task.nSkipped ? `, ${task.nSkipped} DICOMDIR skipped` : "");
  if (!task.complete) {
    if (!container.isConnected) return;  // the page was left
    clear(container, bar, counts);
    setTimeout(() => follow(uid, container), POLL_MS);
    return;
  }
  const failures = task.failures.length
    ? h("table", { class: "import-failures" }, h("thead", {}, h("tr", {}, h("th", {}, "File"), h("th", {}, "Why it was not imported"))),
        h("tbody", {}, task.failures.map((failure) => h("tr", {}, h("td", { class: "path" }, failure.file), h("td", {}, failure.reason)))))
    : null;
  clear(container, message(task.nErrors ? "Import finished, with failures." : "Import finished.", task.nErrors ? "error" : "info"),
    bar, counts, failures);
}
