// The alnus service page: token once per tab (sessionStorage), an image, a lesion box drawn on it, the prediction.
// Plain JavaScript, served by the service itself; everything from the server is shown as text (textContent), never
// as HTML, and the only requests are to this server.
"use strict";

(() => {
  const TOKEN_KEY = "alnus-token";
  const $ = (id) => document.getElementById(id);
  // A number as the service reads one in a box (plain ASCII digits; alnus.data.roi).
  const NUMBER = /^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;
  let NO_RESULT = ""; // the result panel's words before any prediction (from the page)

  const state = {
    auth: "bearer",
    info: null,
    file: null,
    image: null, // {width, height} of the decoded image (the box is in these pixels)
    picture: null, // the preview drawn on the canvas (may be scaled down)
    box: null, // [x, y, w, h] in image pixels
    drag: null,
    fileCount: 0, // images chosen so far: tells one image's inputs from another's
    shownFor: null, // the inputs (`inputsKey`) of the result on screen; null when none is shown
    roiHint: "", // what the hint under the image says when the typed box is fine
    asked: 0, // predictions sent so far: an answer to an earlier one than the last is not shown
    // A file of several frames (a DICOM cine loop). Frames are counted from 0, as the service and the frame column of
    // `alnus predict` count them, so that a frame chosen here is the same frame there.
    frames: null, // how many frames the file has; null for a single image
    frame: null, // the frame chosen; null when there is no choice, or what is typed is not one of the file's frames
    shownFrame: null, // the frame whose picture is on the canvas (the box is drawn on it, Predict sends it)
    frameHint: "", // what the hint under the frame picker says when the frame typed is fine
    previewing: false, // a frame's picture is on its way: one at a time (see `loadFrame`)
  };

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
    }
  }

  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: "Bearer " + token } : {};
  }

  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    } catch (error) {
      throw new ApiError(0, "The service cannot be reached; check that it is running.");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (error) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : "the service answered " + response.status;
      throw new ApiError(response.status, detail);
    }
    return body;
  }

  function show(id, visible) {
    $(id).hidden = !visible;
  }

  function say(id, text) {
    $(id).textContent = text || "";
  }

  // ------------------------------------------------------------------------------------------------ token, model
  function askForToken(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    show("work", false);
    show("forget", false);
    show("token-section", true);
    say("token-message", message);
    $("token").value = "";
    $("token").focus();
  }

  async function loadModel() {
    try {
      state.info = await api("/v1/model");
    } catch (error) {
      if (error.status === 401) {
        askForToken(
          "The service did not accept this token. Check it with whoever runs the service and enter it again."
        );
        return;
      }
      say("startup-error", error.message);
      show("startup-error", true);
      return;
    }
    show("token-section", false);
    show("work", true);
    show("forget", state.auth === "bearer");
    showModel(state.info);
  }

  function showModel(info) {
    say("model-name", info.model.name);
    say("model-id", info.model.name + (info.model.version ? " (package of " + info.model.version + ")" : ""));
    say("model-weights", info.model.weights_sha256);
    const t = info.threshold;
    say(
      "model-threshold",
      t ? t.value.toFixed(4) + " (" + t.rule + "; " + t.description + ")" : "none frozen yet: no calls are made"
    );
    const input = info.input;
    say(
      "model-input",
      input.description ||
        (input.needs_roi ? "the lesion box (" + input.roi_mode + " crop, margin " + input.roi_margin + ")" : "the whole image") +
          ", resized to " + input.size + " px"
    );
    state.roiHint = input.needs_roi
      ? "This model needs the lesion box: drag across the lesion on the image (or type x,y,w,h)."
      : "This model looks at the whole image; a box is drawn on the heat map only.";
    showBoxProblem("");
    const use = $("intended-use");
    use.replaceChildren(
      ...info.intended_use.map((line) => {
        const p = document.createElement("p");
        p.textContent = line;
        return p;
      })
    );
    const validation = info.validation;
    const table = $("validation");
    table.tHead.replaceChildren();
    table.tBodies[0].replaceChildren();
    if (validation && validation.columns.length) {
      say("validation-note", validation.note);
      const head = table.tHead.insertRow();
      for (const name of validation.columns) {
        const th = document.createElement("th");
        th.scope = "col";
        th.textContent = name;
        head.appendChild(th);
      }
      for (const row of validation.rows) {
        const tr = table.tBodies[0].insertRow();
        for (const cell of row) tr.insertCell().textContent = cell;
      }
      show("validation", true);
    } else {
      say("validation-note", "No validation results: " + info.validation_source + ".");
      show("validation", false);
    }
    say("model-card", info.model_card || "The package has no model card.");
    showReaderRule(info.reader_rule);
    updatePredict();
  }

  // The BI-RADS choice is offered only when the package carries a reader rule (the service refuses it otherwise).
  function showReaderRule(rule) {
    const has = Boolean(rule);
    if (!has) $("birads").value = "";
    show("birads-row", has);
    show("birads-hint", has);
    show("model-reader-rule-term", has);
    show("model-reader-rule", has);
    const caveats = has && rule.caveats ? rule.caveats.join(" ") : "";
    say("model-reader-rule", has ? [sentence(rule.rule), rule.applied_here, caveats].join(" ").trim() : "");
  }

  // A sentence of the service's (lower case, no full stop) as one of the page's.
  function sentence(text) {
    return text ? text.charAt(0).toUpperCase() + text.slice(1) + (text.endsWith(".") ? "" : ".") : "";
  }

  // -------------------------------------------------------------------------------------------------- the image
  async function chooseFile(file) {
    if (!file) return;
    state.file = file;
    state.fileCount += 1;
    const chosen = state.fileCount;
    state.image = null;
    state.picture = null;
    // A new file is read at its default frame (a cine loop's middle one) until another is chosen for it.
    showFrames(null);
    setBox(null);
    // A new image may be another patient's: their reading is not carried over.
    $("birads").value = "";
    clearResult();
    say("error", "");
    say("status", "Reading the image…");
    updatePredict();
    try {
      const preview = await askPreview(file, null);
      if (chosen !== state.fileCount) return; // another file was chosen meanwhile: its own preview is shown
      showFrames(preview.frame);
      if (!(await showPicture(preview, chosen))) return;
      const frame = state.frames ? "; frame " + frameOf(state.shownFrame) + " (the middle one) is shown" : "";
      say("status", "Image of " + preview.width + " × " + preview.height + " pixels loaded" + frame + ".");
    } catch (error) {
      if (chosen !== state.fileCount) return;
      state.file = null;
      showFrames(null);
      say("status", "");
      drawImage();
      failed(error);
    }
    updatePredict();
  }

  // The decoded image (`frame`: null for the file's default one) as the service shows it, to draw the box on.
  async function askPreview(file, frame) {
    const form = new FormData();
    form.append("image", file);
    if (frame !== null) form.append("frame", String(frame));
    return api("/v1/preview", { method: "POST", body: form });
  }

  // Draw a preview on the canvas once its picture is decoded; false when another file was chosen meanwhile.
  async function showPicture(preview, chosen) {
    const picture = new Image();
    picture.alt = "";
    picture.src = preview.image;
    try {
      await picture.decode();
    } catch (error) {
      throw new ApiError(0, "The browser could not show the service's picture of the image; choose the file again.");
    }
    if (chosen !== state.fileCount) return false;
    state.image = { width: preview.width, height: preview.height };
    state.picture = picture;
    state.shownFrame = preview.frame ? preview.frame.index : null;
    const canvas = $("canvas");
    canvas.width = picture.naturalWidth;
    canvas.height = picture.naturalHeight;
    drawImage();
    return true;
  }

  // -------------------------------------------------------------------------------------------------- the frame
  // The picker is shown when the service says the file has more than one frame (`frame` of its answer), set to the
  // frame it read. A PNG or TIFF sent without a frame comes back without a count (counting a crafted TIFF's pages
  // is slow: alnus.data.images.frame_choice), so a multi-page TIFF gets no picker and is read at its first page.
  function showFrames(info) {
    const count = info && info.count > 1 ? info.count : null;
    state.frames = count;
    state.frame = count ? info.index : null;
    state.shownFrame = null;
    show("frame-row", Boolean(count));
    show("frame-hint", Boolean(count));
    if (!count) return;
    for (const id of ["frame", "frame-slider"]) {
      $(id).max = String(count - 1);
      $(id).value = String(info.index);
    }
    say("frame-range", "of " + frameRange());
    state.frameHint =
      "This file has " + count + " frames (a cine loop), counted from 0 as in the frame column of alnus predict: " +
      "frame 0 is the first, frame " + (count - 1) + " the last. The middle one is shown first; Predict uses the " +
      "frame shown, with the box drawn on it.";
    showFrameProblem("");
  }

  function frameRange() {
    return "frames 0–" + (state.frames - 1);
  }

  // "2 of frames 0–4": a frame as the page names it (counted from 0, with the file's range so that it cannot be
  // read as counted from 1).
  function frameOf(index) {
    return index + " of " + frameRange();
  }

  // Why the text in the frame field is not one of the file's frames; "" when it is one.
  function frameProblem(text) {
    if (/^[0-9]+$/.test(text) && Number(text) < state.frames) return "";
    const typed = text ? "Frame '" + text + "' is not one of this file's: choose" : "Choose";
    return typed + " a whole number from 0 to " + (state.frames - 1) + " (frames are counted from 0).";
  }

  function showFrameProblem(problem) {
    say("frame-hint", problem || state.frameHint);
    $("frame-hint").classList.toggle("problem", Boolean(problem));
  }

  // A frame picked with the slider or typed: taken at once when it is one of the file's (its picture is asked for);
  // while typing, a number that is not one is told under the picker, and on leaving the field as an error too.
  function onFramePicked(event) {
    // A `change` that comes as the picker is hidden (a new file chosen while the field had focus) picks nothing.
    if (!state.frames) return;
    const text = event.target.value.trim();
    const problem = frameProblem(text);
    state.frame = problem ? null : Number(text);
    if (!problem) {
      const other = event.target.id === "frame" ? "frame-slider" : "frame";
      $(other).value = String(state.frame);
      say("error", "");
    } else if (event.type === "change") {
      say("error", problem);
    }
    showFrameProblem(problem);
    updatePredict();
    inputsEdited();
    if (!problem) loadFrame();
  }

  // The picture of the frame chosen, asked for one at a time: while one is on its way, more choices (a slider
  // dragged, an arrow key held) only change which frame is wanted, and the last one is asked for when it comes. One
  // client may have only a few requests in progress at once (alnus.serve.clients); Predict waits for the frame it
  // would send to be the one on the canvas.
  async function loadFrame() {
    if (state.previewing) return;
    state.previewing = true;
    try {
      while (state.file && state.frames && state.frame !== null && state.frame !== state.shownFrame) {
        const chosen = state.fileCount;
        const wanted = state.frame;
        say("status", "Reading frame " + wanted + "…");
        try {
          const preview = await askPreview(state.file, wanted);
          if (chosen !== state.fileCount || !(await showPicture(preview, chosen))) continue;
        } catch (error) {
          if (chosen !== state.fileCount) continue;
          say("status", "");
          failed(error); // the picker stays as it is: choosing a frame again asks again
          return;
        }
        if (state.frame === state.shownFrame) say("status", "Frame " + frameOf(state.shownFrame) + " is shown.");
      }
    } finally {
      state.previewing = false;
      updatePredict();
    }
  }

  function drawImage() {
    const canvas = $("canvas");
    const context = canvas.getContext("2d");
    if (!state.picture) {
      canvas.width = 0;
      canvas.height = 0;
      return;
    }
    context.drawImage(state.picture, 0, 0, canvas.width, canvas.height);
    const box = state.drag ? dragBox() : state.box;
    if (box) {
      const scale = canvas.width / state.image.width;
      context.lineWidth = Math.max(2, Math.round(canvas.width / 300));
      context.strokeStyle = "#3cff3c";
      context.strokeRect(box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale);
    }
  }

  // Canvas position of a pointer event, in image pixels (the canvas may be shown smaller than it is).
  function imagePoint(event) {
    const canvas = $("canvas");
    const rect = canvas.getBoundingClientRect();
    const x = ((event.clientX - rect.left) / rect.width) * state.image.width;
    const y = ((event.clientY - rect.top) / rect.height) * state.image.height;
    return [clamp(x, 0, state.image.width), clamp(y, 0, state.image.height)];
  }

  function clamp(value, low, high) {
    return Math.min(Math.max(value, low), high);
  }

  function dragBox() {
    const [x0, y0] = state.drag.start;
    const [x1, y1] = state.drag.end;
    const x = Math.round(Math.min(x0, x1));
    const y = Math.round(Math.min(y0, y1));
    const w = Math.round(Math.max(x0, x1)) - x;
    const h = Math.round(Math.max(y0, y1)) - y;
    return [x, y, w, h];
  }

  function setBox(box) {
    state.box = box;
    $("roi").value = box ? box.join(",") : "";
    showBoxProblem("");
    drawImage();
    updatePredict();
    inputsEdited();
  }

  function onPointerDown(event) {
    if (!state.image || event.button !== 0) return;
    event.preventDefault();
    $("canvas").setPointerCapture(event.pointerId);
    const point = imagePoint(event);
    state.drag = { start: point, end: point };
  }

  function onPointerMove(event) {
    if (!state.drag) return;
    state.drag.end = imagePoint(event);
    drawImage();
  }

  function onPointerUp(event) {
    if (!state.drag) return;
    state.drag.end = imagePoint(event);
    const box = dragBox();
    state.drag = null;
    // A click without a drag keeps the box there was.
    setBox(box[2] >= 2 && box[3] >= 2 ? box : state.box);
  }

  // While typing (`input`) a box that parses is taken at once, so Predict is ready before the field loses focus; a
  // half-typed one is not an error yet, but the hint under the image says what is wrong with it (a new-user review:
  // Predict only greyed out, without a word). On `change` (the field left) that is said as an error.
  function onRoiTyped(event) {
    const typing = event && event.type === "input";
    const text = $("roi").value.trim();
    if (!text) return setBox(null);
    const problem = boxProblem(text);
    if (!problem) {
      state.box = boxFields(text).map(Number);
      say("error", "");
      drawImage();
    } else {
      state.box = null;
      if (!typing) say("error", problem);
    }
    showBoxProblem(problem);
    updatePredict();
    inputsEdited();
  }

  // Why a typed box is not one, in the words of the service's refusal (alnus.data.roi.parse_box, and the box lying
  // inside the image); "" when it is one.
  function boxProblem(text) {
    const fields = boxFields(text);
    if (fields.length !== 4) {
      return "The box '" + text + "' has " + fields.length + " number(s); expected 4: x,y,w,h in pixels of the image.";
    }
    const names = ["x", "y", "w", "h"];
    for (let i = 0; i < 4; i++) {
      if (!NUMBER.test(fields[i]) || !Number.isInteger(Number(fields[i]))) {
        return "In the box '" + text + "', " + names[i] + "='" + fields[i] + "' is not a whole number of pixels.";
      }
    }
    const [x, y, w, h] = fields.map(Number);
    if (w <= 0 || h <= 0) return "The box's width and height must be above 0 (got w=" + w + ", h=" + h + ").";
    const image = state.image;
    if (image && (x < 0 || y < 0 || x + w > image.width || y + h > image.height)) {
      return (
        "The box " + [x, y, w, h].join(",") + " extends outside the " + image.width + " × " + image.height +
        " image; keep it inside, in pixels of the image."
      );
    }
    return "";
  }

  // The box's fields as typed: x,y,w,h, also in brackets ([x, y, w, h] or (x, y, w, h)) as the service reads them.
  function boxFields(text) {
    const inner = /^[[(].*[\])]$/.test(text) ? text.slice(1, -1) : text;
    return inner.split(",").map((field) => field.trim());
  }

  // The hint under the image: what is wrong with the typed box, or (none) what the model needs.
  function showBoxProblem(problem) {
    say("roi-hint", problem || state.roiHint);
    $("roi-hint").classList.toggle("problem", Boolean(problem));
  }

  // What a prediction is made of: the image (and its frame), the lesion box and the BI-RADS reading.
  function inputsKey() {
    const birads = state.info && state.info.reader_rule ? $("birads").value : "";
    const frame = state.frames ? String(state.frame) : "";
    return [state.fileCount, frame, state.box ? state.box.join(",") : "", birads].join("|");
  }

  // The inputs a clinician can change after a prediction, named as a sentence starts ("The lesion box or the frame").
  function inputsNamed() {
    const names = ["lesion box"];
    if (state.info && state.info.reader_rule) names.push("BI-RADS");
    if (state.frames) names.push("frame");
    const listed = names.map((name) => "the " + name);
    const words = listed.length > 1 ? listed.slice(0, -1).join(", ") + " or " + listed[listed.length - 1] : listed[0];
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  // A result made with another box, BI-RADS or frame than those now on the page is no longer theirs: it is taken
  // away (a new-user review: the old probability, call and heat map stayed with "Done." after the box was changed).
  function inputsEdited() {
    if (state.shownFor === null || state.shownFor === inputsKey()) return;
    clearResult(inputsNamed() + " changed: press Predict for the result with them.");
    say("status", "");
  }

  // Predict needs the image on the canvas, the box when the model needs one, and for a cine loop the frame chosen
  // on the canvas (the box is drawn on that one).
  function updatePredict() {
    const needsBox = state.info && state.info.input.needs_roi;
    const frameShown = !state.frames || (state.frame !== null && state.frame === state.shownFrame);
    $("predict").disabled = !state.file || !state.image || (needsBox && !state.box) || !frameShown;
  }

  // --------------------------------------------------------------------------------------------------- predict
  function clearResult(why) {
    state.shownFor = null;
    show("result", false);
    say("no-result", why || NO_RESULT);
    show("no-result", true);
    $("heatmap").removeAttribute("src");
  }

  async function predict() {
    if (!state.file) return;
    const form = new FormData();
    form.append("image", state.file);
    if (state.box) form.append("roi", state.box.join(","));
    form.append("heatmap", state.info.heatmap ? "true" : "false");
    const birads = state.info.reader_rule ? $("birads").value : "";
    if (birads) form.append("birads", birads);
    if (state.frames) form.append("frame", String(state.frame));
    const sentFor = inputsKey();
    const ticket = ++state.asked;
    $("predict").disabled = true;
    say("error", "");
    say("status", "Predicting…");
    let result;
    try {
      result = await api("/v1/predict", { method: "POST", body: form });
    } catch (error) {
      if (ticket !== state.asked) return; // a later prediction was asked for: its answer speaks
      say("status", "");
      updatePredict();
      return failed(error);
    }
    // A later prediction was asked for (the box changed and Predict was pressed again): this answer is not shown and
    // says nothing, whenever it comes (a second attack review: a late first answer put "changed while predicting"
    // under the second's result).
    if (ticket !== state.asked) return;
    updatePredict();
    if (inputsKey() !== sentFor) {
      say("status", inputsNamed() + " changed while predicting: press Predict for the result with them.");
      return;
    }
    showResult(result);
    state.shownFor = sentFor;
    say("status", "Done.");
  }

  function showResult(result) {
    say("positive-label", result.positive_label);
    // A model output, not a calibrated risk: shown as a number, not as a percentage.
    say("probability", result.probability.toFixed(3));
    if (result.call === null) {
      say("call", "none");
      say("threshold", "");
    } else {
      say("call", result.call);
      say(
        "threshold",
        "(probability ≥ " + result.threshold.toFixed(4) + " is called " + result.positive_label + "; rule " +
          result.threshold_rule + ")"
      );
    }
    say("threshold-note", result.threshold_note);
    // Which frame of a cine loop the result is of (null for a single image).
    const frame = result.frame;
    const frames = frame ? "frames 0–" + (frame.count - 1) + ", counted from 0 as in alnus predict" : "";
    say("result-frame", frame ? "The result of frame " + frame.index + " (of " + frames + ")." : "");
    show("result-frame", Boolean(frame));
    showReader(result.reader_with_ai);
    // An implausible lesion box (tiny, or nearly the whole image): the probability is shown, with the reason.
    say("box-warning", result.warning ? "Warning: " + result.warning : "");
    show("box-warning", Boolean(result.warning));
    if (result.heatmap) {
      $("heatmap").src = result.heatmap;
      say("heatmap-note", result.heatmap_note || "");
      show("heatmap-figure", true);
    } else {
      show("heatmap-figure", false);
    }
    // Why an answer came without the heat map asked for (an image too large to map, say).
    say("no-heatmap", !result.heatmap && result.heatmap_note ? result.heatmap_note : "");
    show("no-heatmap", !result.heatmap && Boolean(result.heatmap_note));
    show("no-result", false);
    show("result", true);
    // The result sits below the image on a laptop screen: bring its panel into view, heading included, below the
    // sticky notice (whose height depends on the window's width), not under it.
    const header = document.querySelector("header.top");
    const panel = $("result").closest("section") || $("result");
    panel.style.scrollMarginTop = (header ? header.getBoundingClientRect().height : 0) + 8 + "px";
    panel.scrollIntoView({ block: "start", behavior: "smooth" });
  }

  // The radiologist's call and the call with AI (when a BI-RADS was sent): hidden when none was.
  function showReader(reader) {
    show("reader-result", Boolean(reader));
    if (!reader) return;
    say("reader-birads", reader.birads);
    // Calls are the radiologist's recommendation (positive: biopsy), never a diagnosis.
    const words = { 1: "positive (biopsy)", 0: "negative" };
    say("reader-call", reader.reader_call === null ? "none (no call)" : words[reader.reader_call]);
    say("with-ai-call", reader.with_ai_call === null ? "none (no call)" : words[reader.with_ai_call]);
    // The model's probability was below the rule's value for a reading the radiologist called positive.
    say(
      "ruled-out",
      reader.ruled_out ? "(ruled out by the model: probability below " + reader.value.toFixed(3) + ")" : ""
    );
    say("reader-rule", sentence(reader.rule) + " " + reader.note);
  }

  function failed(error) {
    if (error.status === 401) {
      askForToken("The service no longer accepts the token. Enter it again.");
      return;
    }
    say("error", error.message);
  }

  // --------------------------------------------------------------------------------------------------- wiring
  function wire() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      say("token-message", "");
      loadModel();
    });
    $("forget").addEventListener("click", () => askForToken(""));
    $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
    const zone = $("drop-zone");
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (event.dataTransfer.files.length) chooseFile(event.dataTransfer.files[0]);
    });
    const canvas = $("canvas");
    canvas.addEventListener("pointerdown", onPointerDown);
    canvas.addEventListener("pointermove", onPointerMove);
    canvas.addEventListener("pointerup", onPointerUp);
    canvas.addEventListener("pointercancel", () => {
      state.drag = null;
      drawImage();
    });
    $("roi").addEventListener("change", onRoiTyped);
    $("roi").addEventListener("input", onRoiTyped);
    $("clear-box").addEventListener("click", () => setBox(null));
    $("birads").addEventListener("change", inputsEdited);
    $("frame").addEventListener("input", onFramePicked);
    $("frame").addEventListener("change", onFramePicked);
    $("frame-slider").addEventListener("input", onFramePicked);
    $("predict").addEventListener("click", predict);
  }

  async function start() {
    NO_RESULT = $("no-result").textContent.trim();
    wire();
    try {
      const health = await api("/healthz");
      state.auth = health.auth;
    } catch (error) {
      say("startup", "");
      say("startup-error", error.message);
      show("startup-error", true);
      return;
    }
    say("startup", "");
    show("startup", false);
    if (state.auth === "bearer" && !sessionStorage.getItem(TOKEN_KEY)) {
      askForToken("");
      return;
    }
    await loadModel();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
