"""find_guard: refuses C-FIND queries that would list the whole archive.

A find filter runs before every DICOM C-FIND (not /search, not QIDO-RS), in load order. It gets
the query as keyword -> value ("" for a return key) and returns it changed (whole: keys left out
are gone), None to keep it, or a DICOM status to refuse it. This one refuses a STUDY-level
query that names neither a patient nor a date, and turns PatientID to capitals.

Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind find-filter` does).
Course: chapter 9, exercise 7 (find filters).
"""

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": True}
#: "Refused: out of resources" (PS3.4 C.4.1.1.4): the archive will not answer so much at once.
OUT_OF_RESOURCES = 0xA700
NAMING_KEYS = ("PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyInstanceUID")


def incoming_find_filter(calling_aet, query):
    named = [key for key in NAMING_KEYS if query.get(key, "").strip("*")]
    if query.get("QueryRetrieveLevel") == "STUDY" and not named:
        dicoogle.log(f"refused a C-FIND from {calling_aet}: it names no patient, date or study", "warning")
        return OUT_OF_RESOURCES
    if query.get("PatientID"):
        return {**query, "PatientID": query["PatientID"].upper()}
    return None
