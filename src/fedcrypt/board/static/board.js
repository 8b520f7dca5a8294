// fedcrypt board: the runs table, a run's page and the compare view, drawn from the JSON API
// (/api/runs, /api/runs/{id}) with Chart.js. Text from the store is only ever set as text.
"use strict";

const REFRESH_MS = Number(document.body.dataset.refreshMs) || 2000;
const PALETTE = ["#3056d3", "#e07a1f", "#1f8a4c", "#c53030", "#7b3fc4", "#0f8b8d", "#b7791f", "#d53f8c"];
const PHASES = [
  ["train_seconds", "train"], ["protect_seconds", "protect"], ["aggregate_seconds", "aggregate"],
  ["recover_seconds", "recover"], ["eval_seconds", "evaluate"],
];
const app = document.getElementById("app");
let refreshTimer = null;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? "");
    throw new Error(`${response.status}: ${detail || response.statusText}`);
  }
  return body;
}

const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const fixed = (value, digits = 4) => (isNumber(value) ? value.toFixed(digits) : "–");
const megabytes = (bytes) => (isNumber(bytes) ? bytes / 1e6 : null);
const when = (seconds) => new Date(seconds * 1000).toLocaleString();
const runLink = (id) => el("a", { href: `/runs/${encodeURIComponent(id)}` }, id);
const badge = (status) => el("span", { class: `status status-${status}` }, status);
const sum = (rounds, key) => rounds.reduce((total, r) => total + (isNumber(r[key]) ? r[key] : 0), 0);
const lastValue = (rounds, key) => {
  for (let i = rounds.length - 1; i >= 0; i -= 1) if (isNumber(rounds[i][key])) return rounds[i][key];
  return null;
};

function duration(seconds) {
  if (seconds < 90) return `${seconds.toFixed(1)} s`;
  if (seconds < 5400) return `${(seconds / 60).toFixed(1)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

function refreshLater(action) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => action().catch(showError), REFRESH_MS);
}

function showError(error) {
  app.replaceChildren(el("h1", {}, "Something went wrong"), el("p", { class: "error" }, error.message));
}

function markReady(view) {
  app.dataset.ready = view;
  app.dataset.renderMs = performance.now().toFixed(1);
}

// ---- charts ---------------------------------------------------------------------------------

function chartCard(id, title) {
  const canvas = el("canvas", { id });
  return { card: el("section", { class: "card" }, el("h2", {}, title), el("div", { class: "chart" }, canvas)), canvas };
}

function baseOptions(yTitle, { extraScales = {}, zero = false } = {}) {
  return {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    interaction: { mode: "nearest", axis: "x", intersect: false },
    plugins: { legend: { position: "bottom" } },
    scales: {
      x: { type: "linear", title: { display: true, text: "round" }, ticks: { precision: 0 } },
      y: { beginAtZero: zero, title: { display: true, text: yTitle } },
      ...extraScales,
    },
  };
}

function points(rounds, value) {
  return rounds.map((r) => ({ x: r.round, y: value(r) })).filter((p) => isNumber(p.y));
}

function line(label, color, data, axis = "y") {
  return {
    label, data, yAxisID: axis, borderColor: color, backgroundColor: color,
    borderWidth: 2, pointRadius: data.length > 60 ? 0 : 2, tension: 0.15,
  };
}

// A chart whose datasets are recomputed from the rounds on every update.
function seriesChart(canvas, yTitle, series, options = {}) {
  const chart = new Chart(canvas, {
    type: "line",
    data: { datasets: series.map((s) => line(s.label, s.color, [], s.axis)) },
    options: baseOptions(yTitle, options),
  });
  return {
    chart,
    update(rounds) {
      series.forEach((s, i) => {
        const data = points(rounds, s.value);
        chart.data.datasets[i].data = data;
        chart.data.datasets[i].pointRadius = data.length > 60 ? 0 : 2;
      });
      chart.update("none");
    },
  };
}

function phaseChart(canvas) {
  const colors = [...PALETTE.slice(0, PHASES.length), "#a0a7b8"];
  const phaseNames = [...PHASES.map(([, name]) => name), "other"];
  const chart = new Chart(canvas, {
    type: "bar",
    data: { labels: [], datasets: phaseNames.map((name, i) => ({ label: name, data: [], backgroundColor: colors[i] })) },
    options: {
      animation: false, responsive: true, maintainAspectRatio: false,
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { position: "bottom" } },
      scales: {
        x: { stacked: true, title: { display: true, text: "round" } },
        y: { stacked: true, title: { display: true, text: "seconds" } },
      },
    },
  });
  return {
    chart,
    update(rounds) {
      chart.data.labels = rounds.map((r) => r.round);
      PHASES.forEach(([key], i) => { chart.data.datasets[i].data = rounds.map((r) => r[key] || 0); });
      chart.data.datasets[PHASES.length].data = rounds.map(
        (r) => Math.max(0, (r.seconds || 0) - PHASES.reduce((total, [key]) => total + (r[key] || 0), 0)));
      chart.update("none");
    },
  };
}

const hasEpsilon = (rounds) => rounds.some((r) => isNumber(r.dp_epsilon));

// ---- runs table -----------------------------------------------------------------------------

const selectedRuns = new Set();

async function runsView() {
  const params = new URLSearchParams(location.search);
  const query = new URLSearchParams();
  for (const key of ["mechanism", "status"]) if (params.get(key)) query.set(key, params.get(key));
  const data = await getJSON(`/api/runs?${query}`);

  const compare = el("button", {
    id: "compare-selected",
    onclick: () => location.assign(`/compare?ids=${[...selectedRuns].map(encodeURIComponent).join(",")}`),
  }, "Compare selected");
  const updateCompare = () => {
    compare.disabled = selectedRuns.size < 2;
    compare.textContent = `Compare selected (${selectedRuns.size})`;
  };
  const filter = (name, choices) => el("select", {
    id: `filter-${name}`,
    onchange: (event) => {
      const next = new URLSearchParams(location.search);
      if (event.target.value) next.set(name, event.target.value); else next.delete(name);
      location.search = next.toString();
    },
  }, el("option", { value: "" }, `every ${name}`),
  [...new Set([...choices, params.get(name)].filter(Boolean))].map(
    (choice) => el("option", { value: choice, selected: choice === params.get(name) }, choice)));

  const rows = data.runs.map((run) => el("tr", { "data-run": run.id },
    el("td", {}, el("input", {
      type: "checkbox", "aria-label": `select ${run.id}`, checked: selectedRuns.has(run.id),
      onchange: (event) => {
        if (event.target.checked) selectedRuns.add(run.id); else selectedRuns.delete(run.id);
        updateCompare();
      },
    })),
    el("td", {}, runLink(run.id)), el("td", {}, run.job), el("td", {}, run.mechanism), el("td", {}, run.kind),
    el("td", {}, badge(run.status)),
    el("td", { class: "num" }, `${run.rounds_done}/${run.planned_rounds}`),
    el("td", { class: "num" }, fixed(run.final_accuracy)),
    el("td", {}, when(run.started)), el("td", { class: "num" }, duration(run.seconds))));
  const table = rows.length
    ? el("table", { id: "runs" },
      el("thead", {}, el("tr", {}, ["", "id", "job", "mechanism", "kind", "status"].map((h) => el("th", {}, h)),
        ["rounds", "accuracy"].map((h) => el("th", { class: "num" }, h)), el("th", {}, "started"),
        el("th", { class: "num" }, "duration"))),
      el("tbody", {}, rows))
    : el("p", { class: "muted", id: "no-runs" }, query.toString() ? "No runs match these filters." : "No runs recorded yet: start one with `fedcrypt run JOB.toml`.");

  app.replaceChildren(
    el("h1", {}, "Runs"),
    el("div", { class: "toolbar" }, filter("mechanism", data.mechanisms), filter("status", ["running", "finished", "failed"]), compare),
    table);
  updateCompare();
  markReady("runs");
  if (data.runs.some((run) => run.status === "running")) refreshLater(runsView);
}

// ---- one run --------------------------------------------------------------------------------

function runFacts(run, rounds) {
  const facts = [
    ["job", run.job], ["mechanism", run.mechanism], ["kind", run.kind],
    ["rounds", `${run.rounds_done}/${run.planned_rounds}`], ["accuracy", fixed(run.final_accuracy)],
    ["uploaded", `${fixed(megabytes(sum(rounds, "bytes_up")), 2)} MB`], ["started", when(run.started)],
    ["duration", duration(run.seconds)], ["run folder", run.run_dir], ["model", run.model_path || "–"],
  ];
  const epsilon = lastValue(rounds, "dp_epsilon");
  if (epsilon !== null) facts.splice(5, 0, ["ε", fixed(epsilon, 3)]);
  return [
    el("h1", {}, run.id, " ", badge(run.status)),
    el("div", { class: "facts", id: "facts" }, facts.map(([name, value]) => el("span", {}, el("b", {}, `${name}: `), value))),
    run.error ? el("p", { class: "error", id: "run-error" }, run.error) : "",
  ];
}

async function runView(id) {
  const data = await getJSON(`/api/runs/${encodeURIComponent(id)}`);
  let run = data.run;
  const rounds = data.rounds;
  const header = el("div", {}, runFacts(run, rounds));
  const cards = {
    metrics: chartCard("chart-metrics", "Accuracy and loss"),
    bytes: chartCard("chart-bytes", "Bytes per round"),
    time: chartCard("chart-time", "Time per round by phase"),
    epsilon: chartCard("chart-epsilon", "Privacy budget ε"),
  };
  const epsilonNote = el("p", { class: "muted", id: "no-dp" }, "No differential privacy in this run: ε is not tracked.");
  app.replaceChildren(header, el("div", { class: "grid" }, Object.values(cards).map((c) => c.card)),
    el("h2", {}, "Job configuration"), el("pre", { id: "config" }, run.config));

  const charts = [
    seriesChart(cards.metrics.canvas, "accuracy", [
      { label: "test accuracy", color: PALETTE[0], value: (r) => r.accuracy },
      { label: "test loss", color: PALETTE[1], value: (r) => r.loss, axis: "y1" },
      { label: "train loss", color: PALETTE[3], value: (r) => r.train_loss, axis: "y1" },
    ], { extraScales: { y1: { position: "right", title: { display: true, text: "loss" }, grid: { drawOnChartArea: false } } } }),
    seriesChart(cards.bytes.canvas, "MB", [
      { label: "up (clients → server)", color: PALETTE[0], value: (r) => megabytes(r.bytes_up) },
      { label: "down (server → clients)", color: PALETTE[2], value: (r) => megabytes(r.bytes_down) },
    ], { zero: true }),
    phaseChart(cards.time.canvas),
    seriesChart(cards.epsilon.canvas, "ε (cumulative)", [
      { label: "ε spent", color: PALETTE[4], value: (r) => r.dp_epsilon },
    ], { zero: true }),
  ];
  const draw = () => {
    charts.forEach((chart) => chart.update(rounds));
    const dp = hasEpsilon(rounds);
    cards.epsilon.canvas.parentElement.hidden = !dp;
    if (!dp && !epsilonNote.isConnected) cards.epsilon.card.append(epsilonNote);
    if (dp) epsilonNote.remove();
  };
  draw();
  markReady("run");

  const poll = async () => {
    const last = rounds.length ? rounds[rounds.length - 1].round : 0;
    const update = await getJSON(`/api/runs/${encodeURIComponent(run.id)}?after=${last}`);
    run = update.run;
    rounds.push(...update.rounds);
    header.replaceChildren(...runFacts(run, rounds));
    if (update.rounds.length) draw();
    if (run.status === "running") refreshLater(poll);
  };
  if (run.status === "running") refreshLater(poll);
}

// ---- compare --------------------------------------------------------------------------------

async function compareView() {
  const ids = (new URLSearchParams(location.search).get("ids") || "").split(",").map((s) => s.trim()).filter(Boolean);
  if (!ids.length) {
    app.replaceChildren(el("h1", {}, "Compare runs"),
      el("p", { class: "muted" }, "Pick two or more runs in the ", el("a", { href: "/" }, "runs table"), " to compare them."));
    return;
  }
  const details = await Promise.all(ids.map((id) => getJSON(`/api/runs/${encodeURIComponent(id)}`)));
  const label = (run) => `${run.mechanism} · ${run.id}`;
  const metrics = [
    ["compare-accuracy", "Test accuracy", "accuracy", (r) => r.accuracy, false],
    ["compare-loss", "Test loss", "loss", (r) => r.loss, false],
    ["compare-bytes", "Uploaded per round", "MB", (r) => megabytes(r.bytes_up), true],
    ["compare-time", "Time per round", "seconds", (r) => r.seconds, true],
  ];
  if (details.some((d) => hasEpsilon(d.rounds))) {
    metrics.push(["compare-epsilon", "Privacy budget ε", "ε", (r) => r.dp_epsilon, true]);
  }
  const cards = metrics.map(([id, title]) => chartCard(id, title));
  const summary = el("table", { id: "compared" },
    el("thead", {}, el("tr", {}, ["", "run", "job", "mechanism", "status"].map((h) => el("th", {}, h)),
      ["rounds", "final accuracy", "MB up", "seconds", "ε"].map((h) => el("th", { class: "num" }, h)))),
    el("tbody", {}, details.map(({ run, rounds }, i) => el("tr", {},
      el("td", {}, el("span", { class: "swatch", style: `background:${PALETTE[i % PALETTE.length]}` })),
      el("td", {}, runLink(run.id)), el("td", {}, run.job), el("td", {}, run.mechanism), el("td", {}, badge(run.status)),
      el("td", { class: "num" }, `${run.rounds_done}/${run.planned_rounds}`),
      el("td", { class: "num" }, fixed(run.final_accuracy)),
      el("td", { class: "num" }, fixed(megabytes(sum(rounds, "bytes_up")), 2)),
      el("td", { class: "num" }, fixed(sum(rounds, "seconds"), 1)),
      el("td", { class: "num" }, fixed(lastValue(rounds, "dp_epsilon"), 3))))));
  app.replaceChildren(el("h1", {}, `Compare ${details.length} runs`), summary,
    el("div", { class: "grid", style: "margin-top:1rem" }, cards.map((c) => c.card)));

  const charts = metrics.map(([, , yTitle, value, zero], i) => new Chart(cards[i].canvas, {
    type: "line",
    data: {
      datasets: details.map(({ run, rounds }, j) => line(label(run), PALETTE[j % PALETTE.length], points(rounds, value))),
    },
    options: baseOptions(yTitle, { zero }),
  }));
  markReady("compare");
  if (details.some((d) => d.run.status === "running")) {
    refreshLater(async () => {
      charts.forEach((chart) => chart.destroy());
      await compareView();
    });
  }
}

// ---- routing --------------------------------------------------------------------------------

function route() {
  const path = location.pathname;
  if (path === "/") return runsView();
  if (path.startsWith("/runs/")) return runView(decodeURIComponent(path.slice("/runs/".length)));
  if (path === "/compare") return compareView();
  return Promise.reject(new Error(`no page at ${path}`));
}

route().catch(showError);
