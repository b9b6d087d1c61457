"""arrivals: logs each instance that arrives, and each study once it is complete.

The three notify hooks: on_stored (an object received over DICOM or STOW-RS was stored),
on_indexed (an instance entered the index, whatever its origin: watched folders and index
tasks too) and on_stable_study (no new instance in a study for [plugins] stable_age seconds).
They run in the background, after the fact: a slow hook never delays the sender.

Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind events` does); watch the
log, or GET /logger. Course: chapter 9, exercise 5 (events).
"""

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": True}


def on_stored(instance):
    """instance: its UIDs, uri, origin ("store" or "stow"), calling_aet and every tag."""
    dicoogle.log(f"stored {instance['SOPInstanceUID']} from {instance['calling_aet'] or '?'}")


def on_indexed(instance):
    dicoogle.log(f"indexed {instance['SOPInstanceUID']} ({instance['origin']})")


def on_stable_study(study):
    """study: its patient and study attributes by keyword (AccessionNumber, ModalitiesInStudy,
    NumberOfStudyRelatedInstances...). It fires again if the study gets more instances later."""
    dicoogle.log(f"study {study['StudyInstanceUID']} is stable: {study['NumberOfStudyRelatedInstances']} instances"
                 f" ({study['ModalitiesInStudy']})")
