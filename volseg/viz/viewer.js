// volseg's viewer page: NiiVue (window.niivue, embedded before this script) showing one case at a
// time from the JSON block #volseg-viewer-data. State for tests and people: #volseg-viewer's
// data-state is "loading", "ready" or "error" (with the message in .vs-status).
(function () {
  "use strict";
  const root = document.getElementById("volseg-viewer");
  const status = root.querySelector(".vs-status");
  const fail = (msg) => { root.dataset.state = "error"; status.textContent = msg; };
  let data;
  try {
    data = JSON.parse(document.getElementById("volseg-viewer-data").textContent);
  } catch (e) { fail("viewer data unreadable: " + e); return; }
  if (typeof niivue === "undefined") { fail("NiiVue's script is missing from this page."); return; }
  const probe = document.createElement("canvas").getContext("webgl2");
  if (!probe) { fail("This browser has no WebGL2, which the viewer needs; the static figures above still apply."); return; }

  const $ = (sel) => root.querySelector(sel);
  const labels = data.labels;  // [{value, name, color: [r, g, b]}]
  const shown = {};  // label value -> visible
  labels.forEach((l) => { shown[l.value] = true; });
  const state = { caseIndex: 0, layers: { pred: true, truth: false }, opacity: 0.5, window: null };
  const nv = new niivue.Niivue({
    backColor: [0, 0, 0, 1], show3Dcrosshair: true, isColorbar: false, dragAndDropEnabled: false,
    crosshairColor: [1, 1, 0, 1], multiplanarForceRender: true,
  });
  nv.attachToCanvas($(".vs-canvas"));
  nv.setInterpolation(true);  // nearest neighbour: voxels and label borders as stored

  function labelLut() {
    const top = Math.max(0, ...labels.map((l) => l.value));
    const lut = { R: [], G: [], B: [], A: [], I: [], labels: [] };
    for (let v = 0; v <= top; v++) {
      const l = labels.find((x) => x.value === v);
      const c = l ? l.color : [0, 0, 0];
      lut.R.push(c[0]); lut.G.push(c[1]); lut.B.push(c[2]); lut.I.push(v);
      lut.A.push(v > 0 && l && shown[v] ? 255 : 0);
      lut.labels.push(l ? l.name : (v === 0 ? "background" : "label " + v));
    }
    return lut;
  }

  function layerVolume(kind) { return nv.volumes.find((v) => v.volsegLayer === kind); }

  function applyOverlays() {
    ["pred", "truth"].forEach((kind) => {
      const vol = layerVolume(kind);
      if (!vol) return;
      vol.setColormapLabel(labelLut());
      vol.opacity = state.layers[kind] ? state.opacity : 0;
    });
    nv.updateGLVolume();
  }

  function applyWindow() {
    const scan = layerVolume("image");
    if (!scan || !state.window) return;
    scan.cal_min = state.window[0]; scan.cal_max = state.window[1];
    nv.updateGLVolume();
  }

  function windowOptions(c) {
    const sel = $(".vs-window");
    sel.innerHTML = "";
    const opts = [["auto (1st-99th percentile)", c.window], ["full range", c.range]];
    if (c.ct) Object.entries(data.ct_windows).forEach(([k, w]) => opts.push([k, w]));
    opts.forEach(([name, w], i) => {
      const o = document.createElement("option");
      o.textContent = name; o.value = String(i); o.dataset.lo = w[0]; o.dataset.hi = w[1];
      sel.appendChild(o);
    });
    const pick = c.ct ? 2 : 0;  // CT opens in the soft-tissue window
    sel.value = String(pick);
    state.window = opts[pick][1];
  }

  function labelName(v) {
    if (!v) return "background";
    const l = labels.find((x) => x.value === v);
    return l ? l.name : "label " + v;
  }

  function readout(d) {
    const parts = [];
    const at = (kind) => { const i = nv.volumes.findIndex((v) => v.volsegLayer === kind); return i < 0 ? null : d.values[i]; };
    const img = at("image"), pred = at("pred"), truth = at("truth");
    if (d.mm) parts.push("mm " + Array.from(d.mm.slice(0, 3)).map((x) => x.toFixed(1)).join(", "));
    if (img) parts.push((data.cases[state.caseIndex].ct ? "HU " : "intensity ") + Number(img.value).toFixed(1));
    if (pred) parts.push("prediction: " + labelName(Math.round(pred.value)));
    if (truth) parts.push("truth: " + labelName(Math.round(truth.value)));
    $(".vs-readout").textContent = parts.join("  |  ");
  }
  nv.onLocationChange = readout;

  async function loadCase(i) {
    root.dataset.state = "loading";
    status.textContent = "loading " + data.cases[i].name + " ...";
    state.caseIndex = i;
    const c = data.cases[i];
    while (nv.volumes.length) nv.removeVolume(nv.volumes[nv.volumes.length - 1]);
    windowOptions(c);
    for (const kind of ["image", "pred", "truth"]) {
      if (!c[kind]) continue;
      const opts = { base64: c[kind], name: c.name + "_" + kind + ".nii.gz" };
      if (kind === "image") Object.assign(opts, { colormap: "gray", cal_min: state.window[0], cal_max: state.window[1] });
      else opts.opacity = state.layers[kind] ? state.opacity : 0;  // the label table comes in applyOverlays
      const vol = await niivue.NVImage.loadFromBase64(opts);
      vol.volsegLayer = kind;
      nv.addVolume(vol);
    }
    $(".vs-layer-truth").disabled = !c.truth;
    $(".vs-layer-pred").disabled = !c.pred;
    applyWindow();
    applyOverlays();
    nv.setSliceType(Number(root.querySelector(".vs-view.vs-on").dataset.slice));
    nv.drawScene();
    nv.createOnLocationChange();  // fill the readout for the starting crosshair
    $(".vs-note").textContent = c.note;
    status.textContent = "";
    root.dataset.state = "ready";
    root.dataset.case = c.name;
  }

  // controls
  const caseSel = $(".vs-case");
  data.cases.forEach((c, i) => { const o = document.createElement("option"); o.value = String(i); o.textContent = c.name; caseSel.appendChild(o); });
  caseSel.addEventListener("change", () => loadCase(Number(caseSel.value)).catch((e) => fail(String(e))));
  root.querySelectorAll(".vs-view").forEach((b) => b.addEventListener("click", () => {
    root.querySelectorAll(".vs-view").forEach((x) => x.classList.remove("vs-on"));
    b.classList.add("vs-on");
    nv.setSliceType(Number(b.dataset.slice));
  }));
  $(".vs-window").addEventListener("change", (e) => {
    const o = e.target.selectedOptions[0];
    state.window = [Number(o.dataset.lo), Number(o.dataset.hi)];
    applyWindow();
  });
  $(".vs-opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value); applyOverlays(); });
  ["pred", "truth"].forEach((kind) => {
    const box = $(".vs-layer-" + kind);
    box.checked = state.layers[kind];
    box.addEventListener("change", () => { state.layers[kind] = box.checked; applyOverlays(); });
  });
  const list = $(".vs-labels");
  labels.forEach((l) => {
    const lab = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = true; box.className = "vs-label"; box.dataset.value = l.value;
    box.addEventListener("change", () => { shown[l.value] = box.checked; applyOverlays(); });
    const sw = document.createElement("span");
    sw.className = "vs-swatch"; sw.style.background = "rgb(" + l.color.join(",") + ")";
    lab.append(box, sw, document.createTextNode(" " + l.name + " (" + l.value + ")"));
    list.appendChild(lab);
  });
  loadCase(0).catch((e) => fail("cannot load " + data.cases[0].name + ": " + e));
})();
