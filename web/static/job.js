// The job page: follow the job live and update the page in place until it finishes.
// Live push first: an EventSource on /jobs/<id>/events (server-sent events, the browser's
// session decides who may see it). Where EventSource is missing, or the stream keeps failing,
// poll /jobs/<id>.json every 500 ms instead.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root) return;
  var pollUrl = root.dataset.pollUrl;
  var eventsUrl = root.dataset.eventsUrl;
  var terminal = { succeeded: true, failed: true, canceled: true };
  var $ = function (id) { return document.getElementById(id); };
  var shownImages = -1;
  var MAX_STREAM_ERRORS = 3;  // in a row, without an event between them

  function show(id, visible) { $(id).hidden = !visible; }

  function renderImages(job) {
    if (job.images.length === shownImages) return;
    shownImages = job.images.length;
    var box = $("images");
    box.textContent = "";
    // Seeds reach 2**63: past 2**53 a JSON number loses digits in JavaScript, so each image's
    // seed (the job's seed + its index) is worked out from the page's own text, exactly.
    var first = BigInt($("seed").textContent.trim());
    job.images.forEach(function (image, i) {
      var seed = (first + BigInt(i)).toString();
      var fig = document.createElement("figure");
      var img = document.createElement("img");
      img.src = image.url; img.width = image.width; img.height = image.height;
      img.alt = "seed " + seed;
      var cap = document.createElement("figcaption");
      var link = document.createElement("a");
      link.href = image.url; link.download = job.id + "-" + i + ".png"; link.textContent = "download";
      cap.appendChild(document.createTextNode("seed " + seed + " · "));
      cap.appendChild(link);
      fig.appendChild(img); fig.appendChild(cap); box.appendChild(fig);
    });
  }

  function localTime(iso) {
    var when = new Date(iso);
    return isNaN(when.getTime()) ? iso : when.toLocaleTimeString();
  }

  function setTime(id, iso) {
    var el = $(id);
    el.dateTime = iso || "";
    el.textContent = iso ? localTime(iso) : "";
  }

  function renderEstimates(job) {
    var start = job.estimated_start, finish = job.estimated_finish;
    var waiting = !terminal[job.status];
    show("eta", waiting && Boolean(start || finish));
    show("eta-start-row", waiting && job.status === "queued" && Boolean(start));
    setTime("eta-start", start);
    setTime("eta-finish", finish);
  }

  function renderStatus(status) {
    var badge = $("status").querySelector(".badge");
    badge.textContent = status; badge.className = "badge " + status;
    show("queued", status === "queued");
    show("running", status === "running");
    show("canceled", status === "canceled");
    show("cancel-form", !terminal[status]);
  }

  function renderProgress(progress) {
    var bar = $("progress");
    bar.max = progress.total || 1; bar.value = progress.step;
    $("progress-text").textContent = "step " + progress.step + " of " + progress.total;
    var preview = $("preview");
    if (progress.preview_url) {
      // The preview is rewritten in place; its signed URL changes every second, which is
      // how often a new one can show.
      if (preview.dataset.url !== progress.preview_url) {
        preview.dataset.url = progress.preview_url;
        preview.src = progress.preview_url;
      }
      preview.hidden = false;
    }
  }

  function render(job) {
    renderStatus(job.status);
    if (job.queue_position !== null) $("queue-position").textContent = job.queue_position;
    renderProgress(job.progress);
    show("error", job.status === "failed");
    if (job.error) $("error-text").textContent = job.error;
    renderEstimates(job);
    renderImages(job);
  }

  // --- polling, the fallback -----------------------------------------------------------------

  var polling = false;

  function poll() {
    fetch(pollUrl, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (job) {
        render(job);
        if (!terminal[job.status]) setTimeout(poll, 500);
      })
      .catch(function () { setTimeout(poll, 2000); });  // a hiccup: back off, keep going
  }

  function startPolling() {
    if (polling) return;
    polling = true;
    root.dataset.live = "polling";
    poll();
  }

  // --- live push -------------------------------------------------------------------------------

  function follow() {
    var source = new EventSource(eventsUrl);
    var errors = 0;
    root.dataset.live = "events";

    function onEvent(e) {
      errors = 0;
      var data = JSON.parse(e.data);
      if (data.job) {
        render(data.job);
      } else if (data.status) {
        renderStatus(data.status);
        renderProgress(data.progress);
      }
      if (e.type === "completed" || e.type === "failed" || e.type === "canceled") {
        source.close();  // the server closes too; this keeps EventSource from reconnecting
        root.dataset.live = "done";
      }
    }

    ["status", "progress", "preview", "queue", "completed", "failed", "canceled"].forEach(
      function (name) { source.addEventListener(name, onEvent); });
    source.addEventListener("open", function () { errors = 0; });
    source.addEventListener("error", function () {
      // EventSource reconnects by itself (with Last-Event-ID); give up after a few failures
      // in a row, or when it has given up (a 204 at the end, or an answer that is no stream).
      errors += 1;
      if (source.readyState === EventSource.CLOSED || errors >= MAX_STREAM_ERRORS) {
        source.close();
        if (root.dataset.live !== "done") startPolling();
      }
    });
  }

  if (terminal[root.dataset.status]) {
    shownImages = $("images").children.length;
  } else if (window.EventSource && eventsUrl) {
    follow();
  } else {
    setTimeout(startPolling, 500);
  }
  document.querySelectorAll("#eta time").forEach(function (el) {
    if (el.dateTime) el.textContent = localTime(el.dateTime);
  });
})();
