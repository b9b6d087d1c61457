-- label_rule: a rule that labels studies as they arrive (plugins/label_by_sender.py in Lua).
--
-- "Label every MR study sent by the AE NEURO_MRI as 'neuro-course'": the cases land labelled,
-- ready to be found with label:neuro-course in the search language or label= in QIDO-RS.
--
-- Enable it in the config file (it does nothing until given a sender):
--   [plugin.label_rule]
--   enabled = true
--   calling_aet = NEURO_MRI
--
-- Hook shown: on_stored (Orthanc's OnStoredInstance works too), a notify hook, and the call
-- dicoogle.label_study (dicoogle.label_series labels one series instead).

DESCRIPTION = "Labels the studies of one modality sent by one AE"
SETTINGS = {
  enabled = false,        -- acts on data: off until an administrator turns it on
  calling_aet = "",       -- the sender whose objects are labelled ("" labels nothing)
  modality = "MR",
  label = "neuro-course",
}

function on_stored(instance)
  local sender = dicoogle.setting("calling_aet")
  if sender == "" or instance.calling_aet ~= sender then return end
  if instance.tags.Modality ~= dicoogle.setting("modality") then return end
  if dicoogle.label_study(instance.StudyInstanceUID, dicoogle.setting("label")) then
    dicoogle.log("labelled study " .. instance.StudyInstanceUID .. " from " .. sender)
  end
end
