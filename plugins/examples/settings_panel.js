// settings_panel.js: the module of settings_panel, a panel under Management → Plugins.
//
// slot.data.settings holds the plugin's settings; a POST to /plugins/NAME/settings (form
// fields named as the settings, administrators only) changes them live. The session cookie
// goes along, and a POST from the web app's own page passes the archive's origin check.
// Course: chapter 10, exercise 4.

module.exports = function () {
  this.render = function (parent, slot) {
    var name = slot.pluginName || "settings_panel";
    var input = document.createElement("input");
    input.value = slot.data.settings.greeting;
    var save = document.createElement("button");
    save.type = "button";
    save.textContent = "Save";
    var status = document.createElement("span");
    status.className = "muted";
    parent.append(input, save, status);

    save.addEventListener("click", function () {
      fetch("/plugins/" + encodeURIComponent(name) + "/settings", {
        method: "POST", credentials: "same-origin", body: new URLSearchParams({ greeting: input.value }),
      })
        .then(function (response) { return response.json(); })
        .then(function (settings) { status.textContent = settings.error ? settings.error : " saved: " + settings.greeting; })
        .catch(function (error) { status.textContent = " " + error.message; });
    });
  };
};
