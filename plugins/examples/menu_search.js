// menu_search.js: the module of the menu_search web UI plugin, served at /webui/module/menu_search.
//
// The web app creates it with `new` and calls render(parent, slot) when its menu entry is
// opened. It draws a query box with plain DOM calls and asks /search, the archive's own REST
// API, how many instances match: fetch() on the same origin sends the web app's session cookie.
// Styling: the web app's classes (card, muted) and no inline <style>: the app's
// Content-Security-Policy allows its own style sheets only.
// Course: chapter 10, exercise 1.

module.exports = function () {
  this.render = function (parent, slot) {
    var form = document.createElement("form");
    form.className = "card";
    var input = document.createElement("input");
    input.name = "query";
    input.value = "Modality:CT";
    var button = document.createElement("button");
    button.textContent = "Count";
    var answer = document.createElement("p");
    answer.className = "muted";
    form.append(input, button, answer);
    parent.appendChild(form);

    form.addEventListener("submit", function (event) {
      event.preventDefault();
      answer.textContent = "Counting…";
      var url = "/search?" + new URLSearchParams({ query: input.value, field: "SOPInstanceUID", psize: "1" });
      fetch(url, { credentials: "same-origin" })
        .then(function (response) {
          return response.json().then(function (body) {
            if (!response.ok) throw new Error(body.error || response.statusText);
            return body;
          });
        })
        .then(function (body) { answer.textContent = body.numResults + " instance(s) match"; })
        .catch(function (error) { answer.textContent = "Cannot count: " + error.message; });  // textContent: never HTML
    });
  };
};
