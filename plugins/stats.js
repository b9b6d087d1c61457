// stats.js: the web UI module of plugins/stats.py, served at /webui/module/stats.
//
// The web app creates it with `new` and calls render(parent, slot) when its menu entry
// ("Statistics") is opened. It asks the plugin's web service, /ext/stats/, for the counts
// and draws one small table per grouping. Plain DOM calls: no framework, no build step.

module.exports = function () {
  function table(title, counts) {
    var section = document.createElement("section");
    var heading = document.createElement("h4");
    heading.textContent = title;
    section.appendChild(heading);
    var rows = document.createElement("table");
    Object.keys(counts).forEach(function (name) {
      var row = rows.insertRow();
      row.insertCell().textContent = name;  // textContent: never HTML from the archive's data
      row.insertCell().textContent = counts[name];
    });
    section.appendChild(rows);
    return section;
  }

  this.render = function (parent, slot) {
    parent.textContent = "Counting…";
    // The session cookie of the web app's login goes along (same origin).
    fetch("/ext/stats/", { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error(response.status + " " + response.statusText);
        return response.json();
      })
      .then(function (stats) {
        parent.textContent = stats.studies + " studies";
        parent.appendChild(table("By modality", stats.modalities));
        parent.appendChild(table("By year", stats.years));
        parent.appendChild(table("By institution", stats.institutions));
      })
      .catch(function (error) {
        parent.textContent = "Statistics unavailable: " + error.message;
      });
  };
};
