// The image preview: a rendered frame (GET /dic2png), the frames of a multi-frame object
// (POST /dic2png tells how many), and the other images of the series, all from the keyboard.
// Window presets re-render grey images with a window of their own (windowCenter/windowWidth).

import * as api from "./api.js";
import { h, clear, modal } from "./dom.js";

/** Common CT windows (center, width) in Hounsfield units; "As stored" uses the file's own. */
const WINDOW_PRESETS = [["As stored", null], ["Soft tissue", [40, 400]], ["Lung", [-600, 1500]], ["Bone", [400, 1800]],
  ["Brain", [40, 80]], ["Abdomen", [60, 400]]];

/** Open the preview at images[index]; images are /searchDIM image objects of one series. */
export function preview(images, index) {
  let current = index, frame = 0, frames = 1, request = 0, windowing = null;
  const picture = h("img", { class: "preview", alt: "" });
  const status = h("p", { class: "preview-status", "aria-live": "polite" });
  const error = h("div", { "aria-live": "assertive" });
  const slider = h("input", { type: "range", min: 0, max: 0, value: 0, "aria-label": "Frame", oninput: () => showFrame(Number(slider.value)) });
  const frameControls = h("div", { class: "frame-controls", hidden: true },
    h("button", { type: "button", "aria-label": "Previous frame", onclick: () => showFrame(frame - 1) }, "‹"),
    slider,
    h("button", { type: "button", "aria-label": "Next frame", onclick: () => showFrame(frame + 1) }, "›"));
  const previous = h("button", { type: "button", onclick: () => showImage(current - 1) }, "‹ Previous image");
  const next = h("button", { type: "button", onclick: () => showImage(current + 1) }, "Next image ›");
  const dumpLink = h("a", { class: "button", href: "#" }, "All elements");
  const fileLink = h("a", { class: "button", href: "#", download: "" }, "Download DICOM");
  const figure = h("figure", { class: "preview-figure" }, picture, status);
  const presets = h("label", { class: "window-presets" }, "Window ",
    h("select", { "aria-label": "Window preset", onchange: (event) => {
        windowing = WINDOW_PRESETS[Number(event.target.value)][1];
        showFrame(frame);
      } }, WINDOW_PRESETS.map(([name], i) => h("option", { value: i }, name))));

  picture.addEventListener("error", () => clear(error, h("p", { class: "message error", role: "alert" },
    "This object cannot be shown as an image (it may hold no pixels, or use an unsupported compression).")));
  picture.addEventListener("load", () => clear(error));

  function describe() {
    const image = images[current];
    const number = image.number !== undefined ? `Image ${image.number}` : image.filename;
    status.textContent = `${number} (${current + 1} of ${images.length})` + (frames > 1 ? ` · frame ${frame + 1} of ${frames}` : "");
    picture.alt = `${number}${frames > 1 ? `, frame ${frame + 1}` : ""}`;
  }

  function showFrame(value) {
    frame = Math.max(0, Math.min(frames - 1, value));
    slider.value = String(frame);
    picture.src = api.imageUrl(images[current].sopInstanceUID, { frame, window: windowing });
    describe();
  }

  async function showImage(value) {
    current = Math.max(0, Math.min(images.length - 1, value));
    const image = images[current];
    const mine = ++request;
    frame = 0;
    frames = 1;
    frameControls.hidden = true;
    previous.disabled = current === 0;
    next.disabled = current === images.length - 1;
    dumpLink.href = `#/dump/${encodeURIComponent(image.sopInstanceUID)}`;
    fileLink.href = "/legacy/file?uid=" + encodeURIComponent(image.sopInstanceUID);
    showFrame(0);
    try {
      const info = await api.post("/dic2png", { SOPInstanceUID: image.sopInstanceUID });
      if (mine !== request) return;
      frames = Math.max(1, Number(info.NumberOfFrames) || 1);
      slider.max = String(frames - 1);
      frameControls.hidden = frames < 2;
      describe();
    } catch {
      // Unrenderable: the picture's error says so.
    }
  }

  const body = h("div", { class: "preview-body", tabindex: "-1", autofocus: true },
    figure, error, frameControls,
    h("div", { class: "button-row" }, previous, next, presets, h("span", { class: "spacer" }), dumpLink, fileLink),
    h("p", { class: "muted small" }, "Keys: ← → frames, Page Up / Page Down images, Escape closes."));
  const dialog = modal("Preview", body, { wide: true });
  dialog.element.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement && event.target !== slider) return;
    if (event.key === "ArrowLeft" && event.target !== slider) { event.preventDefault(); showFrame(frame - 1); }
    else if (event.key === "ArrowRight" && event.target !== slider) { event.preventDefault(); showFrame(frame + 1); }
    else if (event.key === "PageUp") { event.preventDefault(); showImage(current - 1); }
    else if (event.key === "PageDown") { event.preventDefault(); showImage(current + 1); }
  });
  dumpLink.addEventListener("click", () => dialog.close());
  showImage(index);
  return dialog;
}
