"""counter: a web service that counts the instances matching a query.

GET /ext/counter/count?query=Modality:CT answers {"query": "Modality:CT", "instances": 12}.
Routes are served under /ext/NAME/, behind the archive's login: GET needs a reader, other
methods a user. A dict or a list answers as JSON; bottle.abort(400, "...") answers an error.

Enable: copy this file into plugins/ (`dicoogled new-plugin NAME --kind web` does).
Course: chapter 9, exercise 4 (web services).
"""

import bottle

dicoogle = None  # the plugin API: the daemon gives it when it loads this file (docs/plugins.md)
SETTINGS = {"enabled": True, "limit": 100000}


def routes(app):
    """Add routes to app, a Bottle app of this plugin's own."""

    @app.get("/count")
    def count():
        query = bottle.request.params.get("query", "*:*")
        hits = dicoogle.search(query, limit=dicoogle.setting("limit"), fields=["SOPInstanceUID"])
        return {"query": query, "instances": len(hits)}
