// Dashboard: what the archive holds (GET /health: counts and storage used) and two plots drawn
// here as inline SVG — studies over time and studies per modality — from one
// /searchDIM?depth=study over the chosen date range. Each plot also has its numbers as a table.

import * as api from "./api.js";
import { h, svg, clear, message, field, formatBytes, plural } from "./dom.js";

/** Above this many instances, "all time" is not loaded by itself: the range query reads them all. */
const AUTO_ALL_TIME_LIMIT = 200_000;
const ORIGINS = { store: "received over DICOM", watch: "in watched folders", index: "indexed in place" };

const dicomDate = (date) => date.toISOString().slice(0, 10).replaceAll("-", "");
const isoDate = (d) => `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6, 8)}`;

function rangeOf(preset, from, to) {
  const today = new Date();
  const back = (days) => new Date(today.getTime() - days * 86_400_000);
  if (preset === "30d") return { from: dicomDate(back(29)), to: dicomDate(today) };
  if (preset === "1y") return { from: dicomDate(back(364)), to: dicomDate(today) };
  if (preset === "5y") return { from: dicomDate(back(5 * 365)), to: dicomDate(today) };
  if (preset === "custom" && from && to) return { from: from.replaceAll("-", ""), to: to.replaceAll("-", "") };
  return null;  // all time
}

export async function render(main) {
  const health = await api.get("/health");
  const counts = health.counts;
  const storage = health.storage || { bytes: NaN, by_origin: {} };
  const origins = Object.entries(storage.by_origin || {}).filter(([, bytes]) => bytes)
    .map(([origin, bytes]) => `${formatBytes(bytes)} ${ORIGINS[origin] || origin}`).join(" · ");
  const card = (label, value, note, kind = "") => h("div", { class: "stat card" }, h("span", { class: "stat-label" }, label),
    h("span", { class: `stat-value ${kind}` }, value), note ? h("span", { class: "stat-note" }, note) : null);
  const preset = h("select", { id: "range-preset" },
    [["30d", "Last 30 days"], ["1y", "Last 12 months"], ["5y", "Last 5 years"], ["all", "All time"], ["custom", "Dates…"]].map(([value, label]) => h("option", { value }, label)));
  const from = h("input", { type: "date", "aria-label": "From" });
  const to = h("input", { type: "date", "aria-label": "To" });
  const custom = h("span", { class: "inline", hidden: true }, from, " to ", to);
  const plots = h("div", { class: "plots" });
  clear(main,
    h("h1", {}, "Dashboard"),
    h("section", { class: "stats", "aria-label": "What the archive holds" },
      card("Patients", counts.patients.toLocaleString()),
      card("Studies", counts.studies.toLocaleString()),
      card("Series", counts.series.toLocaleString()),
      card("Images", counts.instances.toLocaleString()),
      card("Storage used", formatBytes(storage.bytes), origins || null),
      card("DICOM", health.aet, `port ${health.dicom_port ?? "closed"} · ${plural(health.ingest.stored, "object")} received since start`, "text")),
    h("section", { class: "card stack", "aria-labelledby": "plots-heading" },
      h("div", { class: "section-head" }, h("h2", { id: "plots-heading" }, "Studies"),
        h("form", { class: "inline", onsubmit: (e) => { e.preventDefault(); draw(); } }, field("Range", preset), custom,
          h("button", { type: "submit", hidden: true, class: "apply-range" }, "Show"))),
      plots));
  preset.addEventListener("change", () => {
    custom.hidden = preset.value !== "custom";
    custom.nextElementSibling.hidden = preset.value !== "custom";
    if (preset.value !== "custom") draw();
  });

  async function draw() {
    const range = rangeOf(preset.value, from.value, to.value);
    clear(plots, h("p", { class: "muted", role: "status" }, "Counting studies…"));
    try {
      const query = range ? `StudyDate:[${range.from} TO ${range.to}]` : "*:*";
      const data = await api.get("/searchDIM", { query, depth: "study" });
      const studies = data.results.flatMap((patient) => patient.studies);
      clear(plots, timePlot(studies, range), modalityPlot(studies));
    } catch (error) {
      clear(plots, message(error.message));
    }
  }

  // The default range: the last 12 months if they hold studies, else all time while that is cheap.
  preset.value = "1y";
  const year = rangeOf("1y");
  try {
    const recent = await api.get("/search", { query: `StudyDate:[${year.from} TO ${year.to}]`, psize: 0 });
    if (!recent.numResults && counts.instances <= AUTO_ALL_TIME_LIMIT) preset.value = "all";
  } catch { /* keep 12 months */ }
  await draw();
}

/** Studies per day, month or year (whichever keeps the bars readable), as SVG bars. */
function timePlot(studies, range) {
  const dated = studies.map((s) => s.studyDate).filter((d) => /^\d{8}$/.test(d)).sort();
  const undated = studies.length - dated.length;
  if (!dated.length && !range) return h("p", { class: "muted" }, "No dated studies.");
  const first = range ? range.from : dated[0], last = range ? range.to : dated[dated.length - 1];
  const days = (Date.parse(isoDate(last)) - Date.parse(isoDate(first))) / 86_400_000 + 1;
  const unit = days <= 62 ? "day" : days <= 3 * 366 ? "month" : "year";
  const keyOf = (d) => (unit === "day" ? isoDate(d) : unit === "month" ? `${d.slice(0, 4)}-${d.slice(4, 6)}` : d.slice(0, 4));
  const bins = new Map();
  // Every bin of the range, empty ones included, so the time axis is even.
  const cursor = new Date(isoDate(first) + "T00:00:00Z"), end = new Date(isoDate(last) + "T00:00:00Z");
  while (cursor <= end && bins.size < 5000) {
    bins.set(keyOf(dicomDate(cursor)), 0);
    if (unit === "day") cursor.setUTCDate(cursor.getUTCDate() + 1);
    else if (unit === "month") cursor.setUTCMonth(cursor.getUTCMonth() + 1, 1);
    else cursor.setUTCFullYear(cursor.getUTCFullYear() + 1, 0, 1);
  }
  for (const d of dated) bins.set(keyOf(d), (bins.get(keyOf(d)) || 0) + 1);
  const entries = [...bins.entries()];
  const title = `Studies per ${unit}, ${keyOf(first)} to ${keyOf(last)}`;
  return figure(title, barChart(entries, title),
    `${plural(dated.length, "study", "studies")} in the range` + (undated ? `, ${undated} without a date` : ""),
    [unit[0].toUpperCase() + unit.slice(1), "Studies"], entries);
}

function modalityPlot(studies) {
  const counts = new Map();
  for (const study of studies) for (const modality of (study.modalities || "").split(",").filter(Boolean)) counts.set(modality, (counts.get(modality) || 0) + 1);
  const entries = [...counts.entries()].sort((a, b) => b[1] - a[1]);
  if (!entries.length) return h("p", { class: "muted" }, "No studies with a modality in this range.");
  const title = "Studies per modality";
  return figure(title, horizontalBars(entries, title), "A study with several modalities counts once for each.", ["Modality", "Studies"], entries);
}

function figure(title, chart, note, headers, entries) {
  return h("figure", { class: "plot" },
    h("figcaption", {}, h("strong", {}, title), h("span", { class: "muted small" }, " · " + note)),
    chart,
    h("details", {}, h("summary", {}, "Show as a table"),
      h("table", { class: "plain compact" }, h("thead", {}, h("tr", {}, headers.map((label) => h("th", { scope: "col" }, label)))),
        h("tbody", {}, entries.filter(([, n]) => n).map(([key, n]) => h("tr", {}, h("td", {}, key), h("td", { class: "number" }, n)))))));
}

function niceMax(value) {
  if (value <= 5) return Math.max(1, value);
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((f) => f * power).find((v) => v >= value);
}

function barChart(entries, title) {
  const width = 720, height = 220, left = 40, bottom = 28, top = 10;
  const max = niceMax(Math.max(...entries.map(([, n]) => n), 0));
  const plotWidth = width - left - 8, plotHeight = height - top - bottom;
  const step = plotWidth / entries.length;
  const labelEvery = Math.ceil(entries.length / 10);
  const y = (n) => top + plotHeight - (n / max) * plotHeight;
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": `${title}: ${entries.filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).slice(0, 40).join(", ")}` },
    [0, max / 2, max].map((tick) => svg("g", { class: "tick" },
      svg("line", { x1: left, x2: width - 8, y1: y(tick), y2: y(tick) }),
      svg("text", { x: left - 6, y: y(tick) + 4, "text-anchor": "end" }, Number.isInteger(tick) ? tick : tick.toFixed(1)))),
    entries.map(([key, n], i) => svg("g", {},
      n ? svg("rect", { class: "bar", x: left + i * step + step * 0.12, width: Math.max(1, step * 0.76), y: y(n), height: plotHeight - (y(n) - top) },
        svg("title", {}, `${key}: ${plural(n, "study", "studies")}`)) : null,
      i % labelEvery === 0 ? svg("text", { class: "axis-label", x: left + i * step + step / 2, y: height - 8, "text-anchor": "middle" }, key) : null)));
}

function horizontalBars(entries, title) {
  const row = 26, left = 70, width = 720, right = 50;
  const height = entries.length * row + 8;
  const max = Math.max(...entries.map(([, n]) => n));
  const scale = (n) => ((width - left - right) * n) / max;
  return svg("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": `${title}: ${entries.map(([k, n]) => `${k} ${n}`).join(", ")}` },
    entries.map(([key, n], i) => svg("g", {},
      svg("text", { x: left - 8, y: i * row + 19, "text-anchor": "end", class: "axis-label" }, key),
      svg("rect", { class: "bar", x: left, y: i * row + 5, height: row - 8, width: Math.max(1, scale(n)) }, svg("title", {}, `${key}: ${plural(n, "study", "studies")}`)),
      svg("text", { x: left + scale(n) + 6, y: i * row + 19, class: "value-label" }, n))));
}
