"""batch_summary: a button under the search results that counts the selected rows by modality.

slot-id "result-batch" puts a button under the results; it opens a dialog whose module,
batch_summary.js, gets the search in slot.data and then the event result-selection-ready
with what the user selected.

Enable: copy this file and batch_summary.js into plugins/, reload the web app.
Course: chapter 10, exercise 3 (the result-batch slot).
"""

SETTINGS = {"enabled": True}

WEBUI = {
    "name": "batch_summary",
    "version": "1.0.0",
    "dicoogle": {"slot-id": "result-batch", "caption": "Summary", "module-file": "batch_summary.js", "roles": []},
}
