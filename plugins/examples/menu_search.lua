-- menu_search: a page of the web app, in its menu, that counts the instances matching a query.
--
-- The same web UI plugin as menu_search.py, declared in Lua: a WEBUI table and the module
-- menu_search.js beside this file.
--
-- Enable: copy this file and menu_search.js into plugins/ (`dicoogled new-plugin NAME --kind
-- webui --lang lua` does), reload the web app. Course: chapter 10, exercise 1, in Lua.

DESCRIPTION = "Counts the instances matching a query"
SETTINGS = { enabled = true }

WEBUI = {
  name = "menu_search",
  version = "1.0.0",
  description = DESCRIPTION,
  dicoogle = { ["slot-id"] = "menu", caption = "Count", ["module-file"] = "menu_search.js", roles = {} },
}
