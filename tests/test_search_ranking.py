"""How /search orders free-text matches: best first (FTS5's BM25), or past a limit in the order
they were indexed. On a real index file, written and searched in this process."""

import io
import sys

import pydicom
import pytest

import studygen
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import dicoogled  # noqa: E402


def indexed(location, descriptions):
    """An index of one instance per description, indexed in this order."""
    index = dicoogled.Index(location)
    for number, description in enumerate(descriptions):
        dataset = studygen.make_instance(0, 0, 0, number, size=8, StudyDescription=description)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
        data = buffer.getvalue()
        header = dicoogled.read_received_header(data)
        record = dicoogled.make_record(header, f"/archive/{number}.dcm", "store", len(data), 0)
        index.write(dicoogled.Index.add_instance, record)
    return index


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_free_text_matches_come_best_first_up_to_the_limit_then_in_index_order(request, tmp_path, engine):
    """The same order on both engines: PostgreSQL's scores are FTS5's BM25, computed alike."""
    location = tmp_path / "index.sqlite" if engine == "sqlite" else request.getfixturevalue("postgres_url")
    # The more often "knee" appears in an instance's text, the better it matches.
    index = indexed(location, ["knee", "knee knee knee knee", "hip", "knee knee"])
    try:
        def order(text, rank_at_most):
            hits, total = index.search(dicoogled.SearchQuery(text, set()), limit=10, rank_at_most=rank_at_most)
            return [hit.path.removeprefix("/archive/").removesuffix(".dcm") for hit in hits], total

        assert order("knee", 3) == (["1", "3", "0"], 3)
        assert order("knee", 2) == (["0", "1", "3"], 3)  # more matches than the limit: as indexed
        # With another condition too, the same rule.
        assert order("knee AND Modality:CT", 3) == (["1", "3", "0"], 3)
        assert order("knee AND Modality:CT", 2) == (["0", "1", "3"], 3)
    finally:
        index.close()
