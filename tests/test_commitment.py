"""Storage Commitment Push Model (PS3.4 Annex J): a pynetdicom SCU asks the real daemon to
commit to instances and gets the N-EVENT-REPORT, on its own association while it is open, else
on one the daemon opens back to it ([modalities] gives its address) as the SCP by role selection.
"""

import pathlib
import queue

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification

from conftest import AET, free_port

WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REPORT_WAIT = 30  # seconds: a deadline, not a pause


class CommitmentSCU:
    """A Storage Commitment SCU whose N-EVENT-REPORT handler puts (event type, information)
    on a queue, on its requesting association and on the small SCP it may run for reports."""

    def __init__(self, aet="COMMITSCU"):
        self.aet, self.reports = aet, queue.Queue()
        self.ae = AE(ae_title=aet)
        self.ae.add_requested_context(StorageCommitmentPushModel)
        # As the acceptor of the daemon's report association: the daemon asks for the SCP role.
        self.ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
        self.handlers = [(evt.EVT_N_EVENT_REPORT, self._on_report)]
        self.server = None

    def _on_report(self, event):
        self.reports.put((event.request.EventTypeID, event.event_information, event.assoc.is_requestor))
        return 0x0000, None

    def listen(self) -> int:
        port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", port), block=False, evt_handlers=self.handlers)
        return port

    def associate(self, daemon):
        assoc = self.ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET, evt_handlers=self.handlers,
                                  ext_neg=[build_role(StorageCommitmentPushModel, scu_role=True)])
        assert assoc.is_established, "association rejected"
        return assoc

    def request(self, assoc, references, transaction_uid=None, action_type=1):
        information = Dataset()
        if transaction_uid is not False:
            information.TransactionUID = transaction_uid or generate_uid()
        items = []
        for sop_class, sop_instance in references:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
            items.append(item)
        information.ReferencedSOPSequence = items
        status, _ = assoc.send_n_action(information, action_type, StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        return status.Status, information

    def report(self):
        return self.reports.get(timeout=REPORT_WAIT)

    def stop(self):
        if self.server:
            self.server.shutdown()


def _stored(daemon, studies, testdata, count=3):
    """Store a generated series and CT_small: [(SOP class, SOP instance, dataset)]."""
    paths = sorted(studies(patients=1, studies=1, series=1, instances=count))[:count] + [testdata("CT_small.dcm")]
    datasets = [pydicom.dcmread(path) for path in paths]
    assert set(daemon.store(*datasets)) == {0x0000}
    return [(ds.SOPClassUID, ds.SOPInstanceUID) for ds in datasets]


def test_all_stored_instances_are_committed_on_the_same_association(daemon, studies, testdata):
    references = _stored(daemon, studies, testdata)
    scu = CommitmentSCU()
    assoc = scu.associate(daemon)
    try:
        status, request = scu.request(assoc, references)
        assert status == 0x0000
        event_type, information, on_request_association = scu.report()
    finally:
        assoc.release()
    assert on_request_association, "the report came while the requesting association was open: on it"
    assert event_type == 1
    assert information.TransactionUID == request.TransactionUID
    assert [(i.ReferencedSOPClassUID, i.ReferencedSOPInstanceUID) for i in information.ReferencedSOPSequence] == references
    assert "FailedSOPSequence" not in information


def test_missing_and_mismatched_instances_fail_with_their_reasons(daemon, studies, testdata):
    references = _stored(daemon, studies, testdata)
    deleted_uid = references[1][1]
    deleted = next(path for path in pathlib.Path(daemon.data_dir).rglob("*")
                   if path.is_file() and path.suffix != ".sqlite" and _uid_of(path) == deleted_uid)
    deleted.unlink()
    unknown = (references[0][0], generate_uid())
    wrong_class = ("1.2.840.10008.5.1.4.1.1.4", references[2][1])  # stored as CT, asked as MR
    scu = CommitmentSCU()
    assoc = scu.associate(daemon)
    try:
        status, _ = scu.request(assoc, [references[0], references[1], unknown, wrong_class])
        assert status == 0x0000
        event_type, information, _ = scu.report()
    finally:
        assoc.release()
    assert event_type == 2
    assert [i.ReferencedSOPInstanceUID for i in information.ReferencedSOPSequence] == [references[0][1]]
    failures = {i.ReferencedSOPInstanceUID: i.FailureReason for i in information.FailedSOPSequence}
    assert failures == {deleted_uid: 0x0110, unknown[1]: 0x0112, wrong_class[1]: 0x0119}


def _uid_of(path):
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=True).get("SOPInstanceUID")
    except Exception:
        return None


def test_report_comes_on_a_new_association_after_the_scu_released(start_daemon, studies, testdata):
    scu = CommitmentSCU()
    port = scu.listen()
    try:
        daemon = start_daemon(f"[modalities]\nCOMMITSCU = 127.0.0.1:{port}\n")
        references = _stored(daemon, studies, testdata, count=2)
        # The SCU releases as soon as the N-ACTION is answered. A request of thousands of
        # references (unknown ones among them) takes the daemon far longer to check than the
        # release takes; should the report still beat it, a larger request is tried.
        for unknown_count in (3000, 12000, 40000):
            unknown = [(references[0][0], generate_uid()) for _ in range(unknown_count)]
            assoc = scu.associate(daemon)
            status, request = scu.request(assoc, references + unknown)
            assoc.release()
            assert status == 0x0000
            event_type, information, on_request_association = scu.report()
            assert information.TransactionUID == request.TransactionUID
            if not on_request_association:
                break
        else:
            raise AssertionError("every report came before the release: no new association was needed")
    finally:
        scu.stop()
    assert event_type == 2
    assert [i.ReferencedSOPInstanceUID for i in information.ReferencedSOPSequence] == [uid for _, uid in references]
    assert len(information.FailedSOPSequence) == unknown_count
    assert {i.FailureReason for i in information.FailedSOPSequence} == {0x0112}
    assert "storage commitment report taken by COMMITSCU" in daemon.log


def test_bad_requests_get_failure_statuses(daemon, studies, testdata):
    references = _stored(daemon, studies, testdata, count=1)
    scu = CommitmentSCU()
    assoc = scu.associate(daemon)
    try:
        assert scu.request(assoc, references, action_type=2)[0] == 0x0123  # no such action type
        assert scu.request(assoc, references, transaction_uid=False)[0] == 0x0120  # missing attribute
        assert scu.reports.empty()
        assert assoc.is_established
    finally:
        assoc.release()


def test_an_ae_not_allowed_commitment_has_its_context_refused(start_daemon):
    daemon = start_daemon("[modalities]\nCOMMITSCU = 127.0.0.1:104 allow=store\n")
    scu = CommitmentSCU()
    scu.ae.add_requested_context(Verification)  # so that the association itself is accepted
    assoc = scu.ae.associate("127.0.0.1", daemon.dicom_port, ae_title=AET)
    try:
        assert assoc.is_established
        assert not [c for c in assoc.accepted_contexts if c.abstract_syntax == StorageCommitmentPushModel]
    finally:
        assoc.release()
    assert "refused Storage Commitment to COMMITSCU" in daemon.log
