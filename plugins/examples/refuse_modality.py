"""refuse_modality: refuses received objects of one modality, or with no Modality at all.

A store filter runs before an object is stored, while the sender waits, for every object
received over DICOM (C-STORE), STOW-RS or dicoogle.store: None or True accepts it, False
refuses it with 0x0124 (not authorized), a number refuses it with that DICOM status. Files in
watched folders and index tasks are already on disk: they are indexed, not filtered.

Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind store-filter` does) and
set the modality: [plugin.refuse_modality] modality = OT.
Course: chapter 9, exercise 6 (store filters).
"""

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": True, "modality": "OT"}
#: C-STORE's "Error: data set does not match SOP class" (PS3.4 Annex B.2.3): the sender sees it.
DATA_SET_DOES_NOT_MATCH = 0xA900


def incoming_store_filter(calling_aet, tags):
    modality = tags.get("Modality")  # None when the element is missing, "" when it is empty
    if not modality:
        dicoogle.log(f"refused {tags.get('SOPInstanceUID')} from {calling_aet or '?'}: no Modality", "warning")
        return DATA_SET_DOES_NOT_MATCH
    if modality == dicoogle.setting("modality"):
        return False
    return None
