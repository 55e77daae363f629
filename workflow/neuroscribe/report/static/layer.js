// Renders a layer's neurons from window.NEUROSCRIBE_LAYER (layers/{model}/{layer}.data.js)
// one page at a time. Every text goes in through textContent, never innerHTML: labels come
// from models and LLMs and are untrusted.
(function () {
  "use strict";
  const data = window.NEUROSCRIBE_LAYER;
  const $ = (id) => document.getElementById(id);
  const state = { page: 0, rows: data.rows };

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function fmt(x) {
    if (x === null || x === undefined) return "–";
    return Math.abs(x) >= 1000 || Number.isInteger(x) ? String(x) : x.toPrecision(3);
  }

  function words(text) {
    return text.toLowerCase().split(/[^\p{L}\p{N}]+/u).filter(Boolean);
  }

  function setup() {
    const select = $("method");
    select.appendChild(el("option", "any method", "")).value = "";
    for (const m of data.methods) select.appendChild(el("option", m)).value = m;
    const head = el("tr");
    head.appendChild(el("th", "neuron"));
    head.appendChild(el("th", "top exemplar"));
    for (const m of data.methods) head.appendChild(el("th", m));
    $("head").appendChild(head);
    for (const id of ["filter", "method", "min-score", "sort"]) {
      $(id).addEventListener("input", () => { state.page = 0; apply(); });
    }
    $("prev").addEventListener("click", () => { state.page -= 1; render(); });
    $("next").addEventListener("click", () => { state.page += 1; render(); });
  }

  function apply() {
    const wanted = words($("filter").value);
    const method = $("method").value;
    const minText = $("min-score").value;
    const min = minText === "" ? null : Number(minText);
    const sort = $("sort").value;
    let rows = data.rows.filter((row) => {
      const entries = method ? [row.m[method]].filter(Boolean) : Object.values(row.m);
      if (min !== null && !entries.some((e) => e[1] !== null && e[1] >= min)) return false;
      if (!wanted.length) return true;
      const have = new Set(entries.flatMap((e) => words(e[0])));
      return wanted.every((w) => have.has(w));
    });
    if (sort !== "neuron") {
      const key = (row) => {
        const entries = method ? [row.m[method]].filter(Boolean) : Object.values(row.m);
        const scores = entries.map((e) => e[1]).filter((s) => s !== null);
        return scores.length ? Math.max(...scores) : null;
      };
      const sign = sort === "score-desc" ? -1 : 1;
      rows = rows.slice().sort((a, b) => {
        const ka = key(a), kb = key(b);
        if (ka === null) return kb === null ? a.n - b.n : 1;
        if (kb === null) return -1;
        return sign * (ka - kb) || a.n - b.n;
      });
    }
    state.rows = rows;
    render();
  }

  function render() {
    const size = data.pageSize;
    const pages = Math.max(1, Math.ceil(state.rows.length / size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    const body = $("rows");
    body.replaceChildren();
    for (const row of state.rows.slice(state.page * size, (state.page + 1) * size)) {
      const tr = el("tr", null, "neuron");
      tr.dataset.neuron = row.n;
      const link = el("a", row.n);
      link.href = data.neuronPage + row.n + ".html";
      tr.appendChild(el("td")).appendChild(link);
      const cell = tr.appendChild(el("td"));
      if (row.t) {
        const img = el("img", null, "mini");
        img.src = "../../" + row.t;
        img.alt = "top exemplar of neuron " + row.n;
        img.loading = "lazy";
        cell.appendChild(img);
      }
      for (const m of data.methods) {
        const td = tr.appendChild(el("td"));
        const entry = row.m[m];
        if (!entry) continue;
        td.appendChild(el("div", entry[0] || "–", "label"));
        const meta = [entry[1] === null ? null : "score " + fmt(entry[1])];
        if (entry[2] !== "ok") meta.push(entry[2]);
        const scores = row.e ? Object.entries(row.e).filter(([k]) => k.startsWith(m + " ")) : [];
        for (const [k, v] of scores) meta.push(k.slice(m.length + 1) + " " + fmt(v));
        const text = meta.filter(Boolean).join(" · ");
        if (text) td.appendChild(el("div", text, entry[2] === "ok" ? "muted small" : "error"));
      }
      body.appendChild(tr);
    }
    $("count").textContent = state.rows.length + " of " + data.rows.length + " neurons";
    $("page").textContent = "page " + (state.page + 1) + " of " + pages;
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages - 1;
    document.body.dataset.ready = "true";
  }

  setup();
  apply();
})();
