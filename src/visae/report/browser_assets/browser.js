// The visae latent browser: three pages (index, sae, latent) drawn from data/*.js files, which
// call VISAE.put(name, object). Scripts, not fetch(): Chromium refuses fetch() of file:// URLs.
// No network, no libraries.
"use strict";

window.VISAE = (() => {
  const store = {};
  const pending = {};

  function put(name, obj) { store[name] = obj; }

  function load(name, src) {
    if (store[name]) return Promise.resolve(store[name]);
    if (!pending[name]) {
      pending[name] = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = src;
        s.onload = () => (store[name] ? resolve(store[name]) : reject(new Error(`${src} did not define ${name}`)));
        s.onerror = () => reject(new Error(`could not load ${src}`));
        document.head.appendChild(s);
      });
    }
    return pending[name];
  }

  // -- small DOM helpers ------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "style" && typeof v === "object") Object.assign(e.style, v);
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...children) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    for (const c of children.flat(Infinity)) if (c) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }

  function fmt(v, digits = 3) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(digits - 1);
    return v.toPrecision(digits).replace(/(\.\d*?[1-9])0+$/, "$1").replace(/\.0+$/, "");
  }
  function pct(v) { return v === null || v === undefined ? "–" : `${(100 * v).toFixed(1)}%`; }

  // -- addressing -------------------------------------------------------------------------------
  function query(s, extra) {
    const p = new URLSearchParams({ model: s.model, dataset: s.dataset, layer: s.layer, sae: s.sae, ...(extra || {}) });
    return p.toString();
  }
  const saeUrl = (s) => `sae.html?${query(s)}`;
  const latentUrl = (s, j) => `latent.html?${query(s, { latent: j })}`;

  function manifest() {
    const m = store.manifest;
    if (!m) throw new Error("data/manifest.js is missing: rebuild with `visae report browser`");
    return m;
  }
  function saeByKey(key) { return manifest().saes.find((s) => s.key === key) || null; }

  function findSae(params) {
    const want = ["model", "dataset", "layer", "sae"].filter((k) => params.get(k) !== null);
    const hits = manifest().saes.filter((s) => want.every((k) => String(s[k]) === params.get(k)));
    if (hits.length !== 1) {
      const what = want.map((k) => `${k}=${params.get(k)}`).join(", ") || "nothing";
      throw new Error(hits.length ? `${what} names ${hits.length} SAEs: add dataset= and layer=`
        : `no SAE in this browser is ${what}`);
    }
    return hits[0];
  }

  function crumbs(...parts) {
    const nav = el("nav", { class: "crumbs" }, el("a", { href: "index.html" }, "all SAEs"));
    for (const p of parts) nav.append(" › ", p);
    return nav;
  }

  function fail(err) {
    console.error(err);
    const app = document.getElementById("app");
    app.prepend(el("div", { class: "error", role: "alert" }, String(err && err.message ? err.message : err)));
  }

  function ci(block) {
    if (!block) return "–";
    const v = fmt(block.value);
    return block.low !== undefined && block.low !== null ? `${v} [${fmt(block.low)}, ${fmt(block.high)}]` : v;
  }

  // -- the index page ---------------------------------------------------------------------------
  function indexPage(app) {
    const m = manifest();
    document.title = "visae · latent browser";
    app.replaceChildren(el("h1", {}, "Latent browser"),
      el("p", { class: "lede" }, `${m.saes.length} SAEs with a latent index. Each SAE's page lists all its latents `
        + "(sortable, filterable); each latent's page shows its top images with its patch heatmaps."));
    const models = [...new Set(m.saes.map((s) => s.model))];
    for (const model of models) {
      const saes = m.saes.filter((s) => s.model === model);
      const rows = saes.map((s) => {
        const cross = s.comparisons.filter((c) => c.cross_model);
        const seed = s.comparisons.filter((c) => !c.cross_model);
        const purity = s.profile && s.profile.rows.find((r) => r.name.startsWith("mean purity"));
        const matched = (cs) => cs.map((c) => `${pct(c.matched_fraction)} (null ${pct(c.null_matched_fraction)})`).join("; ") || "–";
        return el("tr", {},
          el("td", {}, el("a", { href: saeUrl(s), class: "sae-link" }, s.sae)),
          el("td", {}, s.dataset), el("td", { class: "num" }, s.layer), el("td", {}, s.architecture || "–"),
          el("td", { class: "num" }, s.width), el("td", { class: "num" }, pct(s.alive_fraction)),
          el("td", { class: "num" }, s.images),
          el("td", { class: "num" }, purity ? `${fmt(purity.value.value)} (random ${fmt(purity.baseline && purity.baseline.value)})` : "–"),
          el("td", { class: "num" }, matched(cross)), el("td", { class: "num" }, matched(seed)));
      });
      app.append(el("section", {}, el("h2", {}, model),
        el("table", { class: "grid" },
          el("thead", {}, el("tr", {}, ["SAE", "dataset", "layer", "architecture", "latents", "alive", "images",
            "purity of top images", "matched to other model", "matched to seed twin"].map((h) => el("th", {}, h)))),
          el("tbody", {}, rows))));
    }
    app.append(el("p", { class: "note" }, "Matched: share of live latents whose one-to-one partner correlates above "
      + "the comparison's threshold, against the permutation null. Purity: share of a latent's top images in their "
      + "most common class, mean over latents, against random latents."));
  }

  // -- the SAE page -----------------------------------------------------------------------------
  function summaryCards(s) {
    const cards = [];
    const entry = Object.entries(s.entry || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    cards.push(el("div", { class: "card" }, el("h3", {}, "SAE"),
      el("dl", {}, el("dt", {}, "architecture"), el("dd", {}, `${s.architecture || "–"}${entry ? ` (${entry})` : ""}`),
        el("dt", {}, "latents"), el("dd", {}, `${s.width}, ${pct(s.alive_fraction)} alive`),
        el("dt", {}, "indexed images"), el("dd", {}, `${s.images} held-out images of ${s.dataset}`),
        el("dt", {}, "density"), el("dd", {}, fmt(s.density)))));
    const pair = (rows, title) => el("div", { class: "card" }, el("h3", {}, title),
      el("table", { class: "pairs" }, el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", {}, "this SAE"), el("th", {}, "baseline"))),
        el("tbody", {}, rows.map((r) => el("tr", {}, el("td", {}, r.name),
          el("td", { class: "num" }, (typeof r.value === "object" && r.value !== null ? ci(r.value) : fmt(r.value))
            + (r.std !== undefined && r.std !== null ? ` ± ${fmt(r.std)}` : "")),
          el("td", { class: "num" }, r.baseline === undefined || r.baseline === null ? "–"
            : `${typeof r.baseline === "object" ? ci(r.baseline) : fmt(r.baseline)} (${r.baseline_label || "baseline"})`
              + (r.ceiling !== undefined && r.ceiling !== null ? `; ceiling ${fmt(r.ceiling)}` : "")))))));
    if (s.profile && s.profile.rows.length) cards.push(pair(s.profile.rows, "Abstraction and invariance"));
    if (s.saebench && s.saebench.length) cards.push(pair(s.saebench, "SAEBench"));
    if (s.comparisons.length) {
      cards.push(el("div", { class: "card" }, el("h3", {}, "Comparisons"),
        el("table", { class: "pairs" }, el("thead", {}, el("tr", {}, ["with", "matched", "null", "mean r", "null r"].map((h) => el("th", {}, h)))),
          el("tbody", {}, s.comparisons.map((c) => {
            const other = c.other ? saeByKey(c.other) : null;
            return el("tr", {}, el("td", {}, other ? el("a", { href: saeUrl(other) }, c.label) : c.label, c.cross_model ? "" : ` (${c.other_identity.sae})`),
              el("td", { class: "num" }, pct(c.matched_fraction)), el("td", { class: "num" }, pct(c.null_matched_fraction)),
              el("td", { class: "num" }, fmt(c.mean_matched_correlation)), el("td", { class: "num" }, fmt(c.null_mean_matched_correlation)));
          }))),
        el("p", { class: "note" }, `matched: share of live latents with a one-to-one partner above r = ${fmt(s.comparisons[0].threshold)}`)));
    }
    if ((s.interventions || []).length) {
      cards.push(el("div", { class: "card wide" }, el("h3", {}, "Interventions"),
        s.interventions.map((iv) => el("p", {}, el("b", {}, `${iv.task} (${iv.dataset}): `), iv.finding || ""))));
    }
    return el("div", { class: "cards" }, cards);
  }

  function saePage(app, params) {
    const s = findSae(params);
    document.title = `${s.model} · ${s.sae}`;
    app.replaceChildren(crumbs(`${s.model} · ${s.sae}`), el("h1", {}, `${s.model} · ${s.sae}`),
      el("p", { class: "lede" }, `layer ${s.layer} · ${s.dataset} · ${s.width} latents`), summaryCards(s),
      el("p", { class: "loading" }, "loading the latent table…"));
    return load(`table/${s.key}`, `data/${s.key}/table.js`).then((t) => {
      app.querySelector(".loading").remove();
      app.append(new LatentTable(s, t).element);
    });
  }

  class LatentTable {
    constructor(s, t) {
      this.s = s;
      this.t = t;
      this.cols = t.columns.filter((c) => !c.hidden);
      const h = new URLSearchParams(location.hash.slice(1));
      this.sort = h.get("sort") || "latent";
      this.desc = h.get("desc") === "1";
      this.page = Number(h.get("page") || 0);
      this.size = Number(h.get("size") || 100);
      this.alive = h.get("alive") !== "0";
      this.filters = {};
      for (const c of this.cols) {
        for (const k of ["min", "max", "has"]) {
          const v = h.get(`${k}.${c.id}`);
          if (v !== null) this.filters[`${k}.${c.id}`] = v;
        }
      }
      this.body = el("tbody");
      this.count = el("span", { class: "count" });
      this.pager = el("span", { class: "pager" });
      const head = el("tr", {}, this.cols.map((c) => el("th", {
        class: `sortable ${c.type === "text" ? "" : "num"}`, title: c.help, "data-col": c.id,
        onclick: () => this.sortBy(c.id),
      }, c.label, el("span", { class: "arrow" }))));
      const filterRow = el("tr", { class: "filters" }, this.cols.map((c) => el("th", {}, c.type === "text"
        ? this.input(`has.${c.id}`, "contains", "text")
        : el("span", { class: "range" }, this.input(`min.${c.id}`, "≥", "number"), this.input(`max.${c.id}`, "≤", "number")))));
      this.head = head;
      const alive = el("input", { type: "checkbox", id: "alive-only", checked: this.alive,
        onchange: (e) => { this.alive = e.target.checked; this.page = 0; this.render(); } });
      const size = el("select", { onchange: (e) => { this.size = Number(e.target.value); this.page = 0; this.render(); } },
        [50, 100, 200, 500, 1000].map((n) => el("option", { value: n, selected: n === this.size }, `${n} rows`)));
      const reset = el("button", { type: "button", onclick: () => {
        this.filters = {};
        for (const i of filterRow.querySelectorAll("input")) i.value = "";
        this.page = 0; this.render();
      } }, "clear filters");
      this.element = el("section", { class: "latents" }, el("h2", {}, "Latents"),
        el("div", { class: "controls" }, el("label", {}, alive, " live latents only"), size, reset, this.count, this.pager),
        el("div", { class: "scroll" }, el("table", { class: "grid latent-table", id: "latent-table" },
          el("thead", {}, head, filterRow), this.body)),
        el("p", { class: "note" }, "Click a header to sort (again to reverse); hover it for what the column is. "
          + "Empty cells: not measured (dead latents, latents without a profile)."));
      this.render();
      // the filter row sticks right under the header row, whatever the font makes its height
      requestAnimationFrame(() => {
        for (const th of filterRow.children) th.style.top = `${head.getBoundingClientRect().height}px`;
      });
    }

    input(key, placeholder, type) {
      return el("input", { type, step: "any", placeholder, value: this.filters[key] || "", "data-filter": key,
        oninput: (e) => { if (e.target.value === "") delete this.filters[key]; else this.filters[key] = e.target.value;
          this.page = 0; this.render(); } });
    }

    sortBy(id) {
      if (this.sort === id) this.desc = !this.desc;
      else { this.sort = id; this.desc = this.cols.find((c) => c.id === id).type !== "text" && id !== "latent"; }
      this.page = 0;
      this.render();
    }

    rows() {
      const d = this.t.data;
      let idx = [...Array(this.t.rows).keys()];
      if (this.alive) idx = idx.filter((j) => d.frequency[j] > 0);
      for (const [key, raw] of Object.entries(this.filters)) {
        const [kind, id] = [key.slice(0, 3), key.slice(4)];
        const v = d[id];
        if (!v) continue;
        if (kind === "has") {
          const needle = raw.toLowerCase();
          idx = idx.filter((j) => v[j] !== null && String(v[j]).toLowerCase().includes(needle));
        } else {
          const x = Number(raw);
          if (!Number.isFinite(x)) continue;
          idx = idx.filter((j) => v[j] !== null && (kind === "min" ? v[j] >= x : v[j] <= x));
        }
      }
      const v = d[this.sort];
      const sign = this.desc ? -1 : 1;
      const text = this.cols.find((c) => c.id === this.sort).type === "text";
      idx.sort((a, b) => {
        const x = v[a], y = v[b];
        if (x === null && y === null) return a - b;
        if (x === null) return 1;  // not measured: last either way
        if (y === null) return -1;
        const c = text ? String(x).localeCompare(String(y)) : x - y;
        return c !== 0 ? sign * c : a - b;
      });
      return idx;
    }

    cell(c, j) {
      const v = this.t.data[c.id][j];
      if (c.id === "latent") return el("td", { class: "num" }, el("a", { href: latentUrl(this.s, j) }, j));
      if (c.link) {
        const comp = this.s.comparisons[c.link.comparison];
        const partner = this.t.data[c.link.latent][j];
        const other = comp.other ? saeByKey(comp.other) : null;
        if (v === null || partner < 0) return el("td", { class: "num" }, "–");
        return el("td", { class: "num" }, fmt(v), " ", other
          ? el("a", { href: latentUrl(other, partner), class: "partner", title: `${comp.label}, latent ${partner}` }, `→ ${partner}`)
          : el("span", { class: "partner" }, `→ ${partner}`));
      }
      return el("td", { class: c.type === "text" ? "" : "num" }, c.type === "text" ? (v === null ? "–" : v) : fmt(v));
    }

    render() {
      const idx = this.rows();
      const pages = Math.max(1, Math.ceil(idx.length / this.size));
      this.page = Math.min(this.page, pages - 1);
      const shown = idx.slice(this.page * this.size, (this.page + 1) * this.size);
      this.body.replaceChildren(...shown.map((j) => el("tr", { "data-latent": j }, this.cols.map((c) => this.cell(c, j)))));
      for (const th of this.head.children) {
        const on = th.dataset.col === this.sort;
        th.classList.toggle("sorted", on);
        th.querySelector(".arrow").textContent = on ? (this.desc ? " ▼" : " ▲") : "";
        th.setAttribute("aria-sort", on ? (this.desc ? "descending" : "ascending") : "none");
      }
      this.count.textContent = `${idx.length} of ${this.t.rows} latents`;
      const go = (p) => () => { this.page = p; this.render(); };
      this.pager.replaceChildren(
        el("button", { type: "button", disabled: this.page === 0, onclick: go(this.page - 1) }, "‹ prev"),
        ` page ${this.page + 1} of ${pages} `,
        el("button", { type: "button", disabled: this.page >= pages - 1, onclick: go(this.page + 1) }, "next ›"));
      const h = new URLSearchParams({ sort: this.sort, desc: this.desc ? 1 : 0, page: this.page, size: this.size,
        alive: this.alive ? 1 : 0, ...this.filters });
      history.replaceState(null, "", `#${h.toString()}`);
    }
  }

  // -- the latent page --------------------------------------------------------------------------
  const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];  // inferno-like
  function colour(t) {
    const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(x));
    const f = x - i;
    return STOPS[i].map((a, k) => Math.round(a + f * (STOPS[i + 1][k] - a)));
  }

  // heatmaps: zlib-deflated uint8 grids, base64; inflated by the browser's own DecompressionStream
  const decoded = new WeakMap();
  function heatBytes(chunk) {
    if (!decoded.has(chunk)) {
      if (typeof DecompressionStream === "undefined") {
        return Promise.reject(new Error("this browser lacks DecompressionStream (Chromium 80+, Firefox 113+, Safari 16.4+)"));
      }
      const bin = Uint8Array.from(atob(chunk.heat), (ch) => ch.charCodeAt(0));
      const stream = new Blob([bin]).stream().pipeThrough(new DecompressionStream("deflate"));
      decoded.set(chunk, new Response(stream).arrayBuffer().then((buf) => new Uint8Array(buf)));
    }
    return decoded.get(chunk);
  }

  function drawHeat(canvas, bytes, offset, gh, gw) {
    canvas.width = gw;
    canvas.height = gh;
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(gw, gh);
    for (let p = 0; p < gh * gw; p++) {
      const q = bytes[offset + p];
      if (!q) continue;
      const t = q / 255;  // weak patches nearly transparent, the strongest opaque
      const [r, g, b] = colour(0.35 + 0.65 * t);
      img.data.set([r, g, b, Math.round(255 * (0.08 + 0.87 * t))], 4 * p);
    }
    ctx.putImageData(img, 0, 0);
  }

  const THUMB = 100;  // displayed thumbnail side, CSS px
  function thumbnail(set, slot) {
    const per = set.side * set.side;
    const sheet = Math.floor(slot / per), k = slot % per;
    const inSheet = Math.min(per, set.images - sheet * per);
    const cols = Math.min(set.side, inSheet), rows = Math.ceil(inSheet / set.side);
    const [r, c] = [Math.floor(k / set.side), k % set.side];
    return el("img", { src: set.sheets[sheet], alt: "", class: set.cell < THUMB / 2 ? "sprite pixelated" : "sprite",
      style: { width: `${cols * THUMB}px`, height: `${rows * THUMB}px`, left: `${-c * THUMB}px`, top: `${-r * THUMB}px` } });
  }

  function histogram(counts, max, zeros, n) {
    const W = 420, H = 150, pad = { l: 44, r: 10, t: 10, b: 34 };
    const top = Math.max(1, ...counts);
    const bw = (W - pad.l - pad.r) / counts.length;
    const y = (v) => pad.t + (H - pad.t - pad.b) * (1 - v / top);
    const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img",
      "aria-label": "histogram of the latent's image-level activation" });
    counts.forEach((v, i) => {
      const lo = (max * i) / counts.length, hi = (max * (i + 1)) / counts.length;
      g.append(svg("rect", { x: pad.l + i * bw + 1, y: y(v), width: Math.max(1, bw - 2), height: y(0) - y(v), class: "bar" },
        svg("title", {}, `${fmt(lo)}–${fmt(hi)}: ${v} images`)));
    });
    g.append(svg("line", { x1: pad.l, x2: W - pad.r, y1: y(0), y2: y(0), class: "axis" }),
      svg("line", { x1: pad.l, x2: pad.l, y1: pad.t, y2: y(0), class: "axis" }),
      svg("text", { x: pad.l, y: H - 18, class: "tick", "text-anchor": "start" }, "0"),
      svg("text", { x: W - pad.r, y: H - 18, class: "tick", "text-anchor": "end" }, fmt(max)),
      svg("text", { x: (W + pad.l) / 2, y: H - 3, class: "label", "text-anchor": "middle" }, "image-level activation (max over patches)"),
      svg("text", { x: pad.l - 6, y: pad.t + 8, class: "tick", "text-anchor": "end" }, String(top)),
      svg("text", { x: pad.l - 6, y: y(0), class: "tick", "text-anchor": "end" }, "0"));
    return el("figure", {}, g, el("figcaption", {}, `${n - zeros} of ${n} images > 0, in ${counts.length} bins; `
      + `${zeros} images at 0 not drawn.`));
  }

  function classBars(names, ids, freq, mean) {
    const classes = ids.map((c) => names[c] ?? String(c));
    const rowH = 18, W = 420, left = 110, H = rowH * classes.length + 6;
    const top = Math.max(1e-9, ...freq.map((v) => v || 0));
    const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "firing rate per class" });
    classes.forEach((name, i) => {
      const v = freq[i] || 0;
      const w = (W - left - 60) * (v / top);
      g.append(svg("text", { x: left - 6, y: i * rowH + 13, class: "tick", "text-anchor": "end" }, name),
        svg("rect", { x: left, y: i * rowH + 3, width: Math.max(0.5, w), height: rowH - 6, class: "bar" },
          svg("title", {}, `${name}: fires on ${pct(v)} of its images, mean activation ${fmt(mean[i])}`)),
        svg("text", { x: left + w + 4, y: i * rowH + 13, class: "tick" }, pct(v)));
    });
    return el("figure", {}, g, el("figcaption", {}, "share of each class's indexed images the latent fires on"
      + (ids.length < names.length ? ` (the ${ids.length} of ${names.length} classes it fires on most)` : "")));
  }

  function statList(s, d, k) {
    const items = [];
    const add = (label, value, title) => items.push(el("dt", { title }, label), el("dd", {}, value));
    add("fires on", `${pct(d.frequency[k])} of ${s.images} images`);
    add("max activation", fmt(d.max_activation[k]));
    add("top class", d.top_class[k] ? `${d.top_class[k]} (${pct(d.top_class_share[k])} of top ${d.top})` : "–");
    const p = d.profile ? Object.fromEntries(Object.entries(d.profile).map(([key, v]) => [key, v[k]])) : null;
    if (p) {
      add("purity", fmt(p.purity), "share of its top images in their most common class");
      if ("coarse_purity" in p) add("coarse purity", fmt(p.coarse_purity));
      add("LCA depth", fmt(p.lca_depth), "depth of the lowest common ancestor of its top images' classes");
      if ("category" in p) add("category", p.category || "–");
    }
    const dl = el("dl", { class: "stats" }, items);
    const shifts = p ? Object.keys(p).filter((key) => key.startsWith("invariance_")
      && !["invariance_baseline", "invariance_n_valid"].includes(key)) : [];
    if (!shifts.length) return dl;
    return [dl, el("h3", { class: "sub", title: "share of its top images it still fires on strongly after each shift" },
      "Invariance"),
      el("table", { class: "pairs" }, el("thead", {}, el("tr", {}, el("th", {}, "shift"), el("th", {}, "this latent"),
        el("th", { title: "how often it fires that strongly on random images anyway" }, "random images"))),
        el("tbody", {}, shifts.map((key) => el("tr", {}, el("td", {}, key.slice(11)), el("td", { class: "num" }, fmt(p[key])),
          el("td", { class: "num" }, fmt(p.invariance_baseline))))))];
  }
  function matchesBlock(s, d, k) {
    if (!s.comparisons.length) return null;
    const items = s.comparisons.map((c, i) => {
      const cols = d.matches[i];
      const m = cols.match[k] >= 0 || cols.best[k] >= 0
        ? { match: cols.match[k], r: cols.r[k], best: cols.best[k], best_r: cols.best_r[k] } : null;
      const other = c.other ? saeByKey(c.other) : null;
      const link = (j, r) => (j < 0 ? "none" : [other
        ? el("a", { href: latentUrl(other, j), class: "match-link", "data-kind": c.cross_model ? "cross" : "seed" }, `latent ${j}`)
        : `latent ${j}`, ` (r = ${fmt(r)})`]);
      const title = c.cross_model ? `best match in ${c.label}` : `stability vs second seed (${c.other_identity.sae})`;
      return el("div", { class: "match" }, el("h3", {}, title),
        m ? el("p", {}, "one-to-one match: ", link(m.match, m.r),
          m.best !== m.match && m.best >= 0 ? ["; most correlated: ", link(m.best, m.best_r)] : "") : el("p", {}, "dead latent: no match"),
        el("p", { class: "note" }, `pair: ${pct(c.matched_fraction)} of live latents matched above r = ${fmt(c.threshold)} `
          + `(permutation null ${pct(c.null_matched_fraction)})`));
    });
    return el("section", {}, el("h2", {}, "Matches"), el("div", { class: "matches" }, items));
  }

  function interventionsBlock(s, d, k) {
    const list = d.interventions[k];
    if (!list.length) return null;
    return el("section", {}, el("h2", {}, "Interventions"), list.map((e) => {
      const methods = e.order;
      const metrics = e.metrics.filter((m) => methods.some((x) => e.methods[x][m] !== null));
      const info = (s.interventions || []).find((i) => i.task === e.task);
      return el("div", { class: "card wide" },
        el("h3", {}, `${e.task} on ${e.dataset}: chosen for class ${e.class_name}`),
        el("div", { class: "scroll" }, el("table", { class: "grid" },
          el("thead", {}, el("tr", {}, el("th", {}, "method"), el("th", {}, "latent"), metrics.map((m) => el("th", { class: "num" }, m)))),
          el("tbody", {}, methods.map((x) => el("tr", { class: x === e.chosen ? "chosen" : "" },
            el("td", {}, x), el("td", { class: "num" }, fmt(e.methods[x].latent)),
            metrics.map((m) => el("td", { class: "num" }, fmt(e.methods[x][m])))))))),
        info && info.finding ? el("p", { class: "note" }, info.finding) : null);
    }));
  }

  function latentPage(app, params) {
    const s = findSae(params);
    const j = Number(params.get("latent"));
    if (!Number.isInteger(j) || j < 0 || j >= s.width) throw new Error(`latent=${params.get("latent")} is not a latent of ${s.sae} (0..${s.width - 1})`);
    const c = Math.floor(j / s.chunk), k = j - c * s.chunk;
    document.title = `${s.model} · ${s.sae} · latent ${j}`;
    return load(`latents/${s.key}/${c}`, `data/${s.key}/latents_${String(c).padStart(3, "0")}.js`)
      .then((d) => heatBytes(d).then((bytes) => {
      const set = manifest().image_sets[s.image_set];
      const [gh, gw] = d.grid;
      const nav = el("span", { class: "prevnext" },
        j > 0 ? el("a", { href: latentUrl(s, j - 1) }, "‹ latent " + (j - 1)) : "",
        j < s.width - 1 ? el("a", { href: latentUrl(s, j + 1) }, "latent " + (j + 1) + " ›") : "");
      const overlay = el("input", { type: "checkbox", checked: true, id: "show-heat",
        onchange: (e) => grid.classList.toggle("no-heat", !e.target.checked) });
      const alpha = el("input", { type: "range", min: 0, max: 100, value: 85,
        oninput: (e) => grid.style.setProperty("--heat-opacity", e.target.value / 100) });
      const cards = [];
      for (let r = 0; r < d.top; r++) {
        const image = d.images[k][r];
        if (image < 0) continue;
        const canvas = el("canvas", { class: "heat", "data-rank": r });
        drawHeat(canvas, bytes, (k * d.top + r) * gh * gw, gh, gw);
        const p = d.patch[k][r];
        const box = p >= 0 ? el("div", { class: "top-patch", title: "the patch of the image-level maximum", style: {
          left: `${(100 * (p % gw)) / gw}%`, top: `${(100 * Math.floor(p / gw)) / gh}%`,
          width: `${100 / gw}%`, height: `${100 / gh}%` } }) : null;
        const label = d.labels[k][r];
        cards.push(el("figure", { class: "top-image" },
          el("div", { class: "thumb", style: { width: `${THUMB}px`, height: `${THUMB}px` } }, thumbnail(set, d.slots[k][r]), canvas, box),
          el("figcaption", {}, el("b", {}, fmt(d.values[k][r])), el("span", { class: "note" }, ` #${r + 1}`), el("br"),
            label >= 0 ? s.classes[label] : "?", el("br"), el("span", { class: "note" }, `image ${image}`))));
      }
      const grid = el("div", { class: "top-grid" }, cards.length ? cards : el("p", {}, "This latent fired on none of the indexed images."));
      app.replaceChildren(crumbs(el("a", { href: saeUrl(s) }, `${s.model} · ${s.sae}`), `latent ${j}`),
        el("header", { class: "latent-head" }, el("h1", {}, `Latent ${j}`), nav),
        el("p", { class: "lede" }, `${s.model} · ${s.sae} · layer ${s.layer} · ${s.dataset}`),
        el("div", { class: "latent-body" },
          el("section", { class: "images" }, el("h2", {}, `Top ${d.top} images`),
            el("div", { class: "controls" }, el("label", {}, overlay, " patch heatmap"), el("label", {}, " opacity ", alpha)),
            grid,
            el("p", { class: "note" }, `Heatmap: the latent's activation on each of the ${gh}×${gw} patches, `
              + `relative to its maximum ${fmt(d.max_activation[k])}; the outlined patch is the image's maximum.`)),
          el("aside", {}, el("h2", {}, "Summary"), statList(s, d, k))),
        cards.length ? el("div", { class: "charts" },
          el("section", {}, el("h2", {}, "Activation histogram"), histogram(d.hist[k], d.max_activation[k], d.zeros[k], s.images)),
          el("section", {}, el("h2", {}, "Per-class firing rate"), classBars(s.classes, d.classes[k], d.class_frequency[k], d.class_mean[k])))
          : el("p", { class: "note" }, `A dead latent: 0 on all ${s.images} indexed images.`),
        ...[matchesBlock(s, d, k), interventionsBlock(s, d, k)].filter(Boolean));
    }));
  }

  function main() {
    const app = document.getElementById("app");
    const params = new URLSearchParams(location.search);
    const page = document.body.dataset.page;
    try {
      const done = page === "sae" ? saePage(app, params) : page === "latent" ? latentPage(app, params) : indexPage(app);
      Promise.resolve(done).then(() => document.body.setAttribute("data-ready", "1"), fail);
    } catch (err) {
      fail(err);
    }
  }

  document.addEventListener("DOMContentLoaded", main);
  return { put, load, fmt, get: (name) => store[name] || null };
})();
