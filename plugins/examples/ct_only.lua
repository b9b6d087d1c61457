-- ct_only: a query provider that answers like the archive's index, but with CT images only.
--
-- /search?provider=ct_only&query=TEXT calls query(TEXT). This one answers with the URI and
-- the SOPInstanceUID alone (a Lua script's memory is small): for instances the archive holds,
-- the daemon fills in the other fields from its index, so /searchDIM still groups them.
--
-- Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind query --lang lua`).
-- Course: chapter 9, exercise 2 (query providers), in Lua.

DESCRIPTION = "The index's answer, CT images only"
SETTINGS = { enabled = true, limit = 1000 }

function query(text)
  local results = {}
  local hits = dicoogle.search("(" .. text .. ") AND Modality:CT", dicoogle.setting("limit"), { "SOPInstanceUID" })
  for _, hit in ipairs(hits) do
    results[#results + 1] = { uri = hit.uri, fields = { SOPInstanceUID = hit.fields.SOPInstanceUID } }
  end
  return results
end
