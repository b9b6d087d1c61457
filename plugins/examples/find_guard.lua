-- find_guard: refuses C-FIND queries that would list the whole archive.
--
-- A find filter, as find_guard.py: return the query changed (whole), nil to keep it, or a
-- DICOM status to refuse it. Orthanc's name for it, IncomingFindRequestFilter(query, origin),
-- works too.
--
-- Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind find-filter --lang lua`).
-- Course: chapter 9, exercise 7 (find filters), in Lua.

DESCRIPTION = "Refuses C-FIND queries that name no patient, date or study"
SETTINGS = { enabled = true }
local OUT_OF_RESOURCES = 0xA700
local NAMING_KEYS = { "PatientID", "PatientName", "StudyDate", "AccessionNumber", "StudyInstanceUID" }

function incoming_find_filter(calling_aet, query)
  local named = false
  for _, key in ipairs(NAMING_KEYS) do
    local value = query[key] or ""  -- a key not asked for is nil
    if value:gsub("%*", "") ~= "" then named = true end
  end
  if query.QueryRetrieveLevel == "STUDY" and not named then
    dicoogle.log("refused a C-FIND from " .. calling_aet .. ": it names no patient, date or study", "warning")
    return OUT_OF_RESOURCES
  end
  if query.PatientID and query.PatientID ~= "" then
    query.PatientID = string.upper(query.PatientID)
    return query
  end
  return nil
end
