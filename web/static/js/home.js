/*
 * Home page: keeps the status line and the queue table live.
 *
 * Every 900 ms GET <root>q.json and refresh
 *   - #status #ping #pid #uptime #time #version (status line), and
 *   - per queue <name>: the counts <state>-<name> (prep que run err done
 *     relayed), ping-<name>, pid-<name>, uptime-<name>, status-<name>, and
 *     the pause/resume and down/up buttons of its admin form.
 * When queues appear or disappear the page is loaded again.
 *
 * <root> is relative_root (RQ.root()). Needs js/rq.js loaded before it.
 */
(function (global, RQ) {
  "use strict";

  var INTERVAL = 900;
  var STATES = ["prep", "que", "run", "err", "done", "relayed"];
  var text = RQ.text;
  var setText = RQ.setText;
  var colour = RQ.colour;

  /* The epoch time as the page shows it: "YYYY-MM-DD HH:MM:SS UTC". */
  function formatTime(epoch, sample) {
    if (/^\d+$/.test(sample)) {
      return String(epoch);
    }
    var d = new Date(epoch * 1000);
    if (isNaN(d.getTime())) {
      return text(epoch);
    }
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  /*
   * Make the admin form of queue <name> offer the actions that fit its
   * status: pause or resume, down or up.
   */
  function adminButtons(name, status) {
    var forms = document.querySelectorAll("form[action$='q/" + CSS.escape(name) + "/adminoper']");
    var wanted = {
      pause: status === "PAUSE" ? "resume" : "pause",
      down: status === "DOWN" ? "up" : "down",
    };
    var pairs = { pause: "pause", resume: "pause", down: "down", up: "down" };
    forms.forEach(function (form) {
      form.querySelectorAll("button[name], input[type=submit][name]").forEach(function (button) {
        var pair = pairs[button.name];
        if (!pair || button.name === wanted[pair]) {
          return;
        }
        var label = wanted[pair];
        button.name = label;
        if (button.tagName === "BUTTON") {
          button.value = label;
          button.textContent = label;
        } else {
          button.value = label;
        }
      });
    });
  }

  /* Whether q.json lists other queues than the page shows. */
  function queuesChanged(queues) {
    var listed = {};
    var missing = false;
    queues.forEach(function (q) {
      listed[q.name] = true;
      if (!document.getElementById("status-" + q.name)) {
        missing = true;
      }
    });
    var gone = false;
    document.querySelectorAll("[id^='ping-']").forEach(function (cell) {
      if (!listed[cell.id.slice("ping-".length)]) {
        gone = true;
      }
    });
    return missing || gone;
  }

  var pageVersion = null;

  function update(data) {
    var status = setText("status", data.status);
    colour(status, data.status === "OPERATIONAL" ? "green" : "red");
    setText("ping", data.ping);
    setText("pid", data.pid);
    setText("uptime", data.uptime);
    var time = document.getElementById("time");
    if (time) {
      setText("time", formatTime(data.time, time.getAttribute("data-format") === "epoch" ? "0" : time.textContent));
    }
    var version = document.getElementById("version");
    if (version) {
      if (pageVersion === null) {
        pageVersion = (version.getAttribute("data-version") || version.textContent).replace(/^v/, "").trim();
      }
      if (data.version && data.version !== pageVersion) {
        setText("version", "server:v" + data.version + " != web:v" + pageVersion);
        colour(version, "red");
      }
    }

    var queues = data.queues || [];
    if (queuesChanged(queues) && RQ.reload("rq-home-reloaded")) {
      return;
    }
    queues.forEach(function (q) {
      var counts = q.counts || {};
      STATES.forEach(function (state) {
        var cell = setText(state + "-" + q.name, counts[state]);
        if (cell) {
          cell.classList.toggle("nonzero", Number(counts[state]) > 0);
        }
      });
      setText("ping-" + q.name, q.ping);
      setText("pid-" + q.name, q.pid);
      setText("uptime-" + q.name, q.uptime);
      var shown = text(q.status);
      if (shown !== "UP" && shown !== "PAUSE" && shown !== "DOWN") {
        // Not running: the page says why ("DOWN <error>"); keep that.
        var cell = document.getElementById("status-" + q.name);
        shown = cell && cell.textContent.indexOf("DOWN ") === 0 ? cell.textContent : "DOWN " + shown;
      }
      colour(setText("status-" + q.name, shown), RQ.statusColour(q.status));
      adminButtons(q.name, q.status);
    });
  }

  function unreachable() {
    colour(setText("status", "UNREACHABLE"), "red");
  }

  global.RQHome = { update: update, formatTime: formatTime };

  RQ.ready(function () {
    RQ.markCounts("td.count");
    RQ.poll(function () {
      return RQ.bare(RQ.root() + "q.json");
    }, INTERVAL, update, unreachable, "home");
  });
})(window, window.RQ);
