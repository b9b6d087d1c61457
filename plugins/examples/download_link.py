"""download_link: a "DICOM file" link in each image row of the search results.

slot-id "result-option" puts the module, download_link.js, in a cell of every result row; it
is given the row in slot.data: {type: "patient" | "study" | "series" | "image", ...}. This one
shows a link to /legacy/file?uid=... for images, and nothing for the other levels.

Enable: copy this file and download_link.js into plugins/, reload the web app.
Course: chapter 10, exercise 2 (the result-option slot).
"""

SETTINGS = {"enabled": True}

WEBUI = {
    "name": "download_link",
    "version": "1.0.0",
    "dicoogle": {"slot-id": "result-option", "caption": "Download", "module-file": "download_link.js", "roles": []},
}
