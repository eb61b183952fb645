// fastroute dashboard: polls the JSON API and renders with plain DOM calls (no build step, no CDN).
"use strict";

const POLL_MS = 2000;
const COLORS = ["#1d4ed8", "#15803d", "#b45309", "#7c3aed", "#0e7490", "#be185d", "#4d7c0f", "#9a3412"];
const STATE_TEXT = { up: "up", backing_off: "backing off", paused: "paused", idle: "idle", stopped: "stopped",
                     unknown: "unknown", unconfigured: "not configured", unrouted: "unrouted" };

// -- small helpers -------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 120) return `${Math.round(seconds)}s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)}m`;
  if (seconds < 172800) return `${(seconds / 3600).toFixed(1)}h`;
  return `${(seconds / 86400).toFixed(1)}d`;
}

function when(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// The API token, entered once and kept for this tab only (sessionStorage, never localStorage).
const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("fastroute-token") || "";

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (tokenInput.value) headers.Authorization = `Bearer ${tokenInput.value}`;
  return headers;
}

const TOKEN_NEEDED = "This router requires your API token (a login) to show patient data: enter it in the token field at the top right.";
const TOKEN_WRONG = "The API token entered was refused: check it (fastroute user add prints one) and enter it again.";

// Who is logged in, and what that role may do: actions the role cannot do are hidden (the API
// refuses them anyway; hiding them only spares the operator a 403).
async function whoami() {
  const box = document.getElementById("whoami");
  try {
    const resp = await fetch("/api/whoami", { cache: "no-store", headers: authHeaders() });
    const me = resp.ok ? await resp.json() : null;
    const role = me && me.role;
    box.textContent = role ? `${me.user} (${role})` : "not logged in";
    document.getElementById("logout").hidden = !tokenInput.value;
    document.body.classList.toggle("can-act", !!(me && me.can.act));
    document.body.classList.toggle("can-configure", !!(me && me.can.configure));
    document.body.dataset.role = role || "";
  } catch (err) {
    box.textContent = "not logged in";
    document.body.classList.remove("can-act", "can-configure");
  }
}

function authMessage() { return tokenInput.value ? TOKEN_WRONG : TOKEN_NEEDED; }

async function getJSON(path) {
  const resp = await fetch(path, { cache: "no-store", headers: authHeaders() });
  if (resp.status === 401) {
    const box = document.getElementById("auth");
    box.textContent = authMessage();
    box.hidden = false;
    throw new Error(authMessage());
  }
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  document.getElementById("auth").hidden = true;
  return body;
}

function showMessage(text, isError) {
  const box = document.getElementById("message");
  box.textContent = text;
  box.className = isError ? "message error" : "message";
  box.hidden = false;
}

// -- actions (need the bearer token) -------------------------------------------------------------

let appliedToken = tokenInput.value;
tokenInput.addEventListener("change", () => {
  if (tokenInput.value === appliedToken) return;   // a second change event on blur: nothing new
  appliedToken = tokenInput.value;
  sessionStorage.setItem("fastroute-token", tokenInput.value);
  whoami().then(() => {
    refresh();
    route();   // a study link opened before the token was entered
  });
});
// Log out: forget the token in this tab (the API keeps no session to end).
document.getElementById("logout").addEventListener("click", () => {
  tokenInput.value = "";
  tokenInput.dispatchEvent(new Event("change"));
});

// Each action answers with a sentence an operator can read, built from the API's JSON.
async function act(path, body, describe) {
  const headers = authHeaders({ "Content-Type": "application/json" });
  try {
    const resp = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
    const data = await resp.json();
    if (resp.status === 401) throw new Error(authMessage());
    if (!resp.ok) throw new Error(data.error + (data.hint ? ` (${data.hint})` : ""));
    showMessage(describe(data), false);
  } catch (err) {
    showMessage(`Not done: ${err.message}`, true);
  }
  refresh();
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many || one + "s"}`;

// "Send now" (end the backoff, send what waits for a retry at once) appears when the API offers it:
// read from /openapi.json, so the button follows the router's version instead of guessing.
let sendNowPath = null;
async function detectSendNow() {
  try {
    const spec = await (await fetch("/openapi.json", { cache: "no-store" })).json();
    sendNowPath = Object.keys(spec.paths || {}).find((p) =>
      /^\/api\/(destinations|queues)\/\{destination\}\/send[-_]?now$/.test(p) && spec.paths[p].post) || null;
  } catch (err) {
    sendNowPath = null;
  }
}

function sentSentence(data) {
  if (!Array.isArray(data.destinations)) return `Send now: done${data.note ? ` (${data.note})` : ""}.`;
  return data.destinations.map((d) => {
    const was = d.was === "backing_off"
      ? `was backing off after ${plural(d.consecutive_failures, "failure", "failures")} in a row`
      : `was ${STATE_TEXT[d.was] || d.was}`;
    return `Send now to ${d.destination}: backoff ended (${was}); ` +
      `${plural(d.made_due, "object", "objects")} waiting for a retry ${d.made_due === 1 ? "is" : "are"} due now` +
      (d.note ? ` (${d.note})` : ". Sending starts at once.");
  }).join(" ");
}

function sendNow(q) {
  const question = `Send now to ${q.name}?\n\nIts backoff ends and every object waiting for a retry is ` +
    `sent at once (recorded in the audit trail). Use it when ${q.peer ? q.peer.ae_title : q.name} is back.`;
  if (confirm(question)) act(sendNowPath.replace("{destination}", encodeURIComponent(q.name)), { why: "dashboard" }, sentSentence);
}

function actions(q) {
  const name = encodeURIComponent(q.name);
  const out = [];
  if (q.configured) {
    out.push(q.paused
      ? el("button", { class: "resume", onclick: () => act(`/api/queues/${name}/resume`, { why: "dashboard" },
        (d) => `${q.name} resumed: sending again.${d.note ? ` Note: ${d.note}.` : ""}`) }, "resume")
      : el("button", { class: "pause", onclick: () => act(`/api/queues/${name}/pause`, { why: "dashboard" },
        () => `${q.name} paused: its queue keeps filling; nothing is sent until it is resumed.`) }, "pause"));
    if (sendNowPath && !q.paused) out.push(" ", el("button", { class: "send-now", onclick: () => sendNow(q) }, "send now"));
  }
  if (q.failed) {
    out.push(" ", el("button", { class: "retry", onclick: () => {
      const why = prompt(`Retry the ${q.failed} failed object(s) of ${q.name}: why?`, "");
      if (why !== null) act(`/api/queues/${name}/retry`, { why },
        (d) => `${plural(d.count, "failed object")} of ${q.name} queued again (audited).`);
    } }, "retry failed"));
  }
  if (q.pending || q.failed) out.push(" ", el("button", { class: "purge", onclick: () => openPurge(q) }, "purge…"));
  return out;
}

// The purge dialog: states to remove (with how many each), a reason, and a plain-words warning.
const purgeDialog = document.getElementById("purge-dialog");
let purgeTarget = null;

function openPurge(q) {
  purgeTarget = q;
  const choices = q.name === "unrouted" ? [["unrouted", q.pending, true]]
    : [["failed", q.failed, true], ["pending", q.pending, false]];
  purgeDialog.querySelectorAll(".dest").forEach((n) => { n.textContent = q.name; });
  document.getElementById("purge-states").replaceChildren(...choices.filter(([, n]) => n).map(([state, n, on]) =>
    el("label", {}, el("input", { type: "checkbox", name: "state", value: state, checked: on }),
      ` ${plural(n, `${state} object`)}`)));
  document.getElementById("purge-reason").value = "";
  purgeDialog.showModal();
}

document.getElementById("purge-cancel").addEventListener("click", () => purgeDialog.close());
document.getElementById("purge-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const states = [...purgeDialog.querySelectorAll("input[name=state]:checked")].map((n) => n.value);
  const reason = document.getElementById("purge-reason").value.trim();
  if (!states.length || !reason) {
    document.getElementById("purge-reason").reportValidity();
    return;
  }
  purgeDialog.close();
  const q = purgeTarget;
  act(`/api/queues/${encodeURIComponent(q.name)}/purge`, { states, reason },
    (d) => `${plural(d.count, "object")} removed from ${d.destination} (${d.states.join(", ")}) for good; ` +
      `recorded in the audit trail with the reason “${reason}”.`);
});

// -- rendering -----------------------------------------------------------------------------------

function lastMinuteRate(series, name) {
  const values = (series.delivered || {})[name] || [];
  const n = Math.max(1, Math.round(60 / (series.interval || 2)));
  const recent = values.slice(-n);
  return recent.length ? recent.reduce((a, b) => a + b, 0) / recent.length : 0;
}

function stateCell(q) {
  const badge = el("span", { class: `badge ${q.status}` }, STATE_TEXT[q.status] || q.status);
  const extra = [];
  if (q.status === "backing_off" && q.down_since) {
    extra.push(el("div", { class: "muted" }, `down since ${when(q.down_since)}`,
      q.retry_at ? `, retry ${when(q.retry_at)}` : "", ` (${q.consecutive_failures} failures)`));
  }
  if (q.last_error && q.status !== "up") extra.push(el("div", { class: "muted error-text" }, q.last_error));
  return el("td", { class: "state" }, badge, extra);
}

// Label each cell with its column head: narrow screens show the rows as labelled blocks (style.css).
function labelCells(table) {
  const heads = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.children].forEach((td, i) => { if (heads[i]) td.setAttribute("data-label", heads[i]); });
  }
}

function renderDestinations(queues, series) {
  const body = document.querySelector("#destinations tbody");
  body.replaceChildren(...queues.map((q) => el("tr", { "data-destination": q.name },
    el("td", { class: "name" }, q.name, q.peer ? el("div", { class: "muted" },
      `${q.peer.ae_title}@${q.peer.host}:${q.peer.port}`) : ""),
    stateCell(q),
    el("td", { class: "num pending" }, q.pending),
    el("td", { class: "num in_flight" }, q.in_flight),
    // quarantined (issue 15): held back by de-identification, under the failed count (no column)
    el("td", { class: "num failed" }, q.failed, q.quarantined
      ? el("div", { class: "muted quarantined", title: "held back by de-identification (burned-in annotation); kept, not sent" },
        `${q.quarantined} quarantined`) : ""),
    el("td", { class: "num oldest" }, age(q.oldest_age)),
    // storage commitment: committed apart from delivered, under it (no column: narrow screens)
    el("td", { class: "num delivered" }, q.delivered, q.committed || q.commit_waiting
      ? el("div", { class: "muted committed", title: "committed by the destination (storage commitment)" },
        `${q.committed} committed${q.commit_waiting ? `, ${q.commit_waiting} waiting` : ""}`) : "",
      // verify: find: instances listed by the destination's C-FIND; failed studies stand out
      q.verified || q.verify_waiting || q.verify_failed_now
      ? el("div", { class: `muted verified${q.verify_failed_now ? " error-text" : ""}`,
          title: "listed by the destination's C-FIND (verify: find)" },
        `${q.verified} verified${q.verify_waiting ? `, ${q.verify_waiting} study(ies) waiting` : ""}` +
        `${q.verify_failed_now ? `, ${q.verify_failed_now} verify-failed` : ""}`) : ""),
    el("td", { class: "num rate" }, lastMinuteRate(series, q.name).toFixed(2)),
    el("td", { class: "actions" }, actions(q)))));
  if (!queues.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "no destinations configured")));
  }
  labelCells(document.getElementById("destinations"));
}

function renderAlerts(alerts) {
  const box = document.getElementById("alerts");
  box.hidden = !alerts.length;
  box.replaceChildren(el("strong", {}, `${alerts.length} alert(s)`),
    el("ul", {}, alerts.map((a) => el("li", { "data-alert": a.name },
      a.message, el("span", { class: "muted" }, ` (since ${when(a.since)})`)))));
}

function renderUsage(status) {
  const u = status.usage;
  const used = u.used_bytes / u.map_size;
  const free = u.disk_free_bytes / u.disk_total_bytes;
  const low = u.disk_free_bytes < 2 * status.min_free_bytes;
  document.getElementById("usage").replaceChildren(
    el("div", {}, `spool: ${bytes(u.used_bytes)} of ${bytes(u.map_size)}`),
    el("div", { class: "bar" }, el("div", { style: `width:${(100 * used).toFixed(1)}%` })),
    el("div", {}, `disk: ${bytes(u.disk_free_bytes)} free of ${bytes(u.disk_total_bytes)}`,
      el("span", { class: "muted" }, ` (refuses objects below ${bytes(status.min_free_bytes)})`)),
    el("div", { class: low ? "bar low" : "bar" }, el("div", { style: `width:${(100 * (1 - free)).toFixed(1)}%` })));
  const t = status.totals;
  const rows = [["received", `${t.received} (${bytes(t.received_bytes)})`],
                ["delivered", `${t.delivered} (${bytes(t.delivered_bytes)})`],
                ["failed", t.failed], ["retries", t.retries], ["purged", t.purged]];
  for (const [ae, n] of Object.entries(status.received_from || {})) rows.push([`from ${ae || "(no AE)"}`, n]);
  document.querySelector("#totals tbody").replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, v))));
}

function renderFailures(rows) {
  const body = document.querySelector("#failures tbody");
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "no failed objects")));
    return;
  }
  body.replaceChildren(...rows.map((f) => el("tr", { "data-oid": f.oid },
    el("td", {}, when(f.failed_at)), el("td", {}, f.destination),
    el("td", { class: "status" }, f.status_text || "no DICOM status"),
    el("td", { class: "uid" }, f.sop_instance_uid),
    el("td", { class: "uid" }, el("a", { href: studyLink(f.study_instance_uid) }, f.study_instance_uid)),
    el("td", {}, f.calling_ae), el("td", { class: "num" }, f.attempts),
    el("td", { class: "error-text" }, f.error))));
  labelCells(document.getElementById("failures"));
}

// -- the live chart: a hand-written canvas line chart ---------------------------------------------

function drawChart(series) {
  const canvas = document.getElementById("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 800;
  const height = canvas.clientHeight || 220;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const lines = [{ name: "received", values: series.received || [], color: "#9ca3af", dash: [4, 3] }];
  Object.entries(series.delivered || {}).forEach(([name, values], i) =>
    lines.push({ name: `→ ${name}`, values, color: COLORS[i % COLORS.length], dash: [] }));
  const t = series.t || [];
  const pad = { left: 44, right: 10, top: 10, bottom: 22 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const now = t.length ? t[t.length - 1] : Date.now() / 1000;
  const span = 600;
  let max = 0;
  for (const l of lines) for (const v of l.values) max = Math.max(max, v);
  const step = niceStep(max || 1);
  const top = Math.max(step, Math.ceil((max || 1) / step) * step);
  const x = (ti) => pad.left + w * (1 - (now - ti) / span);
  const y = (v) => pad.top + h * (1 - v / top);

  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  ctx.strokeStyle = "#e3e6ea";
  ctx.lineWidth = 1;
  for (let v = 0; v <= top + 1e-9; v += step) {
    ctx.beginPath(); ctx.moveTo(pad.left, y(v)); ctx.lineTo(pad.left + w, y(v)); ctx.stroke();
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    ctx.fillText(formatRate(v), pad.left - 6, y(v));
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let m = 10; m >= 0; m -= 2) ctx.fillText(m ? `-${m}m` : "now", pad.left + w * (1 - m * 60 / span), pad.top + h + 6);

  for (const l of lines) {
    ctx.strokeStyle = l.color; ctx.lineWidth = 2; ctx.setLineDash(l.dash);
    ctx.beginPath();
    let started = false;
    l.values.forEach((v, i) => {
      if (now - t[i] > span) return;
      if (!started) { ctx.moveTo(x(t[i]), y(v)); started = true; } else ctx.lineTo(x(t[i]), y(v));
    });
    ctx.stroke();
  }
  ctx.setLineDash([]);
  canvas.dataset.points = String(t.filter((ti) => now - ti <= span).length);   // what a test can read
  canvas.dataset.first = String(t.length ? t[0] : "");
  document.getElementById("legend").replaceChildren(...lines.map((l) =>
    el("span", {}, el("i", { style: `background:${l.color}` }), l.name)));
}

function niceStep(max) {
  const raw = max / 4;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

function formatRate(v) { return v === 0 ? "0" : v >= 10 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2); }

// -- study search --------------------------------------------------------------------------------

function stepView(s) {
  const bits = [el("strong", {}, s.destination), " ", el("span", { class: `badge ${s.state}` }, s.state.replace("_", " "))];
  if (s.at) bits.push(" ", when(s.at));
  if (s.status_text) bits.push(" ", el("span", { class: "status" }, s.status_text));
  if (s.attempts !== null && s.attempts !== undefined) bits.push(el("span", { class: "muted" }, ` · ${s.attempts} attempt(s)`));
  if (s.next_at && s.state === "pending") bits.push(el("span", { class: "muted" }, ` · next try ${when(s.next_at)}`));
  if (s.error) bits.push(" ", el("span", { class: "error-text" }, s.error));
  if (s.commitment) {   // storage commitment: committed is shown apart from delivered
    const c = s.commitment;
    bits.push(" ", el("span", { class: `badge commit ${c.state}`, "data-commitment": c.state }, c.state),
      c.at ? el("span", { class: "muted" }, ` ${when(c.at)}`) : "",
      c.reason ? el("span", { class: "error-text" }, ` reason 0x${c.reason.toString(16).toUpperCase().padStart(4, "0")}`) : "");
  }
  if (s.verification) {   // verify: find: waiting, verified or verify-failed at that destination
    bits.push(" ", el("span", { class: `badge verify ${s.verification}`, "data-verification": s.verification },
      s.verification));
  }
  if (s.last_failure && s.state !== "failed") {
    bits.push(el("div", { class: "muted" }, `earlier failure ${when(s.last_failure.at)}: ${s.last_failure.status_text} ${s.last_failure.error}`));
  }
  return el("li", { class: "step", "data-destination": s.destination, "data-state": s.state }, bits);
}

// "What each destination gets" (issue 15): the object's content plans run on demand by the API
// (GET /api/objects/{oid}/diff, nothing written), shown as old -> new per attribute.
function valueText(v, absent) { return v === null || v === undefined ? absent : JSON.stringify(v); }

function diffView(doc) {
  return el("ul", { class: "diff" }, doc.destinations.map((d) => {
    const head = [el("strong", {}, d.destination), " "];
    if (d.result === "unchanged") return el("li", { "data-result": d.result }, head, "unchanged (sent as received)");
    if (d.result === "fails") return el("li", { "data-result": d.result }, head, el("span", { class: "error-text" }, `fails, not sent: ${d.error}`));
    if (d.result === "quarantined") return el("li", { "data-result": d.result }, head, el("span", { class: "error-text" }, `quarantined: ${d.quarantine}`));
    return el("li", { "data-result": d.result }, head, `${d.changes.length} change(s) by ${d.by.join(", ")}`,
      el("table", { class: "changes" }, d.changes.map((c) => el("tr", {},
        el("td", { class: "uid" }, c.path), el("td", {}, c.keyword), el("td", {}, valueText(c.old, "(absent)")),
        el("td", {}, "→"), el("td", {}, valueText(c.new, "(removed)")), el("td", { class: "muted" }, c.action)))));
  }));
}

function diffButton(o) {
  const box = el("div", { class: "diff-box" });
  const button = el("button", { type: "button", onclick: async () => {
    button.disabled = true;
    try { box.replaceChildren(diffView(await getJSON(`/api/objects/${o.oid}/diff`))); }
    catch (err) { box.replaceChildren(el("span", { class: "error-text" }, String(err.message || err))); }
    finally { button.disabled = false; }
  } }, "What each destination gets");
  return el("div", {}, button, box);
}

function objectView(o) {
  const src = o.received_from;
  return el("div", { class: "object", "data-sop": o.sop_instance_uid },
    el("div", {}, el("span", { class: "uid" }, o.sop_instance_uid), " ",
      el("span", { class: "muted" }, `${o.modality || "?"} · oid ${o.oid}`)),
    el("div", { class: "meta received" },
      `received ${when(o.received_at)} from ${src.calling_ae || "?"} (${src.peer || "?"}) as ${src.called_ae || "?"}`,
      ` · rules: ${o.rules.length ? o.rules.join(", ") : "none (default route)"}`,
      ` · patient ${o.patient_id || "–"} · accession ${o.accession_number || "–"}`),
    el("ul", { class: "path" }, o.path.length ? o.path.map(stepView) : el("li", { class: "muted" }, "routed nowhere")),
    o.routed_to && o.routed_to.length ? diffButton(o) : null);
}

// A study rolls up per destination and per series (API: "studies"); each series opens onto its instances,
// rendered only when opened, so a 50-image study is a few lines, not 50 boxes.
function studyLink(uid) { return `#/study/${encodeURIComponent(uid)}`; }

const BUCKETS = ["delivered", "committed", "verified", "verify_failed", "waiting", "failed", "dropped"];

function chips(dests) {
  return dests.map((d) => el("span", { class: "dest-chips", "data-destination": d.destination },
    el("strong", {}, d.destination), " ",
    BUCKETS.filter((b) => d[b]).flatMap((b) => [el("span", { class: `chip ${b}`, "data-bucket": b }, `${d[b]} ${b}`), " "])));
}

function studyView(study, byOid) {
  const head = el("tr", {}, el("th", {}, "destination"), el("th", { class: "num" }, "routed"),
    BUCKETS.map((b) => el("th", { class: "num" }, b)));
  const rows = study.destinations.map((d) => el("tr", { "data-destination": d.destination },
    el("td", {}, d.destination), el("td", { class: "num routed" }, d.routed),
    BUCKETS.map((b) => el("td", { class: `num ${b}${b === "failed" ? " failed-count" : ""}${d[b] ? "" : " zero"}` }, d[b]))));
  const when1 = study.first_received_at, when2 = study.last_received_at;
  return el("div", { class: "study", "data-study": study.study_instance_uid },
    el("h3", {}, el("span", { class: "uid" }, study.study_instance_uid),
      el("a", { class: "share", href: studyLink(study.study_instance_uid), title: "link to this study" }, "link")),
    el("div", { class: "meta" }, `patient ${study.patient_id || "–"} · accession ${study.accession_number || "–"} · `,
      `${plural(study.received, "object")} received in ${plural(study.series.length, "series", "series")}`,
      when1 ? ` · ${when(when1)}${when2 && when2 - when1 >= 1 ? ` – ${when(when2)}` : ""}` : ""),
    el("div", { class: "scroll" }, el("table", { class: "rollup" }, el("thead", {}, head),
      el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: 7, class: "muted" }, "routed nowhere"))))),
    study.series.map((se) => seriesView(se, byOid)));
}

function seriesView(se, byOid) {
  const box = el("details", { class: "series", "data-series": se.series_instance_uid },
    el("summary", {}, el("span", { class: "uid" }, se.series_instance_uid || "(no Series Instance UID)"),
      el("span", { class: "muted" }, `${se.modality || "?"} · ${plural(se.received, "instance")}`), chips(se.destinations)));
  box.addEventListener("toggle", () => {
    if (box.open && !box.querySelector(".object")) box.append(...se.oids.map((oid) => objectView(byOid.get(oid))));
  });
  return box;
}

async function search(kind, value) {
  document.getElementById("search-kind").value = kind;
  document.getElementById("search-value").value = value;
  const out = document.getElementById("search-results");
  out.replaceChildren(el("div", { class: "muted" }, "searching…"));
  try {
    const r = await getJSON(`/api/lookup?${kind}=${encodeURIComponent(value)}`);
    const byOid = new Map(r.objects.map((o) => [o.oid, o]));
    out.replaceChildren(
      el("div", { class: "summary" }, `${plural(r.count, "object")} in ${plural(r.studies.length, "study", "studies")}` +
        `${r.truncated ? " (truncated)" : ""}`),
      ...r.studies.map((st) => studyView(st, byOid)));
  } catch (err) {
    out.replaceChildren(el("div", { class: "error-text" }, err.message));
  }
}

// #/study/UID opens that study directly: a link to share, and what the failures table links to.
function route() {
  const m = /^#\/study\/(.+)$/.exec(location.hash);
  if (m) search("study_instance_uid", decodeURIComponent(m[1]));
}

window.addEventListener("hashchange", route);

document.getElementById("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const kind = document.getElementById("search-kind").value;
  const value = document.getElementById("search-value").value.trim();
  if (kind === "study_instance_uid" && location.hash !== studyLink(value)) location.hash = studyLink(value);
  else search(kind, value);
});

// -- throughput history --------------------------------------------------------------------------
// The server's ThroughputHistory keeps the last 10 minutes, so a page reload redraws them. The http
// process starts afresh on a configuration reload, though: the points this tab has seen are kept in
// sessionStorage and put in front of a shorter server history.

const HISTORY_KEY = "fastroute-throughput";
const SPAN_S = 600;

function mergeHistory(series) {
  let kept = null;
  try { kept = JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "null"); } catch (err) { kept = null; }
  const first = series.t.length ? series.t[0] : Infinity;
  const merged = { interval: series.interval, t: [], received: [], delivered: {} };
  const names = new Set([...Object.keys(series.delivered || {}), ...Object.keys((kept && kept.delivered) || {})]);
  for (const n of names) merged.delivered[n] = [];
  const horizon = (series.t.length ? series.t[series.t.length - 1] : Date.now() / 1000) - SPAN_S;
  if (kept && kept.t) {
    kept.t.forEach((t, i) => {
      if (t >= first || t < horizon) return;
      merged.t.push(t);
      merged.received.push(kept.received[i]);
      for (const n of names) merged.delivered[n].push(((kept.delivered || {})[n] || [])[i] || 0);
    });
  }
  series.t.forEach((t, i) => {
    merged.t.push(t);
    merged.received.push(series.received[i]);
    for (const n of names) merged.delivered[n].push(((series.delivered || {})[n] || [])[i] || 0);
  });
  try { sessionStorage.setItem(HISTORY_KEY, JSON.stringify(merged)); } catch (err) { /* full: keep drawing */ }
  return merged;
}

// -- polling -------------------------------------------------------------------------------------

let timer = null;
let unreachableSince = null;

function markReachable() {
  unreachableSince = null;
  document.body.classList.remove("stale");
  document.getElementById("stale").hidden = true;
}

function markUnreachable(err) {
  if (!unreachableSince) unreachableSince = new Date();
  document.body.classList.add("stale");
  const box = document.getElementById("stale");
  box.textContent = `Router unreachable since ${unreachableSince.toLocaleTimeString()} (${err.message}): ` +
    "the numbers below are the last ones received and may be out of date.";
  box.hidden = false;
  document.getElementById("updated").textContent = `unreachable since ${unreachableSince.toLocaleTimeString()}`;
}

// -- migrations (issue 13): progress, rate, ETA, failures with reasons, pause/resume -------------

const JOB_TEXT = { inventory: "inventory", running: "running", paused: "paused", "waiting-window": "waiting for its window",
                   done: "done", "done-with-errors": "done with errors", cancelled: "cancelled" };
const JOB_FINAL = new Set(["done", "done-with-errors", "cancelled"]);

function jobActions(j) {
  const name = encodeURIComponent(j.name);
  if (j.state === "paused") {
    return el("button", { class: "resume", onclick: () => act(`/api/migrations/${name}/resume`, { why: "dashboard" },
      (d) => `Migration ${j.name} resumed: ${JOB_TEXT[d.state] || d.state}.`) }, "resume");
  }
  if (JOB_FINAL.has(j.state)) return "";
  return el("button", { class: "pause", onclick: () => act(`/api/migrations/${name}/pause`, { why: "dashboard" },
    () => `Migration ${j.name} paused: nothing more is retrieved until it is resumed.`) }, "pause");
}

function renderMigrations(jobs, details) {
  document.getElementById("migrations-card").hidden = !jobs.length;
  const body = document.querySelector("#migrations tbody");
  body.replaceChildren(...jobs.map((j) => {
    const done = j.studies_done !== undefined ? j.studies_done : j.studies_verified + j.studies_failed;
    const share = j.studies_total ? done / j.studies_total : 0;
    return el("tr", { "data-job": j.name },
      el("td", { class: "name" }, j.name, el("div", { class: "muted" },
        `${j.source || "?"} → ${(j.destinations || []).join(", ")}`)),
      el("td", { class: "state" }, el("span", { class: `badge ${j.state}` }, JOB_TEXT[j.state] || j.state),
        j.error ? el("div", { class: "muted error-text" }, j.error) : ""),
      el("td", { class: "progress" },
        el("div", { class: "bar" }, el("div", { style: `width:${(100 * share).toFixed(1)}%` })),
        el("div", { class: "muted" }, `${j.instances_received} of ${j.instances_expected} instances received, ` +
          `${j.instances_delivered} delivered`)),
      el("td", { class: "num studies" }, `${done} / ${j.studies_total}`),
      el("td", { class: "num failed-count" + (j.studies_failed ? "" : " zero") }, j.studies_failed),
      el("td", { class: "num rate" }, Number(j.rate || 0).toFixed(1)),
      el("td", { class: "num eta" }, JOB_FINAL.has(j.state) ? "–" : age(j.eta_s)),
      el("td", { class: "actions" }, jobActions(j)));
  }));
  labelCells(document.getElementById("migrations"));
  document.getElementById("migration-failures").replaceChildren(...details.filter((d) => d.failures.length).map((d) =>
    el("div", { class: "migration-failures", "data-job": d.name },
      el("h3", {}, `${d.name}: ${plural(d.studies_failed, "failed study", "failed studies")}`,
        d.failures.length < d.studies_failed ? el("span", { class: "muted" }, ` (first ${d.failures.length}; ` +
          "the report lists all)") : ""),
      el("div", { class: "scroll" }, el("table", {},
        el("thead", {}, el("tr", {}, el("th", {}, "study"), el("th", {}, "patient"), el("th", {}, "accession"),
          el("th", { class: "num" }, "source"), el("th", { class: "num" }, "found"), el("th", {}, "reason"))),
        el("tbody", {}, d.failures.map((f) => el("tr", { "data-study": f.study_instance_uid },
          el("td", { class: "uid" }, f.study_instance_uid), el("td", {}, f.patient_id), el("td", {}, f.accession_number),
          el("td", { class: "num" }, f.source_instances === null ? "–" : f.source_instances),
          el("td", { class: "num" }, f.found_at_destination === null ? "–" : f.found_at_destination),
          el("td", { class: "error-text reason" }, f.reason || "–")))))))));
}

async function fetchMigrations() {
  const jobs = (await getJSON("/api/migrations")).migrations;
  const details = await Promise.all(jobs.filter((j) => j.studies_failed > 0).map((j) =>
    getJSON(`/api/migrations/${encodeURIComponent(j.name)}?limit=20`)));
  return [jobs, details];
}

async function refresh() {
  clearTimeout(timer);
  try {
    const [status, raw, failures, migrations] = await Promise.all([
      getJSON("/api/status"), getJSON("/api/throughput"), getJSON("/api/failures?limit=25"), fetchMigrations()]);
    const series = mergeHistory(raw);
    const l = status.listener;
    document.getElementById("listener").textContent =
      `${status.version} · AE ${l.ae_title} on ${l.host}:${l.port} · ${l.processes} listener process(es)`;
    renderAlerts(status.alerts);
    renderDestinations(status.destinations, series);
    renderUsage(status);
    renderFailures(failures.failures);
    renderMigrations(...migrations);
    drawChart(series);
    markReachable();
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "1";
  } catch (err) {
    if (!document.getElementById("auth").hidden) {
      // Refused for the token: stop polling (no stream of 401s in the router's log) until one is entered.
      document.getElementById("updated").textContent = "waiting for the API token";
      return;
    }
    markUnreachable(err);
  }
  timer = setTimeout(refresh, POLL_MS);
}

Promise.all([detectSendNow(), whoami()]).finally(() => { refresh(); route(); });
