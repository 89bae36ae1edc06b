// The generate form: a preview of the image (and mask) chosen to edit, and the strength shown as
// the slider moves. Nothing is sent before the form is submitted.
(function () {
  "use strict";
  document.querySelectorAll("input[type=file][data-preview]").forEach(function (input) {
    input.addEventListener("change", function () {
      var img = document.getElementById(input.dataset.preview);
      if (!img) { return; }
      if (img.src) { URL.revokeObjectURL(img.src); }
      if (input.files && input.files[0]) {
        img.src = URL.createObjectURL(input.files[0]);
        img.hidden = false;
      } else {
        img.removeAttribute("src");
        img.hidden = true;
      }
    });
  });
  // Choosing a model puts its defaults (steps, guidance, sampler) in the fields.
  var model = document.getElementById("model");
  var defaults = document.getElementById("model-defaults");
  if (model && defaults) {
    var byName = JSON.parse(defaults.textContent);
    model.addEventListener("change", function () {
      var chosen = byName[model.value];
      if (!chosen) { return; }
      ["steps", "guidance", "sampler"].forEach(function (name) {
        var input = document.getElementById(name);
        if (input) { input.value = chosen[name]; }
      });
    });
  }
  var strength = document.getElementById("strength");
  var shown = document.getElementById("strength-value");
  if (strength && shown) {
    strength.addEventListener("input", function () { shown.textContent = strength.value; });
  }
})();
