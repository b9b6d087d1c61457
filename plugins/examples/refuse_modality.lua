-- refuse_modality: refuses received objects of one modality, or with no Modality at all.
--
-- A store filter, as refuse_modality.py: nil or true accepts, false refuses with 0x0124, a
-- number refuses with that DICOM status. Orthanc's name for it, ReceivedInstanceFilter(tags,
-- origin, info), works too.
--
-- Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind store-filter --lang lua`).
-- Course: chapter 9, exercise 6 (store filters), in Lua.

DESCRIPTION = "Refuses objects of one modality, or with none"
SETTINGS = { enabled = true, modality = "OT" }
local DATA_SET_DOES_NOT_MATCH = 0xA900  -- C-STORE's "data set does not match SOP class"

function incoming_store_filter(calling_aet, tags)
  local modality = tags.Modality  -- nil when the element is missing, "" when it is empty
  if modality == nil or modality == "" then
    dicoogle.log("refused " .. tostring(tags.SOPInstanceUID) .. ": no Modality", "warning")
    return DATA_SET_DOES_NOT_MATCH
  end
  if modality == dicoogle.setting("modality") then return false end
  return nil
end
