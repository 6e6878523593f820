// Taskgate console: live task events over server-sent events. No inline script anywhere (CSP).
(function () {
  "use strict";
  var TERMINAL = { completed: true, discarded: true, cancelled: true };

  function follow(section) {
    var url = section.getAttribute("data-events");
    if (!url || section.dataset.following) { return; }
    section.dataset.following = "1";
    var source = new EventSource(url);
    var field = function (name) { return section.querySelector('[data-field="' + name + '"]'); };
    source.addEventListener("task", function (message) {
      var event = JSON.parse(message.data);
      var status = field("status");
      if (status) {
        var chip = document.createElement("span");
        chip.className = "status status-" + event.status;
        chip.textContent = event.status;
        status.replaceChildren(chip);
      }
      var attempts = field("attempts");
      if (attempts) { attempts.textContent = String(event.attempts); }
      var note = field("live");
      if (note) { note.textContent = "Live: " + event.status + " (attempt " + event.attempts + ")"; }
      if (TERMINAL[event.status]) {
        source.close();
        // the result, attempts and errors are rendered by the server: load the page once more
        window.setTimeout(function () {
          var url = new URL(window.location.href);
          url.searchParams.delete("done");
          window.location.replace(url.toString());
        }, 300);
      }
    });
    source.addEventListener("end", function () { source.close(); });
  }

  function start(root) {
    var scope = root && root.querySelectorAll ? root : document;
    scope.querySelectorAll("[data-events]").forEach(follow);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { start(document); });
  } else {
    start(document);
  }
  document.addEventListener("htmx:load", function (e) { start(e.target); });
})();
