// The ConceptCaps explorer: renders window.CONCEPTCAPS_EXPLORER (data.js, written by
// `conceptcaps explore`) as a concept browser and a latent pad. Plain DOM, no libraries,
// so the page works from file:// and as a static Hugging Face Space.
(function () {
  "use strict";

  const data = window.CONCEPTCAPS_EXPLORER;
  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
  const byTag = new Map(data.concepts.map((c) => [c.tag, c]));
  const total = (positives) => data.splits.reduce((sum, s) => sum + ((positives.default || {})[s] || 0), 0);

  // -- header ------------------------------------------------------------------------------
  function renderHeader() {
    document.title = data.title;
    $("title").textContent = data.title;
    const rows = data.rows.default || {};
    const parts = data.splits.map((s) => `${s} ${rows[s] || 0}`);
    $("summary").textContent =
      `${data.concepts.length} concepts · rows per split: ${parts.join(", ")} · taxonomy ${data.taxonomy_version}` +
      (data.clap.evaluated ? " · CLAP scores from conceptcaps evaluate" : " · CLAP: not evaluated") +
      (data.evidence && data.evidence.scored ? " · label evidence from conceptcaps audio score" : " · label evidence: not scored");
    if (data.tiny_models.length) {
      const warning = $("warning");
      warning.hidden = false;
      warning.textContent =
        `Made with tiny random-weight models (${data.tiny_models.join(", ")}): the captions and audio are noise ` +
        "(a pipeline check, not data).";
    }
  }

  // -- clips ---------------------------------------------------------------------------------
  function tagChip(tag, extraClass) {
    return el("li", { class: `chip ${byTag.has(tag) ? byTag.get(tag).category : ""} ${extraClass || ""}`, "data-tag": tag },
      el("button", { type: "button", onclick: () => { selectConcept(tag, true); $("concepts").scrollIntoView(); } }, tag));
  }

  function clipCard(id, extra) {
    const clip = data.clips[id];
    const meta = [id, clip.split, clip.clap === null || clip.clap === undefined ? null : `CLAP ${fmt(clip.clap)}`, extra];
    return el("div", { class: "clip", "data-clip": id },
      el("div", { class: "clip-meta" }, meta.filter(Boolean).join(" · ")),
      el("p", { class: "caption" }, clip.caption),
      el("ul", { class: "chips small" }, clip.tags.map((t) => tagChip(t))),
      clip.audio
        ? el("audio", { controls: true, preload: "metadata", src: clip.audio })
        : el("p", { class: "note" }, data.has_audio ? "no audio file" : "no audio in this release"));
  }

  // -- concept browser -----------------------------------------------------------------------
  function renderConceptList() {
    const list = $("concept-list");
    const categories = [...new Set(data.concepts.map((c) => c.category))];
    for (const category of categories) {
      const items = data.concepts.filter((c) => c.category === category).map((c) =>
        el("li", { "data-tag": c.tag, "data-category": c.category, class: total(c.positives) ? "" : "empty" },
          el("button", { type: "button", onclick: () => selectConcept(c.tag, true) },
            el("span", { class: "tag" }, c.tag), el("span", { class: "count" }, total(c.positives)))));
      list.append(el("h3", { class: `category ${category}` }, category), el("ul", { "data-category": category }, items));
    }
    $("filter").addEventListener("input", (event) => {
      const query = event.target.value.trim().toLowerCase();
      for (const item of list.querySelectorAll("li[data-tag]")) {
        item.hidden = Boolean(query) && !item.dataset.tag.toLowerCase().includes(query);
      }
    });
  }

  function countsTable(concept) {
    const configs = data.configs.filter((c) => concept.positives[c]);
    const head = el("tr", {}, el("th", {}, "config"), data.splits.map((s) => el("th", {}, s)), el("th", {}, "total"));
    const body = configs.map((config) => {
      const counts = data.splits.map((s) => concept.positives[config][s] || 0);
      return el("tr", { "data-config": config }, el("th", {}, config), counts.map((n) => el("td", {}, n)),
        el("td", {}, counts.reduce((a, b) => a + b, 0)));
    });
    return el("table", { class: "counts" }, el("thead", {}, head), el("tbody", {}, body));
  }

  // Label-audio agreement of a concept (audio score): AUC with its interval, the top-k share, and the positives of
  // highest and lowest evidence to listen to (a concept whose lowest clips do not carry it has weak positives).
  function evidenceText(concept) {
    const e = concept.evidence;
    if (!data.evidence || !data.evidence.scored) return "Label evidence: not scored (conceptcaps audio score)";
    if (!e || e.auc === null || e.auc === undefined) {
      return `Label evidence: too few positives for an AUC (${e && e.positives !== undefined ? e.positives : 0})`;
    }
    const level = Math.round((data.evidence.confidence || 0.95) * 100);
    const interval = e.auc_interval ? ` [${fmt(e.auc_interval[0], 2)}, ${fmt(e.auc_interval[1], 2)}]` : "";
    const share = e.top_k_share === null || e.top_k_share === undefined ? "" :
      ` · top-${e.k} share ${fmt(e.top_k_share, 2)} (chance ${fmt(e.chance, 2)})`;
    return `Label evidence: AUC ${fmt(e.auc, 2)}${interval} (${level}% interval) over ${e.positives} positives${share}`;
  }

  function evidenceClips(concept) {
    const e = concept.evidence;
    if (!e || !((e.highest || []).length)) return [];
    return ["highest", "lowest"].map((side) => el("div", { class: "evidence-side", "data-side": side },
      el("h4", {}, side === "highest" ? "Highest evidence (the audio most likely carries it)"
        : "Lowest evidence (listen: does the audio carry it?)"),
      el("div", { class: "clips" }, e[side].map(([id, value]) => clipCard(id, `evidence ${fmt(value, 2)}`)))));
  }

  function selectConcept(tag, updateHash) {
    const concept = byTag.get(tag);
    if (!concept) return;
    for (const item of document.querySelectorAll("#concept-list li")) {
      item.classList.toggle("selected", item.dataset.tag === tag);
    }
    // Keep the chosen tag in view inside the list (scrolling the list alone, not the page).
    const nav = document.querySelector(".concept-nav");
    const chosen = nav.querySelector("li.selected");
    if (chosen && (chosen.offsetTop < nav.scrollTop || chosen.offsetTop > nav.scrollTop + nav.clientHeight - 30)) {
      nav.scrollTop = chosen.offsetTop - nav.clientHeight / 3;
    }
    const clap = concept.clap
      ? `CLAP score ${fmt(concept.clap.mean)} (mean over ${concept.clap.n} clip${concept.clap.n === 1 ? "" : "s"})`
      : data.clap.evaluated ? "CLAP score: no scored clip holds this tag" : "CLAP score: not evaluated";
    const article = $("concept");
    article.replaceChildren(
      el("h3", {}, el("span", { id: "concept-tag" }, concept.tag), " ",
        el("span", { class: `badge ${concept.category}` }, concept.category)),
      countsTable(concept),
      el("p", { id: "concept-clap", class: "note" }, clap),
      el("p", { id: "concept-evidence", class: "note" }, evidenceText(concept)),
      el("h4", {}, concept.clips.length ? `Clips (${concept.clips.length} shown of ${total(concept.positives)})`
        : "No clip in the release holds this tag"),
      el("div", { class: "clips" }, concept.clips.map((id) => clipCard(id))),
      el("div", { id: "concept-evidence-clips" }, evidenceClips(concept)));
    if (updateHash) history.replaceState(null, "", `#tag=${encodeURIComponent(tag)}`);
  }

  // -- latent pad ----------------------------------------------------------------------------
  const pad = data.pad;
  const canvas = $("pad");
  const context = canvas.getContext("2d");
  let current = { row: Math.floor(pad.size / 2), col: Math.floor(pad.size / 2) };
  let shownSet = -1;

  // A point's colour is that of its set's first genre tag (taxonomy order; else its first tag): the points
  // differ in length as samples do (set sizes drawn from the data), so colouring every distinct set apart
  // would speckle the pad, while the genre shows the regions the axes move through.
  const tagIndex = new Map(data.concepts.map((c, i) => [c.tag, i]));
  const colourKey = pad.sets.map((set) => {
    const genre = set.find((t) => byTag.has(t) && byTag.get(t).category === "genre");
    return tagIndex.get(genre !== undefined ? genre : set[0]) || 0;
  });
  const setColour = (index, light) => `hsl(${(colourKey[index] * 137.508) % 360}, 55%, ${light}%)`;
  const [axisX, axisY] = pad.axes;

  // "z[12] = 0.40" and, on a regularised axis, the attribute's value there: " (tempo ≈ 0.67)".
  function axisText(axis, i) {
    const attribute = axis.attribute_values ? ` (${axis.attribute} ≈ ${fmt(axis.attribute_values[i], 2)})` : "";
    return `z[${axis.dim}] = ${fmt(axis.values[i], 2)}${attribute}`;
  }

  function drawPad() {
    const cell = canvas.width / pad.size;
    for (let row = 0; row < pad.size; row++) {
      for (let col = 0; col < pad.size; col++) {
        context.fillStyle = setColour(pad.cells[row * pad.size + col], 82);
        context.fillRect(col * cell, row * cell, Math.ceil(cell), Math.ceil(cell));
      }
    }
    context.strokeStyle = "rgba(0, 0, 0, 0.25)";
    context.beginPath();
    context.moveTo(canvas.width / 2, 0); context.lineTo(canvas.width / 2, canvas.height);
    context.moveTo(0, canvas.height / 2); context.lineTo(canvas.width, canvas.height / 2);
    context.stroke();
    context.strokeStyle = "#111";
    context.lineWidth = 2;
    context.strokeRect(current.col * cell + 1, current.row * cell + 1, cell - 2, cell - 2);
    context.lineWidth = 1;
  }

  function showCell(row, col) {
    current = { row: Math.max(0, Math.min(pad.size - 1, row)), col: Math.max(0, Math.min(pad.size - 1, col)) };
    const index = pad.cells[current.row * pad.size + current.col];
    $("pad-position").textContent = `${axisText(axisX, current.col)}, ${axisText(axisY, pad.size - 1 - current.row)}` +
      ` · tag set ${index + 1} of ${pad.sets.length}`;
    canvas.dataset.row = current.row;
    canvas.dataset.col = current.col;
    drawPad();
    if (index === shownSet) return; // same decoded set: keep the players (and what they loaded)
    shownSet = index;
    $("pad-tags").dataset.set = index;
    $("pad-tags").replaceChildren(...pad.sets[index].map((t) => tagChip(t)));
    $("pad-clips").replaceChildren(...pad.nearest[index].map(([id, jaccard]) => clipCard(id, `Jaccard ${fmt(jaccard, 2)}`)));
  }

  function cellAt(event) {
    const box = canvas.getBoundingClientRect();
    const col = Math.floor(((event.clientX - box.left) / box.width) * pad.size);
    const row = Math.floor(((event.clientY - box.top) / box.height) * pad.size);
    return [row, col];
  }

  function renderPad() {
    $("axis-x").textContent = `→ ${axisX.label}: ${fmt(axisX.range[0], 2)} to ${fmt(axisX.range[1], 2)}`;
    $("axis-y").textContent = `↑ ${axisY.label}: ${fmt(axisY.range[0], 2)} to ${fmt(axisY.range[1], 2)}`;
    $("pad-note").textContent =
      `${pad.size} × ${pad.size} points on two latent dimensions: ${pad.note}. Every other dimension is at 0, the ` +
      "prior's mean. Each point is decoded as the run sampled its sets" +
      (pad.rule && pad.rule.sizes === "data" ? ", with the set sizes of a training set (so lengths vary point to point)" : "") +
      ". A point's colour is its set's first genre tag; the clips listed are the release's closest to the set " +
      "under the pointer (Jaccard similarity of their labels).";
    canvas.addEventListener("mousemove", (event) => showCell(...cellAt(event)));
    canvas.addEventListener("click", (event) => showCell(...cellAt(event)));
    canvas.addEventListener("keydown", (event) => {
      const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
      if (!moves[event.key]) return;
      event.preventDefault();
      showCell(current.row + moves[event.key][0], current.col + moves[event.key][1]);
    });
    showCell(current.row, current.col);
  }

  renderHeader();
  renderConceptList();
  renderPad();
  const fromHash = decodeURIComponent((location.hash.match(/^#tag=(.*)$/) || [])[1] || "");
  const first = data.concepts.find((c) => c.clips.length) || data.concepts[0];
  if (first) selectConcept(byTag.has(fromHash) ? fromHash : first.tag, false);
  document.body.dataset.ready = "true";
})();
