"""worklist_csv: fill the Modality Worklist from a CSV file, as a RIS export would.

Each row of the file is one scheduled procedure step; the columns are DICOM keywords:
    PatientID,PatientName,AccessionNumber,ScheduledStationAETitle,Modality,ScheduledProcedureStepStartDate
    P1,DOE^JOHN,ACC1,CT01,CT,20261206
ScheduledStationAETitle, Modality, ScheduledProcedureStepStartDate (and any other column named
like an attribute of a scheduled step) go inside ScheduledProcedureStepSequence, the rest at the
top, as a modality's worklist query expects them. A row whose AccessionNumber is on the worklist
already is skipped, so importing the file again adds only the new rows.

Enable it in the config file, naming the file (only an administrator can change settings):
    [plugin.worklist_csv]
    enabled = true
    file = /srv/ris/today.csv
then POST /ext/worklist_csv/import (any logged-in user: it reads only that file) answers
    {"added": [ids], "skipped": 1, "errors": ["row 3: PatientName is required"]}

Hook shown: routes (a web service), with the calls dicoogle.worklist and dicoogle.worklist_add.
"""

import csv

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
DESCRIPTION = "Fills the Modality Worklist from a CSV file"
SETTINGS = {"enabled": False, "file": ""}  # acts on data: off until an administrator turns it on

#: The columns that belong to the scheduled step, inside ScheduledProcedureStepSequence (PS3.4 K.6.1.2.2).
STEP_KEYWORDS = {"ScheduledStationAETitle", "Modality", "ScheduledProcedureStepStartDate",
                 "ScheduledProcedureStepStartTime", "ScheduledProcedureStepDescription",
                 "ScheduledPerformingPhysicianName", "ScheduledProcedureStepID", "ScheduledStationName"}


def entry_of(row: dict) -> dict:
    """One CSV row as the DICOM JSON dicoogle.worklist_add takes (pydicom writes the JSON)."""
    entry, step = Dataset(), Dataset()
    for keyword, value in row.items():
        keyword = (keyword or "").strip()
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"column {keyword[:40]!r} is not a DICOM keyword")
        if value and value.strip():
            setattr(step if keyword in STEP_KEYWORDS else entry, keyword, value.strip())
    entry.ScheduledProcedureStepSequence = [step]
    return entry.to_json_dict()


def import_file(path: str) -> dict:
    scheduled = {entry["AccessionNumber"] for entry in dicoogle.worklist()}
    added, skipped, errors = [], 0, []
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.DictReader(handle), start=2):  # row 1 is the header
            if row.get("AccessionNumber") and row["AccessionNumber"].strip() in scheduled:
                skipped += 1
                continue
            try:
                added.append(dicoogle.worklist_add(entry_of(row)))
            except ValueError as error:  # the worklist's reason, or a column that is no keyword
                errors.append(f"row {number}: {error}")
    dicoogle.log(f"imported {path}: {len(added)} added, {skipped} skipped, {len(errors)} refused")
    return {"added": added, "skipped": skipped, "errors": errors}


def routes(app):
    @app.post("/import")
    def import_worklist():
        path = dicoogle.setting("file")
        if not path:
            return {"error": "set [plugin.worklist_csv] file = the CSV file to import"}
        return import_file(path)
