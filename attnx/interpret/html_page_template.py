"""The page's template, stylesheet and script (`html_page` fills and writes them).

Kept apart from `html_page` (the data, its checks and its encoding) because
they are one browser program, read and changed as such: `HTML` holds the
%NAME% placeholders that `html_page._document` fills (TITLE, SUMMARY,
OMITTED, CSS, JS, DATA); `JS` reads the inline JSON whose format
`html_page.FORMAT` names, decodes the quantised weights (`encode_weights`) and
draws the maps on canvases. Nothing here loads from the network: the page's
Content Security Policy forbids it.
"""

HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>%TITLE%</title>
<style>%CSS%</style>
</head>
<body>
<header>
<h1>%TITLE%</h1>
%SUMMARY%
%OMITTED%
<noscript><p class="warning">This page draws its maps with JavaScript: please enable it.</p></noscript>
</header>
<section id="controls">
<label>Example <select id="example-select"></select></label>
<label>Map <select id="map-select"></select></label>
<label>Head <select id="head-select"></select></label>
<label>Cell <input id="zoom" type="range" min="1" max="40" value="16"> <span id="zoom-value"></span></label>
<label><input id="row-scale" type="checkbox"> colour each row by its own range</label>
</section>
<section id="texts">
<dl>
<dt>Source</dt><dd id="source-text" dir="auto"></dd>
<dt>Reference</dt><dd id="reference-text" dir="auto"></dd>
<dt>Hypothesis</dt><dd id="hypothesis-text" dir="auto"></dd>
</dl>
</section>
<div id="map-title"></div>
<div id="map-message" class="warning" hidden></div>
<div id="hover-info" aria-live="polite">Hover a cell of the map to read its weight.</div>
<div id="query-tokens" title="queries: hover one to see its weights"></div>
<div id="panels">
<div id="heatmap-box"><div id="heatmap-stack"><canvas id="heatmap"></canvas><canvas id="heatmap-overlay"></canvas></div></div>
<div id="grid-panel" hidden>
<div id="grid-stack"><img id="grid-image" alt="the source image"><canvas id="grid-canvas"></canvas></div>
<p id="grid-caption"></p>
</div>
</div>
<div id="colorbar"><span id="colorbar-min"></span><canvas id="colorbar-canvas" width="256" height="12"></canvas><span id="colorbar-max"></span></div>
<div id="tooltip" hidden></div>
<script type="application/json" id="attnx-data">%DATA%</script>
<script>%JS%</script>
</body>
</html>
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .5em; }
table#summary { border-collapse: collapse; margin: .5em 0; }
#summary th, #summary td { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
#summary td { font-variant-numeric: tabular-nums; }
.warning { background: #fff3cd; border: 1px solid #e0c36c; padding: .4em .8em; margin: .5em 0; }
#controls { display: flex; flex-wrap: wrap; gap: .4em 1.2em; align-items: center; margin: .6em 0; }
#controls select { max-width: 40em; }
#texts dl { display: grid; grid-template-columns: max-content 1fr; gap: .1em 1em; margin: .3em 0; }
#texts dt { font-weight: 600; }
#texts dd { margin: 0; overflow-wrap: anywhere; max-height: 6em; overflow: auto; }
.token { display: inline-block; padding: 0 3px; margin: 1px; border-radius: 3px; background: #eef; }
.token.active { background: #fc6; }
#map-title { font-weight: 600; margin-top: .6em; }
#hover-info { min-height: 1.4em; margin: .3em 0; font-variant-numeric: tabular-nums; }
#query-tokens { max-height: 5.5em; overflow: auto; margin: .2em 0 .5em; }
#panels { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
#heatmap-box { overflow: auto; max-width: 100%; max-height: 78vh; border: 1px solid #ddd; }
#heatmap-stack, #grid-stack { position: relative; }
#heatmap, #grid-image { display: block; }
#heatmap-overlay, #grid-canvas { position: absolute; left: 0; top: 0; pointer-events: none; }
#grid-image { width: 320px; image-rendering: auto; }
#grid-canvas.alone { position: static; pointer-events: auto; }
#colorbar { display: flex; align-items: center; gap: .5em; margin: .5em 0; }
#colorbar-canvas { width: 256px; height: 12px; border: 1px solid #ccc; }
#tooltip { position: fixed; z-index: 10; pointer-events: none; background: rgba(20,20,20,.88);
  color: #fff; padding: 3px 7px; border-radius: 4px; font-size: 12px; max-width: 40em; }
"""

# ASCII only (the page is ASCII, and <script> text takes no character
# references): write other characters as \\u escapes.
JS = r"""
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var DATA = JSON.parse($("attnx-data").textContent);
  var LEVELS = DATA.levels, NOT_FINITE = DATA.not_finite;
  var LUT = new Uint8Array(DATA.colormap.match(/../g).map(function (h) { return parseInt(h, 16); }));
  var MAX_CANVAS = 16000;  // CSS px per side; browsers refuse canvases past ~32k device px
  var state = { example: 0, name: null, head: null, cell: 8, rowScale: false, layout: null, values: null };
  var cache = new WeakMap();

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A label as shown: whitespace made visible, long ones cut on the axes.
  function shown(label) {
    if (label === "") return "\u2205";
    if (/^\s+$/.test(label)) return label.replace(/\s/g, "\u2423");
    return label;
  }
  function short(label) {
    var chars = Array.from(shown(label));
    return chars.length > 18 ? chars.slice(0, 17).join("") + "\u2026" : chars.join("");
  }
  // A weight with at most 4 significant digits, and none finer than its
  // row's quantisation step (digits below the step would be noise).
  function fmt(v, step) {
    if (Number.isNaN(v)) return "not finite";
    if (v === 0) return "0";
    var digits = 4;
    if (step > 0) {
      var exponent = Math.floor(Math.log10(Math.abs(v)));
      digits = Math.max(1, Math.min(4, exponent + 1 - Math.ceil(Math.log10(step))));
    }
    return v.toPrecision(digits);
  }
  function stepOf(m, row) { return (m.hi[row] - m.lo[row]) / LEVELS; }

  function weightsOf(m) {
    var values = cache.get(m);
    if (values) return values;
    var rows = m.shape[0], cols = m.shape[1], bin = atob(m.data);
    values = new Float64Array(rows * cols);
    for (var i = 0; i < rows; i++) {
      var lo = m.lo[i], step = (m.hi[i] - m.lo[i]) / LEVELS;
      for (var j = 0; j < cols; j++) {
        var p = 2 * (i * cols + j);
        var q = bin.charCodeAt(p) | (bin.charCodeAt(p + 1) << 8);
        values[i * cols + j] = q === NOT_FINITE ? NaN : lo + q * step;
      }
    }
    cache.set(m, values);
    return values;
  }

  function example() { return DATA.examples[state.example]; }
  function mapsNamed(name) { return example().maps.filter(function (m) { return m.name === name; }); }
  function currentMap() {
    var maps = mapsNamed(state.name);
    for (var i = 0; i < maps.length; i++) if (String(maps[i].head) === state.head) return maps[i];
    return maps[0] || null;
  }
  function headOrder(a, b) {
    if (a.head === "mean") return -1;
    if (b.head === "mean") return 1;
    return a.head - b.head;
  }

  function fillSelect(select, items, keep) {
    select.textContent = "";
    items.forEach(function (item) {
      var option = el("option", "", item.text);
      option.value = item.value;
      select.appendChild(option);
    });
    var values = items.map(function (item) { return item.value; });
    select.value = values.indexOf(keep) >= 0 ? keep : (values[0] || "");
    return select.value;
  }

  function showExample() {
    var ex = example();
    $("source-text").textContent = ex.image ? "an image, " + ex.image.grid[0] + " x " +
      ex.image.grid[1] + " grid: " + ex.source.join(" ") : ex.source.join(" ");
    $("reference-text").textContent = ex.reference;
    $("hypothesis-text").textContent = ex.hypothesis;
    var names = [];
    ex.maps.forEach(function (m) { if (names.indexOf(m.name) < 0) names.push(m.name); });
    state.name = fillSelect($("map-select"), names.map(function (name) {
      var m = mapsNamed(name)[0];
      var missing = mapsNamed(name).filter(function (x) { return x.omitted; }).length;
      return { value: name, text: name + " \u2014 " + m.kind + ", layer " + m.layer +
        (missing ? " (" + missing + " not embedded)" : "") };
    }), state.name);
    showHeads();
  }

  function showHeads() {
    var maps = mapsNamed(state.name).slice().sort(headOrder);
    state.head = fillSelect($("head-select"), maps.map(function (m) {
      return { value: String(m.head), text: String(m.head) + (m.omitted ? " (not embedded)" : "") };
    }), state.head);
    state.cell = 0;  // fit the new map
    showMap();
  }

  function fitCell(m) {
    var room = Math.max(200, $("heatmap-box").parentNode.clientWidth - 180);
    return Math.max(1, Math.min(28, Math.floor(room / Math.max(1, m.shape[1]))));
  }

  function showMap() {
    var m = currentMap(), message = $("map-message");
    clearHover();
    setInfo("Hover a cell of the map to read its weight.");
    $("query-tokens").textContent = "";
    $("grid-panel").hidden = true;
    state.layout = null;
    if (!m) { message.hidden = false; message.textContent = "This example has no maps."; hideCanvas(); return; }
    $("map-title").textContent = m.name + " \u2014 " + m.kind + ", layer " + m.layer + ", head " +
      m.head + " (" + m.shape[0] + " queries x " + m.shape[1] + " keys)";
    if (m.omitted) {
      message.hidden = false;
      message.textContent = "The map " + m.name + ", head " + m.head + " (" + m.shape[0] + " x " +
        m.shape[1] + ") is not embedded in this page: " + m.omitted + ".";
      hideCanvas();
      return;
    }
    if (m.shape[0] === 0 || m.shape[1] === 0) {
      message.hidden = false;
      message.textContent = "The map " + m.name + " is empty (" + m.shape[0] + " x " + m.shape[1] + ").";
      hideCanvas();
      return;
    }
    message.hidden = true;
    var maxCell = Math.max(1, Math.floor(MAX_CANVAS / Math.max(m.shape[0], m.shape[1])));
    if (!state.cell) state.cell = fitCell(m);
    state.cell = Math.min(state.cell, maxCell);
    $("zoom").max = String(Math.min(40, maxCell));
    $("zoom").value = String(state.cell);
    $("zoom-value").textContent = state.cell + " px";
    state.values = weightsOf(m);
    drawHeatmap(m, state.values);
    showQueryTokens(m);
    if (gridOf(m)) { $("grid-panel").hidden = false; drawGrid(m, 0); }
  }

  function hideCanvas() {
    var canvas = $("heatmap");
    canvas.width = canvas.height = 0;
    canvas.style.width = canvas.style.height = "0px";
    $("heatmap-overlay").width = 0;
  }

  // The colour of value v: its place between the map's (or the row's) bounds.
  function colourRange(m, row) {
    if (state.rowScale) return [m.lo[row], m.hi[row]];
    var lo = 0, hi = 0;
    for (var i = 0; i < m.shape[0]; i++) { lo = Math.min(lo, m.lo[i]); hi = Math.max(hi, m.hi[i]); }
    return [lo, hi];
  }
  function paint(pixels, offset, v, range) {
    if (Number.isNaN(v)) { pixels[offset] = 255; pixels[offset + 1] = 0; pixels[offset + 2] = 255; }
    else {
      var span = range[1] - range[0];
      var t = span > 0 ? Math.round(255 * (v - range[0]) / span) : 255;
      t = Math.max(0, Math.min(255, t)) * 3;
      pixels[offset] = LUT[t]; pixels[offset + 1] = LUT[t + 1]; pixels[offset + 2] = LUT[t + 2];
    }
    pixels[offset + 3] = 255;
  }

  function drawHeatmap(m, values) {
    var ex = example(), rows = m.shape[0], cols = m.shape[1], cell = state.cell;
    var queries = ex.labels[m.q], keys = ex.labels[m.k];
    var canvas = $("heatmap"), ctx = canvas.getContext("2d");
    // Labels: one per cell when cells are tall enough, else every stride-th.
    var stride = cell >= 9 ? 1 : Math.ceil(9 / cell);
    var fontPx = stride === 1 ? Math.min(12, cell - 1) : 9;
    var font = fontPx + "px system-ui, sans-serif";
    ctx.font = font;
    var widest = function (labels) {
      var w = 0;
      for (var i = 0; i < labels.length; i += stride) w = Math.max(w, ctx.measureText(short(labels[i])).width);
      return Math.ceil(w);
    };
    var left = widest(queries) + 10, top = widest(keys) + 10;
    var width = left + cols * cell + 4, height = top + rows * cell + 4;
    var dpr = window.devicePixelRatio || 1;
    [canvas, $("heatmap-overlay")].forEach(function (c) {
      c.width = Math.round(width * dpr); c.height = Math.round(height * dpr);
      c.style.width = width + "px"; c.style.height = height + "px";
    });
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    // One pixel per weight, then scaled up without smoothing: fast at 512 x 512.
    var image = new ImageData(cols, rows), pixels = image.data;
    for (var i = 0; i < rows; i++) {
      var range = colourRange(m, i);
      for (var j = 0; j < cols; j++) paint(pixels, 4 * (i * cols + j), values[i * cols + j], range);
    }
    var small = document.createElement("canvas");
    small.width = cols; small.height = rows;
    small.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(small, left, top, cols * cell, rows * cell);
    ctx.fillStyle = "#222";
    ctx.font = font;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    for (i = 0; i < rows; i += stride) ctx.fillText(short(queries[i]), left - 5, top + (i + 0.5) * cell);
    ctx.textAlign = "left";
    for (j = 0; j < cols; j += stride) {
      ctx.save();
      ctx.translate(left + (j + 0.5) * cell, top - 5);
      ctx.rotate(-Math.PI / 2);
      ctx.fillText(short(keys[j]), 0, 0);
      ctx.restore();
    }
    state.layout = { left: left, top: top, cell: cell, rows: rows, cols: cols, dpr: dpr };
    // For tests and tools: where the cells are, in CSS px from the canvas's corner.
    canvas.dataset.left = left; canvas.dataset.top = top; canvas.dataset.cell = cell;
    drawColorbar(m);
  }

  function drawColorbar(m) {
    var ctx = $("colorbar-canvas").getContext("2d"), image = ctx.createImageData(256, 12);
    for (var x = 0; x < 256; x++) for (var y = 0; y < 12; y++) {
      var o = 4 * (y * 256 + x);
      image.data[o] = LUT[3 * x]; image.data[o + 1] = LUT[3 * x + 1]; image.data[o + 2] = LUT[3 * x + 2]; image.data[o + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    var range = colourRange(m, 0);
    $("colorbar-min").textContent = state.rowScale ? "row min" : fmt(range[0]);
    $("colorbar-max").textContent = state.rowScale ? "row max" : fmt(range[1]);
  }

  function showQueryTokens(m) {
    var box = $("query-tokens"), labels = example().labels[m.q];
    labels.forEach(function (label, i) {
      var span = el("span", "token query-token", shown(label));
      span.dir = "auto";
      span.dataset.index = i;
      span.addEventListener("mouseenter", function () { showRow(i); });
      box.appendChild(span);
    });
  }

  // ------------------------------------------------------------ hovering

  function setInfo(text, attrs) {
    var info = $("hover-info");
    info.textContent = text;
    ["query", "key", "weight"].forEach(function (k) { delete info.dataset[k]; });
    Object.keys(attrs || {}).forEach(function (k) { info.dataset[k] = attrs[k]; });
  }

  function clearHover() {
    $("tooltip").hidden = true;
    var overlay = $("heatmap-overlay");
    overlay.getContext("2d").clearRect(0, 0, overlay.width, overlay.height);
    document.querySelectorAll(".query-token.active").forEach(function (n) { n.classList.remove("active"); });
  }

  function outline(row, col) {
    var L = state.layout, overlay = $("heatmap-overlay"), ctx = overlay.getContext("2d");
    ctx.setTransform(L.dpr, 0, 0, L.dpr, 0, 0);
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    ctx.strokeStyle = "rgba(255,80,0,.9)";
    ctx.lineWidth = 1;
    ctx.strokeRect(L.left - 0.5, L.top + row * L.cell - 0.5, L.cols * L.cell + 1, L.cell + 1);
    if (col >= 0) {
      ctx.strokeStyle = "#f00";
      ctx.lineWidth = 2;
      ctx.strokeRect(L.left + col * L.cell - 1, L.top + row * L.cell - 1, L.cell + 2, L.cell + 2);
    }
  }

  function markToken(row) {
    document.querySelectorAll(".query-token.active").forEach(function (n) { n.classList.remove("active"); });
    var token = document.querySelector('.query-token[data-index="' + row + '"]');
    if (token) token.classList.add("active");
  }

  function showCell(row, col, x, y) {
    var m = currentMap(), ex = example(), v = state.values[row * m.shape[1] + col];
    var q = ex.labels[m.q][row], k = ex.labels[m.k][col], weight = fmt(v, stepOf(m, row));
    var text = "query " + row + " \u201c" + shown(q) + "\u201d \u2192 key " + col + " \u201c" + shown(k) + "\u201d: " + weight;
    setInfo(text, { query: row, key: col, weight: weight });
    var tip = $("tooltip");
    tip.textContent = text;
    tip.hidden = false;
    tip.style.left = (x + 14) + "px";
    tip.style.top = (y + 14) + "px";
    outline(row, col);
    markToken(row);
    if (gridOf(m)) drawGrid(m, row);
  }

  function showRow(row) {
    var m = currentMap();
    if (!state.layout) return;
    outline(row, -1);
    markToken(row);
    var label = shown(example().labels[m.q][row]), text = "query " + row + " \u201c" + label + "\u201d";
    if (gridOf(m)) text += drawGrid(m, row);
    setInfo(text, { query: row });
  }

  $("heatmap").addEventListener("mousemove", function (event) {
    var L = state.layout;
    if (!L) return;
    var col = Math.floor((event.offsetX - L.left) / L.cell), row = Math.floor((event.offsetY - L.top) / L.cell);
    if (row < 0 || col < 0 || row >= L.rows || col >= L.cols) { clearHover(); return; }
    showCell(row, col, event.clientX, event.clientY);
  });
  $("heatmap").addEventListener("mouseleave", clearHover);

  // ------------------------------------------------------------ image grid

  // The grid of a spatial map whose keys are the example's image cells, or null.
  function gridOf(m) {
    var image = example().image;
    if (!image || m.kind !== "spatial" || m.omitted) return null;
    return image.grid[0] * image.grid[1] === m.shape[1] ? image.grid : null;
  }

  // Draws query `row`'s weights over the grid; returns a caption.
  function drawGrid(m, row) {
    var ex = example(), grid = gridOf(m), rows = grid[0], cols = grid[1];
    var img = $("grid-image"), canvas = $("grid-canvas"), ctx = canvas.getContext("2d");
    var withImage = !!ex.image.png;
    img.hidden = !withImage;
    canvas.classList.toggle("alone", !withImage);
    if (withImage && img.dataset.example !== String(state.example)) {
      img.dataset.example = String(state.example);
      img.onload = function () { drawGrid(currentMap(), state.gridRow || 0); };
      img.src = "data:image/png;base64," + ex.image.png;
    }
    state.gridRow = row;
    var width = withImage ? img.clientWidth : Math.min(320, 40 * cols);
    var height = withImage ? img.clientHeight : width * rows / cols;
    if (!width || !height) return "";
    canvas.width = width; canvas.height = height;
    canvas.style.width = width + "px"; canvas.style.height = height + "px";
    var values = state.values, base = row * m.shape[1], best = 0, max = -Infinity, min = Infinity;
    for (var c = 0; c < rows * cols; c++) {
      var v = values[base + c];
      if (v > max) { max = v; best = c; }
      if (v < min) min = v;
    }
    var cw = width / cols, ch = height / rows, pixel = [0, 0, 0, 0];
    ctx.clearRect(0, 0, width, height);
    for (var r = 0; r < rows; r++) for (var k = 0; k < cols; k++) {
      v = values[base + r * cols + k];
      var t = max > min ? (v - min) / (max - min) : 1;
      if (withImage) {
        // A spotlight: the image shows through where the query looks.
        ctx.fillStyle = Number.isNaN(v) ? "rgba(255,0,255,.8)" : "rgba(0,0,0," + (0.8 * (1 - t)).toFixed(3) + ")";
      } else {
        paint(pixel, 0, Number.isNaN(v) ? NaN : min + t * (max - min), [min, max]);
        ctx.fillStyle = "rgb(" + pixel[0] + "," + pixel[1] + "," + pixel[2] + ")";
      }
      ctx.fillRect(Math.floor(k * cw), Math.floor(r * ch), Math.ceil(cw), Math.ceil(ch));
    }
    var caption = " over the " + rows + " x " + cols + " grid: max " + fmt(max, stepOf(m, row)) + " at cell (" +
      Math.floor(best / cols) + ", " + (best % cols) + ") \u201c" + shown(ex.labels[m.k][best]) + "\u201d";
    $("grid-caption").textContent = "query " + row + " \u201c" + shown(ex.labels[m.q][row]) + "\u201d" + caption;
    return caption;
  }

  $("grid-canvas").addEventListener("mousemove", function (event) {
    var m = currentMap(), grid = m && gridOf(m), canvas = $("grid-canvas");
    if (!grid || !canvas.width) return;
    var r = Math.floor(event.offsetY / (canvas.height / grid[0])), k = Math.floor(event.offsetX / (canvas.width / grid[1]));
    if (r < 0 || k < 0 || r >= grid[0] || k >= grid[1]) return;
    showCell(state.gridRow || 0, r * grid[1] + k, event.clientX, event.clientY);
  });

  // ------------------------------------------------------------ controls

  $("example-select").addEventListener("change", function (e) { state.example = +e.target.value; showExample(); });
  $("map-select").addEventListener("change", function (e) { state.name = e.target.value; showHeads(); });
  $("head-select").addEventListener("change", function (e) { state.head = e.target.value; state.cell = 0; showMap(); });
  $("zoom").addEventListener("input", function (e) { state.cell = +e.target.value; showMap(); });
  $("row-scale").addEventListener("change", function (e) { state.rowScale = e.target.checked; showMap(); });

  fillSelect($("example-select"), DATA.examples.map(function (ex, i) {
    var text = ex.hypothesis || ex.reference || ex.source.join(" ");
    var chars = Array.from(text);
    return { value: String(i), text: i + ": " + (chars.length > 60 ? chars.slice(0, 59).join("") + "\u2026" : text) };
  }), "0");
  if (DATA.examples.length) showExample();
  else { $("map-message").hidden = false; $("map-message").textContent = "This page has no examples."; }
  document.body.dataset.renderMs = String(Math.round(performance.now()));
  document.body.dataset.ready = "true";
})();
"""
