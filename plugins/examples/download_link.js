// download_link.js: the module of download_link, one cell of each search result row.
//
// slot.data says which row: {type: "image", uid, uri, instanceNumber} for an image, and
// {type: "patient" | "study" | "series", ...} for the others, which get no link.
// Course: chapter 10, exercise 2.

module.exports = function () {
  this.render = function (parent, slot) {
    var row = slot.data || {};
    if (row.type !== "image") return;
    var link = document.createElement("a");
    link.href = "/legacy/file?" + new URLSearchParams({ uid: row.uid });
    link.download = row.uid + ".dcm";
    link.textContent = "DICOM file";
    parent.appendChild(link);
  };
};
