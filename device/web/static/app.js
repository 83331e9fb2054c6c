/* LeukoScreen status page: live view of the appliance.
 *
 * Gets a snapshot ({status, recent}) from /api/live, then follows /api/events (server-sent events).
 * When the event stream is refused or drops, it polls /api/live every few seconds and tries the stream
 * again later, so a phone on a flaky network still sees current results. No framework, no build step.
 */
(function () {
  "use strict";

  var POLL_MS = 2500;
  var SSE_RETRY_MS = 20000;
  var TOKEN_KEY = "leukoscreen.token";

  var body = document.body;
  var CLASSES = (body.getAttribute("data-classes") || "").split(",").filter(Boolean);
  var BENIGN = body.getAttribute("data-benign") || "";

  var state = {
    seq: -1,
    live: null, // latest result from the device
    pinned: null, // a result the user clicked in the recent list
    slideId: null,
    slidesLoadedFor: undefined,
    source: null,
    pollTimer: null,
    sseRetryTimer: null,
    lastSnapshotAt: 0
  };

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") e.textContent = v;
        else if (k === "className") e.className = v;
        else e.setAttribute(k, v);
      });
    }
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      e.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return e;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  function num(v) { return typeof v === "number" && isFinite(v); }

  function pct(v, digits) { return num(v) ? (v * 100).toFixed(digits === undefined ? 1 : digits) + "%" : "—"; }

  function fixed(v, d, unit) { return num(v) ? v.toFixed(d) + (unit || "") : "—"; }

  function bytes(v) {
    if (!num(v)) return "—";
    var units = ["B", "KB", "MB", "GB", "TB"], i = 0;
    while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
    return (i === 0 ? v.toFixed(0) : v.toFixed(v < 10 ? 2 : 1)) + " " + units[i];
  }

  function duration(s) {
    if (!num(s)) return "—";
    s = Math.floor(s);
    var d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + (s % 60) + " s";
    return s + " s";
  }

  function toDate(t) {
    if (t === null || t === undefined || t === "") return null;
    var d = num(t) ? new Date(t * 1000) : new Date(t);
    return isNaN(d.getTime()) ? null : d;
  }

  function timeText(t) {
    var d = toDate(t);
    if (!d) return "";
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  }

  function dateTimeText(t) {
    var d = toDate(t);
    if (!d) return "—";
    return d.toLocaleDateString([], { year: "numeric", month: "short", day: "numeric" }) + " " + timeText(t);
  }

  function humanKey(k) {
    var s = String(k).replace(/_/g, " ");
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  /* ---- verdict helpers ------------------------------------------------------ */

  // The class a result points at: its label when ok, else its most probable class.
  function topClass(r) {
    if (r.label) return r.label;
    var best = null, bp = -1;
    Object.keys(r.scores || {}).forEach(function (c) {
      if (r.scores[c] > bp) { bp = r.scores[c]; best = c; }
    });
    return best;
  }

  // CSS tone of a result: "all" (ALL seen), "ok" (benign), "retake", "refer".
  function tone(r) {
    if (!r) return "none";
    if (r.status === "ok") return r.all ? "all" : "ok";
    if (r.status === "retake") return "retake";
    if (r.status === "refer") return r.all ? "all" : "refer";
    return "none";
  }

  function headline(r) {
    if (r.status === "ok") return r.label + (r.all ? " (ALL)" : "");
    if (r.status === "retake") return "Retake this field";
    if (r.status === "refer") return r.all ? "ALL likely: refer" : "Refer to a haematologist";
    return r.status || "—";
  }

  function statusWord(r) {
    if (r.status === "ok") return r.all ? "ALL detected" : "OK";
    return r.status;
  }

  /* ---- current field -------------------------------------------------------- */

  function renderField(r) {
    var img = $("field-image");
    var t = tone(r);
    if (!r) return;
    var current = img.getAttribute("data-id");
    if (current !== r.id) {
      clear(img);
      if (r.image_url) {
        img.appendChild(el("img", { src: r.image_url, alt: "Field " + r.id + ": " + headline(r) }));
      } else {
        img.appendChild(el("span", { text: "No image stored for this field" }));
      }
      img.setAttribute("data-id", r.id);
    }

    var st = $("verdict-status");
    st.className = "pill " + t;
    st.textContent = statusWord(r);
    $("verdict-all").classList.toggle("hidden", !(r.all && r.status !== "ok"));

    var lab = $("verdict-label");
    lab.className = "label-big " + t;
    lab.textContent = headline(r);

    var conf = $("verdict-confidence");
    clear(conf);
    if (r.status !== "retake" && num(r.confidence)) {
      conf.appendChild(document.createTextNode("Confidence "));
      conf.appendChild(el("strong", { text: pct(r.confidence) }));
      var tc = topClass(r);
      if (r.status !== "ok" && tc) conf.appendChild(document.createTextNode(" (best guess " + tc + ")"));
    } else {
      conf.textContent = "Not classified: the image did not pass the quality check.";
    }

    var reason = $("verdict-reason");
    reason.textContent = r.reason || "";
    reason.className = "reason" + (r.status === "refer" ? " refer" : "") + (r.reason ? "" : " hidden");

    renderBars(r);
    renderQuality(r.quality || {});

    var meta = $("field-meta");
    clear(meta);
    [
      r.id ? "Field " + r.id : null,
      r.slide_id ? "slide " + r.slide_id : (r.source === "upload" ? "uploaded image" : "no slide"),
      r.name ? r.name : null,
      r.timings && num(r.timings.invoke) ? "inference " + r.timings.invoke.toFixed(1) + " ms" : null
    ].forEach(function (s) { if (s) meta.appendChild(el("span", { text: s })); });
    $("field-when").textContent = dateTimeText(r.time);
  }

  function renderBars(r) {
    var box = $("score-bars");
    clear(box);
    var scores = r.scores || {};
    var names = CLASSES.length ? CLASSES.slice() : Object.keys(scores);
    Object.keys(scores).forEach(function (c) { if (names.indexOf(c) < 0) names.push(c); });
    if (!names.length || r.status === "retake" && !Object.keys(scores).length) {
      box.appendChild(el("div", { className: "muted", text: "No scores: field not classified." }));
      return;
    }
    var tc = topClass(r);
    names.forEach(function (c) {
      var v = num(scores[c]) ? scores[c] : 0;
      var cls = "bar-row" + (c === tc ? " top" : "") + (c === BENIGN ? " is-benign" : " is-all");
      var fill = el("span");
      fill.style.width = Math.max(0, Math.min(100, v * 100)).toFixed(1) + "%";
      box.appendChild(el("div", { className: cls, "data-class": c }, [
        el("span", { className: "name", text: c, title: c }),
        el("div", { className: "bar", role: "meter", "aria-valuemin": "0", "aria-valuemax": "1",
                     "aria-valuenow": v.toFixed(3), "aria-label": c }, [fill]),
        el("span", { className: "val", text: pct(v) })
      ]));
    });
  }

  // The quality gate's figures (device/quality.py): what they mean and how to print them.
  var QUALITY = [
    ["sharpness", "Sharpness", function (v) { return v.toFixed(0); }],
    ["brightness", "Brightness", function (v) { return v.toFixed(0) + " / 255"; }],
    ["clipped", "Clipped pixels", function (v) { return pct(v, 1); }],
    ["stained", "Stained area", function (v) { return pct(v, 2); }],
    ["texture", "Texture scale", function (v) { return v > 0 ? v.toFixed(1) + " px" : "-"; }]
  ];

  function renderQuality(q) {
    var box = $("quality");
    clear(box);
    var shown = 0;
    QUALITY.forEach(function (row) {
      var v = q[row[0]];
      if (!num(v)) return;
      shown++;
      box.appendChild(el("div", { "data-key": row[0] }, [el("dt", { text: row[1] }), el("dd", { text: row[2](v) })]));
    });
    if (q.code !== undefined) {
      box.appendChild(el("div", { "data-key": "gate" }, [
        el("dt", { text: "Quality gate" }),
        el("dd", { text: q.ok ? "passed" : "failed (" + String(q.code || "?").replace(/_/g, " ") + ")" })
      ]));
      shown++;
    }
    if (!shown) box.appendChild(el("div", { className: "muted", text: "—" }));
  }

  /* ---- slide -------------------------------------------------------------- */

  // Slide verdicts from device/slides.py: pending | benign | ALL | refer.
  var SLIDE_TEXT = { ALL: "ALL detected", benign: "No ALL seen (benign)", refer: "Refer to a haematologist",
                     pending: "Pending: keep scanning" };

  function slideTone(v) {
    return v === "ALL" ? "all" : v === "benign" ? "benign" : v === "refer" ? "refer" : "none";
  }

  function renderSlide(slide) {
    var sid = slide && slide.id ? slide.id : null;
    state.slideId = sid;
    $("slide-id").textContent = sid || "no slide open";
    var v = $("slide-verdict");
    var verdict = slide ? slide.verdict : null;
    var text = verdict ? (SLIDE_TEXT[verdict] || String(verdict)) : (sid ? "No fields yet" : "No slide open");
    if (slide && slide.subtype) text += ": " + slide.subtype;
    v.textContent = text;
    v.className = "slide-verdict " + slideTone(verdict);
    v.setAttribute("data-verdict", verdict || "");

    var summary = [];
    if (slide && num(slide.fields)) summary.push(slide.fields + (slide.fields === 1 ? " field" : " fields"));
    if (slide && slide.started) summary.push("started " + dateTimeText(slide.started));
    $("slide-summary").textContent = summary.join(" · ") ||
      (sid ? "" : "The next camera field opens a slide; long-press the button or use Start new slide.");
    $("slide-reason").textContent = (slide && slide.reason ? slide.reason : "") +
      (slide && num(slide.certainty) ? " (how sure: " + (100 * slide.certainty).toFixed(2) + "%)" : "");

    var counts = {};
    var byClass = (slide && slide.counts) || {};
    var byStatus = (slide && slide.statuses) || {};
    Object.keys(byClass).forEach(function (k) { counts[k] = byClass[k]; });
    counts.refer = byStatus.refer || 0;
    counts.retake = byStatus.retake || 0;
    var rows = CLASSES.slice();
    Object.keys(byClass).forEach(function (k) { if (rows.indexOf(k) < 0) rows.push(k); });
    rows.push("refer", "retake");
    var total = 0;
    rows.forEach(function (k) { total += num(counts[k]) ? counts[k] : 0; });
    var tb = $("tally-body");
    clear(tb);
    rows.forEach(function (k) {
      var n = num(counts[k]) ? counts[k] : 0;
      var fill = el("span");
      fill.style.width = (total ? (100 * n / total) : 0).toFixed(1) + "%";
      var isAll = CLASSES.indexOf(k) >= 0 && k !== BENIGN;
      var rowTone = k === BENIGN ? " is-benign" : isAll ? " is-all" : "";
      tb.appendChild(el("tr", { "data-key": k }, [
        el("td", { text: k === "refer" ? "Referred" : k === "retake" ? "Retake" : k }),
        el("td", { className: "barcell" }, [el("div", { className: "bar mini" + rowTone }, [fill])]),
        el("td", { className: "n", text: String(n) })
      ]));
    });
    tb.appendChild(el("tr", { className: "total" }, [
      el("td", { text: "Total" }), el("td", { className: "barcell" }), el("td", { className: "n", id: "tally-total", text: String(total) })
    ]));

    var link = $("report-link");
    if (sid) {
      link.href = "/api/slides/" + encodeURIComponent(sid) + "/report";
      link.classList.remove("hidden");
    } else {
      link.classList.add("hidden");
    }
    $("end-btn").disabled = !sid;
  }

  /* ---- recent --------------------------------------------------------------- */

  function renderRecent(list) {
    var box = $("recent");
    clear(box);
    if (!list || !list.length) {
      box.appendChild(el("span", { className: "muted", text: "No results yet." }));
      return;
    }
    list.forEach(function (r) {
      var t = tone(r);
      var title = r.status === "ok" ? r.label : r.status === "retake" ? "Retake" : (r.all ? "ALL: refer" : "Refer");
      var b = el("button", { type: "button", className: "thumb " + t, title: headline(r) + (r.reason ? ": " + r.reason : ""),
                             "data-id": r.id }, [
        r.thumb_url ? el("img", { src: r.thumb_url, alt: "", loading: "lazy" }) : el("img", { alt: "" }),
        el("span", { className: "cap" }, [
          el("b", { text: title }),
          el("span", { className: "muted", text: (r.status !== "retake" && num(r.confidence) ? pct(r.confidence, 0) + " · " : "")
                                                 + timeText(r.time) })
        ])
      ]);
      b.addEventListener("click", function () { pin(r); });
      box.appendChild(b);
    });
  }

  function pin(r) {
    state.pinned = r;
    $("pinned-note").classList.remove("hidden");
    renderField(r);
    $("field-card").scrollIntoView({ behavior: "smooth", block: "start" });
  }

  function unpin() {
    state.pinned = null;
    $("pinned-note").classList.add("hidden");
    if (state.live) renderField(state.live);
  }

  /* ---- health --------------------------------------------------------------- */

  function renderHealth(s) {
    var box = $("health");
    clear(box);
    var model = s.model || {};
    var bundles = s.bundles || {};
    var inf = s.inference_ms || {};
    var images = s.images || {};
    var rows = [
      ["Model", model.name, null, null, "model"],
      ["Model sha256", (model.sha256 || "").slice(0, 16) + "…", "mono", model.sha256, "sha256"],
      ["Bundle", (model.bundle || bundles.active) + (bundles.factory ? " (factory)" : ""), "mono",
        bundles.active_dir, "bundle"],
      ["Previous bundle", bundles.previous ? bundles.previous + " (rollback returns to it)" : null, "mono",
        bundles.previous_dir, "previous-bundle"],
      ["Runtime", s.runtime, null, null, "runtime"],
      ["Delegate", s.delegate || "none (CPU)", null, null, "delegate"],
      ["Inference median", fixed(inf.p50, 1, " ms"), null, null, "p50"],
      ["Inference p95", fixed(inf.p95, 1, " ms"), null, null, "p95"],
      ["Fields / s", fixed(s.fps, 2), null, null, "fps"],
      ["Uptime", duration(s.uptime_s), null, null, "uptime"],
      ["CPU temperature", num(s.cpu_temp_c) ? s.cpu_temp_c.toFixed(1) + " °C" : "n/a (not a Pi)", null, null, "temp"],
      ["Free disk", bytes(s.disk_free_bytes), null, null, "disk"],
      ["Database", bytes(s.db_bytes), null, null, "db"],
      ["Records", num(s.fields) ? String(s.fields) : "—", null, null, "records"],
      ["Images kept", num(images.count) ? images.count + " (" + bytes(images.bytes) + ")" : "—", null, null, "images"],
      ["Source", [s.source, s.trigger].filter(Boolean).join(", "), null, null, "source"]
    ];
    rows.forEach(function (row) {
      box.appendChild(el("div", { "data-key": row[4] }, [
        el("dt", { text: row[0] }),
        el("dd", { className: row[2] || null, title: row[3] || null, text: row[1] === undefined || row[1] === null || row[1] === "" ? "—" : String(row[1]) })
      ]));
    });

    var faults = s.faults || [];
    var hf = $("health-faults");
    clear(hf);
    var bannerList = $("faults-banner-list");
    clear(bannerList);
    if (faults.length) {
      var ul = el("ul", { className: "fault-list" });
      faults.forEach(function (f) {
        var text = typeof f === "string" ? f : ((f.kind ? f.kind + ": " : "") + (f.message || JSON.stringify(f)) +
          (f.count > 1 ? " (" + f.count + "×)" : ""));
        ul.appendChild(el("li", { text: text }));
        bannerList.appendChild(el("li", { text: text }));
      });
      hf.appendChild(ul);
    } else {
      hf.appendChild(el("div", { className: "no-faults", text: "No faults." }));
    }
    $("faults-banner").classList.toggle("hidden", !faults.length);

    var ds = $("device-state");
    var st = faults.length ? "fault" : s.ready ? "ready" : "starting";
    ds.setAttribute("data-state", st);
    ds.querySelector(".t").textContent = st === "fault" ? "Fault" : st === "ready" ? "Ready" : "Starting";
    $("health-when").textContent = "updated " + timeText(Date.now() / 1000);
  }

  function renderAlert(s) {
    var active = !!s.alarm;
    $("alert").classList.toggle("hidden", !active);
    if (active) {
      var last = s.last;
      var txt = "ALL detected";
      if (last && last.all) txt += (last.label ? ": " + last.label : "") + (last.id ? " (field " + last.id + ")" : "");
      $("alert-text").textContent = txt + ". Check the field and confirm with a haematologist.";
    }
  }

  /* ---- snapshot ------------------------------------------------------------- */

  function applySnapshot(snap) {
    if (!snap || !snap.status) return;
    state.lastSnapshotAt = Date.now();
    var s = snap.status;
    renderHealth(s);
    renderAlert(s);
    renderSlide(s.slide || null);
    if (snap.recent) renderRecent(snap.recent);
    var last = s.last || (snap.recent && snap.recent[0]) || null;
    if (last) {
      state.live = last;
      if (!state.pinned) renderField(last);
    }
    var slidesKey = String(state.slideId) + "/" + (s.slide ? s.slide.fields : "") + "/" + Math.floor(Date.now() / 30000);
    if (state.slidesLoadedFor !== slidesKey) {
      state.slidesLoadedFor = slidesKey;
      loadSlides();
    }
    if (num(s.seq)) state.seq = s.seq;
  }

  function setConn(mode) {
    var c = $("conn");
    c.setAttribute("data-state", mode);
    c.querySelector(".t").textContent = mode === "live" ? "Live" : mode === "polling" ? "Polling" : "Offline";
  }

  function fetchJSON(url, opts) {
    return fetch(url, opts || { cache: "no-store" }).then(function (resp) {
      return resp.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = null; }
        if (!resp.ok) {
          var msg = (data && (data.message || data.error)) || resp.status + " " + resp.statusText;
          var err = new Error(msg);
          err.status = resp.status;
          throw err;
        }
        return data;
      });
    });
  }

  function poll() {
    return fetchJSON("/api/live").then(function (snap) {
      applySnapshot(snap);
      if (!state.source) setConn("polling");
    }).catch(function () {
      if (!state.source) setConn("offline");
    });
  }

  function startPolling() {
    if (state.pollTimer) return;
    state.pollTimer = window.setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    if (state.pollTimer) window.clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  function startStream() {
    if (!window.EventSource || state.source) { startPolling(); return; }
    var src;
    try { src = new EventSource("/api/events"); } catch (e) { startPolling(); return; }
    state.source = src;
    src.addEventListener("snapshot", function (ev) {
      var snap;
      try { snap = JSON.parse(ev.data); } catch (e) { return; }
      setConn("live");
      stopPolling();
      applySnapshot(snap);
    });
    src.onerror = function () {
      // The server ends streams now and then (and refuses them when busy): fall back to polling and
      // reconnect later instead of letting EventSource hammer the device.
      src.close();
      state.source = null;
      setConn("polling");
      startPolling();
      if (!state.sseRetryTimer) {
        state.sseRetryTimer = window.setTimeout(function () { state.sseRetryTimer = null; startStream(); }, SSE_RETRY_MS);
      }
    };
  }

  /* ---- slides list ------------------------------------------------------------ */

  function loadSlides() {
    fetchJSON("/api/slides?limit=8").then(function (data) {
      var list = $("slides-list");
      clear(list);
      var slides = (data && data.slides) || [];
      if (!slides.length) { list.appendChild(el("li", { className: "muted", text: "No slides yet." })); return; }
      slides.forEach(function (sl) {
        list.appendChild(el("li", null, [
          el("span", null, [
            el("span", { className: "mono", text: sl.id }),
            el("span", { className: "muted", text: " · " + (num(sl.fields) ? sl.fields + " fields" : "") +
                                                     (sl.open ? " · open" : "") })
          ]),
          el("a", { href: "/api/slides/" + encodeURIComponent(sl.id) + "/report", target: "_blank", rel: "noopener", text: "Report" })
        ]));
      });
    }).catch(function () { /* the next snapshot retries */ });
  }

  /* ---- operator actions ------------------------------------------------------------ */

  function token() { return ($("token").value || "").trim(); }

  function post(url, bodyData, msgId) {
    var msg = $(msgId);
    var t = token();
    if (!t) {
      msg.className = "msg error";
      msg.textContent = "Enter the device token first (Operator panel).";
      $("token").focus();
      return Promise.reject(new Error("no token"));
    }
    msg.className = "msg";
    msg.textContent = "Working…";
    return fetchJSON(url, { method: "POST", headers: { "Authorization": "Bearer " + t }, body: bodyData || null, cache: "no-store" })
      .then(function (data) { msg.className = "msg good"; msg.textContent = ""; poll(); return data; })
      .catch(function (err) {
        msg.className = "msg error";
        msg.textContent = err.status === 401 || err.status === 403 ? "Token refused: " + err.message : err.message;
        throw err;
      });
  }

  function wire() {
    try { $("token").value = window.localStorage.getItem(TOKEN_KEY) || ""; } catch (e) { /* private mode */ }
    $("token").addEventListener("change", function () {
      try { window.localStorage.setItem(TOKEN_KEY, token()); } catch (e) { /* private mode */ }
    });
    $("token-form").addEventListener("submit", function (ev) { ev.preventDefault(); });
    $("unpin-btn").addEventListener("click", unpin);
    $("start-btn").addEventListener("click", function () {
      post("/api/slides/start", null, "slide-msg").then(function (d) {
        $("slide-msg").textContent = "Slide " + d.slide_id + " started.";
      }).catch(function () {});
    });
    $("end-btn").addEventListener("click", function () {
      post("/api/slides/end", null, "slide-msg").then(function (d) {
        $("slide-msg").textContent = d.slide_id ? "Slide " + d.slide_id + " ended." : "No slide was open.";
      }).catch(function () {});
    });
    $("ack-btn").addEventListener("click", function () {
      post("/api/alert/acknowledge", null, "tools-msg").then(function () {
        $("alert").classList.add("hidden");
      }).catch(function () {
        $("tools-card").scrollIntoView({ behavior: "smooth" });
      });
    });
    $("upload-form").addEventListener("submit", function (ev) {
      ev.preventDefault();
      var f = $("upload-file").files[0];
      if (!f) {
        $("tools-msg").className = "msg error";
        $("tools-msg").textContent = "Choose an image file first.";
        return;
      }
      var fd = new FormData();
      fd.append("file", f, f.name);
      $("upload-btn").disabled = true;
      post("/api/classify", fd, "tools-msg").then(function (r) {
        $("tools-msg").textContent = f.name + ": " + headline(r) + (r.reason ? " (" + r.reason + ")" : "");
        pin(r);
      }).catch(function () {}).then(function () { $("upload-btn").disabled = false; });
    });
  }

  wire();
  poll().then(startStream);
})();
