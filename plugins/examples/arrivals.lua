-- arrivals: logs each instance that arrives, and each study once it is complete.
--
-- The three notify hooks, as in arrivals.py. Orthanc's names work too, with Orthanc's
-- arguments: OnStoredInstance(instanceId, tags, metadata, origin) and OnStableStudy(studyId).
--
-- Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind events --lang lua`).
-- Course: chapter 9, exercise 5 (events), in Lua.

DESCRIPTION = "Logs arrivals and stable studies"
SETTINGS = { enabled = true }

function on_stored(instance)
  local from = instance.calling_aet ~= "" and instance.calling_aet or "?"
  dicoogle.log("stored " .. instance.SOPInstanceUID .. " from " .. from)
end

function on_indexed(instance)
  dicoogle.log("indexed " .. instance.SOPInstanceUID .. " (" .. instance.origin .. ")")
end

function on_stable_study(study)
  -- study: its patient and study attributes by keyword; fires again after later instances
  dicoogle.log("study " .. study.StudyInstanceUID .. " is stable: " .. study.NumberOfStudyRelatedInstances
               .. " instances (" .. study.ModalitiesInStudy .. ")")
end
