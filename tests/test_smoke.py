"""The daemon starts, answers C-ECHO and /health, stores and finds."""

from conftest import make_identifier


def test_health_and_echo(daemon):
    health = daemon.health()
    assert health["status"] == "ok"
    assert health["dicom_port"] == daemon.dicom_port
    daemon.dcmtk("echoscu")


def test_store_then_find(daemon, studies):
    paths = studies(patients=1, studies=1, series=1, instances=2)
    assert daemon.store(*paths) == [0, 0]
    results, status = daemon.find(make_identifier("STUDY", PatientName="", StudyInstanceUID="", NumberOfStudyRelatedInstances=""))
    assert status == 0
    assert len(results) == 1
    assert results[0].NumberOfStudyRelatedInstances == 2
