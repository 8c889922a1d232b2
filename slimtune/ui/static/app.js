// slimtune ui: tabs over the server's API. Every number and message comes from the server (the CLI's functions).
"use strict";

const $ = (sel) => document.querySelector(sel);
const $$ = (sel) => Array.from(document.querySelectorAll(sel));
const esc = (s) => String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const gib = (x) => (x === null || x === undefined) ? "—" : x < 0.1 ? (x * 1024).toFixed(1) + " MiB" : x.toFixed(2) + " GiB";
const secs = (s) => (s === null || s === undefined) ? "—" : s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
let INFO = null;

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) { const e = new Error(data.error || r.statusText); e.fields = data.fields || {}; e.status = r.status; throw e; }
  return data;
}

// ---- tabs; the hash keeps the tab and the watched folder, so a reload shows the same page
function showTab(name) {
  $$(".tab").forEach(t => t.classList.toggle("on", t.id === name));
  $$("nav a").forEach(a => a.classList.toggle("on", a.dataset.tab === name));
  if (name === "runs") listRuns();
  if (name === "chat") api("/api/runs").then(r => {
    $("#run-folders").innerHTML = r.runs.filter(x => x.done).map(x => `<option value="${esc(x.folder)}">`).join("");
  }).catch(() => {});
}
function route() {
  const [tab, query] = (location.hash.slice(1) || "setup").split("?");
  const params = new URLSearchParams(query || "");
  showTab(tab);
  if (tab === "train" && params.get("folder")) watch(params.get("folder"));
  else if (tab === "train" && !WATCHING) watchNewest();
}
window.addEventListener("hashchange", route);

// ---- Setup
function fillSelect(name, choices, value) {
  const sel = $(`[name="${name}"]`);
  sel.innerHTML = choices.map(c => `<option${c === value ? " selected" : ""}>${esc(c)}</option>`).join("");
}
function methodFields() {
  const name = $('[name="method.name"]').value, box = $("#method-fields");
  const spec = INFO.sections.method;
  box.innerHTML = (INFO.method_fields[name] || []).map(k => {
    const f = spec[k], v = Array.isArray(f.default) ? f.default.join(",") : f.default;
    const input = f.type === "bool" ? `<input type="checkbox" name="method.${k}"${v ? " checked" : ""}>`
      : choicesFor("method." + k) ? `<select name="method.${k}">${choicesFor("method." + k).map(c => `<option>${c}</option>`).join("")}</select>`
      : `<input name="method.${k}" value="${esc(v)}" ${f.type === "int" || f.type === "float" ? 'type="number" step="any"' : ""}>`;
    return `<label title="${esc(f.doc)}">${k} ${input}</label><div class="err" data-for="method.${k}"></div>`;
  }).join("") || '<p class="muted">no other settings for this method</p>';
}
const choicesFor = (key) => INFO.choices[key];
function objectiveFields() {
  // the knobs the chosen objective reads (forms.OBJECTIVE_FIELDS) and the data format it takes
  const name = $('[name="train.objective"]').value;
  $("#objective-fields").innerHTML = (INFO.objective_fields[name] || []).map(dotted => {
    const [section, k] = dotted.split("."), f = INFO.sections[section][k], choices = choicesFor(dotted);
    const input = choices ? `<select name="${dotted}">${choices.map(c => `<option${c === f.default ? " selected" : ""}>${esc(c)}</option>`).join("")}</select>`
      : `<input name="${dotted}" value="${esc(f.default)}" type="number" step="any">`;
    return `<label title="${esc(f.doc)}">${k} ${input}</label><div class="err" data-for="${dotted}"></div>`;
  }).join("");
  $("#data-hint").textContent = INFO.data_hints[name] || "";
  $('[name="data.train"]').placeholder = name === "sft" ? "train.jsonl (alpaca or messages)" : "pairs.jsonl";
}

function tree() {
  // the form as YAML's nested mapping; values typed as the config declares them
  const out = {model: {}, data: {}, method: {}, train: {}, preference: {}};
  $$("#setup-form [name]").forEach(el => {
    const [section, key] = el.name.split(".");
    if (!key || !(section in out)) return;
    const f = INFO.sections[section][key];
    let v = el.type === "checkbox" ? el.checked : el.value.trim();
    if (el.type !== "checkbox" && f) {
      if (f.type.startsWith("list")) v = v ? v.split(",").map(s => s.trim()).filter(Boolean).map(s => f.type === "list[int]" ? Number(s) : s) : [];
      // "int | str" (micro_batch_size, grad_accum: a number or auto) takes a number too
      else if (/\b(int|float)\b/.test(f.type) && v !== "" && !isNaN(Number(v))) v = Number(v);
    }
    out[section][key] = v;
  });
  return out;
}
function showErrors(scope, fields, fallback) {
  $$(`${scope} .err[data-for]`).forEach(e => { e.textContent = ""; });
  Object.entries(fields || {}).forEach(([key, text]) => {
    const box = $(`${scope} .err[data-for="${key}"]`) || $(`${scope} .err[data-for="config"]`) || fallback;
    if (box) box.textContent += (box.textContent ? "\n" : "") + text;
  });
}

let setupTimer = null, setupSeq = 0;
function setupChanged() { clearTimeout(setupTimer); setupTimer = setTimeout(refreshSetup, 350); }
async function refreshSetup() {
  const seq = ++setupSeq, t = tree(), budget = $('[name="budget"]').value.trim();
  const errors = {};
  const results = await Promise.allSettled([api("/api/config", {tree: t}), api("/api/estimate", {tree: t, budget}),
                                            t.data.train ? api("/api/preview", {tree: t, n: 3}) : Promise.resolve(null)]);
  if (seq !== setupSeq) return;  // a newer edit is on its way
  results.forEach(r => { if (r.status === "rejected") Object.assign(errors, r.reason.fields && Object.keys(r.reason.fields).length ? r.reason.fields : {config: r.reason.message}); });
  showErrors("#setup-form", errors);
  const [cfg, est, prev] = results.map(r => r.status === "fulfilled" ? r.value : null);
  if (cfg) { $("#yaml").textContent = cfg.yaml; $("#warnings").innerHTML = cfg.warnings.map(w => `<div class="err">${esc(w)}</div>`).join(""); }
  if (est) showEstimate(est);
  $("#est-status").textContent = est ? "" : "(fix the settings marked in red)";
  $("#preview").innerHTML = prev ? previewHtml(prev) : (t.data.train ? "" : "give a data file");
}
function showEstimate(e) {
  const max = Math.max(...Object.values(e.parts), 1e-9);
  let html = `<div id="params">trainable ${e.trainable.toLocaleString()} of ${e.total.toLocaleString()} parameters
    (${(100 * e.trainable / e.total).toFixed(4)}%)</div>`;
  html += Object.entries(e.parts).filter(([k, v]) => v > 0 || k !== "gathered").map(([k, v]) =>
    `<div class="bar"><span style="width:160px">${k}</span><span class="fill" style="width:${Math.round(200 * v / max)}px"></span>${gib(v)}</div>`).join("");
  html += `<p id="peak">predicted peak <b>${gib(e.peak_gib)}</b> + CUDA context ${gib(e.cuda_context_gib)}</p>`;
  if (e.budget_gib !== null) html += `<p class="fit ${e.fits ? "yes" : "no"}">${esc(e.verdict)}</p>`;
  if (e.fits === false) $('.err[data-for="budget"]').textContent = e.verdict;
  if (e.fixes.length) html += "<p>changes that fit:</p><ul>" + e.fixes.map(f => `<li><code>${esc(f.change)}</code> ${gib(f.gib)}</li>`).join("") + "</ul>";
  else if (e.fits === false) html += "<p>no single change fits; combine them or use a larger GPU</p>";
  if (e.faster) html += `<p>faster on a GPU, same records per step: <code>${esc(e.faster.change)}</code> (${gib(e.faster.gib)})</p>`;
  html += `<details><summary>as <code>slimtune estimate</code> prints it</summary><pre id="est-plan">${esc(e.plan)}</pre><pre id="est-table">${esc(e.table)}</pre></details>`;
  $("#estimate").innerHTML = html;
}
function previewHtml(p) {
  const s = p.stats;
  if (p.pairs) return `<p id="preview-counts">${esc(p.summary)} (first ${p.limit} records at most)</p>` +
    p.records.map(r => `<div class="record"><div class="muted">${esc(r.where)}: ${r.tokens} tokens, ${r.prompt} prompt (masked),
    ${r.trained} in the answers${r.truncated ? ", TRUNCATED" : ""}</div>` + r.parts.map(x =>
    `<div class="seg ${x.trained ? "trained" : "prompt"} ${esc(x.kind)}"><b>${esc(x.kind)}</b> ${esc(x.text)}</div>`).join("") + "</div>").join("");
  let html = `<p id="preview-counts">${s.records} records read (first ${p.limit} at most): ${s.tokens} tokens, ${s.trained_tokens} trained;
    <b>${s.truncated} truncated</b> at max length, ${s.lost_eos} lost their EOS, ${s.lost_answer} lost their whole answer</p>`;
  return html + p.records.map(r => `<div class="record"><div class="muted">${esc(r.where)}: ${r.tokens} tokens, ${r.prompt} prompt (masked),
    ${r.trained} trained${r.truncated ? ", TRUNCATED" : ""}</div>` + r.parts.map(x =>
    `<span class="seg ${x.trained ? "trained" : "prompt"}">${esc(x.text)}</span>`).join("") + "</div>").join("") +
    '<p class="muted"><span class="seg prompt">prompt (masked)</span> <span class="seg trained">trained</span></p>';
}
async function startRun() {
  $("#start-error").textContent = "";
  try {
    await api("/api/runs/start", {tree: tree()});
    location.hash = "#train?folder=" + encodeURIComponent(absolute($('[name="train.output_dir"]').value));
  } catch (e) { showErrors("#setup-form", e.fields); if (!Object.keys(e.fields).length) $("#start-error").textContent = e.message; }
}
const absolute = (p) => p.startsWith("/") ? p : INFO.work + "/" + p;

// ---- Train: the run folder followed through server-sent events
let WATCHING = null, SOURCE = null;
const CH = {};
function makeCharts() {
  CH.loss = new StepChart($("#chart-loss"), "loss", ["train loss", "eval loss"]);
  CH.lr = new StepChart($("#chart-lr"), "learning rate", ["lr"], v => v.toExponential(2));
  CH.tps = new StepChart($("#chart-tps"), "tokens/s", ["input", "trained"]);
  CH.mem = new StepChart($("#chart-mem"), "memory (GiB)", []);
  CH.rewards = new StepChart($("#chart-rewards"), "rewards", ["margins", "chosen", "rejected", "eval margins"]);
  CH.accuracy = new StepChart($("#chart-accuracy"), "preference accuracy", ["accuracy", "eval accuracy"]);
  Object.values(CH).forEach(c => c.draw());
}
const REWARDS = [["rewards/margins", "margins"], ["rewards/chosen", "chosen"], ["rewards/rejected", "rejected"]];
function addRewards(chart, acc, r, prefix) {
  // a preference run's reward curves (engine/preference_step.py's metrics); eval rows carry them as eval_*
  const key = (k) => prefix ? "eval_" + k : k, name = (n) => prefix ? "eval " + n : n;
  REWARDS.forEach(([k, n]) => { if (key(k) in r) chart.add(name(n), r.step, r[key(k)]); });
  if (key("rewards/accuracy") in r) acc.add(name("accuracy"), r.step, r[key("rewards/accuracy")]);
  return key("rewards/margins") in r;
}
function addRows(rows) {
  rows.forEach(r => {
    if (addRewards(CH.rewards, CH.accuracy, r, "loss" in r ? "" : "eval")) { $("#chart-rewards").hidden = false; $("#chart-accuracy").hidden = false; }
    if ("loss" in r) {
      CH.loss.add("train loss", r.step, r.loss); CH.lr.add("lr", r.step, r.lr);
      CH.tps.add("input", r.step, r.input_tokens_per_s); CH.tps.add("trained", r.step, r.trained_tokens_per_s);
      if ("mem_gib" in r) CH.mem.add("GPU allocated (peak)", r.step, r.mem_gib);
      if ("rss_gib" in r) CH.mem.add("process RSS (peak, CPU run)", r.step, r.rss_gib);
    }
    if ("eval_loss" in r) CH.loss.add("eval loss", r.step, r.eval_loss);
  });
  Object.values(CH).forEach(c => c.draw());
}
function showState(s) {
  const steps = s.total ? `step ${s.step} of ${s.total}` : `step ${s.step}`;
  $("#run-status").textContent = `${s.status}: ${steps}, elapsed ${secs(s.elapsed_s)}, remaining ${s.status === "running" ? secs(s.remaining_s) : "—"}` +
    (s.pid ? ` (PID ${s.pid})` : "") + (s.status === "stopped" ? `; resumable from ${s.checkpoint}` : "");
  $("#run-status").dataset.status = s.status;
  const log = $("#run-log");
  log.textContent = s.log.join("\n"); log.scrollTop = log.scrollHeight;
  const failed = s.status === "failed" ? s.log.filter(l => / error: /.test(l)).pop() : null;
  $("#train-error").textContent = failed || "";  // the command's own message, e.g. a folder that holds another run
  $("#stop").disabled = s.status !== "running";
  $("#resume").disabled = s.status !== "stopped";
}
function watch(folder) {
  if (SOURCE) SOURCE.close();
  WATCHING = folder; $("#run-folder").value = folder; $("#chat-folder").value ||= folder;
  Object.values(CH).forEach(c => c.clear());
  $("#chart-rewards").hidden = true; $("#chart-accuracy").hidden = true;
  SOURCE = new EventSource("/api/run/events?folder=" + encodeURIComponent(folder));
  SOURCE.addEventListener("rows", ev => addRows(JSON.parse(ev.data)));
  SOURCE.addEventListener("reset", () => Object.values(CH).forEach(c => c.clear()));
  SOURCE.addEventListener("state", ev => showState(JSON.parse(ev.data)));
  SOURCE.onerror = () => {};  // EventSource reconnects by itself
}
async function watchNewest() {
  try { const r = await api("/api/runs"); if (r.runs.length && !WATCHING) watch(r.runs[0].folder); } catch (e) { /* no runs yet */ }
}
async function runAction(what) {
  $("#train-error").textContent = "";
  try { await api("/api/runs/" + what, {folder: WATCHING}); } catch (e) { $("#train-error").textContent = e.message; }
}

// ---- Runs
async function listRuns() {
  $("#runs-error").textContent = "";
  try {
    const r = await api("/api/runs?dir=" + encodeURIComponent($("#runs-dir").value));
    $("#runs-table").innerHTML = "<tr><th>run</th><th>steps</th><th>train loss</th><th>eval loss</th><th>finished</th></tr>" +
      r.runs.map(x => `<tr class="pick" data-folder="${esc(x.folder)}"><td>${esc(x.name)}</td><td>${x.steps ?? "—"}</td>
        <td>${x.train_loss?.toFixed(4) ?? "—"}</td><td>${x.eval_loss?.toFixed(4) ?? "—"}</td><td>${x.done ? "yes" : "no"}</td></tr>`).join("");
    $$("#runs-table tr.pick").forEach(tr => tr.addEventListener("click", () => runDetail(tr.dataset.folder)));
  } catch (e) { $("#runs-error").textContent = e.message; }
}
async function runDetail(folder) {
  const s = await api("/api/run?folder=" + encodeURIComponent(folder));
  const scores = s.summary ? Object.entries(s.summary.eval_after || {}).map(([k, v]) => `${k} ${typeof v === "number" ? v.toFixed(4) : v}`).join(", ") : "not finished";
  $("#run-detail").innerHTML = `<div><h3>${esc(folder)}</h3><p>${esc(s.status)}; final scores: ${esc(scores)}</p>
    <p><a href="#train?folder=${encodeURIComponent(folder)}">watch in Train</a> · <a href="#chat" id="chat-this">chat with it</a></p>
    <div id="detail-chart"></div><div id="detail-rewards"></div></div><div><pre>${esc(s.config)}</pre></div>`;
  $("#chat-this").addEventListener("click", () => { $("#chat-folder").value = folder; });
  const c = new StepChart($("#detail-chart"), "loss", ["train loss", "eval loss"]);
  s.rows.forEach(r => { if ("loss" in r) c.add("train loss", r.step, r.loss); if ("eval_loss" in r) c.add("eval loss", r.step, r.eval_loss); });
  c.draw();
  const rw = new StepChart($("#detail-rewards"), "rewards", []);
  if (s.rows.map(r => addRewards(rw, rw, r, "loss" in r ? "" : "eval")).some(Boolean)) rw.draw();
}

// ---- Chat: answers streamed as server-sent events over a POST
const HISTORY = {run: [], base: []};
function addMsg(box, role, text) {
  const d = document.createElement("div"); d.className = "msg " + role; d.textContent = text; box.appendChild(d); return d;
}
async function streamAnswer(side, box) {
  const s = {sample: $("#chat-sample").checked, temperature: +$("#chat-temperature").value, top_p: +$("#chat-top-p").value,
             top_k: +$("#chat-top-k").value, max_new_tokens: +$("#chat-max-new").value};
  const body = {folder: $("#chat-folder").value, messages: HISTORY[side], sampling: s, base: side === "base", system: $("#chat-system").value};
  const r = await fetch("/api/chat", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!r.ok) { const e = await r.json(); throw new Error(e.error); }
  const out = addMsg(box, "assistant", ""), reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", text = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i); buf = buf.slice(i + 2);
      const name = (chunk.match(/^event: (.*)$/m) || [])[1], data = JSON.parse((chunk.match(/^data: (.*)$/m) || [])[1]);
      if (name === "token") { text += data; out.textContent = text; out.dataset.streamed = String(+(out.dataset.streamed || 0) + 1); }
      if (name === "done") { text = data.text; out.textContent = text; out.dataset.done = "1"; }
      if (name === "error") throw new Error(data);
    }
  }
  HISTORY[side].push({role: "assistant", content: text});
}
async function send(ev) {
  ev.preventDefault();
  const line = $("#chat-input").value.trim();
  if (!line) return;
  $("#chat-input").value = ""; $("#chat-error").textContent = "";
  const sides = [["run", $("#chat-run")]].concat($("#chat-base").checked ? [["base", $("#chat-base-msgs")]] : []);
  for (const [side, box] of sides) {
    HISTORY[side].push({role: "user", content: line}); addMsg(box, "user", line);
    try { await streamAnswer(side, box); } catch (e) { HISTORY[side].pop(); $("#chat-error").textContent = e.message; }
  }
}

// ---- Compare
let COMPARE = null, COMPARE_TIMER = null;
async function compareStart() {
  $("#compare-error").textContent = "";
  try {
    const r = await api("/api/compare/start", {tree: tree(), methods: $("#compare-methods").value,
                                                objectives: $("#compare-objectives").value, output: $("#compare-output").value});
    compareWatch(r.folder);
  } catch (e) { $("#compare-error").textContent = e.message + (Object.keys(e.fields).length ? " (see Setup)" : ""); showErrors("#setup-form", e.fields); }
}
function compareWatch(folder) {
  COMPARE = folder || absolute($("#compare-output").value);
  clearInterval(COMPARE_TIMER); COMPARE_TIMER = setInterval(compareRefresh, 1500); compareRefresh();
}
async function compareRefresh() {
  let s;
  try { s = await api("/api/compare?folder=" + encodeURIComponent(COMPARE)); } catch (e) { $("#compare-error").textContent = e.message; return; }
  $("#compare-status").textContent = s.done ? "finished" : s.running ? `running (PID ${s.pid})` : "not running";
  $("#compare-table").innerHTML = "<tr>" + s.header.map(h => `<th>${esc(h)}</th>`).join("") + "</tr>" +
    s.body.map(r => "<tr>" + r.map(c => `<td>${esc(c)}</td>`).join("") + "</tr>").join("");
  if (!CH.compare) CH.compare = new StepChart($("#chart-compare"), "train loss per method", []);
  Object.entries(s.curves).forEach(([label, pts]) => CH.compare.set(label, pts));
  CH.compare.draw();
  $("#compare-charts").innerHTML = Object.entries(s.charts).map(([t, p]) => `<img alt="${esc(t)}" src="/api/file?path=${encodeURIComponent(p)}&t=${Date.now() >> 14}">`).join("");
  $("#compare-log").textContent = s.log.join("\n");
  if (s.done && !s.running) clearInterval(COMPARE_TIMER);
}

// ---- start
async function main() {
  INFO = await api("/api/info");
  $("#where").textContent = INFO.work;
  $("#runs-dir").value = INFO.runs;
  fillSelect("data.template", INFO.choices["data.template"], "auto");
  fillSelect("method.name", INFO.choices["method.name"], "lora");
  fillSelect("train.precision", INFO.choices["train.precision"], "auto");
  fillSelect("train.device", INFO.choices["train.device"], "auto");
  fillSelect("train.objective", INFO.choices["train.objective"], "sft");
  methodFields();
  objectiveFields();
  $('[name="method.name"]').addEventListener("change", methodFields);
  $('[name="train.objective"]').addEventListener("change", objectiveFields);
  $("#setup-form").addEventListener("input", setupChanged);
  $("#setup-form").addEventListener("change", setupChanged);
  $("#start-run").addEventListener("click", startRun);
  $("#download-yaml").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([$("#yaml").textContent], {type: "text/yaml"})); a.download = "slimtune.yaml"; a.click();
  });
  $("#watch").addEventListener("click", () => { location.hash = "#train?folder=" + encodeURIComponent(absolute($("#run-folder").value)); });
  $("#stop").addEventListener("click", () => runAction("stop"));
  $("#resume").addEventListener("click", () => runAction("resume"));
  $("#list-runs").addEventListener("click", listRuns);
  $("#chat-form").addEventListener("submit", send);
  $("#chat-base").addEventListener("change", () => { $("#chat-base-col").hidden = !$("#chat-base").checked; });
  $("#chat-reset").addEventListener("click", () => { HISTORY.run = []; HISTORY.base = []; $("#chat-run").innerHTML = ""; $("#chat-base-msgs").innerHTML = ""; });
  $("#compare-start").addEventListener("click", compareStart);
  $("#compare-watch").addEventListener("click", () => compareWatch());
  $("#compare-stop").addEventListener("click", async () => { try { await api("/api/compare/stop", {folder: COMPARE}); } catch (e) { $("#compare-error").textContent = e.message; } });
  makeCharts();
  route();
  refreshSetup();
}
main();
