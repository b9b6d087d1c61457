"""Modality Worklist (C-FIND, PS3.4 K) and MPPS (N-CREATE/N-SET, PS3.4 F), end to end.

Entries are scheduled over REST, as a RIS would; DCMTK's findscu -W queries them with each
matching key, as a modality does; pynetdicom reports the performed procedure step, and the
entry's state is read back over REST.
"""

import json

import apsw
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ModalityPerformedProcedureStep, ModalityWorklistInformationFind

from conftest import AET, NODELAY
from restclient import ADMIN_ENV, Client, admin_client, base_url

#: (PatientName, PatientID, AccessionNumber, station AE, Modality, start date) of the scheduled steps.
SCHEDULE = [
    ("DOE^JOHN", "P1", "ACC1", "CT01", "CT", "20261206"),
    ("DOE^JANE", "P2", "ACC2", "MR01", "MR", "20261207"),
    ("ROE^RICHARD", "P3", "ACC3", "CT02", "CT", "20261210"),
]


def entry_json(name, patient_id, accession, station, modality, date, study_uid=None) -> dict:
    """A scheduled procedure step as a RIS sends it: DICOM JSON."""
    entry = Dataset()
    entry.PatientName, entry.PatientID, entry.AccessionNumber = name, patient_id, accession
    if study_uid:
        entry.StudyInstanceUID = study_uid
    step = Dataset()
    step.ScheduledStationAETitle, step.Modality, step.ScheduledProcedureStepStartDate = station, modality, date
    step.ScheduledProcedureStepDescription = f"{modality} exam"
    entry.ScheduledProcedureStepSequence = [step]
    return entry.to_json_dict()


def post_entry(client: Client, document) -> object:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return client.request("POST", "/worklist", data=body, headers={"Content-Type": "application/json"})


@pytest.fixture
def ris(start_daemon):
    """A daemon with the SCHEDULE on its worklist; .admin is an admin client, .ids the entries' ids."""
    daemon = start_daemon(env=ADMIN_ENV)
    daemon.admin = admin_client(daemon)
    daemon.ids = []
    for row in SCHEDULE:
        response = post_entry(daemon.admin, entry_json(*row))
        assert response.status == 201, response
        daemon.ids.append(response.json()["id"])
    return daemon


def findscu_worklist(daemon, tmp_path, *keys) -> list[Dataset]:
    """findscu -W with the keys given (and the usual return keys); the responses it wrote."""
    out = tmp_path / f"rsp{len(list(tmp_path.iterdir()))}"
    out.mkdir()
    returned = ["PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID",
                "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
                "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate",
                "ScheduledProcedureStepSequence[0].Modality",
                "ScheduledProcedureStepSequence[0].ScheduledProcedureStepID"]
    arguments = []
    given = {key.split("=")[0] for key in keys}
    for key in [*keys, *(k for k in returned if k not in given)]:
        arguments += ["-k", key]
    daemon.dcmtk("findscu", "-W", "-X", "-od", str(out), *arguments)
    return [pydicom.dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def patient_ids(responses) -> set:
    return {response.PatientID for response in responses}


@pytest.mark.parametrize("key, expected", [
    ("ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT01", {"P1"}),
    ("ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261207", {"P2"}),
    ("ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261206-20261207", {"P1", "P2"}),
    ("ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261208-", {"P3"}),
    ("ScheduledProcedureStepSequence[0].Modality=CT", {"P1", "P3"}),
    ("PatientName=doe*", {"P1", "P2"}),
    ("PatientName=R?E^*", {"P3"}),
    ("PatientID=P2", {"P2"}),
    ("AccessionNumber=ACC3", {"P3"}),
    ("PatientID=P9", set()),
])
def test_findscu_worklist_matches_each_key(ris, tmp_path, key, expected):
    assert patient_ids(findscu_worklist(ris, tmp_path, key)) == expected


def test_findscu_worklist_keys_match_within_one_step(ris, tmp_path):
    """Sequence matching: station CT01 and modality MR are in no single step."""
    assert findscu_worklist(ris, tmp_path, "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT01",
                            "ScheduledProcedureStepSequence[0].Modality=MR") == []
    both = findscu_worklist(ris, tmp_path, "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT02",
                            "ScheduledProcedureStepSequence[0].Modality=CT")
    assert patient_ids(both) == {"P3"}


def test_findscu_worklist_returns_the_requested_keys_and_filled_ones(ris, tmp_path):
    [response] = findscu_worklist(ris, tmp_path, "PatientID=P1")
    assert str(response.PatientName) == "DOE^JOHN" and response.AccessionNumber == "ACC1"
    assert pydicom.uid.UID(response.StudyInstanceUID).is_valid
    [step] = response.ScheduledProcedureStepSequence
    assert (step.ScheduledStationAETitle, step.Modality, step.ScheduledProcedureStepStartDate) == ("CT01", "CT", "20261206")
    assert step.ScheduledProcedureStepID.startswith("SPS")  # filled in when the RIS gave none
    assert "ScheduledProcedureStepDescription" not in step  # not asked for
    assert "PatientBirthDate" not in response


def test_worklist_over_rest(ris):
    entries = ris.admin.get("/worklist").json()
    assert [(e["id"], e["state"], e["AccessionNumber"]) for e in entries] == [
        (entry_id, "SCHEDULED", row[2]) for entry_id, row in zip(ris.ids, SCHEDULE)]
    assert Dataset.from_json(entries[0]["dataset"]).PatientID == "P1"
    assert Client(base_url(ris)).get("/worklist").status == 401  # patient data: a login first
    assert ris.admin.delete(f"/worklist/{ris.ids[1]}").json() == {"deleted": True}
    assert ris.admin.delete(f"/worklist/{ris.ids[1]}").status == 404
    assert ris.admin.delete("/worklist/nope").status == 404
    assert [e["id"] for e in ris.admin.get("/worklist").json()] == [ris.ids[0], ris.ids[2]]


@pytest.mark.parametrize("body, reason", [
    (b"not json", "not JSON"),
    (b"[1, 2]", "expected a DICOM JSON object"),
    (json.dumps({"00100020": {"vr": "LO", "Value": ["P1"]}}).encode(), "PatientName is required"),
    (json.dumps(entry_json("A^B", "P1", "X", "CT01", "CT", "2026-12-06")).encode(), "is not YYYYMMDD"),
    (json.dumps({**entry_json("A^B", "P1", "X", "CT01", "CT", "20261206"),
                 "0020000D": {"vr": "UI", "Value": ["not a uid"]}}).encode(), "not a valid UID"),
    (json.dumps({"00100010": {"vr": "XX", "Value": ["A"]}}).encode(), "not valid DICOM JSON"),
    (json.dumps({**entry_json("A^B", "P1", "X", "CT01", "CT", "20261206"),
                 "7FE00010": {"vr": "OB", "BulkDataURI": "file:///etc/passwd"}}).encode(), "BulkDataURI"),
])
def test_bad_worklist_entries_are_refused_with_a_reason(ris, body, reason):
    response = post_entry(ris.admin, body)
    assert response.status == 400, response
    assert reason in response.json()["error"]
    assert len(ris.admin.get("/worklist").json()) == len(SCHEDULE)


def test_scheduling_needs_an_admin(ris):
    anonymous = Client(base_url(ris))
    assert post_entry(anonymous, entry_json(*SCHEDULE[0])).status == 401


# ---- MPPS: the modality reports what it did ------------------------------------------------------


def mpps_association(daemon, aet="CT01"):
    ae = AE(ae_title=aet)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.add_requested_context(ModalityWorklistInformationFind)
    association = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=NODELAY)
    assert association.is_established
    return association


def performed_step(entry: dict, status="IN PROGRESS") -> Dataset:
    """An MPPS N-CREATE data set for a worklist entry (as GET /worklist gives it)."""
    scheduled = Dataset.from_json(entry["dataset"])
    step = Dataset()
    step.StudyInstanceUID = scheduled.StudyInstanceUID
    step.AccessionNumber = scheduled.AccessionNumber
    step.ScheduledProcedureStepID = scheduled.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID
    attributes = Dataset()
    attributes.ScheduledStepAttributesSequence = [step]
    attributes.PatientName, attributes.PatientID = scheduled.PatientName, scheduled.PatientID
    attributes.PerformedProcedureStepID = "PPS1"
    attributes.PerformedStationAETitle = "CT01"
    attributes.PerformedProcedureStepStartDate = "20261206"
    attributes.PerformedProcedureStepStartTime = "101500"
    attributes.PerformedProcedureStepStatus = status
    attributes.Modality = "CT"
    return attributes


def states(daemon) -> list[str]:
    return [entry["state"] for entry in daemon.admin.get("/worklist").json()]


@pytest.mark.parametrize("final", ["COMPLETED", "DISCONTINUED"])
def test_mpps_create_then_set_moves_the_entry_along(ris, tmp_path, final):
    entry = ris.admin.get("/worklist").json()[0]
    uid = generate_uid()
    association = mpps_association(ris)
    try:
        status, _ = association.send_n_create(performed_step(entry), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        assert states(ris) == ["IN PROGRESS", "SCHEDULED", "SCHEDULED"]
        # A step begun is no longer work to do: the modality's next worklist query leaves it out.
        assert patient_ids(findscu_worklist(ris, tmp_path, "ScheduledProcedureStepSequence[0].Modality=CT")) == {"P3"}

        # The same step created twice: Duplicate SOP Instance.
        status, _ = association.send_n_create(performed_step(entry), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0111

        modification = Dataset()
        modification.PerformedProcedureStepStatus = final
        modification.PerformedProcedureStepEndDate, modification.PerformedProcedureStepEndTime = "20261206", "103000"
        status, _ = association.send_n_set(modification, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        assert states(ris) == [final, "SCHEDULED", "SCHEDULED"]

        # Final once COMPLETED or DISCONTINUED: a further N-SET fails (PS3.4 F.7.2.2.2).
        status, _ = association.send_n_set(modification, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0110
    finally:
        association.release()


def test_mpps_errors_have_their_statuses(ris):
    entry = ris.admin.get("/worklist").json()[1]
    association = mpps_association(ris, "MR01")
    try:
        status, _ = association.send_n_create(performed_step(entry, status="COMPLETED"),
                                              ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0106  # created COMPLETED: invalid attribute value
        unscheduled = performed_step(entry)
        del unscheduled.ScheduledStepAttributesSequence
        status, _ = association.send_n_create(unscheduled, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0120  # missing attribute
        unknown = Dataset()
        unknown.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = association.send_n_set(unknown, ModalityPerformedProcedureStep, generate_uid())
        assert status.Status == 0x0112  # no such object instance
        uid = generate_uid()
        status, _ = association.send_n_create(performed_step(entry), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        wrong = Dataset()
        wrong.PerformedProcedureStepStatus = "FINISHED"
        status, _ = association.send_n_set(wrong, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0106
    finally:
        association.release()
    assert states(ris) == ["SCHEDULED", "IN PROGRESS", "SCHEDULED"]


def test_modalities_allow_limits_worklist_and_mpps(start_daemon, tmp_path):
    """[modalities] allow= names worklist and mpps like the other services."""
    daemon = start_daemon("[modalities]\nCT01 = 127.0.0.1:104 allow=store,worklist\n", env=ADMIN_ENV)
    daemon.admin = admin_client(daemon)
    assert post_entry(daemon.admin, entry_json(*SCHEDULE[0])).status == 201
    ae = AE(ae_title="CT01")
    ae.add_requested_context(ModalityPerformedProcedureStep)
    ae.add_requested_context(ModalityWorklistInformationFind)
    association = ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=NODELAY)
    try:
        accepted = {str(context.abstract_syntax) for context in association.accepted_contexts}
        assert accepted == {str(ModalityWorklistInformationFind)}
        query = Dataset()
        query.PatientID = ""
        responses = list(association.send_c_find(query, ModalityWorklistInformationFind))
        assert [ds.PatientID for status, ds in responses if status.Status == 0xFF00] == ["P1"]
    finally:
        association.release()
    assert "refused MPPS to CT01" in daemon.log


@pytest.mark.sqlite_only("rewrites index.sqlite as schema version 2 made it (PRAGMA user_version)")
def test_an_index_of_schema_version_2_gets_the_worklist_tables(start_daemon):
    daemon = start_daemon(env=ADMIN_ENV)
    daemon.stop()
    index = apsw.Connection(str(daemon.data_dir / "index.sqlite"))
    index.execute("DROP TABLE performed_procedure_steps; DROP TABLE worklist_entries; DROP TABLE protected_studies;"
                  " DROP TABLE study_labels; DROP TABLE series_labels;"
                  " DROP TABLE webhook_deliveries; DROP INDEX studies_unannounced;"
                  " ALTER TABLE studies DROP COLUMN last_arrival; ALTER TABLE studies DROP COLUMN stable_announced;"
                  " PRAGMA user_version=2")
    index.close()
    daemon.start()
    assert "upgrading the index" in daemon.log
    admin = admin_client(daemon)
    assert post_entry(admin, entry_json(*SCHEDULE[0])).status == 201
    assert [entry["state"] for entry in admin.get("/worklist").json()] == ["SCHEDULED"]


# ---- plugins fill the worklist ----------------------------------------------------------------


def test_the_csv_plugin_fills_the_worklist_once(start_daemon, tmp_path):
    table = tmp_path / "today.csv"
    table.write_text("PatientID,PatientName,AccessionNumber,ScheduledStationAETitle,Modality,ScheduledProcedureStepStartDate\n"
                     "P1,DOE^JOHN,ACC1,CT01,CT,20261206\n"
                     "P2,,ACC2,MR01,MR,20261206\n"
                     "P3,ROE^RICHARD,ACC3,CT02,CT,20261207\n", encoding="utf-8")
    daemon = start_daemon(f"[plugin.worklist_csv]\nenabled = true\nfile = {table}\n", env=ADMIN_ENV)
    admin = admin_client(daemon)
    first = admin.post("/ext/worklist_csv/import").json()
    assert len(first["added"]) == 2 and first["skipped"] == 0
    assert first["errors"] == ["row 3: PatientName is required"]
    again = admin.post("/ext/worklist_csv/import").json()
    assert again == {"added": [], "skipped": 2, "errors": ["row 3: PatientName is required"]}
    entries = admin.get("/worklist").json()
    assert [entry["AccessionNumber"] for entry in entries] == ["ACC1", "ACC3"]
    step = Dataset.from_json(entries[1]["dataset"]).ScheduledProcedureStepSequence[0]
    assert (step.ScheduledStationAETitle, step.Modality, step.ScheduledProcedureStepStartDate) == ("CT02", "CT", "20261207")


def test_a_lua_plugin_schedules_and_lists_as_python_does(start_daemon, tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "ris.lua").write_text('''
routes = {["POST /add"] = function(params)
  local id = dicoogle.worklist_add({
    ["00100010"] = {vr = "PN", Value = {{Alphabetic = "LUA^PATIENT"}}},
    ["00100020"] = {vr = "LO", Value = {params.patient}}})
  local ok, reason = pcall(dicoogle.worklist_add, {["00100020"] = {vr = "LO", Value = {"P9"}}})
  local entries = dicoogle.worklist()
  return {id = id, count = #entries, state = entries[1].state, refused = tostring(reason)}
end}
''', encoding="utf-8")
    daemon = start_daemon(args=["--plugins-dir", str(folder)], env=ADMIN_ENV)
    admin = admin_client(daemon)
    answer = admin.post("/ext/ris/add", data={"patient": "P7"}).json()
    assert answer["count"] == 1 and answer["state"] == "SCHEDULED"
    assert "PatientName is required" in answer["refused"]
    [entry] = admin.get("/worklist").json()
    assert entry["id"] == answer["id"] and Dataset.from_json(entry["dataset"]).PatientID == "P7"
