"""label_by_sender: a rule that labels studies as they arrive.

"Label every MR study sent by the AE NEURO_MRI as 'neuro-course'": a teacher points a scanner (or
a colleague's archive) at dicoogled, and the cases land labelled, ready to be found with
label:neuro-course in the search language, in the web app's label filter, or with label= in
QIDO-RS. The same rule in Lua is plugins/label_rule.lua.

Enable it in the config file (the rule needs a sender, so it does nothing until given one):
  [plugin.label_by_sender]
  enabled = true
  calling_aet = NEURO_MRI
  modality = MR
  label = neuro-course

Hook shown: on_stored, a notify hook run in the background once an object received over DICOM
(or STOW-RS) is stored and indexed, and the call dicoogle.label_study (dicoogle.label_series
labels one series instead).
"""

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {
    "enabled": False,  # acts on data: off until an administrator turns it on
    "calling_aet": "",  # the sender whose objects are labelled ("" labels nothing)
    "modality": "MR",  # which objects: their Modality
    "label": "neuro-course",
}


def on_stored(instance):
    """instance: its UIDs, uri, origin, calling_aet and every tag."""
    sender = dicoogle.setting("calling_aet")
    if not sender or instance["calling_aet"] != sender:
        return
    if instance["tags"].get("Modality") != dicoogle.setting("modality"):
        return
    # label_study answers False when the study had the label already: the first instance labels it.
    if dicoogle.label_study(instance["StudyInstanceUID"], dicoogle.setting("label")):
        dicoogle.log(f"labelled study {instance['StudyInstanceUID']} from {sender}")
