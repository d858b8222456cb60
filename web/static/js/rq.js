/*
 * What the live pages share (home.js, queue.js): loaded before them, it
 * defines window.RQ.
 *
 *   RQ.root()                 relative_root: the data-root attribute of <body>,
 *                             else derived from this script's own URL
 *                             (<root>js/rq.js); always ends in "/".
 *   RQ.bare(url)              the absolute URL without user:password.
 *   RQ.text(value)            a value as shown ("" for null/undefined).
 *   RQ.setText(id, value)     set the text of #id when it changed; the element.
 *   RQ.colour(el, name)       make el green, red or orange (only that one).
 *   RQ.statusColour(status)   UP green, PAUSE orange, anything else red.
 *   RQ.reload(key)            load the page again, at most once in 10 s.
 *   RQ.markCounts(selector)   mark the cells holding a count > 0 "nonzero".
 *   RQ.poll(url, interval, onData, onFail, what)
 *                             GET url() as JSON every interval ms, one request
 *                             at a time; onData(data) on success, onFail(e)
 *                             (if given) when it fails.
 *   RQ.ready(start)           run start once the document is parsed.
 */
(function (global) {
  "use strict";

  var COLOURS = ["green", "red", "orange"];

  var SCRIPT = document.currentScript;

  function root() {
    var r = document.body && document.body.getAttribute("data-root");
    if (r) {
      return r.charAt(r.length - 1) === "/" ? r : r + "/";
    }
    if (SCRIPT && SCRIPT.src) {
      var path = new URL(SCRIPT.src, global.location.href).pathname;
      var at = path.lastIndexOf("js/");
      if (at >= 0) {
        return path.slice(0, at);
      }
    }
    return "/";
  }

  /*
   * An absolute URL without user:password (fetch refuses URLs holding
   * credentials, and relative URLs inherit them from a page opened as
   * http://user:pass@host/...; the browser still sends the cached login).
   */
  function bare(url) {
    var u = new URL(url, global.location.href);
    u.username = "";
    u.password = "";
    return u.href;
  }

  function text(value) {
    return value === null || value === undefined ? "" : String(value);
  }

  /* Set the text of element #id (only when it changed); the element. */
  function setText(id, value) {
    var el = document.getElementById(id);
    if (el && el.textContent !== text(value)) {
      el.textContent = text(value);
    }
    return el;
  }

  /* Give el the colour class name and none of the others (no-op without el). */
  function colour(el, name) {
    if (!el) {
      return;
    }
    COLOURS.forEach(function (c) {
      el.classList.toggle(c, c === name);
    });
  }

  /* Colour of a queue status: UP green, PAUSE orange, anything else red. */
  function statusColour(status) {
    if (status === "UP") {
      return "green";
    }
    if (status === "PAUSE") {
      return "orange";
    }
    return "red";
  }

  /*
   * Load the page again, at most once in 10 s per sessionStorage key (never
   * a reload loop); whether it reloads.
   */
  function reload(key) {
    try {
      var last = Number(global.sessionStorage.getItem(key)) || 0;
      if (Date.now() - last < 10000) {
        return false;
      }
      global.sessionStorage.setItem(key, String(Date.now()));
    } catch (e) {
      return false;
    }
    global.location.reload();
    return true;
  }

  /* Highlight the count cells (selector) the server rendered that are > 0. */
  function markCounts(selector) {
    document.querySelectorAll(selector).forEach(function (cell) {
      cell.classList.toggle("nonzero", Number(cell.textContent) > 0);
    });
  }

  /*
   * GET url() as JSON every interval ms, the next request interval ms after
   * the last one settled. onData(data) gets the answer; a failed request
   * (network, non-2xx, not JSON) goes to onFail(error) when given. What
   * still throws is logged as "<what> refresh failed".
   */
  function poll(url, interval, onData, onFail, what) {
    function once() {
      global
        .fetch(url(), { cache: "no-store", credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) {
            throw new Error("HTTP " + response.status);
          }
          return response.json();
        })
        .then(onData, onFail)
        .catch(function (e) {
          if (global.console) {
            global.console.warn(what + " refresh failed:", e);
          }
        })
        .then(function () {
          global.setTimeout(once, interval);
        });
    }
    global.setTimeout(once, interval);
  }

  /* Run start() once the document is parsed (now, if it already is). */
  function ready(start) {
    if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", start);
    } else {
      start();
    }
  }

  global.RQ = {
    root: root,
    bare: bare,
    text: text,
    setText: setText,
    colour: colour,
    statusColour: statusColour,
    reload: reload,
    markCounts: markCounts,
    poll: poll,
    ready: ready,
  };
})(window);
