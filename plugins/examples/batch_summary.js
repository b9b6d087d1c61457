// batch_summary.js: the module of batch_summary, in the dialog of a button under the results.
//
// slot.data = {query, queryProvider, results}; then the event "result-selection-ready" brings
// detail = {search: {data: {results, numResults, elapsedTime}}, selected: {contents, level}}.
// Dispatching "hide" on the slot closes the dialog.
// Course: chapter 10, exercise 3.

module.exports = function () {
  this.render = function (parent, slot) {
    var summary = document.createElement("p");
    summary.textContent = "Query: " + (slot.data.query || "");
    var list = document.createElement("ul");
    var close = document.createElement("button");
    close.type = "button";
    close.textContent = "Close";
    close.addEventListener("click", function () { slot.dispatchEvent(new CustomEvent("hide")); });
    parent.append(summary, list, close);

    slot.addEventListener("result-selection-ready", function (event) {
      var selected = event.detail.selected || { contents: [] };
      var rows = selected.contents.length ? selected.contents : event.detail.search.data.results;
      var counts = {};
      rows.forEach(function (row) {
        var modality = row.serieModality || row.modalities || (row.fields && row.fields.Modality) || "?";
        counts[modality] = (counts[modality] || 0) + 1;
      });
      summary.textContent = rows.length + " " + (selected.level || "result") + "(s) of " + slot.data.query;
      Object.keys(counts).sort().forEach(function (modality) {
        var item = document.createElement("li");
        item.textContent = modality + ": " + counts[modality];
        list.appendChild(item);
      });
    });
  };
};
