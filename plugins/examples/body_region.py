"""body_region: adds a searchable field, BodyRegion, to every instance entering the index.

BodyRegion is Body Part Examined (0018,0015) in capitals, or UNKNOWN when the object has none,
so `BodyRegion:CHEST` finds chest images whatever case the modality wrote, and
`BodyRegion:UNKNOWN` finds the ones that never said.

Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind index` does). Only
instances indexed afterwards get the field. Turn it off with [plugin.body_region] enabled = false.
Course: chapter 9, exercise 1 (index plugins).
"""

SETTINGS = {"enabled": True}


def index(instance):
    """Extra fields for an instance, before its index row is written (keep it quick).

    instance["tags"] holds every element, keyword -> text. A missing element is a missing key
    (so .get() gives None); an element present but empty is "".
    """
    part = instance["tags"].get("BodyPartExamined") or ""
    return {"BodyRegion": part.upper() or "UNKNOWN"}
