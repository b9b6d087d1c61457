"""anonymize: de-identify a study with DICOM's Basic Profile, into a new study in the archive.

POST /ext/anonymize/studies/<StudyInstanceUID> reads every instance of the study and applies
PS3.15 Annex E's Basic Application Level Confidentiality Profile: names, IDs, dates, addresses
and the like are removed, emptied or replaced, every UID is replaced (consistently, so the
copies still form one study), and private elements are removed. The copies enter the archive
through the same path as received objects, as Orthanc's /studies/{id}/anonymize does; the
original stays. The answer names the new study: {"StudyInstanceUID": ..., "stored": n}.

The profile is not written here but taken from the dicom-anonymizer package, which implements
the standard's Table E.1-1: `pip install dicom-anonymizer` (or dicoogled's `[plugins]` extra).
Without it the route answers 501 and says so. Check the result before sharing: burnt-in text in
pixels, and free text in odd places, are beyond any tag-based profile.

For real research data use the daemon's own de-identifier instead (POST /research/export, or
Deidentifier in dicoogled.py): the same profile with its options, the same pseudonym for the
same patient in every export, and a map an administrator can re-identify with. This file
stays as the short example of a web-service plugin that writes to the archive.

Enable it in the config file (or POST /plugins/web/anonymize/enable):
    [plugin.anonymize]
    enabled = true

Hooks shown: routes (a web service, behind the core's login: POST needs a user), with the calls
dicoogle.instances, dicoogle.file and dicoogle.store.
"""

import io
import threading

import bottle
import pydicom

try:
    from dicomanonymizer import anonymize_dataset
except ImportError:  # optional: the route explains what to install
    anonymize_dataset = None

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": False}  # writes to the archive: off until an administrator turns it on

# dicom-anonymizer keeps its old -> new UID table in a module global: one study at a time.
_lock = threading.Lock()


def deidentify(data: bytes) -> bytes:
    """One instance's Part 10 bytes, de-identified with the Basic Profile."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    anonymize_dataset(dataset, delete_private_tags=True)
    # PS3.15 E.1.1: say that the identity was removed, and how.
    dataset.PatientIdentityRemoved = "YES"
    dataset.DeidentificationMethod = "PS3.15 Basic Profile (dicom-anonymizer)"  # LO: 64 at most
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    output = io.BytesIO()
    dataset.save_as(output, enforce_file_format=True)
    return output.getvalue()


def routes(app):
    @app.post("/studies/<study_uid:re:[0-9.]{1,64}>")
    def anonymize_study(study_uid):
        if anonymize_dataset is None:
            bottle.abort(501, "de-identification needs the dicom-anonymizer package: pip install dicom-anonymizer")
        instances = dicoogle.instances(study_uid)
        if not instances:
            bottle.abort(404, f"no study {study_uid}")
        new_study_uid, stored, failed = None, 0, 0
        with _lock:
            for sop_uid, _, _, _ in instances:
                copy = deidentify(dicoogle.file(sop_uid))
                new_study_uid = pydicom.dcmread(io.BytesIO(copy), stop_before_pixels=True).StudyInstanceUID
                status = dicoogle.store(copy, "anonymize")  # 0 is success
                stored, failed = stored + (status == 0), failed + (status != 0)
        dicoogle.log(f"de-identified study {study_uid} as {new_study_uid}: {stored} stored, {failed} failed")
        return {"StudyInstanceUID": new_study_uid, "stored": stored, "failed": failed}
