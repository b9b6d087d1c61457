-- counter: a web service that counts the instances matching a query.
--
-- GET /ext/counter/count?query=Modality:CT answers {"query": "Modality:CT", "instances": 12}.
-- A Lua web service is a global table routes: "METHOD /path" = function(params), params
-- holding the query and form fields (and any <name> of the path). A table answers as JSON.
--
-- Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind web --lang lua`).
-- Course: chapter 9, exercise 4 (web services), in Lua.

DESCRIPTION = "Counts the instances matching a query"
SETTINGS = { enabled = true, limit = 100000 }

routes = {
  ["GET /count"] = function(params)
    local query = params.query or "*:*"
    -- ask for one field: a Lua script's memory is small
    local hits = dicoogle.search(query, dicoogle.setting("limit"), { "SOPInstanceUID" })
    return { query = query, instances = #hits }
  end,
}
