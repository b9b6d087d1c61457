"""The index on both engines, SQLite and PostgreSQL: the same instances written through the
writer, the same C-FIND matching (PS3.4 C.2.2.2) at every level, the same searches, pages and
counts, asked of an SQLite file and of a real PostgreSQL server (tests/pgserver.py)."""

import io
import sys

import pydicom
import pytest
from pydicom.dataset import Dataset

import studygen
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402

#: Each test puts the index on both engines itself.
pytestmark = pytest.mark.each_engine

#: patient, study, series, instance, modality and attributes of each instance written.
INSTANCES = [
    (0, 0, 0, 0, "CT", {"PatientName": "Müller^Jürgen", "StudyDate": "20200105", "StudyDescription": "Knee left",
                        "InstitutionName": "General Hospital", "ImageComments": "knee pain after a fall"}),
    (0, 0, 0, 1, "CT", {"PatientName": "Müller^Jürgen", "StudyDate": "20200105", "StudyDescription": "Knee left",
                        "InstitutionName": "General Hospital", "ImageComments": "knee knee knee"}),
    (0, 0, 1, 0, "MR", {"PatientName": "Müller^Jürgen", "StudyDate": "20200105", "StudyDescription": "Knee left",
                        "InstitutionName": "General Hospital"}),
    (0, 1, 0, 0, "MR", {"PatientName": "Müller^Jürgen", "StudyDate": "20210311", "StudyDescription": "Hip [right]",
                        "InstitutionName": "General Hospital"}),
    (1, 0, 0, 0, "CT", {"PatientName": "Doe^Jane", "StudyDate": "20191231", "StudyDescription": "Chest",
                        "InstitutionName": "St. Mary", "ImageComments": "alpha beta"}),
    (1, 0, 0, 1, "CT", {"PatientName": "Doe^Jane", "StudyDate": "20191231", "StudyDescription": "Chest",
                        "InstitutionName": "St. Mary", "ImageComments": "alphabet"}),
    (2, 0, 0, 0, "MR", {"PatientName": "Ødegård^Åse", "StudyDate": "20220720", "StudyDescription": "Brain_scan 50%",
                        "InstitutionName": "Clinic", "ImageComments": "beta"}),
]


def dataset(number: int) -> Dataset:
    patient, study, series, instance, modality, attributes = INSTANCES[number]
    return studygen.make_instance(patient, study, series, instance, size=8, modality=modality, **attributes)


def write_instances(index):
    """INSTANCES into an index, through its writer, as /archive/NUMBER.dcm."""
    for number in range(len(INSTANCES)):
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset(number), enforce_file_format=True)
        data = buffer.getvalue()
        record = dicoogled.make_record(dicoogled.read_received_header(data), f"/archive/{number}.dcm", "store", len(data), 0)
        index.write(dicoogled.Index.add_instance, record)


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, tmp_path):
    """An index of INSTANCES, in an SQLite file or a PostgreSQL database."""
    location = tmp_path / "index.sqlite" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    index = dicoogled.Index(location)
    write_instances(index)
    yield index
    index.close()


def answers(index):
    """Every answer the tests compare between the engines, by name."""
    finder = dicoogled.Finder(index)

    def find(level, offset=0, limit=None, **keys):
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
        return [{e.keyword: str(e.value) for e in response if e.keyword != "SpecificCharacterSet"}
                for response in finder.search(identifier, offset=offset, limit=limit)]

    def search(text, limit=None, offset=0):
        hits, total = index.search(dicoogled.SearchQuery(text, set()), limit, offset)
        return sorted(hit.path for hit in hits), total

    def ranked(text, limit=None, offset=0):
        """Best first: FTS5's BM25 on both engines."""
        hits, total = index.search(dicoogled.SearchQuery(text, set()), limit, offset)
        return [hit.path for hit in hits], total

    return {
        "counts": index.counts(),
        "patients": find("PATIENT", PatientID="", PatientName="", NumberOfPatientRelatedInstances=""),
        "studies by date range": find("STUDY", StudyDate="20200101-20211231", StudyInstanceUID="", ModalitiesInStudy=""),
        "studies before": find("STUDY", StudyDate="-20200105", StudyDescription=""),
        "name folded": find("PATIENT", PatientName="muller*", PatientID=""),
        "name wildcard one": find("PATIENT", PatientName="D?E^JANE", PatientID=""),
        "description literal bracket": find("STUDY", StudyDescription="Hip [right]", StudyInstanceUID=""),
        "description wildcard with %": find("STUDY", StudyDescription="*50%", StudyInstanceUID=""),
        "underscore is literal": find("STUDY", StudyDescription="Brain?scan*", StudyInstanceUID=""),
        "underscore not a wildcard": find("STUDY", StudyDescription="Brain_s*", StudyInstanceUID=""),
        "underscore matches itself only": find("STUDY", StudyDescription="Hip_*", StudyInstanceUID=""),
        "percent matches itself only": find("STUDY", StudyDescription="Brain%*", StudyInstanceUID=""),
        "series by modality": find("SERIES", Modality="MR", SeriesInstanceUID="", NumberOfSeriesRelatedInstances=""),
        "modalities in study": find("STUDY", ModalitiesInStudy="CT\\XA", StudyInstanceUID=""),
        "instances any tag": find("IMAGE", ImageComments="*knee*", SOPInstanceUID=""),
        "instances institution": find("IMAGE", InstitutionName="St. Mary", SOPInstanceUID="", InstanceNumber=""),
        "uid list": find("IMAGE", SOPInstanceUID="\\".join(dataset(n).SOPInstanceUID for n in (0, 2, 4))),
        "page": find("IMAGE", 2, 3, SOPInstanceUID=""),
        "page with any tag": find("IMAGE", 1, 2, ImageComments="*", SOPInstanceUID="", InstitutionName="Gen*"),
        "free text": search("knee"),
        "free text prefix": search("alpha*"),
        "phrase": search('"pain after"'),
        "accents folded": search("jurgen"),
        "fielded column": search("Modality:MR"),
        "fielded name": search("PatientName:müller"),
        "fielded uid prefix": search(f"StudyInstanceUID:{dataset(4).StudyInstanceUID[:-6]}*"),
        "fielded other": search("ImageComments:beta"),
        "fielded range": search("StudyDate:[20200101 TO 20211231]"),
        "wildcard inside a word": search("alp?a"),
        "not": search("knee AND NOT Modality:MR"),
        "or": search("beta OR Modality:MR"),
        "search page": search("*:*", 2, 3),
        "ranked": ranked("knee"),
        "ranked page": ranked("knee OR hospital OR alpha*", 3, 1),
        "ranked with a condition": ranked('knee AND Modality:CT OR "general hospital"'),
    }


def test_both_engines_give_the_same_answers(tmp_path, postgres_url):
    """Every answer of answers() is the same on an SQLite file and on PostgreSQL, and each is
    what the instances written say (so the comparison is not of two empty answers)."""
    found = {}
    for engine, location in (("sqlite", tmp_path / "index.sqlite"), ("postgresql", postgres_url)):
        index = dicoogled.Index(location)
        try:
            write_instances(index)
            found[engine] = answers(index)
        finally:
            index.close()
    sqlite, postgresql = found["sqlite"], found["postgresql"]
    for name in sqlite:
        assert sqlite[name] == postgresql[name], name
    assert sqlite["counts"] == {"patients": 3, "studies": 4, "series": 5, "instances": 7}
    assert len(sqlite["studies by date range"]) == 2
    assert [p["PatientName"] for p in sqlite["name folded"]] == ["Müller^Jürgen"]
    assert len(sqlite["description literal bracket"]) == 1 and len(sqlite["description wildcard with %"]) == 1
    assert len(sqlite["underscore is literal"]) == 1 and len(sqlite["underscore not a wildcard"]) == 1
    assert sqlite["underscore matches itself only"] == sqlite["percent matches itself only"] == []
    assert len(sqlite["instances any tag"]) == 2 and len(sqlite["uid list"]) == 3 and len(sqlite["page"]) == 3
    # ... 6.dcm too: its BodyPartExamined is KNEE.
    assert sqlite["free text"] == (["/archive/0.dcm", "/archive/1.dcm", "/archive/2.dcm", "/archive/6.dcm"], 4)
    assert sqlite["free text prefix"] == (["/archive/4.dcm", "/archive/5.dcm"], 2)
    assert sqlite["phrase"] == (["/archive/0.dcm"], 1)
    assert sqlite["accents folded"][1] == 4 and sqlite["fielded name"][1] == 4 and sqlite["fielded range"][1] == 4
    assert sqlite["fielded column"] == (["/archive/2.dcm", "/archive/3.dcm", "/archive/6.dcm"], 3)
    assert sqlite["fielded uid prefix"] == (["/archive/4.dcm", "/archive/5.dcm"], 2)
    assert sqlite["fielded other"] == (["/archive/4.dcm", "/archive/6.dcm"], 2)
    assert sqlite["wildcard inside a word"] == (["/archive/4.dcm"], 1)
    assert sqlite["not"] == (["/archive/0.dcm", "/archive/1.dcm"], 2) and sqlite["or"][1] == 4
    assert len(sqlite["search page"][0]) == 2 and sqlite["search page"][1] == 7
    # "knee" three times in 1.dcm's comments, once in 0.dcm's; 2.dcm and 6.dcm name it once, in fewer words.
    assert sqlite["ranked"][0][0] == "/archive/1.dcm" and sqlite["ranked"][1] == 4
    assert len(sqlite["ranked page"][0]) == 3 and sqlite["ranked page"][1] == 7


def test_a_postgresql_index_keeps_its_schema_version_and_reopens(postgres_url):
    index = dicoogled.Index(postgres_url)
    assert index.schema_version() == dicoogled.SCHEMA_VERSION
    index.close()
    index = dicoogled.Index(postgres_url)
    try:
        assert index.schema_version() == dicoogled.SCHEMA_VERSION
        assert index.counts() == {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    finally:
        index.close()


def test_the_writer_and_readers_on_both_engines(index):
    """Labels, protection, worklist entries, webhook deliveries and removal, through the writer."""
    study = dataset(0).StudyInstanceUID
    assert index.write(dicoogled.Index.add_label, "STUDY", study, "knees") is True
    assert index.write(dicoogled.Index.add_label, "STUDY", study, "knees") is False
    assert [tuple(c) for c in index.labels()] == [("knees", 1)]
    assert index.labelled("SERIES", "knees") == sorted({dataset(n).SeriesInstanceUID for n in (0, 2)})
    assert index.write(dicoogled.Index.protect_study, study) is True
    assert index.is_protected(study) and index.protected_studies() == [study]
    entry = index.write(dicoogled.Index.add_worklist_entry, "1.2.3", "A1", "S1", {"00100010": {"vr": "PN"}})
    assert index.worklist_entry(entry).accession_number == "A1"
    assert index.received_totals()[0] == 7
    # The protected study is not recyclable; the others are, each with its instances and bytes.
    recyclable = index.recyclable_studies()
    assert sorted(s.study_instance_uid for s in recyclable) == sorted({dataset(n).StudyInstanceUID for n in (3, 4, 6)})
    assert sum(s.instances for s in recyclable) == 4 and all(isinstance(s.bytes, int) for s in recyclable)
    removed = index.write(dicoogled.Index.remove_paths, ["/archive/0.dcm", "/archive/1.dcm", "/archive/2.dcm"])
    assert removed == 3
    assert index.counts() == {"patients": 3, "studies": 3, "series": 3, "instances": 4}
    assert index.search(dicoogled.SearchQuery("knee", set()))[1] == 1  # 6.dcm, a KNEE


def test_a_query_of_too_many_terms_is_refused_and_the_most_answered_alike(index):
    """A query holds at most MAX_SEARCH_TERMS terms: the most is answered (both engines alike:
    see test_both_engines_give_the_same_answers), one more is a syntax error naming the limit."""
    most = dicoogled.MAX_SEARCH_TERMS
    knees = " OR ".join(["knee"] * most)
    assert index.search(dicoogled.SearchQuery(knees, set()))[1] == index.search(dicoogled.SearchQuery("knee", set()))[1] > 0
    assert index.search(dicoogled.SearchQuery(" AND ".join(["knee"] * most), set()))[1] > 0
    with pytest.raises(dicoogled.SearchSyntaxError, match=f"more than {most} terms"):
        dicoogled.SearchQuery(knees + " OR knee", set())
    with pytest.raises(dicoogled.SearchSyntaxError, match=f"more than {most} terms"):
        dicoogled.SearchQuery("Modality:(" + "CT " * (most + 1) + ")", set())


def test_postgresql_scores_are_fts5s_bm25_to_the_last_bit(tmp_path, postgres_url):
    """PostgreSQL ranks free text with FTS5's own BM25 (bm25_scores): for single words, prefixes,
    phrases (of a word repeated, ending in a prefix), AND and OR, every match gets the very number
    SQLite's bm25() gives it."""
    sqlite, postgresql = dicoogled.Index(tmp_path / "index.sqlite"), dicoogled.Index(postgres_url)
    try:
        for index in (sqlite, postgresql):
            write_instances(index)
        # Only a prefix phrase's last word is a prefix: "1 ac"* holds "1 acquisitionnumber", not
        # "123851 accessionnumber".
        for fts5 in ('"knee"', '"alpha"*', '"pain" AND "fall"', '("knee") OR ("general" AND "hospital")',
                     '"general hospital"', '"knee" OR "beta" OR "ct"', '"knee knee"', '"knee kn"*', '"alpha b"*',
                     '"general h"* AND "knee"', '"1 ac"*'):
            expected = sorted(sqlite.reader.execute("SELECT rowid, bm25(metadata) FROM metadata WHERE metadata MATCH ?",
                                                    [fts5]).fetchall())
            assert expected and sorted(postgresql.engine.bm25_scores(postgresql.reader, fts5)) == expected, fts5
    finally:
        sqlite.close()
        postgresql.close()


def test_many_threads_read_a_postgresql_index_at_once(postgres_url):
    """More threads than pooled reader connections, each finding and searching while the writer
    writes: every answer is whole (all the instances written before it, as a count that only grows)."""
    import concurrent.futures
    index = dicoogled.Index(postgres_url)
    try:
        write_instances(index)
        finder = dicoogled.Finder(index)
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = ""

        def read(_):
            seen = []
            for _ in range(10):
                studies = len(list(finder.search(identifier)))
                hits, total = index.search(dicoogled.SearchQuery("knee", set()))
                # The count comes first, the page after it: a write may come between them.
                assert total <= len(hits)
                seen.append((studies, total))
            return seen

        def write_more():
            for number in range(3):
                extra = studygen.make_instance(9, number, 0, 0, size=8, ImageComments="knee")
                buffer = io.BytesIO()
                pydicom.dcmwrite(buffer, extra, enforce_file_format=True)
                data = buffer.getvalue()
                record = dicoogled.make_record(dicoogled.read_received_header(data), f"/archive/extra{number}.dcm",
                                               "store", len(data), 0)
                index.write(dicoogled.Index.add_instance, record)

        with concurrent.futures.ThreadPoolExecutor(3 * dicoogled.POSTGRESQL_READERS) as pool:
            writer = pool.submit(write_more)
            answers = list(pool.map(read, range(3 * dicoogled.POSTGRESQL_READERS)))
            writer.result()
        for seen in answers:
            assert all(4 <= studies <= 7 and 4 <= total <= 7 for studies, total in seen)
            assert seen == sorted(seen)  # what one thread sees never goes back
        assert len(list(finder.search(identifier))) == 7
    finally:
        index.close()


# ---- random queries, the same answers ---------------------------------------------------------

import functools  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from pydicom.multival import MultiValue  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def both_engines(tmp_path_factory, postgres_server):
    """INSTANCES in an SQLite file and in a PostgreSQL database, for the whole module."""
    indexes = [dicoogled.Index(tmp_path_factory.mktemp("engines") / "index.sqlite"), dicoogled.Index(postgres_server.database())]
    for index in indexes:
        write_instances(index)
    yield indexes
    for index in indexes:
        index.close()


@functools.cache
def _stored(keyword):
    """The values of a keyword among INSTANCES (a multi-value joined by backslashes)."""
    values = {"\\".join(map(str, v)) if isinstance(v, (list, MultiValue)) else str(v)
              for v in (getattr(dataset(n), keyword, "") for n in range(len(INSTANCES)))}
    return sorted(values - {""})


def _patterns(keyword):
    """Values a C-FIND key of this keyword may take: stored ones, their pieces with wildcards, lists."""
    stored = _stored(keyword) or ["ABSENT"]
    piece = st.sampled_from(stored).flatmap(lambda v: st.tuples(st.integers(0, len(v)), st.integers(0, len(v))).map(
        lambda ends: v[min(ends):max(ends)]))
    return st.one_of(st.just(""), st.sampled_from(stored), piece.map(lambda p: p + "*"), piece.map(lambda p: "*" + p + "*"),
                     piece.map(lambda p: p.replace(p[:1], "?", 1) + "*" if p else "?*"),
                     st.lists(st.sampled_from(stored), min_size=2, max_size=3).map("\\".join))


_FIND_KEYS = {
    "PATIENT": ["PatientName", "PatientID", "PatientSex", "PatientBirthDate"],
    "STUDY": ["StudyDescription", "StudyDate", "InstitutionName", "AccessionNumber"],
    "SERIES": ["Modality", "SeriesDescription", "BodyPartExamined", "ProtocolName"],
    "IMAGE": ["ImageType", "ImageComments", "SOPInstanceUID", "SOPClassUID"],
}
_DATE_RANGES = st.sampled_from(["20200101-20211231", "-20200105", "20210311-", "20191231-20191231", "19000101-19991231"])


@st.composite
def find_requests(draw):
    level = draw(st.sampled_from(dicoogled.LEVELS))
    keywords = [k for lvl in dicoogled.LEVELS[:dicoogled.LEVELS.index(level) + 1] for k in _FIND_KEYS[lvl]]
    keys = {k: draw(_patterns(k)) for k in draw(st.lists(st.sampled_from(keywords), min_size=1, max_size=3, unique=True))}
    if level != "PATIENT" and draw(st.booleans()):
        keys["StudyDate"] = draw(_DATE_RANGES)
    offset, limit = draw(st.sampled_from([(0, None), (1, 2), (0, 1), (3, None)]))
    return level, keys, offset, limit


_SEARCH_TERMS = st.one_of(
    st.sampled_from(["knee", "alpha*", "alp?a", '"pain after"', "jurgen", "hospital", "ct", "mr", "beta", "*:*"]),
    st.sampled_from(["Modality", "PatientName", "StudyDescription", "ImageComments", "InstitutionName", "BodyPartExamined"])
      .flatmap(lambda k: st.sampled_from(_stored(k) or ["x"]).map(lambda v: f'{k}:"{v}"'))
      .map(lambda term: term.replace('"*"', "*")),
    st.sampled_from(["StudyDate:[20200101 TO 20211231]", "StudyDate:{20191231 TO *]", "SeriesNumber:[1 TO 2]"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=find_requests())
def test_random_c_finds_are_answered_alike(both_engines, request):
    level, keys, offset, limit = request
    identifier = Dataset()
    identifier.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(identifier, keyword, value)
    sqlite, postgresql = ([dict(r) for r in dicoogled.Finder(index).search(identifier, offset=offset, limit=limit)]
                          for index in both_engines)
    assert [str(r) for r in sqlite] == [str(r) for r in postgresql]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(terms=st.lists(_SEARCH_TERMS, min_size=1, max_size=3), joiners=st.lists(st.sampled_from([" AND ", " OR ", " AND NOT "]), min_size=2, max_size=2),
       page=st.sampled_from([(None, 0), (2, 0), (2, 1), (3, 2)]))
def test_random_searches_are_answered_alike(both_engines, terms, joiners, page):
    text = terms[0] + "".join(joiner + term for joiner, term in zip(joiners, terms[1:]))
    query = dicoogled.SearchQuery(text, set())
    sqlite, postgresql = ([(hit.path, hit.meta) for hit in index.search(query, *page)[0]] + [index.search(query)[1]]
                          for index in both_engines)
    assert sqlite == postgresql, text


def every_reader(index) -> dict:
    """The answer of every reader of the Index (and of the writer's operations), by name, after
    the same writes: labels, protection, worklist and performed steps, webhook deliveries,
    announcements, a removal."""
    write = index.write
    first, chest, brain = dataset(0), dataset(4), dataset(6)
    write(dicoogled.Index.add_label, "STUDY", first.StudyInstanceUID, "knees")
    write(dicoogled.Index.add_label, "SERIES", chest.SeriesInstanceUID, "chests")
    write(dicoogled.Index.restore_labels, [dicoogled.LabelRecord("STUDY", brain.StudyInstanceUID, "brains", "2020-01-01 00:00:00")])
    write(dicoogled.Index.protect_study, brain.StudyInstanceUID)
    entry = write(dicoogled.Index.add_worklist_entry, "1.2.3.4", "ACC1", "STEP1", {"00100010": {"vr": "PN"}})
    write(dicoogled.Index.create_performed_step, "1.2.3.5", entry, "IN PROGRESS", {"a": 1})
    write(dicoogled.Index.update_performed_step, "1.2.3.5", "COMPLETED", {"a": 2})
    deliveries = [dicoogled.Delivery(f"d{n}", "hook", "stable", "{}") for n in range(3)]
    write(dicoogled.Index.queue_deliveries, deliveries)
    write(dicoogled.Index.delivery_attempted, "d0", "delivered")
    write(dicoogled.Index.delivery_attempted, "d1", "pending", "refused", 5.0)
    quiet = index.quiet_studies(float("inf"))
    announced = [write(dicoogled.Index.announce_stable, study.study_instance_uid, study.last_arrival) for study in quiet[:2]]
    knees = dicoogled.Visibility.of(labels=["knees"])
    chests_and_brain = dicoogled.Visibility.of(labels=["chests"], study_uids=[brain.StudyInstanceUID])

    def without_times(rows):
        return [row._replace(created="", updated="") for row in rows]

    def restricted_find(visibility, level, **keys):
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        for keyword, value in keys.items():
            setattr(identifier, keyword, value)
        return [str(r) for r in dicoogled.Finder(index).search(identifier, visibility=visibility)]

    found = {
        "counts": index.counts(), "bytes by origin": index.bytes_by_origin(), "received": index.received_totals(),
        "recyclable": index.recyclable_studies(), "recyclable sparing": index.recyclable_studies(2, first.StudyInstanceUID, ["knees"]),
        "to retire": index.studies_to_retire(1, modality="CT", label="chests"),
        "to retire any": index.studies_to_retire(2 ** 62, origin="store"),
        "protected": index.protected_studies(), "is protected": index.is_protected(brain.StudyInstanceUID),
        "instance": index.instance(first.SOPInstanceUID), "by path": index.instance(path="/archive/4.dcm"),
        "invisible instance": index.instance(chest.SOPInstanceUID, visibility=knees),
        "instances of": index.instances_of(study_uid=first.StudyInstanceUID),
        "instances of series": index.instances_of(series_uid=chest.SeriesInstanceUID, visibility=chests_and_brain),
        "archive members": index.archive_members([first.StudyInstanceUID], [chest.SeriesInstanceUID, first.SeriesInstanceUID]),
        "below": index.instances_below("/archive"), "locations": index.locations_in("file"),
        "every instance": list(index.every_instance()), "modalities": index.modalities(),
        "worklist": without_times(index.worklist()), "entries of": without_times(index.worklist_entries_of("1.2.3.4")),
        "performed": without_times(index.performed_steps_of(entry)), "step": index.performed_step("1.2.3.5").status,
        "metadata by uid": index.metadata_by_uid([first.SOPInstanceUID, "9.9"]),
        "labels": index.labels(), "labels visible": index.labels(chests_and_brain),
        "labels of": index.labels_of("SERIES", [chest.SeriesInstanceUID, first.SeriesInstanceUID]),
        "labelled study": index.labelled("STUDY", "chests"), "labelled series": index.labelled("SERIES", "knees"),
        "holds": [index.holds("STUDY", first.StudyInstanceUID, knees), index.holds("SERIES", chest.SeriesInstanceUID, knees)],
        "quiet": [q.study_instance_uid for q in quiet], "announced": announced,
        "still quiet": [q.study_instance_uid for q in index.quiet_studies(float("inf"))],
        "study attributes": index.study_attributes(first.StudyInstanceUID),
        "due": [d.delivery_id for d in index.due_deliveries(10.0)],
        "deliveries": [d._replace(created=0.0, finished=d.finished is not None, next_attempt=min(d.next_attempt, 10.0))
                       for d in index.deliveries()],
        "patients seen": restricted_find(chests_and_brain, "PATIENT", PatientID="", NumberOfPatientRelatedStudies="",
                                         NumberOfPatientRelatedInstances=""),
        "studies seen": restricted_find(knees, "STUDY", StudyInstanceUID="", ModalitiesInStudy="", SOPClassesInStudy=""),
        "search seen": [hit.path for hit in index.search(dicoogled.SearchQuery("*:*", set()), visibility=chests_and_brain)[0]],
        "label search": [hit.path for hit in index.search(dicoogled.SearchQuery("label:ch* OR label:knees", set()))[0]],
    }
    write(dicoogled.Index.delete_worklist_entry, entry)
    write(dicoogled.Index.unprotect_study, brain.StudyInstanceUID)
    write(dicoogled.Index.remove_label, "STUDY", first.StudyInstanceUID, "knees")
    write(dicoogled.Index.announce_all_stable)
    found["after"] = (index.worklist(), index.protected_studies(), index.labels(), index.quiet_studies(float("inf")))
    return found


def test_every_reader_answers_alike(tmp_path, postgres_url):
    found = []
    for location in (tmp_path / "index.sqlite", postgres_url):
        index = dicoogled.Index(location)
        try:
            write_instances(index)
            found.append(every_reader(index))
        finally:
            index.close()
    sqlite, postgresql = found
    for name in sqlite:
        assert sqlite[name] == postgresql[name], name
    # ... and they say something.
    assert sqlite["study attributes"]["ModalitiesInStudy"] == "CT\\MR" and sqlite["labels"][0] == ("brains", 1)
    assert sqlite["announced"] == [True, True] and len(sqlite["still quiet"]) == 2 and sqlite["due"] == ["d1"]
    assert len(sqlite["archive members"]) == 5 and len(sqlite["every instance"]) == 7 and sqlite["to retire"]
    assert len(sqlite["patients seen"]) == 2 and len(sqlite["studies seen"]) == 1 and len(sqlite["search seen"]) == 3
    assert sqlite["after"][:3] == ([], [], [("brains", 1), ("chests", 1)]) and sqlite["after"][3] == []
