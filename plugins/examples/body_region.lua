-- body_region: adds a searchable field, BodyRegion, to every instance entering the index.
--
-- BodyRegion is Body Part Examined (0018,0015) in capitals, or UNKNOWN when the object has
-- none, so BodyRegion:CHEST finds chest images whatever case the modality wrote.
--
-- Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind index --lang lua`
-- does). Only instances indexed afterwards get the field.
-- Course: chapter 9, exercise 1 (index plugins), in Lua.

DESCRIPTION = "Adds BodyRegion, Body Part Examined in capitals"
SETTINGS = { enabled = true }

-- instance.tags holds every element, keyword -> text. A missing element is nil; an element
-- present but empty is "".
function index(instance)
  local part = instance.tags.BodyPartExamined or ""
  return { BodyRegion = part ~= "" and string.upper(part) or "UNKNOWN" }
end
