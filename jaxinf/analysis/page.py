"""The run report's page shell: its style, its one script (the search box) and the Content-Security-Policy that
lets that script, and nothing else, run.

The report (:mod:`jaxinf.analysis.report`) shows text from the run (documents, ids, prompts), all of it escaped.
Its only script is :data:`SEARCH_JS`, inline (the page works from a file, no network) and allowed by its SHA-256
in the policy (:data:`CSP`): a script injected into the page some other way, or an inline event handler, does not
run. Without scripts the page still reads; only the search box is inert.

The search box filters the section of queries and their top and bottom documents as one types: a query whose own
text (kind, task, id, prompt, completion) holds every word typed is shown whole; in any other query only the
document rows (rank, id, source, text) that hold every word are shown, and the query is opened; a query with
neither is hidden. Words are matched case-insensitively as substrings of the text shown; an empty box shows
every query as the page opened.
"""

from __future__ import annotations

import base64
import hashlib

STYLE = (
    "body{font-family:sans-serif;margin:0;background:#fafafa;color:#222}main{max-width:1100px;margin:auto;"
    "padding:1em 2em}table{border-collapse:collapse;margin:.5em 0 1em;font-size:.85em}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top}th{background:#eee}"
    "figure{margin:1em 0}img{max-width:100%}.notes{background:#fff4d6;border:1px solid #e6c35c;padding:.5em 1em}"
    "details{background:#fff;border:1px solid #ddd;margin:.3em 0;padding:.3em .6em}"
    "summary{cursor:pointer}.doc{font-family:monospace;font-size:.8em;white-space:pre-wrap;max-width:60em}"
    "mark{background:#ffd54f}code{background:#eee;padding:0 .2em}"
    "#search{font-size:1em;padding:.2em .4em;width:30em;max-width:100%}#search-count{margin-left:.6em;color:#555}"
)

SEARCH_JS = """(function () {
  var box = document.getElementById("search");
  var count = document.getElementById("search-count");
  if (!box) { return; }
  var entries = Array.prototype.slice.call(document.querySelectorAll("#queries details.query"));
  var opened = entries.map(function (d) { return d.open; });
  function lower(e) { return (e.textContent || "").toLowerCase(); }
  function filter() {
    var words = box.value.toLowerCase().split(/\\s+/).filter(function (w) { return w.length > 0; });
    function holds(text) { return words.every(function (w) { return text.indexOf(w) >= 0; }); }
    var shown = 0;
    entries.forEach(function (d, i) {
      var own = Array.prototype.map.call(d.querySelectorAll(".qtext"), lower).join(" ");
      var whole = holds(own);
      var rows = 0;
      Array.prototype.forEach.call(d.querySelectorAll("tbody tr"), function (r) {
        var keep = whole || holds(lower(r));
        r.hidden = !keep;
        if (keep) { rows += 1; }
      });
      d.hidden = !(whole || rows > 0);
      d.open = words.length === 0 ? opened[i] : (d.open || !d.hidden);
      if (!d.hidden) { shown += 1; }
    });
    count.textContent = words.length === 0 ? "" : shown + " of " + entries.length + " queries";
  }
  box.addEventListener("input", filter);
  filter();
})();"""

_DIGEST = base64.b64encode(hashlib.sha256(SEARCH_JS.encode("utf-8")).digest()).decode("ascii")
CSP = (
    f"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'sha256-{_DIGEST}'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'"
)
SCRIPT = f"<script>{SEARCH_JS}</script>"

SEARCH_BOX = (
    '<p><input type="search" id="search" placeholder="Search queries and documents" autocomplete="off" '
    'aria-label="Search queries and documents"><span id="search-count" aria-live="polite"></span></p>'
)
