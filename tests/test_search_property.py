"""Property: for random data sets and random field queries, /search returns exactly the
instances a straightforward Python filter over the same values selects.

The filter re-states, independently of dicoogled's code, the rules of its search language
(the docstring of dicoogled.field_value_matches): text compares case- and accent-insensitively;
a clause matches a value equal to it or, for words and phrases, a run of whole words inside it;
'*' and '?' are wildcards over the whole value or one word; ranges compare numbers when both
bounds are numbers (or a :Float: type is given), else folded text.

One daemon serves the module; each example indexes a folder of its own with an index task,
gives its patients their own PatientIDs and scopes every query to them, so examples never see
each other's data.
"""

import datetime
import itertools
import re
import unicodedata

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import studygen
from conftest import RunningDaemon, wait_until

#: Each test puts the index on both engines itself.
pytestmark = pytest.mark.each_engine
from restclient import ADMIN_ENV, admin_client

# ---- the reference filter ---------------------------------------------------------------------


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+", fold(text))


def number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def value_matches(clause, value: str) -> bool:
    if clause[0] == "range":
        _, low, high, include_low, include_high, numeric = clause
        numeric = numeric or all(number(b) is not None for b in (low, high) if b != "*")
        convert = number if numeric else fold
        value = convert(value)
        if value is None or value == "":
            return False
        if low != "*" and (value < convert(low) or (value == convert(low) and not include_low)):
            return False
        if high != "*" and (value > convert(high) or (value == convert(high) and not include_high)):
            return False
        return True
    pattern = fold(clause[1]).strip()
    if "*" in pattern or "?" in pattern:
        regex = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.DOTALL)
        return bool(regex.fullmatch(fold(value)) or any(regex.fullmatch(w) for w in words(value)))
    if fold(value) == pattern:
        return True
    wanted, have = words(pattern), words(value)
    return bool(wanted) and any(have[i:i + len(wanted)] == wanted for i in range(len(have) - len(wanted) + 1))


def matches(tree, instance: dict) -> bool:
    kind = tree[0]
    if kind == "and":
        return all(matches(child, instance) for child in tree[1])
    if kind == "or":
        return any(matches(child, instance) for child in tree[1])
    if kind == "not":
        return not matches(tree[1], instance)
    _, field, clause = tree
    value = instance.get(field)
    return value is not None and value_matches(clause, value)


# ---- queries ----------------------------------------------------------------------------------

NAMES = [  # (PatientName, SpecificCharacterSet)
    ("DOE^JOHN", None), ("DOE^JANE", None), ("JOHNSON^ROBERT", None), ("O'BRIEN^PATRICK", None),
    ("MÜLLER^JÜRGEN", "ISO_IR 100"), ("GARCÍA^JOSÉ", "ISO_IR 100"), ("NGUYEN^VAN AN", None),
    ("ИВАНОВ^ИВАН", "ISO_IR 192"), ("Yamada^Tarou=山田^太郎", "ISO_IR 192"), ("SMITH", None),
]
NAME_TERMS = ["doe", "DOE", "john", "jane", "JOHNSON", "müller", "muller", "MULLER", "garcia", "garcía", "josé",
              "van an", "an", "nguyen", "иванов", "tarou", "山田", "smith", "o'brien", "brien", "DOE^JOHN", "doe^ja*",
              "jo*", "*son", "d?e", "?", "*", "j*n", "*ü*", "*an"]
MODALITIES = ["CT", "MR", "PT"]
MODALITY_TERMS = ["CT", "ct", "MR", "PT", "?T", "M*", "*", "C?"]
DESCRIPTIONS = ["CT head", "head CT routine", "MR knee left", "Knee, left side", "PET whole body", "chest; contrast",
                "Tête sans injection", "follow-up"]
DESCRIPTION_TERMS = ["head", "ct", "knee", "left", "knee left", "left knee", "head ct", "whole body", "tete", "tête",
                     "follow", "follow-up", "up", "contrast", "chest;", "*body", "kn?e", "he*", "routine"]
PRIVATE_VALUES = ["alpha beta", "Beta gamma", "delta", "ALPHA", "épsilon"]
PRIVATE_TERMS = ["alpha", "beta", "alpha beta", "beta alpha", "gamma", "epsilon", "délta", "al*", "*a", "?eta"]
SLICE_LOCATIONS = ["-100", "-97.5", "-12.25", "-0.5", "0", "2.5", "7", "33.125", "100"]
DATE_BOUNDS = ["20100101", "20150120", "20151231", "20180305", "20200101", "20231231", "*"]
FLOAT_BOUNDS = ["-100", "-50", "-12.25", "0", "2.5", "10", "100", "*"]

PRIVATE_FIELD = "00091010"


def rendered_term(term: str) -> str:
    """A term as query text: several words need quotes; the reference filter sees the words."""
    return f'"{term}"' if re.search(r"[\s,;]", term) else term


match_clauses = st.one_of(
    st.tuples(st.just("PatientName"), st.sampled_from(NAME_TERMS)),
    st.tuples(st.just("Modality"), st.sampled_from(MODALITY_TERMS)),
    st.tuples(st.just("StudyDescription"), st.sampled_from(DESCRIPTION_TERMS)),
    st.tuples(st.just(PRIVATE_FIELD), st.sampled_from(PRIVATE_TERMS)),
).map(lambda pair: (("field", pair[0], ("match", pair[1])), f"{pair[0]}:{rendered_term(pair[1])}"))


@st.composite
def range_clauses(draw):
    field, bounds, typed = draw(st.sampled_from([("StudyDate", DATE_BOUNDS, False), ("SliceLocation", FLOAT_BOUNDS, True),
                                                 ("SliceLocation", FLOAT_BOUNDS, False)]))
    low, high = draw(st.sampled_from(bounds)), draw(st.sampled_from(bounds))
    include_low, include_high = draw(st.booleans()), draw(st.booleans())
    text = f"{field}:{'Float:' if typed else ''}{'[' if include_low else '{'}{low} TO {high}{']' if include_high else '}'}"
    return ("field", field, ("range", low, high, include_low, include_high, typed)), text


leaves = st.one_of(match_clauses, range_clauses())


def combine(children):
    return st.one_of(
        st.lists(children, min_size=2, max_size=3).map(
            lambda items: (("and", [t for t, _ in items]), " AND ".join(f"({q})" for _, q in items))),
        st.lists(children, min_size=2, max_size=3).map(
            lambda items: (("or", [t for t, _ in items]), " OR ".join(f"({q})" for _, q in items))),
        children.map(lambda item: (("not", item[0]), f"NOT ({item[1]})")),
        children.map(lambda item: (("not", item[0]), f"-({item[1]})")),
        st.lists(children, min_size=2, max_size=2).map(  # implicit AND of adjacent clauses
            lambda items: (("and", [t for t, _ in items]), " ".join(f"({q})" for _, q in items))),
    )


queries = st.recursive(leaves, combine, max_leaves=5)

# ---- data sets --------------------------------------------------------------------------------

series_strategy = st.fixed_dictionaries({
    "Modality": st.sampled_from(MODALITIES),
    "instances": st.lists(st.tuples(st.sampled_from(SLICE_LOCATIONS), st.sampled_from(PRIVATE_VALUES)), min_size=1, max_size=3),
})
study_strategy = st.fixed_dictionaries({
    "StudyDate": st.dates(min_value=datetime.date(2009, 1, 1), max_value=datetime.date(2024, 12, 31)).map(lambda d: d.strftime("%Y%m%d")),
    "StudyDescription": st.sampled_from(DESCRIPTIONS),
    "series": st.lists(series_strategy, min_size=1, max_size=2),
})
patient_strategy = st.fixed_dictionaries({
    "name": st.sampled_from(NAMES),
    "studies": st.lists(study_strategy, min_size=1, max_size=2),
})
data_sets = st.lists(patient_strategy, min_size=1, max_size=3)

_examples = itertools.count(1)


def build(example: int, patients) -> tuple[list, dict]:
    """The data sets to store, and each instance's searchable values by SOPInstanceUID."""
    datasets, values = [], {}
    for p, patient in enumerate(patients):
        name, charset = patient["name"]
        for s, study in enumerate(patient["studies"]):
            for e, series in enumerate(study["series"]):
                for i, (location, private) in enumerate(series["instances"]):
                    ds = studygen.make_instance(
                        p, s, e, i, size=4, seed=example, modality="MR" if series["Modality"] == "MR" else "CT",
                        SpecificCharacterSet=charset, PatientName=name, PatientID=f"E{example}P{p}",
                        Modality=series["Modality"], StudyDate=study["StudyDate"],
                        StudyDescription=study["StudyDescription"], SliceLocation=location,
                    )
                    ds[0x00091010].value = private
                    datasets.append(ds)
                    values[str(ds.SOPInstanceUID)] = {
                        "PatientName": name, "Modality": series["Modality"], "StudyDate": study["StudyDate"],
                        "StudyDescription": study["StudyDescription"], "SliceLocation": location, PRIVATE_FIELD: private,
                    }
    return datasets, values


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def archive(request, tmp_path_factory):
    """The daemon, its index in an SQLite file or in a PostgreSQL database: the rules hold on both."""
    folder = tmp_path_factory.mktemp("property")
    url = request.getfixturevalue("postgres_server").database() if request.param == "postgresql" else ""
    config = f"[index]\nurl = {url}\n"  # an empty url: the SQLite file, whatever the suite runs on
    daemon = RunningDaemon(folder / "data", config, env=ADMIN_ENV).start()
    assert (folder / "data" / "index.sqlite").exists() == (request.param == "sqlite")
    try:
        daemon.admin = admin_client(daemon)
        daemon.examples = folder / "examples"
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.stop()


def index_in_place(archive, example: int, datasets: list):
    """Write an example's files to a folder of its own and index it with an index task (faster
    than C-STORE, and the way Dicoogle users load folders)."""
    folder = archive.examples / f"example{example}"
    folder.mkdir(parents=True)
    for n, ds in enumerate(datasets):
        pydicom.dcmwrite(folder / f"{n}.dcm", ds, enforce_file_format=True)
    response = archive.admin.post("/management/tasks/index", uri=folder.as_uri())
    assert response.status == 200, response
    uid = response.json()["tasks"][0]["uid"]

    def finished():
        task = next(t for t in archive.admin.get("/index/task").json()["results"] if t["taskUid"] == uid)
        return task if task.get("complete") else None
    task = wait_until(finished, interval=0.005, message=f"index task of example {example}")
    assert (task["nIndexed"], task["nErrors"]) == (len(datasets), 0)
    archive.admin.post("/index/task", uid=uid, type="close")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(patients=data_sets, queries=st.lists(queries, min_size=1, max_size=6))
def test_search_selects_what_the_reference_filter_selects(archive, patients, queries):
    example = next(_examples)
    datasets, values = build(example, patients)
    index_in_place(archive, example, datasets)
    scope = f"PatientID:E{example}P*"
    everything = archive.admin.get("/search", query=scope, field="SOPInstanceUID").json()
    assert {r["fields"]["SOPInstanceUID"] for r in everything["results"]} == set(values)
    for tree, text in queries:
        expected = {uid for uid, instance in values.items() if matches(tree, instance)}
        response = archive.admin.get("/search", query=f"{scope} AND ({text})", field="SOPInstanceUID")
        assert response.status == 200, (text, response)
        body = response.json()
        found = {r["fields"]["SOPInstanceUID"] for r in body["results"]}
        assert found == expected, f"query {text!r}: extra {[values[u] for u in found - expected]}, missing {[values[u] for u in expected - found]}"
        assert body["numResults"] == len(expected)
