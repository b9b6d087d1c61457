-- autoroute: forward studies that match a rule to another DICOM node.
--
-- Orthanc's best-known Lua script, in dicoogled: once a study has had no new instance for
-- [plugins] stable_age seconds, its instances that match `rule` (a search-language query such
-- as Modality:CT) are sent with C-STORE to `destination`, an AE listed under [modalities].
-- With when = stored, each instance is forwarded as soon as it is stored instead.
--
-- Enable it in the config file:
--   [plugin.autoroute]
--   enabled = true
--   destination = WORKSTATION
--   rule = Modality:CT
--   [modalities]
--   WORKSTATION = 192.168.1.20:11112
--
-- Hooks shown: on_stable_study and on_stored, notify hooks that run in the background (a slow
-- destination never delays the modality), and the calls dicoogle.search and dicoogle.send.

DESCRIPTION = "Forwards studies matching a rule to another DICOM node"
SETTINGS = {
  enabled = false,    -- acts on data: off until configured
  destination = "",   -- an AE title from [modalities]
  rule = "*:*",       -- which instances to forward, as a search-language query
  when = "stable",    -- "stable": whole studies once complete; "stored": each instance at once
}

-- The SOPInstanceUIDs of the instances in scope (a query) that match the rule.
local function matching(scope)
  local rule = dicoogle.setting("rule")
  local query = (rule == "" or rule == "*:*") and scope or scope .. " AND (" .. rule .. ")"
  local uids = {}
  -- Ask for the one field needed: a study's full metadata would not fit Lua's memory cap.
  for _, hit in ipairs(dicoogle.search(query, 100000, { "SOPInstanceUID" })) do
    uids[#uids + 1] = hit.fields.SOPInstanceUID
  end
  return uids
end

local function forward(uids)
  local destination = dicoogle.setting("destination")
  if #uids == 0 then return end
  if destination == "" then
    dicoogle.log("nothing sent: set [plugin.autoroute] destination = AET", "warning")
    return
  end
  local result = dicoogle.send(uids, destination)
  dicoogle.log("forwarded " .. result.sent .. " instance(s) to " .. destination .. ", " .. result.failed .. " failed")
end

function on_stable_study(study)
  if dicoogle.setting("when") == "stable" then
    forward(matching("StudyInstanceUID:" .. study.StudyInstanceUID))
  end
end

function on_stored(instance)
  if dicoogle.setting("when") == "stored" then
    forward(matching("SOPInstanceUID:" .. instance.SOPInstanceUID))
  end
end
