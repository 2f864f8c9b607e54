// kport ui: the page. Live events over one WebSocket, history from the journal over the
// HTTP API, everything drawn by hand (no framework, nothing fetched from elsewhere).
"use strict";

const ROW = 22;                 // px: the log's fixed row height
// events the page holds at most (?rows=N: 1,000 to 1,000,000); older ones come back from
// the journal on scroll
const MAX_ROWS = Math.min(1e6, Math.max(1000, Number(new URLSearchParams(location.search).get("rows")) || 100000));
const TRIM = Math.ceil(MAX_ROWS / 10);  // how many go at once when the window is full
const PAGE = 1000;              // events per history fetch
const TREE_KEEP_MS = 10000;     // how long an exited process stays in the tree, fading
const SOURCES = ["proc", "file", "net"];
const HOSTS_MAX = 10000;        // fleet: hosts listed in the host filter and stats at most
// fleet: the views that are each host's own, off when the page shows the fleet
const FLEET_OFF = ["tree", "prompts", "rules"];
const COLOURS = { proc: "--proc", file: "--file", net: "--net" };

const $ = (id) => document.getElementById(id);
const el = (tag, props = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
};

// --- state ------------------------------------------------------------------------------

const state = {
  rows: [],            // events, oldest first
  seqs: new Set(),     // keys (see keyOf) of the rows: nothing is shown twice
  fleet: null,         // {url, stream} when the UI shows the fleet (kport ui --fleet)
  hosts: new Map(),    // fleet: host → {events, last_ts}, at most HOSTS_MAX
  hostsUnlisted: 0,    // fleet: events of hosts beyond HOSTS_MAX
  trimmed: 0,          // rows let go because the page held MAX_ROWS (the oldest first)
  notShown: 0,         // fleet: events never shown (this page fell behind, or paused too long)
  repeats: 0,          // fleet: events this page already had (a replay after a reconnect)
  view: [],            // rows that pass the filters
  lastSeq: null,       // the newest seq received live: a reconnect asks from there
  paused: false,
  held: [],            // live events that came while paused
  heldOverflow: false,
  detached: false,     // scrolled back so far that the newest rows were let go
  newer: 0,            // live events not shown while detached
  following: true,     // stuck to the bottom: new rows scroll into sight
  selected: -1,        // index into view
  loadingOlder: false,
  exhausted: false,    // the journal has nothing older (for these filters)
  ws: null,
  wsState: "connecting",
  retry: 0,
  ports: {},
  prompts: new Map(),  // id → prompt (pending)
  settled: [],
  rates: [],
  procs: new Map(),    // pid → process, for the tree and ancestry
  collapsed: new Set(),
  treeDirty: true,
  suspects: [],        // seq ranges skipped by the live stream, checked a second later
  uiDropped: 0,        // events this page fell behind on (fetched back from the journal)
  gapsFilled: 0,
  view_: "log",
  rules: null,
  editing: null,       // index of the rule in the editor, or -1 for a new one
};

// --- the connection ---------------------------------------------------------------------

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const after = state.lastSeq !== null ? `?after=${state.lastSeq}` : "";
  const ws = new WebSocket(`${proto}//${location.host}/api/live${after}`);
  state.ws = ws;
  setConn("connecting");
  ws.onmessage = (e) => onMessage(JSON.parse(e.data));
  ws.onopen = () => { state.retry = 0; setConn("live"); };
  ws.onclose = () => {
    state.ws = null;
    const wait = Math.min(5000, 250 * 2 ** state.retry++);
    setConn("reconnecting", wait);
    setTimeout(connect, wait);
  };
}

function setConn(what, wait) {
  state.wsState = what;
  const node = $("conn");
  const sources = Object.entries(state.ports).filter(([n]) => SOURCES.includes(n));
  const served = sources.filter(([, p]) => p.state !== "absent");  // absent: not enabled in the daemon
  const down = served.filter(([, p]) => p.state !== "connected");
  node.className = "conn";
  if (what === "reconnecting") {
    node.textContent = `UI server unreachable; trying again in ${(wait / 1000).toFixed(1)} s`;
    node.classList.add("bad");
  } else if (what === "connecting") {
    node.textContent = "connecting…";
  } else if (state.fleet) {
    const fleet = state.ports.fleet || { state: "connecting" };
    if (fleet.state === "connected") {
      node.textContent = `live: the fleet at ${state.fleet.url}, ${state.hosts.size.toLocaleString()} hosts`;
    } else if (fleet.state === "connecting") {
      node.textContent = `connecting to the fleet at ${state.fleet.url}…`;
    } else {
      node.textContent = `fleet: ${fleet.error || fleet.state}; trying again`;
      node.classList.add("bad");
    }
  } else if (!served.length || down.length === served.length) {
    const why = sources.map(([n, p]) => `${n} ${p.state}`).join(", ");
    node.textContent = `daemon not reachable (${why}); trying again`;
    node.classList.add("bad");
  } else if (down.length) {
    node.textContent = "live; " + down.map(([n, p]) => `${n}: ${p.state}`).join(", ");
    node.classList.add("warn");
  } else {
    node.textContent = "live: " + served.map(([n]) => n).join(", ");
  }
  renderStatsTables();
}

function onMessage(msg) {
  switch (msg.type) {
    case "hello": {
      state.ports = msg.status.ports;
      if (msg.status.fleet && !state.fleet) enterFleet(msg.status.fleet);
      state.rates = msg.rates;
      for (const p of msg.status.prompts) state.prompts.set(p.id, p);
      state.settled = msg.status.settled.slice(-50);
      renderPrompts();
      setConn("live");
      // Back after the UI server's memory ran out: what it no longer holds is in the journal.
      if (state.lastSeq !== null && msg.ring_first !== null && msg.ring_first > state.lastSeq + 1) {
        fillGap(state.lastSeq + 1, msg.ring_first - 1);
      }
      if (!state.fleet) refreshProcesses();
      break;
    }
    case "events":
      for (const event of msg.events) live(event);
      if (state.fleet) state.notShown += msg.dropped || 0;  // here, gaps name this host's seqs
      for (const [first, last] of msg.gaps) { state.uiDropped += last - first + 1; fillGap(first, last); }
      afterAppend();
      break;
    case "prompt": onPrompt(msg.prompt); break;
    case "ports": state.ports = msg.ports; setConn(state.wsState); break;
    case "rate":
      state.rates.push(msg.sample);
      if (state.rates.length > 300) state.rates.shift();
      if (state.view_ === "stats") drawChart();
      break;
  }
}

// --- the log ----------------------------------------------------------------------------

function live(event) {
  if (state.fleet) { fleetLive(event); return; }
  if (typeof event.seq === "number") {
    if (state.lastSeq !== null && event.seq <= state.lastSeq && state.seqs.has(event.seq)) return;
    if (state.lastSeq !== null && event.seq > state.lastSeq + 1 && everyPortLive()) {
      state.suspects.push({ first: state.lastSeq + 1, last: event.seq - 1, at: Date.now() });
    }
    if (state.lastSeq === null || event.seq > state.lastSeq) state.lastSeq = event.seq;
  }
  trackProcess(event);
  if (state.paused) {
    if (state.held.length < MAX_ROWS) state.held.push(event); else state.heldOverflow = true;
    return;
  }
  if (state.detached) { state.newer++; return; }
  append(event);
}

function append(event) {
  const key = keyOf(event);
  if (key !== null) {
    if (state.seqs.has(key)) return;
    state.seqs.add(key);
  }
  state.rows.push(event);
  if (passes(event)) state.view.push(event);
}

// What makes an event one: here its seq (daemon-wide); in the fleet its host and seq, since
// each host counts its own and the stream may deliver one again after a broker was killed.
function keyOf(e) {
  if (typeof e.seq !== "number") return null;
  return state.fleet ? `${e.host}\u0000${e.journal}\u0000${e.seq}` : e.seq;
}

// --- the fleet (kport ui --fleet) -------------------------------------------------------

function enterFleet(fleet) {
  state.fleet = fleet;
  state.seqs = new Set(state.rows.map(keyOf).filter((k) => k !== null));
  document.body.classList.add("fleet");
  document.title = "kport: fleet";
  $("fleet-note").textContent = `The fleet's log, from ${fleet.url} (stream ${fleet.stream}). ` +
    "Prompts, rules and the process tree are each host's own: open kport ui on that host.";
  for (const v of FLEET_OFF) {
    const tab = $(`tab-${v}`);
    tab.disabled = true;
    tab.title = "each host's own: open kport ui on that host";
  }
  if (!available(state.view_)) show("log");
}

function available(view) { return !(state.fleet && FLEET_OFF.includes(view)); }

// The server drops what it has sent once; a page that reconnects is sent the recent past
// again, and drops what it holds.
function fleetLive(event) {
  const key = keyOf(event);
  if (key !== null && state.seqs.has(key)) { state.repeats++; return; }
  noteHost(event);
  if (state.paused) {
    if (state.held.length < MAX_ROWS) state.held.push(event); else state.notShown++;
    return;
  }
  append(event);
}

let hostsTimer = null;
function noteHost(e) {
  if (e.host == null) return;
  const host = String(e.host);
  const known = state.hosts.get(host);
  if (known) { known.events++; known.last_ts = e.ts ?? known.last_ts; return; }
  if (state.hosts.size >= HOSTS_MAX) { state.hostsUnlisted++; return; }
  state.hosts.set(host, { events: 1, last_ts: e.ts });
  if (!hostsTimer) hostsTimer = setTimeout(listHosts, 200);
}

function listHosts() {
  hostsTimer = null;
  const names = [...state.hosts.keys()].sort();
  $("hosts-list").replaceChildren(...names.map((h) => el("option", { value: h })));
  setConn(state.wsState);
}

// seq is daemon-wide and every event port's events reach this page, so a seq skipped is
// an event this page never got (the UI server restarted, say) unless it comes a moment
// later on another port. Ranges still missing after a second are fetched from the journal.
function everyPortLive() {
  // a port this UI may not read would make every one of its events look like a gap
  return SOURCES.every((n) => !state.ports[n] || state.ports[n].state !== "denied");
}

function checkSuspects() {
  const now = Date.now();
  const due = state.suspects.filter((g) => now - g.at >= 1000);
  state.suspects = state.suspects.filter((g) => now - g.at < 1000);
  for (const g of due) {
    let start = null;
    const last = Math.min(g.last, g.first + MAX_ROWS);
    for (let seq = g.first; seq <= last + 1; seq++) {
      const missing = seq <= last && !state.seqs.has(seq);
      if (missing && start === null) start = seq;
      if (!missing && start !== null) { fillGap(start, seq - 1); start = null; }
    }
  }
}

function afterAppend() {
  if (state.rows.length > MAX_ROWS) trimOldest();
  updateCount();
  if (state.view_ === "log") {
    if (state.following && !state.paused) scrollToEnd(); else renderLog();
  }
  if (state.view_ === "tree") scheduleTree();
}

function trimOldest() {
  const gone = state.rows.splice(0, state.rows.length - MAX_ROWS + TRIM);
  for (const e of gone) state.seqs.delete(keyOf(e));
  state.trimmed += gone.length;
  const before = state.view.length;
  state.view = state.rows.filter(passes);
  state.exhausted = false;
  const log = $("log");
  if (!state.following) log.scrollTop = Math.max(0, log.scrollTop - (before - state.view.length) * ROW);
  if (state.selected >= 0) state.selected = Math.max(-1, state.selected - (before - state.view.length));
}

function trimNewest() {
  const gone = state.rows.splice(MAX_ROWS - TRIM);
  for (const e of gone) state.seqs.delete(keyOf(e));
  state.view = state.rows.filter(passes);
  state.detached = true;
  $("live").hidden = false;
}

const filters = { host: "", source: "", kind: "", text: "", user: "", pid: "" };

function passes(e) {
  // a host's loss is shown with that host's events (loss is never filtered away otherwise)
  if (filters.host && !globMatch(filters.host, String(e.host ?? ""))) return false;
  if (e.kind === "lost") return true;
  if (filters.source && e.source !== filters.source) return false;
  if (filters.kind && !globMatch(filters.kind, String(e.kind || ""))) return false;
  if (filters.pid && String(e.pid) !== filters.pid) return false;
  if (filters.user && String(e.user ?? "") !== filters.user && String(e.uid ?? "") !== filters.user) return false;
  if (filters.text) {
    if (e._text === undefined) e._text = JSON.stringify(e).toLowerCase();
    if (!e._text.includes(filters.text)) return false;
  }
  return true;
}

function globMatch(pattern, value) {
  if (!/[*?]/.test(pattern)) return pattern.split(",").map((p) => p.trim()).includes(value);
  const re = new RegExp("^" + pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".") + "$");
  return re.test(value);
}

function applyFilters() {
  filters.host = state.fleet ? $("f-host").value.trim() : "";
  filters.source = $("f-source").value;
  filters.kind = $("f-kind").value.trim();
  filters.text = $("f-text").value.trim().toLowerCase();
  filters.user = $("f-user").value.trim();
  filters.pid = $("f-pid").value.trim();
  state.view = state.rows.filter(passes);
  state.selected = -1;
  state.exhausted = false;
  updateCount();
  scrollToEnd();
}

function updateCount() {
  const shown = state.view.length.toLocaleString();
  const all = state.rows.length.toLocaleString();
  let text = shown === all ? `${all} events` : `${shown} of ${all} events`;
  if (state.paused) text += ` · paused, ${state.held.length.toLocaleString()} waiting`;
  if (state.detached) text += ` · ${state.newer.toLocaleString()} newer not shown`;
  if (state.fleet && state.trimmed) text += ` · ${state.trimmed.toLocaleString()} older let go (at most ${MAX_ROWS.toLocaleString()} held)`;
  if (state.fleet && state.notShown) text += ` · ${state.notShown.toLocaleString()} not shown (this page fell behind)`;
  $("log-count").textContent = text;
}

function clock(ts) {
  if (!ts) return "--:--:--";
  const d = new Date(ts / 1e6);
  return d.toTimeString().slice(0, 8) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function summary(e) {
  if (e.kind === "lost") {
    const range = e.first_seq != null ? ` (seq ${e.first_seq}–${e.last_seq})` : "";
    const howMany = e.count ?? (e.at_most != null ? `up to ${e.at_most}` : "some");  // a bound only, after a crash
    return `LOST ${howMany} events${range} ${e.reason || e.where || ""}`;
  }
  const argv = e.argv || e.cmdline;
  const command = (argv && argv.length ? argv.join(" ") : e.exe || e.comm || "?") + (e.gone ? " (gone)" : "");
  switch (e.source) {
    case "file": return `${e.verdict ? e.verdict.toUpperCase() + " " : ""}${e.path ?? e.name ?? ""}  ← ${command}${e.rule ? "  [" + e.rule + "]" : ""}`;
    case "net": {
      const peer = state.fleet ? e.peer_host : e.host;  // in the fleet, host is the host that saw it
      const where = e.direction === "in" ? `from ${e.src}:${e.sport} to port ${e.dport}` : `${e.dst}${peer ? " (" + peer + ")" : ""}:${e.dport}`;
      return `${(e.verdict || e.kind || "").toUpperCase()} ${e.protocol || ""} ${where}  ← ${command}${e.rule ? "  [" + e.rule + "]" : ""}`;
    }
    case "kport": return `${e.kind}${e.reason ? ": " + e.reason : ""}${e.durable !== undefined ? " (durable: " + e.durable + ")" : ""}`;
    default: {
      let extra = "";
      if (e.kind === "exit") extra = e.signal != null ? ` signal=${e.signal}` : ` code=${e.code}`;
      if (e.kind === "exit" && e.run_time_s != null) extra += ` ran=${Number(e.run_time_s).toFixed(3)}s`;
      return `${command}${extra}  ← ${e.parent_exe || "?"}(${e.ppid ?? "?"})`;
    }
  }
}

const pool = [];

function renderLog() {
  const log = $("log");
  const spacer = $("log-spacer");
  const height = state.view.length * ROW + ROW;
  if (spacer.style.height !== height + "px") spacer.style.height = height + "px";
  const top = log.scrollTop;
  const first = Math.max(0, Math.floor(top / ROW) - 5);
  const last = Math.min(state.view.length, Math.ceil((top + log.clientHeight) / ROW) + 5);
  let used = 0;
  for (let i = first; i < last; i++, used++) {
    let row = pool[used];
    if (!row) {
      row = el("div", { class: "row", role: "row" },
        el("span"), el("span", { class: "c-host" }), el("span"), el("span"), el("span", { class: "c-pid" }), el("span", { class: "c-user" }), el("span"));
      row.addEventListener("click", () => select(row._index, true));
      pool.push(row);
      log.append(row);
    }
    const e = state.view[i];
    row._index = i;
    row.style.transform = `translateY(${(i + 1) * ROW}px)`;
    row.hidden = false;
    row.classList.toggle("sel", i === state.selected);
    if (row._event !== e) {
      row._event = e;
      const c = row.children;
      row.classList.toggle("lost", e.kind === "lost");
      c[0].textContent = clock(e.ts);
      c[1].textContent = state.fleet ? e.host ?? "" : "";
      c[1].title = c[1].textContent;
      c[2].textContent = e.source || "";
      c[2].className = "s-" + (e.source || "");
      c[3].textContent = e.kind || "";
      c[4].textContent = e.pid ?? "";
      c[5].textContent = e.user ?? e.uid ?? "";
      c[6].textContent = summary(e);
      c[6].className = e.verdict ? "v-" + e.verdict : "";
      c[6].title = c[6].textContent;
    }
  }
  for (let j = used; j < pool.length; j++) pool[j].hidden = true;
}

function scrollToEnd() {
  const log = $("log");
  renderLogHeightOnly();
  log.scrollTop = log.scrollHeight;
  renderLog();
}

function renderLogHeightOnly() { $("log-spacer").style.height = (state.view.length * ROW + ROW) + "px"; }

let scrollQueued = false;
function onScroll() {
  if (scrollQueued) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    const log = $("log");
    state.following = log.scrollTop + log.clientHeight >= log.scrollHeight - ROW * 2 && !state.detached;
    renderLog();
    if (log.scrollTop < ROW * 30 && !state.fleet) loadOlder();  // the fleet has no journal here
  });
}

function historyQuery(extra) {
  const q = new URLSearchParams(extra);
  if (filters.source) q.append("source", filters.source);
  if (filters.kind && !/[*?,]/.test(filters.kind)) q.append("kind", filters.kind);
  if (/^\d+$/.test(filters.pid)) q.append("pid", filters.pid);
  if (filters.text) q.append("text", filters.text);
  return q;
}

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

async function loadOlder() {
  if (state.loadingOlder || state.exhausted) return;
  const oldest = state.rows.find((e) => typeof e.seq === "number");
  if (!oldest) return;
  state.loadingOlder = true;
  try {
    const page = await api("/api/events?" + historyQuery({ before: oldest.seq, limit: PAGE }));
    const older = page.events.filter((e) => !state.seqs.has(e.seq)).reverse();
    if (!page.more) state.exhausted = true;
    if (!older.length) return;
    for (const e of older) { state.seqs.add(e.seq); trackProcess(e, true); }
    state.rows = older.concat(state.rows);
    const added = older.filter(passes).length;
    state.view = older.filter(passes).concat(state.view);
    if (state.selected >= 0) state.selected += added;
    if (state.rows.length > MAX_ROWS) trimNewest();
    const log = $("log");
    renderLogHeightOnly();
    log.scrollTop += added * ROW;
    renderLog();
    updateCount();
  } catch (err) {
    state.exhausted = true;
    $("log-count").textContent = `history: ${err.message}`;
  } finally {
    state.loadingOlder = false;
  }
}

// Events this page did not get live (it fell behind, or the UI server lost track):
// fetched from the journal and put in their place by seq.
async function fillGap(first, last) {
  let from = first;
  try {
    while (from <= last) {
      const page = await api("/api/events?" + new URLSearchParams({ first: from, last, oldest_first: "true", limit: 5000 }));
      if (!page.events.length) break;
      insertBySeq(page.events.filter((e) => !state.seqs.has(e.seq)));
      state.gapsFilled += page.events.length;
      from = page.events[page.events.length - 1].seq + 1;
      if (!page.more) break;
    }
  } catch (err) {
    append({ source: "kport", kind: "lost", ts: Date.now() * 1e6, count: last - from + 1, first_seq: from, last_seq: last, reason: `not shown and not in the journal: ${err.message}` });
  }
  afterAppend();
}

function insertBySeq(events) {
  for (const e of events) {
    let lo = 0, hi = state.rows.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      const s = state.rows[mid].seq;
      if (typeof s === "number" && s < e.seq) lo = mid + 1; else hi = mid;
    }
    state.rows.splice(lo, 0, e);
    state.seqs.add(e.seq);
    trackProcess(e, true);
  }
  state.view = state.rows.filter(passes);
}

async function jumpToLive() {
  state.rows = []; state.view = []; state.seqs.clear();
  state.detached = false; state.newer = 0; state.exhausted = false; state.following = true;
  $("live").hidden = true;
  const page = await api("/api/events?" + historyQuery({ limit: 2000 }));
  insertBySeq(page.events.reverse());
  afterAppend();
  scrollToEnd();
}

function select(index, open) {
  if (index < 0 || index >= state.view.length) return;
  state.selected = index;
  const log = $("log");
  const y = (index + 1) * ROW;
  if (y < log.scrollTop + ROW) log.scrollTop = y - ROW;
  else if (y + ROW > log.scrollTop + log.clientHeight) log.scrollTop = y + ROW - log.clientHeight;
  renderLog();
  if (open || !$("detail").hidden) showDetail(state.view[index]);
}

// a rule's field → the event's field it looks at (as `kport query --why` says it)
const LOOKS_AT = { kinds: "kind", path: "path", exe: "exe", uids: "uid", users: "uid", gids: "gid", groups: "gid", ancestors: "ancestors", cmdline: "argv", hosts: "host", addresses: "dst", ports: "dport", protocols: "protocol", interfaces: "interface", direction: "direction", sha256: "exe_sha256" };

// why a verdict was given: the same lines as `kport query --why SEQ`
function explainWhy(e) {
  const w = e.why;
  if (!w) return "";
  const verdict = String(e.verdict ?? "?").toUpperCase();
  const shown = (v) => v == null ? "(not known)" : Array.isArray(v) ? v.join(" ") : String(v);
  const lines = [];
  if (w.by === "rule") {
    const where = w.file ? `${w.file}:${w.line}` : `kept ${w.kept ?? ""}`;
    lines.push(`decided: ${verdict} by rule '${w.rule}' (${where})`, `its action: ${w.action}`);
    const fields = Object.entries(w.fields || {});
    if (fields.length) {
      lines.push("matched:");
      for (const [name, wanted] of fields) lines.push(`  ${name} = ${JSON.stringify(wanted)}  \u2190  ${shown(e[LOOKS_AT[name] ?? name])}`);
    } else lines.push("matched: everything (the rule has no criteria)");
  } else if (w.by === "client") {
    const c = w.client || {};
    lines.push(`decided: ${verdict} by a decision client: pid ${c.pid}${c.comm ? " (" + c.comm + ")" : ""}, uid ${c.uid}, connection ${c.connection}`);
  } else if (w.by === "deadline") {
    lines.push(`decided: ${verdict} by the default verdict (default_verdict): the deadline passed (${w.reason})`);
  } else if (w.setting === "default_verdict") {
    lines.push(`decided: ${verdict} by the default verdict (default_verdict): ${w.reason}`);
  } else {
    lines.push(`decided: ${verdict} by the default action (${w.action}): ${w.reason ?? "no rule matched"}`);
  }
  if (w.asked_by_rule) lines.push(`asked because of rule '${w.asked_by_rule}' (action ask)`);
  return lines.join("\n");
}

function showDetail(e) {
  const { _text, ...plain } = e;
  $("detail-json").textContent = JSON.stringify(plain, null, 2);
  const why = explainWhy(e);
  $("detail-why").textContent = why;
  $("detail-why").hidden = $("detail-why-head").hidden = !why;
  const list = $("detail-ancestry");
  list.replaceChildren();
  for (const p of ancestry(e)) {
    list.append(el("li", {}, `${p.pid} ${p.exe || p.comm || "?"}${p.argv && p.argv.length ? "  " + p.argv.join(" ") : ""}${p.exited ? " (exited)" : ""}`));
  }
  if (!list.children.length) list.append(el("li", { class: "muted" }, "no process"));
  $("detail").hidden = false;
}

function ancestry(e) {
  const chain = [];
  if (e.pid == null) return chain;
  let p = state.procs.get(e.pid);
  if (!p || (e.start_time && p.start_time && p.start_time !== e.start_time)) {
    p = { pid: e.pid, ppid: e.ppid, exe: e.exe, argv: e.argv || e.cmdline, comm: e.comm };
  }
  const seen = new Set();
  while (p && !seen.has(p.pid)) {
    seen.add(p.pid);
    chain.push(p);
    if (!p.ppid) break;
    p = state.procs.get(p.ppid) || (p === chain[0] && e.parent_exe ? { pid: p.ppid, exe: e.parent_exe } : null);
  }
  return chain;
}

// --- the process tree ------------------------------------------------------------------

async function refreshProcesses() {
  try {
    const asked = Date.now();
    const list = await api("/api/processes");
    const now = Date.now();
    const fresh = new Map();
    for (const p of list) {
      const old = state.procs.get(p.pid);
      // the same process: what the events said wins (an exit seen while the list was read)
      fresh.set(p.pid, old && old.start_time === p.start_time ? { ...p, ...old } : p);
    }
    for (const [pid, p] of state.procs) {
      if (fresh.has(pid)) continue;
      // exited ones fade out; ones the events brought while the list was read stay
      if ((p.exited && now - p.exited < TREE_KEEP_MS) || (!p.exited && p.born >= asked - 1000)) fresh.set(pid, p);
    }
    state.procs = fresh;
    scheduleTree();
  } catch (err) {
    $("tree-count").textContent = `processes: ${err.message}`;
  }
}

function trackProcess(e, historical) {
  if (e.source !== "proc" || e.pid == null || historical) return;
  const now = Date.now();
  if (e.kind === "fork" || e.kind === "exec" || e.kind === "snapshot") {
    const old = state.procs.get(e.pid);
    const p = old && old.start_time === e.start_time ? old : { pid: e.pid, born: now };
    Object.assign(p, {
      ppid: e.ppid ?? p.ppid, start_time: e.start_time ?? p.start_time, exe: e.exe ?? p.exe,
      argv: e.argv ?? p.argv, user: e.user ?? p.user, uid: e.uid ?? p.uid,
      comm: e.comm ?? (e.exe ? e.exe.split("/").pop() : p.comm),
    });
    delete p.exited;
    state.procs.set(e.pid, p);
    state.treeDirty = true;
  } else if (e.kind === "exit" && !e.thread) {
    const p = state.procs.get(e.pid);
    // fading counts from the exit itself, so that old exits replayed at load go at once
    if (p && !p.exited) { p.exited = e.ts ? Math.min(now, e.ts / 1e6) : now; state.treeDirty = true; }
  } else if (e.kind === "comm") {
    const p = state.procs.get(e.pid);
    if (p) { p.comm = e.comm; state.treeDirty = true; }
  }
}

let treeTimer = null;
function scheduleTree() {
  if (treeTimer || state.view_ !== "tree") return;
  treeTimer = setTimeout(() => { treeTimer = null; renderTree(); }, 300);
}

function processKey(p) { return `${p.pid}:${p.start_time}`; }

function renderTree() {
  const now = Date.now();
  for (const [pid, p] of state.procs) if (p.exited && now - p.exited > TREE_KEEP_MS) state.procs.delete(pid);
  const children = new Map();
  const roots = [];
  for (const p of state.procs.values()) {
    if (p.ppid && state.procs.has(p.ppid) && p.ppid !== p.pid) {
      if (!children.has(p.ppid)) children.set(p.ppid, []);
      children.get(p.ppid).push(p);
    } else roots.push(p);
  }
  const find = $("tree-filter").value.trim().toLowerCase();
  const matches = (p) => !find || String(p.pid) === find || [p.comm, p.exe, p.user, (p.argv || []).join(" ")].some((v) => v && String(v).toLowerCase().includes(find));
  const wanted = new Set();
  if (find) {
    for (const p of state.procs.values()) {
      if (!matches(p)) continue;
      for (let q = p, n = 0; q && n < 64; q = state.procs.get(q.ppid), n++) wanted.add(q.pid);
    }
  }
  const focusedKey = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.key : null;
  const build = (p, depth) => {
    if (find && !wanted.has(p.pid)) return null;
    const kids = (children.get(p.pid) || []).sort((a, b) => a.pid - b.pid);
    const key = processKey(p);
    const open = !state.collapsed.has(key) || (find && kids.some((k) => wanted.has(k.pid)));
    const toggle = el("button", { class: "toggle", tabindex: "-1", "aria-hidden": "true", onclick: () => toggleNode(key) }, kids.length ? (open ? "▾" : "▸") : "·");
    const line = el("div", { tabindex: "-1", dataset: { key } }, toggle,
      el("span", { class: "pid" }, String(p.pid)),
      el("strong", {}, p.comm || (p.exe ? p.exe.split("/").pop() : "?")),
      el("span", { class: "user" }, String(p.user ?? p.uid ?? "")),
      el("span", { class: "args", title: (p.argv || []).join(" ") }, (p.argv || []).slice(1).join(" ")));
    const item = el("li", {
      role: "treeitem", "aria-level": String(depth + 1),
      "aria-expanded": kids.length ? String(Boolean(open)) : null,
      class: (p.exited ? "exited " : "") + (p.born && now - p.born < 2000 ? "new" : ""),
    }, line);
    if (kids.length && open) {
      const group = el("ul", { role: "group" });
      for (const k of kids) { const child = build(k, depth + 1); if (child) group.append(child); }
      item.append(group);
    }
    return item;
  };
  const tree = $("tree");
  const fragment = document.createDocumentFragment();
  for (const root of roots.sort((a, b) => a.pid - b.pid)) { const node = build(root, 0); if (node) fragment.append(node); }
  tree.replaceChildren(fragment);
  const live = [...state.procs.values()].filter((p) => !p.exited).length;
  $("tree-count").textContent = `${live} processes`;
  const first = focusedKey && tree.querySelector(`[data-key="${CSS.escape(focusedKey)}"]`);
  const target = first || tree.querySelector("[data-key]");
  if (target) target.tabIndex = 0;
  if (first) first.focus();
  state.treeDirty = false;
}

function toggleNode(key) {
  if (state.collapsed.has(key)) state.collapsed.delete(key); else state.collapsed.add(key);
  renderTree();
}

function onTreeKey(e) {
  const lines = [...$("tree").querySelectorAll("[data-key]")];
  const at = lines.indexOf(document.activeElement);
  if (at < 0) return;
  const move = (i) => { if (lines[i]) { lines[at].tabIndex = -1; lines[i].tabIndex = 0; lines[i].focus(); } };
  const key = lines[at].dataset.key;
  const item = lines[at].parentElement;
  if (e.key === "ArrowDown") move(at + 1);
  else if (e.key === "ArrowUp") move(at - 1);
  else if (e.key === "ArrowRight" && item.getAttribute("aria-expanded") === "false") toggleNode(key);
  else if (e.key === "ArrowLeft" && item.getAttribute("aria-expanded") === "true") toggleNode(key);
  else if (e.key === "Enter" || e.key === " ") toggleNode(key);
  else return;
  e.preventDefault();
}

// --- prompts ----------------------------------------------------------------------------

function onPrompt(p) {
  if (p.state === "pending") state.prompts.set(p.id, p);
  else {
    state.prompts.delete(p.id);
    state.settled.push(p);
    if (state.settled.length > 50) state.settled.shift();
  }
  renderPrompts();
}

function describeRequest(r, domain) {
  const argv = r.cmdline || r.argv;
  const command = argv && argv.length ? argv.join(" ") : r.exe || "?";
  let what;
  if (domain === "file") what = `${r.kind || "open"} ${r.path}`;
  else if (r.direction === "in") what = `incoming ${r.protocol} from ${r.src} to port ${r.dport}`;
  else what = `${r.protocol} to ${r.host ? r.host + " (" + r.dst + ")" : r.dst} port ${r.dport}`;
  return { what, who: `pid ${r.pid} · ${r.user ?? r.uid ?? "?"} · ${command}` };
}

function renderPrompts() {
  const box = $("prompts");
  const pending = [...state.prompts.values()].sort((a, b) => a.deadline_ts - b.deadline_ts);
  const focusedId = document.activeElement && document.activeElement.closest ? document.activeElement.closest(".prompt")?.dataset.id : null;
  box.replaceChildren(...pending.map(promptCard));
  $("settled").replaceChildren(...state.settled.slice().reverse().map(settledCard));
  const badge = $("prompt-count");
  badge.hidden = pending.length === 0;
  badge.textContent = String(pending.length);
  document.title = pending.length ? `(${pending.length}) kport: asking` : "kport";
  const deciding = ["file-decide", "net-decide"].map((n) => [n, state.ports[n]]).filter(([, p]) => p);
  $("prompts-state").textContent = pending.length ? "" :
    "No prompts waiting. " + deciding.map(([n, p]) => `${n}: ${p.state}${p.state === "denied" ? " (this UI's user may not decide)" : ""}`).join(" · ");
  if (focusedId) { const card = box.querySelector(`[data-id="${focusedId}"] button`); if (card) card.focus(); }
  tickCountdowns();
}

function promptCard(p) {
  const { what, who } = describeRequest(p.request, p.domain);
  const verdicts = p.domain === "net" ? ["allow", "deny", "reject"] : ["allow", "deny"];
  const remember = p.domain === "net"
    ? el("select", { "aria-label": "for how long", class: "duration" },
      el("option", { value: "once" }, "this once"), el("option", { value: "15" }, "15 minutes"),
      el("option", { value: "restart" }, "until kport restarts"), el("option", { value: "always" }, "always (a rule)"))
    : el("label", {}, el("input", { type: "checkbox", class: "remember" }), " remember (a rule)");
  const card = el("article", { class: "prompt", dataset: { id: String(p.id) }, "aria-label": `prompt: ${what}` },
    el("h3", {}, what),
    el("div", { class: "who" }, who),
    programHash(p.request),
    el("div", {}, p.domain === "net" ? "connection" : "file access", " · ", el("span", { class: "countdown", dataset: { deadline: String(p.deadline_ts) } }, "")),
    el("div", { class: "actions" },
      ...verdicts.map((v) => el("button", { type: "button", class: v, title: `${v} (${v[0]})`, onclick: () => answer(p, v, card) }, v[0].toUpperCase() + v.slice(1))),
      remember),
    el("div", { class: "error", role: "alert" }));
  card.addEventListener("keydown", (e) => {
    if (e.target.tagName === "SELECT") return;
    const v = verdicts.find((x) => x[0] === e.key.toLowerCase());
    if (v && !e.ctrlKey && !e.metaKey && !e.altKey) { e.preventDefault(); answer(p, v, card); }
  });
  return card;
}

// The program's content: its sha256, and a warning when it is not the one the last
// decision about that path saw (replaced or rebuilt since).
function programHash(r) {
  if (!r.exe_sha256) return el("div", { class: "hash muted" }, r.exe_sha256_pending ? "sha256: being computed" : "sha256: unknown");
  return el("div", { class: r.hash_changed ? "hash changed" : "hash", title: r.exe_sha256 },
    r.hash_changed ? "changed since the last decision about this program · " : "", `sha256 ${r.exe_sha256.slice(0, 16)}…`);
}

function settledCard(p) {
  const { what, who } = describeRequest(p.request, p.domain);
  const words = {
    answered: `answered: ${p.verdict}`,
    missed: `missed: the default (${p.verdict}) was applied`,
    expired: "missed: the deadline passed and the default was applied",
    withdrawn: "withdrawn: the daemon applied its default",
  };
  return el("article", { class: `prompt settled ${p.state}` },
    el("h3", {}, what), el("div", { class: "who" }, who), el("div", { class: "state" }, words[p.state] || p.state));
}

async function answer(p, verdict, card) {
  const body = { verdict };
  if (p.domain === "net") {
    const d = card.querySelector(".duration").value;
    body.duration = /^\d+$/.test(d) ? Number(d) : d;
  } else body.remember = card.querySelector(".remember").checked;
  for (const b of card.querySelectorAll("button")) b.disabled = true;
  try {
    await api(`/api/prompts/${p.id}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  } catch (err) {
    card.querySelector(".error").textContent = err.message;
    for (const b of card.querySelectorAll("button")) b.disabled = false;
  }
}

function tickCountdowns() {
  const now = Date.now() / 1000;
  for (const node of document.querySelectorAll(".countdown")) {
    const left = Number(node.dataset.deadline) - now;
    node.textContent = left > 0 ? `${left.toFixed(1)} s left` : "deadline passed";
  }
}

// --- rules ------------------------------------------------------------------------------

async function loadRules() {
  const domain = $("rules-domain").value;
  $("rules-error").hidden = true;
  try {
    state.rules = await api(`/api/rules/${domain}`);
  } catch (err) {
    state.rules = null;
    showRulesError(err.message);
  }
  renderRules();
}

function showRulesError(text) { const n = $("rules-error"); n.textContent = text; n.hidden = false; }

function matchText(rule) {
  return Object.entries(rule).filter(([k]) => k !== "name" && k !== "action")
    .map(([k, v]) => `${k}=${Array.isArray(v) ? v.join(",") : v}`).join("  ") || "everything";
}

function renderRules() {
  const r = state.rules;
  const own = $("rules-own");
  own.replaceChildren();
  $("rules-temporary").replaceChildren();
  $("rules-others").replaceChildren();
  if (!r) { $("rules-info").textContent = ""; return; }
  $("rules-info").textContent = `file ${r.editable.path} · default ${r.default}` + (r.error ? ` · reload error: ${r.error}` : "");
  const rules = r.editable.rules;
  rules.forEach((rule, i) => {
    const button = (label, title, fn, disabled) => el("button", { type: "button", title, "aria-label": `${title} rule ${i + 1}`, onclick: fn, disabled }, label);
    own.append(el("tr", {},
      el("td", {}, String(i + 1)), el("td", {}, rule.name || ""),
      el("td", { class: "a-" + rule.action }, rule.action), el("td", { class: "m" }, matchText(rule)),
      el("td", {}, button("Edit", "edit", () => editRule(i)), " ",
        button("↑", "move up", () => moveRule(i, -1), i === 0), " ",
        button("↓", "move down", () => moveRule(i, 1), i === rules.length - 1), " ",
        button("Delete", "delete", () => deleteRule(i)))));
  });
  if (!rules.length) own.append(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "none yet: add one, or answer a prompt with remember")));
  for (const t of r.temporary) {
    $("rules-temporary").append(el("tr", {}, el("td", { class: "a-" + t.rule.action }, t.rule.action), el("td", { class: "m" }, matchText(t.rule)),
      el("td", {}, t.minutes_left == null ? "until restart" : `${t.minutes_left} min left`)));
  }
  for (const o of r.others) {
    $("rules-others").append(el("tr", {}, el("td", {}, o.rule.name || ""), el("td", { class: "a-" + o.rule.action }, o.rule.action),
      el("td", { class: "m" }, matchText(o.rule)), el("td", { class: "muted" }, o.origin)));
  }
}

const LIST_FIELDS = new Set(["kinds", "path", "exe", "users", "groups", "ancestors", "cmdline", "hosts", "addresses", "ports", "protocols", "interfaces"]);
const NUMERIC_LISTS = new Set(["users", "groups", "ports"]);

function editRule(index) {
  const r = state.rules;
  if (!r) return;
  state.editing = index;
  const rule = index >= 0 ? r.editable.rules[index] : { action: r.actions[0] };
  const box = $("rule-fields");
  box.replaceChildren();
  for (const field of r.fields) {
    const id = `rule-${field}`;
    let input;
    if (field === "action") {
      input = el("select", { id }, ...r.actions.map((a) => el("option", { value: a, selected: rule.action === a }, a)));
    } else if (field === "direction") {
      input = el("select", { id }, el("option", { value: "" }, "either"), el("option", { value: "out", selected: rule.direction === "out" }, "out"), el("option", { value: "in", selected: rule.direction === "in" }, "in"));
    } else {
      const v = rule[field];
      input = el("input", { id, value: v === undefined ? "" : Array.isArray(v) ? v.join(", ") : String(v), placeholder: field === "kinds" ? r.kinds.join(", ") : "" });
    }
    box.append(el("label", { for: id }, field), input);
  }
  $("rule-form-title").textContent = index >= 0 ? `Rule ${index + 1}` : "New rule (goes first)";
  $("rule-form").hidden = false;
  box.querySelector("input, select").focus();
}

function ruleFromForm() {
  const rule = {};
  for (const field of state.rules.fields) {
    const value = $(`rule-${field}`).value.trim();
    if (!value) continue;
    if (LIST_FIELDS.has(field)) {
      rule[field] = value.split(",").map((s) => s.trim()).filter(Boolean)
        .map((s) => (NUMERIC_LISTS.has(field) && /^\d+$/.test(s) ? Number(s) : s));
    } else rule[field] = value;
  }
  return rule;
}

async function saveRules(rules) {
  const domain = $("rules-domain").value;
  $("rules-error").hidden = true;
  try {
    state.rules = await api(`/api/rules/${domain}`, {
      method: "PUT", headers: { "content-type": "application/json" },
      body: JSON.stringify({ rules, version: state.rules.editable.version }),
    });
    renderRules();
    return true;
  } catch (err) {
    showRulesError(err.message);
    return false;
  }
}

async function submitRule(e) {
  e.preventDefault();
  const rules = state.rules.editable.rules.slice();
  const rule = ruleFromForm();
  if (state.editing >= 0) rules[state.editing] = rule; else rules.unshift(rule);
  if (await saveRules(rules)) $("rule-form").hidden = true;
}

function moveRule(i, by) {
  const rules = state.rules.editable.rules.slice();
  [rules[i], rules[i + by]] = [rules[i + by], rules[i]];
  saveRules(rules);
}

function deleteRule(i) {
  const rules = state.rules.editable.rules.slice();
  rules.splice(i, 1);
  saveRules(rules);
}

// --- stats ------------------------------------------------------------------------------

function drawChart() {
  const canvas = $("chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (!width) return;
  if (canvas.width !== width * ratio) { canvas.width = width * ratio; canvas.height = height * ratio; }
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  const styles = getComputedStyle(document.documentElement);
  const samples = state.rates;
  const peak = Math.max(10, ...samples.flatMap((s) => SOURCES.map((n) => s[n] || 0)));
  const left = 48, bottom = height - 18;
  g.strokeStyle = styles.getPropertyValue("--line"); g.fillStyle = styles.getPropertyValue("--muted");
  g.font = "11px system-ui";
  for (let i = 0; i <= 4; i++) {
    const y = bottom - (bottom - 8) * i / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(width - 4, y); g.stroke();
    g.fillText(Math.round(peak * i / 4).toLocaleString(), 4, y + 4);
  }
  g.fillText("−5 min", left, height - 4); g.fillText("now", width - 28, height - 4);
  const step = (width - left - 4) / 299;
  for (const name of SOURCES) {
    g.strokeStyle = styles.getPropertyValue(COLOURS[name]);
    g.lineWidth = 1.5;
    g.beginPath();
    samples.forEach((s, i) => {
      const x = left + (300 - samples.length + i) * step;
      const y = bottom - (bottom - 8) * (s[name] || 0) / peak;
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
  }
  const latest = samples[samples.length - 1] || {};
  $("legend").replaceChildren(...SOURCES.map((n) => {
    const span = el("span", {}, `${n} ${(latest[n] || 0).toLocaleString()}/s`);
    span.style.color = styles.getPropertyValue(COLOURS[n]);
    return span;
  }));
}

function renderStatsTables() {
  const body = $("ports");
  if (!body) return;
  const words = state.fleet ? { absent: "not reachable" } : { absent: "not served by the daemon", idle: "not in use" };
  body.replaceChildren(...Object.entries(state.ports).map(([name, p]) => el("tr", {},
    el("td", {}, name),
    el("td", { class: p.state === "connected" ? "a-allow" : ["idle", "absent"].includes(p.state) && !state.fleet ? "muted" : "a-deny" },
      words[p.state] || p.state),
    el("td", {}, new Date(p.since * 1000).toLocaleTimeString()), el("td", {}, (p.events || 0).toLocaleString()),
    el("td", { class: p.lost ? "a-deny" : "" }, (p.lost || 0).toLocaleString()), el("td", { class: "m" }, p.error || ""))));
  const memory = performance.memory ? `${(performance.memory.usedJSHeapSize / 1048576).toFixed(1)} MiB` : "n/a";
  $("page-stats").replaceChildren(
    el("tr", {}, el("td", {}, "connection to the UI server"), el("td", {}, state.wsState)),
    el("tr", {}, el("td", {}, "events held by this page"), el("td", {}, `${state.rows.length.toLocaleString()} (at most ${MAX_ROWS.toLocaleString()})`)),
    el("tr", {}, el("td", {}, "fallen behind, fetched back from the journal"), el("td", {}, `${state.uiDropped.toLocaleString()} (${state.gapsFilled.toLocaleString()} fetched)`)),
    el("tr", {}, el("td", {}, "JavaScript heap"), el("td", {}, memory)));
  if (state.fleet) {
    $("page-stats").append(
      el("tr", {}, el("td", {}, "older events let go (the oldest go first)"), el("td", {}, state.trimmed.toLocaleString())),
      el("tr", {}, el("td", {}, "not shown: this page fell behind"), el("td", {}, state.notShown.toLocaleString())),
      el("tr", {}, el("td", {}, "sent again and dropped (same host and seq)"), el("td", {}, state.repeats.toLocaleString())));
    const hosts = [...state.hosts.entries()].sort(([a], [b]) => a.localeCompare(b));
    $("hosts").replaceChildren(...hosts.map(([h, info]) => el("tr", {},
      el("td", {}, h), el("td", {}, info.events.toLocaleString()), el("td", {}, clock(info.last_ts)))));
    if (state.hostsUnlisted) $("hosts").append(el("tr", {}, el("td", { colspan: "3", class: "muted" }, `more hosts than ${HOSTS_MAX.toLocaleString()}: ${state.hostsUnlisted.toLocaleString()} events not counted here`)));
  }
}

// --- views and keys ---------------------------------------------------------------------

const VIEWS = ["log", "tree", "prompts", "rules", "stats"];

function show(view) {
  if (!available(view)) return;  // the fleet: each host's own (the tab says so)
  state.view_ = view;
  for (const v of VIEWS) {
    $(`view-${v}`).hidden = v !== view;
    const tab = $(`tab-${v}`);
    tab.setAttribute("aria-selected", String(v === view));
    tab.tabIndex = v === view ? 0 : -1;
  }
  if (location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
  if (view === "log") scrollToEndIfFollowing();
  if (view === "tree") { refreshProcesses(); renderTree(); }
  if (view === "rules" && !state.rules) loadRules();
  if (view === "stats") { drawChart(); renderStatsTables(); }
}

function scrollToEndIfFollowing() { if (state.following) scrollToEnd(); else renderLog(); }

function togglePause() {
  state.paused = !state.paused;
  const button = $("pause");
  button.setAttribute("aria-pressed", String(state.paused));
  button.textContent = state.paused ? "Resume" : "Pause";
  if (!state.paused) {
    const held = state.held;
    const overflow = state.heldOverflow;
    state.held = []; state.heldOverflow = false;
    if (overflow && !state.fleet) { jumpToLive(); return; }
    for (const e of held) { if (state.detached) state.newer++; else append(e); }
    afterAppend();
  }
  updateCount();
}

function onKey(e) {
  const typing = /^(INPUT|SELECT|TEXTAREA)$/.test(e.target.tagName);
  if (e.key === "Escape") {
    if (!$("detail").hidden) { $("detail").hidden = true; $("log").focus(); }
    else if (!$("rule-form").hidden) $("rule-form").hidden = true;
    return;
  }
  if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
  const n = Number(e.key);
  if (n >= 1 && n <= VIEWS.length) {
    if (available(VIEWS[n - 1])) { show(VIEWS[n - 1]); $(`tab-${VIEWS[n - 1]}`).focus(); }
    e.preventDefault();
    return;
  }
  if (state.view_ !== "log") return;
  if (e.key === "/") { $("f-text").focus(); e.preventDefault(); }
  else if (e.key === "p") togglePause();
  else if (e.target === $("log") || e.target.closest?.(".log")) {
    const page = Math.floor($("log").clientHeight / ROW) - 1;
    const moves = { ArrowDown: 1, j: 1, ArrowUp: -1, k: -1, PageDown: page, PageUp: -page };
    if (e.key in moves) { select(Math.max(0, Math.min(state.view.length - 1, (state.selected < 0 ? state.view.length : state.selected) + moves[e.key])), false); e.preventDefault(); }
    else if (e.key === "Home") { select(0, false); e.preventDefault(); }
    else if (e.key === "End") { select(state.view.length - 1, false); scrollToEnd(); e.preventDefault(); }
    else if (e.key === "Enter" && state.selected >= 0) { showDetail(state.view[state.selected]); e.preventDefault(); }
  }
}

function onTabKey(e) {
  const at = VIEWS.indexOf(state.view_);
  if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
    const step = e.key === "ArrowRight" ? 1 : VIEWS.length - 1;
    let next = VIEWS[(at + step) % VIEWS.length];
    while (!available(next)) next = VIEWS[(VIEWS.indexOf(next) + step) % VIEWS.length];
    show(next); $(`tab-${next}`).focus(); e.preventDefault();
  }
}

function debounce(fn, ms) { let t; return () => { clearTimeout(t); t = setTimeout(fn, ms); }; }

function start() {
  for (const v of VIEWS) $(`tab-${v}`).addEventListener("click", () => show(v));
  $("tab-log").parentElement.addEventListener("keydown", onTabKey);
  document.addEventListener("keydown", onKey);
  $("log").addEventListener("scroll", onScroll, { passive: true });
  $("log").addEventListener("dblclick", () => { if (state.selected >= 0) showDetail(state.view[state.selected]); });
  for (const id of ["f-host", "f-kind", "f-text", "f-user", "f-pid"]) $(id).addEventListener("input", debounce(applyFilters, 200));
  $("f-source").addEventListener("change", applyFilters);
  $("pause").addEventListener("click", togglePause);
  $("live").addEventListener("click", jumpToLive);
  $("detail-close").addEventListener("click", () => { $("detail").hidden = true; $("log").focus(); });
  $("tree").addEventListener("keydown", onTreeKey);
  $("tree-filter").addEventListener("input", debounce(renderTree, 200));
  $("tree-expand").addEventListener("click", () => { state.collapsed.clear(); renderTree(); });
  $("tree-collapse").addEventListener("click", () => { for (const p of state.procs.values()) state.collapsed.add(processKey(p)); renderTree(); });
  $("rules-domain").addEventListener("change", loadRules);
  $("rules-reload").addEventListener("click", loadRules);
  $("rules-add").addEventListener("click", () => editRule(-1));
  $("rule-form").addEventListener("submit", submitRule);
  $("rule-cancel").addEventListener("click", () => { $("rule-form").hidden = true; });
  window.addEventListener("resize", debounce(() => { renderLog(); if (state.view_ === "stats") drawChart(); }, 100));
  setInterval(tickCountdowns, 250);
  setInterval(checkSuspects, 500);
  setInterval(() => { if (state.view_ === "tree" && state.treeDirty) renderTree(); }, 1000);
  setInterval(() => { if (state.view_ === "stats") renderStatsTables(); }, 2000);
  const initial = location.hash.slice(1);
  show(VIEWS.includes(initial) ? initial : "log");
  connect();
}

// Exposed for the browser tests: what the page holds, read without scraping.
window.kport = { state, filters };

start();
