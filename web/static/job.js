// The job page: poll the job every 500 ms and update it in place until it finishes.
(function () {
  "use strict";
  var root = document.getElementById("job");
  if (!root) return;
  var url = root.dataset.pollUrl;
  var terminal = { succeeded: true, failed: true, canceled: true };
  var $ = function (id) { return document.getElementById(id); };
  var shownImages = -1;

  function show(id, visible) { $(id).hidden = !visible; }

  function renderImages(job) {
    if (job.images.length === shownImages) return;
    shownImages = job.images.length;
    var box = $("images");
    box.textContent = "";
    job.images.forEach(function (image, i) {
      var fig = document.createElement("figure");
      var img = document.createElement("img");
      img.src = image.url; img.width = image.width; img.height = image.height;
      img.alt = "seed " + image.seed;
      var cap = document.createElement("figcaption");
      var link = document.createElement("a");
      link.href = image.url; link.download = job.id + "-" + i + ".png"; link.textContent = "download";
      cap.appendChild(document.createTextNode("seed " + image.seed + " · "));
      cap.appendChild(link);
      fig.appendChild(img); fig.appendChild(cap); box.appendChild(fig);
    });
  }

  function render(job) {
    var badge = $("status").querySelector(".badge");
    badge.textContent = job.status; badge.className = "badge " + job.status;
    show("queued", job.status === "queued");
    if (job.queue_position !== null) $("queue-position").textContent = job.queue_position;
    show("running", job.status === "running");
    var bar = $("progress");
    bar.max = job.progress.total || 1; bar.value = job.progress.step;
    $("progress-text").textContent = "step " + job.progress.step + " of " + job.progress.total;
    var preview = $("preview");
    if (job.progress.preview_url) {
      // The preview is rewritten in place; its signed URL changes every second, which is
      // how often a new one can show.
      if (preview.dataset.url !== job.progress.preview_url) {
        preview.dataset.url = job.progress.preview_url;
        preview.src = job.progress.preview_url;
      }
      preview.hidden = false;
    }
    show("error", job.status === "failed");
    if (job.error) $("error-text").textContent = job.error;
    show("canceled", job.status === "canceled");
    show("cancel-form", !terminal[job.status]);
    renderImages(job);
  }

  function poll() {
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (job) {
        render(job);
        if (!terminal[job.status]) setTimeout(poll, 500);
      })
      .catch(function () { setTimeout(poll, 2000); });  // a hiccup: back off, keep going
  }

  if (!terminal[root.dataset.status]) setTimeout(poll, 500);
  else shownImages = $("images").children.length;
})();
