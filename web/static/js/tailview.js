/*
 * Live tail view of a message log (…/tailviewlog/<log>).
 *
 * The page holds
 *
 *   <pre id="log" data-log-url="…" data-state-url="…/state.json"
 *        data-offset="<bytes already rendered>">…</pre>
 *   <span id="lines">…</span>
 *   <input type="checkbox" id="tail-scroll" checked>
 *
 * with the log's start already rendered by the server. This script follows
 * the file: GET the log with "Range: bytes=<offset>-"; on 206 append the
 * new bytes, set offset = end + 1 from Content-Range and ask again after
 * 100 ms; otherwise GET state.json: while the message is in prep/que/run ask
 * for the log again after 1 s; after the first final state fetch the log
 * once more, then stop.
 *
 * Rendering matches the server's (web/ansi.py): & < > escaped, http(s) URLs
 * linked, ANSI SGR sequences (0 reset, 1 bright, 22, 30-37/90-97 fg, 39,
 * 40-47/100-107 bg, 49) turned into spans with the classes ansi-fg-<n>,
 * ansi-bg-<n> and ansi-bright, other escapes and control characters
 * dropped. An unfinished last line is held back until its newline arrives
 * (or the message reaches a final state).
 *
 * window.RQTail exposes the pieces (AnsiRenderer, TailView, escapeHtml,
 * linkify, countLines) for tests.
 */
(function (global) {
  "use strict";

  var LOG_DELAY = 100;      // ms between log requests while it grows
  var STATE_DELAY = 1000;   // ms between polls while the message is live
  var LIVE_STATES = { prep: true, que: true, run: true };

  /* A CSI sequence: ESC [ parameters final-byte. */
  var CSI = /\x1b\[([0-9;?]*)([@-~])/g;
  /* Other escapes (two-byte ESC sequences, OSC up to BEL/ST) and stray ESCs. */
  var OTHER_ESC = /\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]?/g;
  /* White space as Python's re.compile(r"\s") sees it (not JS's \s). */
  var WS = "\\t\\n\\x0b\\x0c\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
  var URL_RE = new RegExp("https?://[^" + WS + "<>\"'`]+[^" + WS + "<>\"'`.,;:!?)\\]}]", "g");
  /* Control characters other than newline and tab are not shown. */
  var CONTROL = /[\x00-\x08\x0b-\x1f\x7f]/g;

  function escapeHtml(text) {
    return String(text)
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;");
  }

  /* Plain text as HTML with every http(s) URL made a link. */
  function linkify(text) {
    var out = "";
    var pos = 0;
    var match;
    URL_RE.lastIndex = 0;
    while ((match = URL_RE.exec(text)) !== null) {
      out += escapeHtml(text.slice(pos, match.index));
      var url = escapeHtml(match[0]);
      out += '<a href="' + url + '" rel="nofollow noopener">' + url + "</a>";
      pos = match.index + match[0].length;
    }
    return out + escapeHtml(text.slice(pos));
  }

  /* Number of lines in text: a last line without newline counts too. */
  function countLines(text) {
    if (!text) {
      return 0;
    }
    var n = (text.match(/\n/g) || []).length;
    return text.charAt(text.length - 1) === "\n" ? n : n + 1;
  }

  /*
   * ANSI text to HTML. The colour state carries over from one call to the
   * next, as the log arrives in pieces.
   */
  function AnsiRenderer() {
    this.fg = null;
    this.bg = null;
    this.bright = false;
  }

  AnsiRenderer.prototype.classes = function () {
    var out = [];
    if (this.fg !== null) {
      out.push("ansi-fg-" + this.fg);
    }
    if (this.bg !== null) {
      out.push("ansi-bg-" + this.bg);
    }
    if (this.bright) {
      out.push("ansi-bright");
    }
    return out.join(" ");
  };

  AnsiRenderer.prototype.sgr = function (params) {
    var codes = params ? params.split(";") : ["0"];
    for (var i = 0; i < codes.length; i++) {
      if (!/^\d*$/.test(codes[i])) {
        continue;
      }
      var n = codes[i] ? parseInt(codes[i], 10) : 0;
      if (n === 0) {
        this.fg = null;
        this.bg = null;
        this.bright = false;
      } else if (n === 1) {
        this.bright = true;
      } else if (n === 22) {
        this.bright = false;
      } else if (n >= 30 && n <= 37) {
        this.fg = n - 30;
      } else if (n >= 90 && n <= 97) {
        this.fg = n - 90;
        this.bright = true;
      } else if (n === 39) {
        this.fg = null;
      } else if (n >= 40 && n <= 47) {
        this.bg = n - 40;
      } else if (n >= 100 && n <= 107) {
        this.bg = n - 100;
      } else if (n === 49) {
        this.bg = null;
      }
    }
  };

  AnsiRenderer.prototype.run = function (classes, chunk) {
    chunk = chunk.replace(OTHER_ESC, "").replace(CONTROL, "");
    if (!chunk) {
      return "";
    }
    var html = linkify(chunk);
    return classes ? '<span class="' + classes + '">' + html + "</span>" : html;
  };

  /* The HTML for the next piece of log text. */
  AnsiRenderer.prototype.render = function (text) {
    var out = "";
    var pos = 0;
    var match;
    CSI.lastIndex = 0;
    while ((match = CSI.exec(text)) !== null) {
      out += this.run(this.classes(), text.slice(pos, match.index));
      if (match[2] === "m" && match[1].indexOf("?") < 0) {
        this.sgr(match[1]);
      }
      pos = match.index + match[0].length;
    }
    return out + this.run(this.classes(), text.slice(pos));
  };

  /* Text without escapes and control characters (what the page shows). */
  AnsiRenderer.prototype.plain = function (text) {
    return text.replace(CSI, "").replace(OTHER_ESC, "").replace(CONTROL, "");
  };

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

  function concat(a, b) {
    var out = new Uint8Array(a.length + b.length);
    out.set(a, 0);
    out.set(b, a.length);
    return out;
  }

  function sleep(ms) {
    return new Promise(function (resolve) {
      global.setTimeout(resolve, ms);
    });
  }

  /*
   * Follows one log into a <pre>. options: logUrl, stateUrl, offset,
   * linesEl, scrollBox (checkbox), fetch (for tests).
   */
  function TailView(pre, options) {
    options = options || {};
    this.pre = pre;
    this.logUrl = options.logUrl || bare(pre.getAttribute("data-log-url"));
    this.stateUrl = options.stateUrl || bare(pre.getAttribute("data-state-url"));
    var offset = options.offset !== undefined ? options.offset : pre.getAttribute("data-offset");
    this.offset = parseInt(offset, 10) || 0;
    this.linesEl = options.linesEl !== undefined ? options.linesEl : document.getElementById("lines");
    this.scrollBox = options.scrollBox !== undefined ? options.scrollBox : document.getElementById("tail-scroll");
    this.fetch = options.fetch || global.fetch.bind(global);
    this.renderer = new AnsiRenderer();
    this.decoder = new TextDecoder("utf-8");
    this.pending = new Uint8Array(0);   // bytes of the unfinished last line
    var shown = pre.textContent;
    this.newlines = (shown.match(/\n/g) || []).length;
    this.partial = shown.length > 0 && shown.charAt(shown.length - 1) !== "\n";
    // Lines of the log above the first one shown: the server may render
    // only the end of a long log ("Lines <top>-<bottom> of <total>").
    this.base = 0;
    var initial = this.linesEl ? /of\s+(\d+)/.exec(this.linesEl.textContent) : null;
    if (initial) {
      this.base = Math.max(0, parseInt(initial[1], 10) - this.total());
    }
    this.state = null;
    this.stopped = false;
    var self = this;
    var onScroll = function () {
      self.updateLines();
    };
    pre.addEventListener("scroll", onScroll);
    if (this.scrollBox) {
      this.scrollBox.addEventListener("change", function () {
        self.changed();
      });
    }
    global.addEventListener("scroll", onScroll);
    global.addEventListener("resize", onScroll);
  }

  /* Lines shown in the <pre>. */
  TailView.prototype.total = function () {
    return this.newlines + (this.partial ? 1 : 0);
  };

  /* Append decoded text to the page. */
  TailView.prototype.appendText = function (text) {
    if (!text) {
      return;
    }
    var html = this.renderer.render(text);
    if (html) {
      this.pre.insertAdjacentHTML("beforeend", html);
    }
    var plain = this.renderer.plain(text);
    if (plain) {
      this.newlines += (plain.match(/\n/g) || []).length;
      this.partial = plain.charAt(plain.length - 1) !== "\n";
    }
  };

  /* New bytes of the log: show every complete line, keep the rest. */
  TailView.prototype.feed = function (bytes) {
    var data = concat(this.pending, bytes);
    var cut = data.lastIndexOf(10);
    if (cut < 0) {
      this.pending = data;
      return;
    }
    this.pending = data.slice(cut + 1);
    this.appendText(this.decoder.decode(data.subarray(0, cut + 1), { stream: true }));
    this.changed();
  };

  /* Show what was held back (the log will not grow any more). */
  TailView.prototype.flush = function () {
    var text = this.decoder.decode(this.pending);
    this.pending = new Uint8Array(0);
    this.appendText(text);
    this.changed();
  };

  TailView.prototype.changed = function () {
    if (this.scrollBox && this.scrollBox.checked) {
      this.pre.scrollTop = this.pre.scrollHeight;
      var doc = document.scrollingElement || document.documentElement;
      if (doc.scrollHeight > global.innerHeight) {
        global.scrollTo(0, doc.scrollHeight);
      }
    }
    this.updateLines();
  };

  /* "Lines <top>-<bottom> of <total>" for the lines in view. */
  TailView.prototype.visibleRange = function () {
    var total = this.total();
    if (total === 0) {
      return [this.base, this.base, this.base];
    }
    var pre = this.pre;
    var style = global.getComputedStyle(pre);
    var lineHeight = parseFloat(style.lineHeight) || parseFloat(style.fontSize) * 1.2 || 16;
    var padTop = parseFloat(style.paddingTop) || 0;
    var top;
    var bottom;
    if (pre.scrollHeight > pre.clientHeight + 1) {
      // The <pre> scrolls by itself.
      top = (pre.scrollTop - padTop) / lineHeight;
      bottom = (pre.scrollTop + pre.clientHeight - padTop) / lineHeight;
    } else {
      // The page scrolls: the part of the <pre> inside the window.
      var rect = pre.getBoundingClientRect();
      top = (Math.max(0, -rect.top) - padTop) / lineHeight;
      bottom = (Math.min(rect.height, global.innerHeight - rect.top) - padTop) / lineHeight;
    }
    top = Math.min(total, Math.max(1, Math.floor(top) + 1));
    bottom = Math.min(total, Math.max(top, Math.floor(bottom)));
    return [this.base + top, this.base + bottom, this.base + total];
  };

  TailView.prototype.updateLines = function () {
    if (!this.linesEl) {
      return;
    }
    var r = this.visibleRange();
    var text = "Lines " + r[0] + "-" + r[1] + " of " + r[2];
    if (this.linesEl.textContent !== text) {
      this.linesEl.textContent = text;
    }
  };

  /* One log request: true when it brought new bytes. */
  TailView.prototype.pollLog = async function () {
    var response = await this.fetch(this.logUrl, {
      headers: { Range: "bytes=" + this.offset + "-" },
      cache: "no-store",
      credentials: "same-origin",
    });
    var fresh = response.status === 206 || (response.status === 200 && this.offset === 0);
    if (!fresh) {
      return false;
    }
    var bytes = new Uint8Array(await response.arrayBuffer());
    if (bytes.length === 0) {
      return false;
    }
    var range = /bytes\s+(\d+)-(\d+)\//.exec(response.headers.get("Content-Range") || "");
    var start = range ? parseInt(range[1], 10) : this.offset;
    if (start !== this.offset) {
      return false;   // not the bytes asked for: never show a piece twice
    }
    this.offset = range ? parseInt(range[2], 10) + 1 : this.offset + bytes.length;
    this.feed(bytes);
    return true;
  };

  /* The message state (from state.json), null when unknown. */
  TailView.prototype.pollState = async function () {
    var response = await this.fetch(this.stateUrl, { cache: "no-store", credentials: "same-origin" });
    if (response.status === 404) {
      return "gone";
    }
    if (!response.ok) {
      return null;
    }
    var body = await response.json();
    return Array.isArray(body) ? String(body[0]) : null;
  };

  TailView.prototype.showState = function (state) {
    this.state = state;
    var el = document.getElementById("state");
    if (el && state && el.textContent !== state) {
      el.textContent = state;
    }
  };

  /* Follow the log until the message reaches a final state. */
  TailView.prototype.run = async function () {
    this.pre.classList.add("tailing");
    this.changed();   // start at the bottom when the box is checked
    var finalSeen = false;
    while (!this.stopped) {
      var grew = false;
      try {
        grew = await this.pollLog();
      } catch (e) {
        grew = false;
      }
      if (grew) {
        await sleep(LOG_DELAY);
        continue;
      }
      if (finalSeen) {
        break;
      }
      var state = null;
      try {
        state = await this.pollState();
      } catch (e) {
        state = null;
      }
      if (state !== null) {
        this.showState(state);
      }
      if (state !== null && !LIVE_STATES[state]) {
        finalSeen = true;   // one more look at the log, then stop
        continue;
      }
      await sleep(STATE_DELAY);
    }
    this.stop();
  };

  TailView.prototype.stop = function () {
    if (this.stopped && !this.pre.classList.contains("tailing")) {
      return;
    }
    this.stopped = true;
    this.flush();
    this.pre.classList.remove("tailing");
    this.pre.classList.add("finished");
  };

  global.RQTail = {
    AnsiRenderer: AnsiRenderer,
    TailView: TailView,
    countLines: countLines,
    escapeHtml: escapeHtml,
    linkify: linkify,
  };

  function start() {
    if (global.self !== global.top && document.body) {
      // In the message page's frame: show just the log, open links in the
      // whole window rather than in the frame.
      document.body.classList.add("embedded");
      document.addEventListener("click", function (event) {
        var link = event.target.closest ? event.target.closest("a[href]") : null;
        if (link && !link.target) {
          link.target = "_top";
        }
      });
    }
    var pre = document.getElementById("log");
    if (pre && pre.getAttribute("data-log-url")) {
      global.RQTail.view = new TailView(pre);
      global.RQTail.done = global.RQTail.view.run();
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})(window);
