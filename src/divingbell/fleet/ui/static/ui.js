// divingbell fleet UI: renders the service's own JSON API and refreshes it every few seconds.
// No framework and no asset from the internet; the session cookie authenticates every fetch.
"use strict";

const REFRESH_MS = 2000;
const page = document.body.dataset.page;
const role = document.querySelector('meta[name="role"]').content;
const csrf = document.querySelector('meta[name="csrf-token"]').content;
const prefix = (document.querySelector('link[rel="stylesheet"]').getAttribute("href") || "").replace(/\/ui\/static\/ui\.css$/, "");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(text) { return el("span", { class: "badge " + String(text) }, text); }

function age(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 172800) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " days ago";
}

function when(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0; let value = n;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
  return value.toFixed(i ? 1 : 0) + " " + units[i];
}

async function api(path, options) {
  const response = await fetch(prefix + path, Object.assign({ credentials: "same-origin" }, options || {}));
  if (response.status === 401) { window.location = prefix + "/ui/login"; throw new Error("logged out"); }
  const body = (response.headers.get("content-type") || "").includes("json") ? await response.json() : await response.text();
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    throw new Error(detail);
  }
  return body;
}

function list(body, key) { return Array.isArray(body) ? body : (body[key] || []); }

// Every machine, a page at a time: /v1/machines pages with a `next` cursor (null on the last).
async function allMachines() {
  const machines = [];
  let after = null;
  do {
    const body = await api("/v1/machines?limit=1000" + (after ? "&after=" + encodeURIComponent(after) : ""));
    if (Array.isArray(body)) return body;
    for (const m of body.machines) machines.push(m);
    if (body.next && body.next === after) throw new Error("the service returned the same page of machines twice");
    after = body.next;
  } while (after);
  return machines;
}

function status(text, isError) {
  const line = document.getElementById("status-line");
  line.textContent = text;
  line.className = "status-line" + (isError ? " error" : "");
}

function replaceRows(tbody, rows) { tbody.replaceChildren(...rows); }

function machineRow(m) {
  const ipv4 = (m.ips || []).slice();
  const macs = (m.macs || []).slice();
  if (!m.macs) {
    for (const iface of m.interfaces || []) {
      if (iface.mac) macs.push(iface.mac);
      for (const a of iface.addresses || []) if (!String(a.address).startsWith("fe80")) ipv4.push(a.address);
    }
  }
  return {
    id: m.id, name: m.hostname || m.name || m.id, role: (m.roles || []).join(", ") || "–",
    rack: (m.labels || {})["divingbell.io/rack"] || m.rack || "–", state: m.state,
    revision: m.revision === null || m.revision === undefined ? "–" : m.revision,
    up_to_date: m.up_to_date === null || m.up_to_date === undefined ? "–" : (m.up_to_date ? "yes" : "no"),
    report_age: m.last_report_at || "", power: m.power_state || "–", mac: macs.join(" "), ip: ipv4.join(" "),
  };
}

// --- pages -----------------------------------------------------------------------------------

const sortState = { key: "name", dir: 1 };

async function renderMachines() {
  const machines = (await allMachines()).map(machineRow);
  const states = new Set(machines.map((m) => m.state));
  const roles = new Set(machines.map((m) => m.role));
  for (const [id, values] of [["state-filter", states], ["role-filter", roles]]) {
    const select = document.getElementById(id);
    const known = new Set([...select.options].map((o) => o.value));
    for (const value of [...values].sort()) if (!known.has(value)) select.append(el("option", { value }, value));
  }
  const text = document.getElementById("filter").value.trim().toLowerCase();
  const state = document.getElementById("state-filter").value;
  const roleFilter = document.getElementById("role-filter").value;
  const shown = machines.filter((m) => (!state || m.state === state) && (!roleFilter || m.role === roleFilter) &&
    (!text || Object.values(m).some((v) => String(v).toLowerCase().includes(text))));
  shown.sort((a, b) => (String(a[sortState.key]) > String(b[sortState.key]) ? 1 : -1) * sortState.dir *
    (sortState.key === "report_age" ? -1 : 1));
  document.getElementById("machine-total").textContent = `${shown.length} of ${machines.length}`;
  replaceRows(document.querySelector("#machines tbody"), shown.map((m) => el("tr",
    { class: "clickable", "data-id": m.id, onclick: () => { window.location = prefix + "/ui/machines/" + encodeURIComponent(m.id); } },
    el("td", {}, el("a", { href: prefix + "/ui/machines/" + encodeURIComponent(m.id) }, m.name)), el("td", {}, m.role),
    el("td", {}, m.rack), el("td", {}, badge(m.state)), el("td", {}, m.revision),
    el("td", {}, m.up_to_date === "no" ? badge("outdated") : m.up_to_date), el("td", {}, age(m.report_age)),
    el("td", {}, m.power === "–" ? "–" : badge(m.power)), el("td", {}, m.mac), el("td", {}, m.ip))));
}

function setupMachines() {
  for (const th of document.querySelectorAll("#machines th")) {
    th.addEventListener("click", () => {
      sortState.dir = sortState.key === th.dataset.key ? -sortState.dir : 1;
      sortState.key = th.dataset.key;
      for (const other of document.querySelectorAll("#machines th")) other.className = "";
      th.className = sortState.dir > 0 ? "sorted-asc" : "sorted-desc";
      renderMachines();
    });
  }
  for (const id of ["filter", "state-filter", "role-filter"]) document.getElementById(id).addEventListener("input", renderMachines);
}

async function renderMachine() {
  const id = document.body.dataset.machine;
  const path = "/v1/machines/" + encodeURIComponent(id);
  // Everything is fetched before anything is drawn, so the page never shows half a machine;
  // the name is drawn last and marks the page as complete.
  const [m, bmc] = await Promise.all([api(path), api(path + "/bmc").catch(() => null)]);
  let reports = m.reports;
  if (!reports) { try { reports = list(await api(path + "/reports"), "reports"); } catch (e) { reports = []; } }
  const row = machineRow(m);
  const facts = [["State", badge(m.state)], ["Role", row.role], ["Rack", row.rack], ["Revision", row.revision],
    ["Up to date", row.up_to_date], ["Last report", age(m.last_report_at)], ["UUID", m.uuid || "–"], ["Boot id", m.boot_id || "–"],
    ["Hostname", m.hostname ? m.hostname + (m.hostname_accepted ? "" : " (claimed; not accepted: divingbell fleet accept)") : "–"]];
  // The BMC's last confirmed power state (from the store: the page never queries the BMC).
  if (bmc) {
    facts.push(["Power", el("span", {}, badge(bmc.power_state), ` ${bmc.protocol}, ${age(bmc.power_checked_at)}`)]);
    document.getElementById("power-actions").hidden = role !== "admin";
  } else {
    facts.push(["Power", "no BMC"]);
  }
  // What the machine's discovery said: shown, never used until an admin sets the BMC.
  if (m.reported_bmc) {
    facts.push(["BMC (reported)", `${m.reported_bmc.address} (${m.reported_bmc.source}; ${bmc ? "set: " + bmc.address : "not set: divingbell fleet bmc"})`]);
  }
  replaceRows(document.getElementById("machine-facts"), facts.map(([k, v]) => el("div", { class: "card" }, el("h2", {}, k), el("p", {}, v))));
  replaceRows(document.getElementById("interfaces"), (m.interfaces || []).map((i) => el("tr", {},
    el("td", {}, i.name), el("td", {}, i.mac), el("td", {}, (i.addresses || []).map((a) => `${a.address}/${a.prefix}`).join(" ")), el("td", {}, i.gateway || "–"))));
  replaceRows(document.getElementById("disks"), (m.disks || []).map((d) => el("tr", {},
    el("td", {}, d.path), el("td", {}, bytes(d.size_bytes)), el("td", {}, d.model || "–"), el("td", {}, d.serial || "–"))));
  replaceRows(document.getElementById("history"), (m.history || []).slice().reverse().map((h) => el("tr", {},
    el("td", {}, when(h.at)), el("td", {}, h.from || h.from_state || "–"), el("td", {}, badge(h.to || h.to_state)), el("td", {}, h.reason || ""))));
  replaceRows(document.getElementById("reports"), reports.map((r) => el("tr", {},
    el("td", {}, when(r.received_at || r.at)), el("td", {}, r.revision), el("td", {}, badge(r.state)),
    el("td", {}, Object.entries(r.modules || {}).map(([name, mod]) => el("div", {},
      `${name}: ${mod.changes || 0} change(s)`, (mod.failures || []).length ? el("span", { class: "error" }, " — " + mod.failures.join("; ")) : ""))),
    el("td", {}, r.duration_seconds === undefined ? "–" : Number(r.duration_seconds).toFixed(2) + " s"))));
  document.getElementById("machine-name").textContent = row.name;
}

function progressOf(rollout) {
  const counts = rollout.summary || {};
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  return { total, done: counts.done || 0, failed: counts.failed || 0, updating: counts.updating || 0 };
}

async function currentRollout() {
  try { return await api("/v1/rollouts/current"); } catch (e) { if (String(e.message).includes("no rollout")) return null; throw e; }
}

async function renderOverview() {
  const machines = await allMachines();
  document.getElementById("machine-count").textContent = machines.length;
  document.getElementById("up-to-date").textContent = machines.filter((m) => m.up_to_date === true).length;
  document.getElementById("outdated").textContent = machines.filter((m) => m.up_to_date === false).length;
  const byState = {};
  for (const m of machines) byState[m.state] = (byState[m.state] || 0) + 1;
  replaceRows(document.getElementById("by-state"), Object.keys(byState).sort().map((s) => el("tr", {}, el("td", {}, badge(s)), el("td", {}, byState[s]))));
  const revisions = list(await api("/v1/revisions"), "revisions");
  const current = revisions.find((r) => r.current);
  document.getElementById("current-revision").textContent = current ? current.revision : "–";
  const rollout = await currentRollout();
  if (rollout) {
    const p = progressOf(rollout);
    document.getElementById("rollout-summary").replaceChildren(`Revision ${rollout.revision}: `, badge(rollout.status),
      ` ${p.done} of ${p.total} done, ${p.updating} updating, ${p.failed} failed`);
    document.getElementById("rollout-bar").style.width = (p.total ? (100 * p.done) / p.total : 0) + "%";
  }
}

async function renderRollout() {
  const rollout = await currentRollout();
  const actions = document.getElementById("rollout-actions");
  if (!rollout) { document.getElementById("rollout-head").textContent = "No rollout yet."; actions.hidden = true; }
  else {
    const p = progressOf(rollout);
    document.getElementById("rollout-head").replaceChildren(
      el("p", {}, `Rollout ${rollout.id} of revision ${rollout.revision} `, badge(rollout.status),
        ` — ${p.done} of ${p.total} done, ${p.updating} updating, ${p.failed} failed. Started by ${rollout.started_by || "?"} ${age(rollout.started_at)}.`),
      el("div", { class: "progress" }, el("div", { class: "bar", style: `width:${p.total ? (100 * p.done) / p.total : 0}%` })));
    const halt = document.getElementById("halt-reason");
    halt.hidden = !rollout.halt_reason;
    halt.textContent = rollout.halt_reason || "";
    actions.hidden = role !== "admin";
    document.getElementById("pause").disabled = rollout.status !== "running";
    document.getElementById("resume").disabled = !["paused", "halted"].includes(rollout.status);
    document.getElementById("abort").disabled = ["completed", "aborted"].includes(rollout.status);
    replaceRows(document.getElementById("waves"), (rollout.waves || []).map((wave, index) => el("div", { class: "wave" },
      el("h3", {}, `Wave ${index + 1}`), el("div", { class: "members" }, wave.map((m) => el("span",
        { class: "badge " + m.progress, title: m.error || "", "data-machine": m.name }, `${m.name}: ${m.progress}`))))));
  }
  const history = list(await api("/v1/rollouts"), "rollouts");
  replaceRows(document.getElementById("rollout-history"), history.map((r) => el("tr", {},
    el("td", {}, r.id), el("td", {}, r.revision), el("td", {}, badge(r.status)), el("td", {}, r.started_by || "–"),
    el("td", {}, when(r.started_at)), el("td", {}, when(r.finished_at)))));
}

function setupRollout() {
  for (const button of document.querySelectorAll("#rollout-actions button")) {
    button.addEventListener("click", async () => {
      const verb = button.dataset.verb;
      if (verb === "abort" && !window.confirm("Abort this rollout? Machines not yet reached stay on their revision.")) return;
      button.disabled = true;
      try {
        await api("/v1/rollouts/current/" + verb, { method: "POST", headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
          body: JSON.stringify({ rollback: document.getElementById("rollback").checked }) });
        status(`${verb}: done`);
      } catch (e) { status(`${verb} failed: ${e.message}`, true); }
      refresh();
    });
  }
}

function setupMachine() {
  // Power through the machine's BMC (admin; the session's CSRF token like every action). The
  // service answers once the BMC confirmed, or with what it sent and why it stopped.
  for (const button of document.querySelectorAll("#power-actions button")) {
    button.addEventListener("click", async () => {
      const action = button.dataset.action;
      const id = document.body.dataset.machine;
      if (action !== "on" && !window.confirm(`Power ${action} ${id}? It stops whatever runs on it.`)) return;
      const body = { action };
      if (document.getElementById("boot-pxe").checked) body.boot_once = "pxe";
      for (const b of document.querySelectorAll("#power-actions button")) b.disabled = true;
      status(`power ${action}: waiting for the BMC to confirm…`);
      try {
        const answer = await api("/v1/machines/" + encodeURIComponent(id) + "/power", { method: "POST",
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf }, body: JSON.stringify(body) });
        status(`power ${action}: ${answer.message}`);
      } catch (e) { status(`power ${action} failed: ${e.message}`, true); }
      for (const b of document.querySelectorAll("#power-actions button")) b.disabled = false;
      refresh();
    });
  }
}

async function renderRevisions() {
  const revisions = list(await api("/v1/revisions"), "revisions");
  replaceRows(document.getElementById("revisions"), revisions.slice().reverse().map((r) => el("tr", {},
    el("td", {}, r.revision), el("td", {}, when(r.created_at)), el("td", {}, r.created_by || "–"),
    el("td", {}, el("code", {}, (r.digest || "").slice(0, 12))), el("td", {}, r.current ? badge("current") : ""))));
  for (const [id, offset] of [["diff-from", 2], ["diff-to", 1]]) {
    const select = document.getElementById(id);
    if (select.options.length === revisions.length) continue;
    select.replaceChildren(...revisions.map((r) => el("option", { value: r.revision }, r.revision)));
    if (revisions.length >= offset) select.value = revisions[revisions.length - offset].revision;
  }
}

async function renderDiff() {
  const body = await api(`/v1/revisions/${document.body.dataset.from}/diff/${document.body.dataset.to}`);
  const pre = document.getElementById("diff");
  const lines = (body.diff || "").split("\n");
  pre.replaceChildren(...(lines.length && body.diff ? lines.map((line) => el("span", {
    class: /^(\+\+\+|---|@@)/.test(line) ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "" }, line + "\n"))
    : ["The two revisions are the same."]));
}

const pages = {
  overview: { render: renderOverview }, machines: { render: renderMachines, setup: setupMachines },
  machine: { render: renderMachine, setup: setupMachine }, rollout: { render: renderRollout, setup: setupRollout },
  revisions: { render: renderRevisions }, diff: { render: renderDiff, once: true },
};

async function refresh() {
  const current = pages[page];
  if (!current) return;
  try {
    await current.render();
    status("updated " + new Date().toLocaleTimeString());
  } catch (e) {
    status("could not refresh: " + e.message, true);
  }
}

if (pages[page]) {
  if (pages[page].setup) pages[page].setup();
  refresh();
  if (!pages[page].once) setInterval(refresh, REFRESH_MS);
}
