"""ct_only: a query provider that answers like the archive's index, but with CT images only.

/search?provider=ct_only&query=TEXT (and /searchDIM, /export, the web app's provider list) call
query(TEXT). A real provider would ask another system (a research database, a remote archive);
this one asks the index, so it shows the shape of an answer without needing one.

Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind query` does); it is then
listed by /providers. Course: chapter 9, exercise 2 (query providers).
"""

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": True, "limit": 1000}


def query(text):
    """A list of {"uri": ..., "fields": {...}}, one per instance.

    For /searchDIM to group the results by patient, study and series, return PatientID,
    StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID; for instances the archive holds,
    SOPInstanceUID alone is enough: the daemon fills in the rest from its index.
    """
    hits = dicoogle.search(f"({text}) AND Modality:CT", limit=dicoogle.setting("limit"))
    return [{"uri": hit["uri"], "fields": hit["fields"]} for hit in hits]
