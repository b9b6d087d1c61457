"""settings_panel: a panel under Management → Plugins that shows and changes its own settings.

slot-id "settings" gives the module, settings_panel.js, a panel with the plugin's settings in
slot.data.settings; it saves a change with POST /plugins/settings_panel/settings, the REST
route an administrator's script would use (saved in data/settings.ini, kept over a restart).

Enable: copy this file and settings_panel.js into plugins/, reload the web app.
Course: chapter 10, exercise 4 (the settings slot).
"""

SETTINGS = {"enabled": True, "greeting": "hello"}

WEBUI = {
    "name": "settings_panel",
    "version": "1.0.0",
    "dicoogle": {"slot-id": "settings", "caption": "Greeting", "module-file": "settings_panel.js", "roles": []},
}
