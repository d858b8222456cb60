/*
 * Queue page: keeps the status, counts and message lists live.
 *
 * Every 900 ms GET q/<name>.json?limit=<list size> (the data-json-url of the
 * #queue box) and refresh #status #ping #pid #uptime, the counts #<state>_size and the lists
 * #list-<state> with the markup the server renders (web/pages.py): the
 * newest messages (at most data-limit of the list, or data-per-page of
 * <body>, default 50) grouped under YYYYMMDD headings, each linking to its
 * message page;
 *   que      dest, seconds to due, "Run now" and "Delete" forms,
 *   run      status, "Destroy" form,
 *   relayed  "relayed" and the remote id.
 * A list showing a later page (?<state>_page=N, N > 1) keeps what the server
 * rendered; so does a list whose content has not changed since (its
 * data-key, computed as here), so a click on it is never lost to a
 * rebuild. When the queue goes DOWN or comes back the page is loaded again
 * (its layout differs).
 *
 * <root> is relative_root (RQ.root()); <name> is data-queue of the #queue
 * box, else taken from the path. Needs js/rq.js loaded before it.
 */
(function (global, RQ) {
  "use strict";

  var INTERVAL = 900;
  var STATES = ["prep", "que", "run", "done", "err", "relayed"];
  var DEFAULT_LIMIT = 50;
  var text = RQ.text;
  var setText = RQ.setText;

  function queueName() {
    var holder = document.querySelector("[data-queue]");
    if (holder) {
      return holder.getAttribute("data-queue");
    }
    var match = /\/q\/([^\/.]+)\/?$/.exec(global.location.pathname);
    return match ? decodeURIComponent(match[1]) : null;
  }

  /* The URL of q/<name>.json. */
  function jsonUrl() {
    var holder = document.querySelector("[data-json-url]");
    if (holder) {
      return holder.getAttribute("data-json-url");
    }
    return RQ.root() + "q/" + encodeURIComponent(name) + ".json";
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      node.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) {
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  /* A one-button POST form, as the server renders it. */
  function postForm(action, label, method) {
    return el("form", { method: "post", action: action, class: "inline" }, [
      el("input", { type: "hidden", name: "_method", value: method }),
      el("input", { type: "submit", value: label }),
    ]);
  }

  /* Seconds from the server's time to a due time: "5s", "-3s". */
  function dueText(due, now) {
    var secs = Math.trunc(Number(due) - Number(now));
    return due === null || due === undefined || isNaN(secs) ? "" : secs + "s";
  }

  /* The YYYYMMDD day of a message id. */
  function day(msgId) {
    return String(msgId).slice(0, 8);
  }

  /* One message of a list (the markup of web/pages.py's queue_entry). */
  function entry(state, msg, base, now) {
    var target = base + encodeURIComponent(msg.msg_id);
    var li = el("li", { class: "msg " + state }, [el("a", { href: target, class: "msg-link" }, [msg.msg_id])]);
    var add = function () {
      for (var i = 0; i < arguments.length; i++) {
        var part = arguments[i];
        li.appendChild(typeof part === "string" ? document.createTextNode(part) : part);
      }
    };
    if (state === "que") {
      add(
        " ", el("span", { class: "dest" }, [text(msg.dest)]),
        " ", el("span", { class: "due", title: "seconds to due" }, [dueText(msg.due, now)]),
        " ", postForm(target, "Run now", "run_now"),
        postForm(target, "Delete", "delete")
      );
    } else if (state === "run") {
      add(" ", el("span", { class: "status" }, [text(msg.status)]), " ", postForm(target, "Destroy", "destroy"));
    } else if (state === "relayed") {
      var remote = text(msg.new_msg);
      add(" relayed ", remote.indexOf("http") === 0 ? el("a", { href: remote }, [remote]) : remote);
    }
    return li;
  }

  /* Whether the page shows a later page of this state's list. */
  function pagedAway(state) {
    var page = new URLSearchParams(global.location.search).get(state + "_page");
    return page !== null && parseInt(page, 10) > 1;
  }

  /* How many entries the list shows (the server's page size). */
  function limitOf(list) {
    return parseInt(list.getAttribute("data-limit"), 10) || parseInt(document.body.getAttribute("data-per-page"), 10) ||
      DEFAULT_LIMIT;
  }

  /* Rebuild #list-<state> (or only refresh the due times if nothing else changed). */
  function fillList(list, state, messages, base, now) {
    if (list.getAttribute("data-live") === "false" || pagedAway(state)) {
      return;
    }
    var shown = (messages || []).slice(0, limitOf(list));
    if (list.rqKey === undefined && list.hasAttribute("data-key")) {
      // What the server rendered: kept while it is still what q/<name>.json says.
      list.rqKey = list.getAttribute("data-key");
    }
    var key = JSON.stringify(
      shown.map(function (m) {
        return [m.msg_id, m.dest, m.status, m.new_msg];
      })
    );
    if (list.rqKey === key) {
      var dues = {};
      shown.forEach(function (m) {
        dues[m.msg_id] = m.due;
      });
      list.querySelectorAll("li.msg").forEach(function (li) {
        var link = li.querySelector("a.msg-link");
        var span = li.querySelector(".due");
        if (link && span && dues.hasOwnProperty(link.textContent)) {
          var t = dueText(dues[link.textContent], now);
          if (span.textContent !== t) {
            span.textContent = t;
          }
        }
      });
      return;
    }
    list.rqKey = key;
    var frag = document.createDocumentFragment();
    var ul = null;
    var current = null;
    shown.forEach(function (msg) {
      var d = day(msg.msg_id);
      if (ul === null || d !== current) {
        current = d;
        ul = el("ul", {}, []);
        frag.appendChild(el("li", { class: "day-group" }, [el("h4", { class: "day" }, [d]), ul]));
      }
      ul.appendChild(entry(state, msg, base, now));
    });
    list.replaceChildren(frag);
  }

  var name = null;
  var pageDown = null;   // whether the page was rendered for a DOWN queue

  function update(data) {
    if (pageDown === null) {
      var shown = document.getElementById("status");
      var word = shown ? shown.textContent.trim() : data.status;
      pageDown = word !== "UP" && word !== "PAUSE";
    }
    if ((data.status === "DOWN") !== pageDown && RQ.reload("rq-queue-reloaded")) {
      return;
    }
    RQ.colour(setText("status", data.status), RQ.statusColour(data.status));
    if (data.status === "DOWN") {
      return;
    }
    setText("ping", data.ping);
    setText("pid", data.pid);
    setText("uptime", data.uptime);
    var base = RQ.root() + "q/" + encodeURIComponent(name) + "/";
    var messages = data.messages || {};
    STATES.forEach(function (state) {
      var size = setText(state + "_size", data[state + "_size"]);
      if (size) {
        size.classList.toggle("nonzero", Number(data[state + "_size"]) > 0);
      }
      var list = document.getElementById("list-" + state);
      if (list) {
        fillList(list, state, messages[state], base, data.time);
      }
    });
  }

  /* q/<name>.json asking only for as many messages as the lists show. */
  function pollUrl() {
    var url = new URL(RQ.bare(jsonUrl()));
    var most = 0;
    document.querySelectorAll("[id^='list-']").forEach(function (list) {
      most = Math.max(most, limitOf(list));
    });
    url.searchParams.set("limit", String(most || DEFAULT_LIMIT));
    return url.href;
  }

  global.RQQueue = { update: update, dueText: dueText };

  RQ.ready(function () {
    RQ.markCounts("[id$='_size']");
    name = queueName();
    if (name) {
      RQ.poll(pollUrl, INTERVAL, update, null, "queue");
    }
  });
})(window, window.RQ);
