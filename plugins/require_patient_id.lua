-- require_patient_id: refuse received objects that have no PatientID.
--
-- An object without a PatientID is filed under its patient's name alone, and two patients
-- with one name become one. This filter refuses such objects before they are stored, with a
-- DICOM status the sender sees (and can act on), instead of archiving them quietly.
--
-- Enable it in the config file (or POST /plugins/events/require_patient_id/enable):
--   [plugin.require_patient_id]
--   enabled = true
--
-- Hook shown: incoming_store_filter, a decision hook. It runs on the sender's association
-- before the object is stored; nil or true accepts, false refuses with 0x0124, a number
-- refuses with that status. Orthanc's name for it, ReceivedInstanceFilter, works too.

DESCRIPTION = "Refuses received objects that have no PatientID"
SETTINGS = {
  enabled = false,        -- acts on data: off until an administrator turns it on
  status = 0xA900,        -- C-STORE "Error: data set does not match SOP class"
}

function incoming_store_filter(calling_aet, tags)
  local patient_id = tags.PatientID
  if type(patient_id) ~= "string" or patient_id:match("^%s*$") then
    dicoogle.log("refused " .. tostring(tags.SOPInstanceUID) .. " from " .. calling_aet .. ": no PatientID", "warning")
    return dicoogle.setting("status")
  end
  return true
end
