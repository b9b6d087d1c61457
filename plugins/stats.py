"""stats: how many studies the archive holds, by modality, year and institution.

A web service and a web UI plugin in one file. GET /ext/stats/ answers
    {"studies": 12, "modalities": {"CT": 9, "MR": 3}, "years": {"2023": 5, ...},
     "institutions": {"General Hospital": 7, ...}}
and stats.js, the module beside this file, shows those counts as a menu page of the web app.

It only reads, so it is enabled as it is; turn it off with [plugin.stats] enabled = false.

Hooks shown: routes (a web service under /ext/stats/, behind the core's login) and WEBUI (the
descriptor that puts stats.js in the web app's menu), with the call dicoogle.find.
"""

import collections

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": True}

#: Where the web app shows the module (slot-id), under which caption, and for which roles
#: (none: everyone logged in). The same fields as a Dicoogle web plugin's package.json.
WEBUI = {
    "name": "stats",
    "version": "1.0.0",
    "description": "Studies by modality, year and institution",
    "dicoogle": {"slot-id": "menu", "caption": "Statistics", "module-file": "stats.js", "roles": []},
}


def count_studies() -> dict:
    """Count every study once: a C-FIND at STUDY level, as a DICOM client would ask."""
    modalities, years, institutions = collections.Counter(), collections.Counter(), collections.Counter()
    studies = 0
    keys = {"StudyInstanceUID": "", "ModalitiesInStudy": "", "StudyDate": "", "InstitutionName": ""}
    for study in dicoogle.find("STUDY", keys):
        studies += 1
        found = study.get("ModalitiesInStudy") or "?"  # one value is a str, several a list
        for modality in [found] if isinstance(found, str) else found:
            modalities[modality] += 1
        years[str(study.get("StudyDate") or "")[:4] or "?"] += 1
        institutions[str(study.get("InstitutionName") or "") or "?"] += 1
    return {"studies": studies, "modalities": dict(modalities), "years": dict(sorted(years.items())),
            "institutions": dict(institutions)}


def routes(app):
    @app.get("/")
    def stats():
        return count_studies()
