"""menu_search: a page of the web app, in its menu, that counts the instances matching a query.

A web UI plugin is a WEBUI descriptor (the fields of a Dicoogle web plugin's package.json) and a
JavaScript module beside it, menu_search.js. slot-id "menu" gives it a sidebar entry and a page
of its own, #/ext/menu_search; the module asks the archive's REST API, /search, with the
session of the web app's login.

Enable: copy this file and menu_search.js into plugins/ (`dicoogled new-plugin NAME --kind webui`
does), reload the web app. Course: chapter 10, exercise 1 (the menu slot).
"""

SETTINGS = {"enabled": True}

WEBUI = {
    "name": "menu_search",
    "version": "1.0.0",
    "description": "Counts the instances matching a query",
    #: slot-id: where the web app shows it; roles: who sees it (empty: everyone logged in).
    "dicoogle": {"slot-id": "menu", "caption": "Count", "module-file": "menu_search.js", "roles": []},
}
