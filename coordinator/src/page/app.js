// The Veraltheim status page: polls /api/status and /api/jobs once a second and draws models,
// jobs, GPUs and the supervision tree. No framework and no build step; every text from the
// server goes into the page as text (textContent), never as markup.
"use strict";

(() => {
  const POLL_MS = 1000;
  const JOBS_SHOWN = 50;
  const TAIL_BYTES = 64 * 1024;
  const RATE_WINDOW_MS = 10000;
  const GPU_HISTORY = 60;
  const TOKEN_KEY = "veraltheim.token";
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (sel, root = document) => root.querySelector(sel);

  // An element with properties and children (strings become text nodes).
  function el(tag, props = {}, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (v == null) continue;
      if (k === "class") e.className = v;
      else if (k === "data") Object.assign(e.dataset, v);
      else if (k === "title") e.title = v;
      else if (k === "onclick") e.addEventListener("click", v);
      else e.setAttribute(k, v);
    }
    for (const c of children) {
      if (c != null) e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  // ---- formatting ----------------------------------------------------------------------------

  function fmtBytes(n) {
    if (n == null) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function fmtUs(us) {
    if (us == null) return "—";
    if (us < 1000) return us.toFixed(0) + " µs";
    if (us < 1e6) return (us / 1000).toFixed(us < 1e4 ? 2 : 1) + " ms";
    return (us / 1e6).toFixed(2) + " s";
  }

  function fmtAge(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  function stateBadge(state) {
    const s = String(state || "?");
    return el("span", { class: "state state-" + s.toLowerCase().replace(/[^a-z_]/g, "") }, s);
  }

  // ---- the API -------------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function token() {
    try { return sessionStorage.getItem(TOKEN_KEY) || ""; } catch (_) { return ""; }
  }

  async function api(path) {
    const headers = { Accept: "application/json" };
    const t = token();
    if (t) headers.Authorization = "Bearer " + t;
    let r;
    try {
      r = await fetch(path, { headers, cache: "no-store" });
    } catch (e) {
      throw new HttpError(0, "the server cannot be reached (" + e.message + ")");
    }
    const text = await r.text();
    if (!r.ok) {
      let message = text.trim();
      try {
        const j = JSON.parse(text);
        if (j && typeof j.error === "string") message = j.error;
      } catch (_) { /* the authentication layer answers in plain text */ }
      throw new HttpError(r.status, message || r.statusText);
    }
    return JSON.parse(text);
  }

  // Endpoints refused (401/403) with the token in use, and the refusal: not asked again until
  // another token is pasted (or the page reloaded), so that an open tab does not add a refusal
  // a second to the server's audit log.
  const refusals = new Map();

  function ask(key, path) {
    const r = refusals.get(key);
    if (r && r.token === token()) return Promise.reject(r.err);
    return api(path).catch((err) => {
      if (err.status === 401 || err.status === 403) refusals.set(key, { token: token(), err });
      throw err;
    });
  }

  // A refusal as a sentence for a person.
  function explain(err) {
    if (err.status === 401) {
      return "Not signed in (401): " + err.message +
        ". Paste a bearer token in the field at the top of the page.";
    }
    if (err.status === 403) {
      return "Refused (403): " + err.message +
        ". Paste a token with the rights, or reload the page once they are granted.";
    }
    if (err.status === 0) return err.message;
    return "Error " + err.status + ": " + err.message;
  }

  function sectionError(section, err) {
    const p = $("#" + section + " > p.error");
    if (!err) { p.hidden = true; p.textContent = ""; return; }
    p.hidden = false;
    p.textContent = explain(err);
  }

  function notice(text, kind) {
    const n = $("#notice");
    n.hidden = !text;
    n.textContent = text || "";
    n.className = kind || "";
  }

  // ---- models --------------------------------------------------------------------------------

  // Per model: samples of its answered-request counter, for requests per second.
  const rateSamples = new Map();

  function rate(name, t, n) {
    let s = rateSamples.get(name) || [];
    // A counter that went down belongs to a model loaded again: start over.
    if (s.length && (n < s[s.length - 1].n || t <= s[s.length - 1].t)) s = [];
    s.push({ t, n });
    while (s.length > 2 && t - s[1].t >= RATE_WINDOW_MS) s.shift();
    rateSamples.set(name, s);
    if (s.length < 2) return null;
    return ((n - s[0].n) * 1000) / (t - s[0].t);
  }

  function renderModels(doc) {
    const rows = doc.models.map((m) => {
      const st = m.stats;
      const rps = st ? rate(m.name, doc.time_ms, st.success + st.failure) : null;
      if (!st) rateSamples.delete(m.name);
      return el("tr", { data: { model: m.name }, title: m.reason || null },
        el("td", { class: "name" }, m.name),
        el("td", {}, stateBadge(m.state)),
        el("td", { class: "device" }, m.device || "—"),
        el("td", { class: "num memory" }, m.device ? fmtBytes(m.memory_bytes) : "—"),
        el("td", { class: "num queue" }, st ? st.pending : "—"),
        el("td", { class: "num rps" }, rps == null ? "—" : rps.toFixed(rps < 10 ? 1 : 0)),
        el("td", { class: "num p50" }, st && st.success ? fmtUs(st.total_p50_us) : "—"),
        el("td", { class: "num p99" }, st && st.success ? fmtUs(st.total_p99_us) : "—"),
        el("td", { class: "num batch" }, st && st.execution_count ? st.avg_batch_size.toFixed(2) : "—"));
    });
    $("#models tbody").replaceChildren(...rows);
  }

  // ---- GPUs ----------------------------------------------------------------------------------

  const gpuHistory = new Map();

  function sparkline(values, max, label) {
    const W = 180, H = 36;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
    const step = W / (GPU_HISTORY - 1);
    const points = values.map((v, i) => {
      const x = W - (values.length - 1 - i) * step;
      const y = H - 1 - (Math.min(v, max) / max) * (H - 2);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
    const title = document.createElementNS(SVG, "title");
    title.textContent = label;
    svg.append(title);
    return svg;
  }

  function renderGpus(doc) {
    const seen = new Set();
    const cards = doc.gpus.map((g) => {
      seen.add(g.index);
      const memPct = g.memory_total_bytes ? (100 * g.memory_used_bytes) / g.memory_total_bytes : 0;
      const h = gpuHistory.get(g.index) || [];
      h.push({ util: g.utilization_percent, mem: memPct });
      while (h.length > GPU_HISTORY) h.shift();
      gpuHistory.set(g.index, h);
      const tags = [g.simulated ? "simulated" : null, g.lost ? "LOST" : null].filter(Boolean);
      return el("div", { class: "gpu" + (g.lost ? " lost" : ""), data: { gpu: String(g.index) } },
        el("h3", {}, `GPU ${g.index} · ${g.name}`, tags.length ? el("span", { class: "muted" }, " (" + tags.join(", ") + ")") : null),
        el("div", { class: "metric" },
          el("span", { class: "label" }, "memory"),
          el("span", { class: "value memory" },
            `${fmtBytes(g.memory_used_bytes)} / ${fmtBytes(g.memory_total_bytes)} (${memPct.toFixed(0)} %)`),
          sparkline(h.map((x) => x.mem), 100, "memory used, % of total")),
        el("div", { class: "metric" },
          el("span", { class: "label" }, "utilisation"),
          el("span", { class: "value util" }, g.utilization_percent + " %"),
          sparkline(h.map((x) => x.util), 100, "GPU utilisation, %")),
        g.models.length ? el("div", { class: "muted" }, "models: " + g.models.join(", ")) : null);
    });
    for (const k of [...gpuHistory.keys()]) if (!seen.has(k)) gpuHistory.delete(k);
    if (!cards.length) {
      const why = doc.gpu_probe_error ? ` (${doc.gpu_probe_error})` : "";
      cards.push(el("p", { class: "muted" }, "No GPU" + why + "."));
    }
    $("#gpus").replaceChildren(...cards);
    const host = doc.host;
    $("#host").textContent = `Host: ${host.cores} cores, ` +
      `${fmtBytes(host.memory_available_bytes)} of ${fmtBytes(host.memory_total_bytes)} memory available; ` +
      `coordinator resident ${fmtBytes(host.process_rss_bytes)}.`;
  }

  // ---- the supervision tree ------------------------------------------------------------------

  function treeNode(n, path) {
    const failure = n.last_failure ? el("span", { class: "failure" }, "last failure: " + n.last_failure) : null;
    const li = el("li", {},
      el("div", { class: "node", data: { path } },
        el("span", { class: "name" }, n.name),
        el("span", { class: "kind" }, n.kind),
        stateBadge(n.state),
        el("span", { class: "restarts-label" + (n.restarts ? " restarted" : "") },
          "restarts ", el("span", { class: "restarts" }, n.restarts)),
        failure));
    if (n.children.length) {
      li.append(el("ul", {}, ...n.children.map((c) => treeNode(c, path ? path + "/" + c.name : c.name))));
    }
    return li;
  }

  function renderTree(doc) {
    $("#tree").replaceChildren(treeNode(doc.tree, ""));
  }

  // ---- jobs and their logs -------------------------------------------------------------------

  let selectedJob = null;

  function renderJobs(doc) {
    $("#jobs-bound").textContent = doc.more
      ? `(the newest ${doc.limit}; older ones are not shown)`
      : `(${doc.jobs.length})`;
    const rows = doc.jobs.map((j) => {
      const pct = Math.round(100 * (j.progress || 0));
      const bar = el("span", { class: "bar" }, el("span", { class: "fill" }));
      bar.firstChild.style.width = pct + "%";
      return el("tr", {
        class: "job" + (j.id === selectedJob ? " selected" : ""),
        data: { job: j.id },
        title: [j.reason, j.tenant ? "tenant " + j.tenant : null, j.attempt ? "attempt " + j.attempt : null]
          .filter(Boolean).join(" · ") || null,
        onclick: () => selectJob(j.id),
      },
        el("td", { class: "id" }, j.id),
        el("td", { class: "name" }, j.name || "—"),
        el("td", {}, j.queue),
        el("td", {}, stateBadge(j.state)),
        el("td", { class: "progress" }, bar, " " + pct + " %"),
        el("td", { class: "num age" }, fmtAge(doc.time_ms - j.created_ms)));
    });
    if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "No jobs.")));
    $("#jobs tbody").replaceChildren(...rows);
  }

  function selectJob(id) {
    selectedJob = id;
    for (const tr of document.querySelectorAll("#jobs tr.job")) {
      tr.classList.toggle("selected", tr.dataset.job === id);
    }
    $("#logs-panel").hidden = false;
    $("#logs-job").textContent = id;
    $("#logs").textContent = "loading…";
    loadLogs();
  }

  async function loadLogs() {
    const id = selectedJob;
    if (!id) return;
    try {
      const doc = await ask("logs:" + id,
        `/api/jobs/${encodeURIComponent(id)}/logs?tail_bytes=${TAIL_BYTES}`);
      if (id !== selectedJob) return;
      sectionError("logs-panel", null);
      const parts = [];
      for (const l of doc.logs) {
        const shown = l.truncated ? `, the last ${TAIL_BYTES} shown` : "";
        parts.push(`── ${l.stream} (${l.bytes} bytes${shown}) ──\n${l.text}`);
      }
      const text = parts.length ? parts.join("\n") : `(no output yet; job ${doc.state})`;
      const pre = $("#logs");
      if (pre.textContent !== text) pre.textContent = text;
    } catch (err) {
      if (id === selectedJob) sectionError("logs-panel", err);
    }
  }

  // ---- the loop ------------------------------------------------------------------------------

  let timer = null;
  let running = false;
  let again = false;

  async function tick() {
    if (running) { again = true; return; }
    running = true;
    try {
      const [status, jobs] = await Promise.allSettled([
        ask("status", "/api/status"),
        ask("jobs", `/api/jobs?limit=${JOBS_SHOWN}`),
      ]);
      const errors = [];
      if (status.status === "fulfilled") {
        const doc = status.value;
        for (const s of ["models-section", "gpus-section", "tree-section"]) sectionError(s, null);
        renderModels(doc);
        renderGpus(doc);
        renderTree(doc);
        $("#server-info").textContent =
          `v${doc.version} · up ${fmtAge(doc.uptime_ms)} · ${doc.ready ? "ready" : "not ready"}`;
      } else {
        errors.push(status.reason);
        for (const s of ["models-section", "gpus-section", "tree-section"]) sectionError(s, status.reason);
        if (status.reason.status === 401 || status.reason.status === 403) {
          $("#models tbody").replaceChildren();
          $("#gpus").replaceChildren();
          $("#tree").replaceChildren();
        }
      }
      if (jobs.status === "fulfilled") {
        sectionError("jobs-section", null);
        renderJobs(jobs.value);
      } else {
        errors.push(jobs.reason);
        sectionError("jobs-section", jobs.reason);
        if (jobs.reason.status === 401 || jobs.reason.status === 403) $("#jobs tbody").replaceChildren();
      }
      if (selectedJob) await loadLogs();
      const unauthenticated = errors.find((e) => e.status === 401);
      const unreachable = errors.find((e) => e.status === 0);
      if (unauthenticated) {
        notice(explain(unauthenticated), "auth");
        if (document.activeElement !== $("#token")) $("#token").focus();
      } else if (unreachable) {
        notice(explain(unreachable), "down");
      } else {
        notice(null);
      }
      $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
    } finally {
      running = false;
      clearTimeout(timer);
      timer = setTimeout(tick, again ? 0 : POLL_MS);
      again = false;
    }
  }

  function tokenChanged() {
    refusals.clear();
    rateSamples.clear();
    showTokenState();
    tick();
  }

  function showTokenState() {
    $("#token").placeholder = token() ? "token in use (this tab)" : "paste a token";
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("#token").value.trim();
      if (t) {
        try { sessionStorage.setItem(TOKEN_KEY, t); } catch (_) { /* storage off: nothing kept */ }
      }
      $("#token").value = "";
      tokenChanged();
    });
    $("#forget-token").addEventListener("click", () => {
      try { sessionStorage.removeItem(TOKEN_KEY); } catch (_) { /* nothing kept */ }
      tokenChanged();
    });
    $("#logs-close").addEventListener("click", () => {
      selectedJob = null;
      $("#logs-panel").hidden = true;
      for (const tr of document.querySelectorAll("#jobs tr.selected")) tr.classList.remove("selected");
    });
    showTokenState();
    tick();
  });
})();
