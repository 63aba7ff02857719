// vitalgate central station: a grid of beds from GET /v1/devices, kept live by the
// /v1/stream events of the ward; the selected bed's ECG and pleth drawn from `waveform` events.
// The API key is kept in session storage (this tab only) and sent with every request.

import { AuthError, LiveStream, reasonOf } from "./stream.js";
import { Sweep } from "./waveform.js";

const REFRESH_MS = 5_000;
const PAGE_LIMIT = 500;
const FRESH_MS = 30_000; // a live reading younger than this clears NO SIGNAL until the next refresh
const KEY = "vitalgate.key";
const WARD = "vitalgate.ward";
const SELECTED = "vitalgate.selected";
const RANK = { high: 3, medium: 2, low: 1 };

// What a tile shows, in this order; anything else the device reports follows under its own name.
const METRICS = [
  { id: "heart_rate", label: "HR", unit: "/min", colour: "--hr" },
  { id: "spo2", label: "SpO₂", unit: "%", colour: "--spo2" },
  { id: "pulse_rate", label: "PR", unit: "/min", colour: "--hr" },
  { id: "resp_rate", label: "RR", unit: "/min", colour: "--resp" },
  { id: "nibp", label: "NIBP", unit: "mmHg", colour: "--nibp", parts: ["nibp_sys", "nibp_dia", "nibp_mean"] },
  { id: "etco2", label: "EtCO₂", unit: "mmHg", colour: "--etco2" },
  { id: "body_temp", label: "Temp", unit: "°C", colour: "--temp", digits: 1 },
  { id: "perfusion_index", label: "PI", unit: "%", colour: "--spo2", digits: 1 },
  { id: "fio2", label: "FiO₂", unit: "%", colour: "--other" },
  { id: "peep", label: "PEEP", unit: "cmH₂O", colour: "--other" },
  { id: "tidal_volume", label: "TV", unit: "mL", colour: "--other" },
];
const PART_OF = Object.fromEntries(METRICS.flatMap((m) => (m.parts || [m.id]).map((p) => [p, m])));
const TILE_CELLS = 6; // 3 x 2 numerals per tile; NIBP takes two cells

const $ = (id) => document.getElementById(id);
const state = {
  beds: new Map(),      // device_id -> DeviceStatus, updated in place by stream events
  tiles: new Map(),     // device_id -> tile element
  order: [],
  flags: {},            // flag name -> bit, from /ui/flags.json
  selected: sessionStorage.getItem(SELECTED),
  stream: null,
  timer: null,
  since: [],            // alert events received while a refresh was in flight, applied again after it
  refreshing: false,
};

// ------------------------------------------------------------------ API

class HttpError extends Error {}

async function api(path) {
  const res = await fetch(path, {
    headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`, Accept: "application/json" },
    cache: "no-store",
  });
  if (res.status === 401 || res.status === 403) throw new AuthError(res.status, await reasonOf(res));
  if (!res.ok) throw new HttpError(`${path.split("?")[0]}: HTTP ${res.status}: ${await reasonOf(res)}`);
  return res.json();
}

function ward() {
  return sessionStorage.getItem(WARD) || "";
}

async function fetchDevices() {
  const out = [];
  let cursor = null;
  for (let page = 0; page < 20; page++) {
    const q = new URLSearchParams({ limit: String(PAGE_LIMIT) });
    if (ward()) q.set("location", ward());
    if (cursor) q.set("cursor", cursor);
    const body = await api(`/v1/devices?${q}`);
    out.push(...body.devices);
    cursor = body.next_cursor;
    if (!cursor) break;
  }
  return out;
}

// ------------------------------------------------------------------ state updates

/** Reload the bed list; with `first`, errors are thrown to the caller instead of shown. */
async function refresh(first = false) {
  if (state.refreshing) return;
  state.refreshing = true;
  state.since = [];
  try {
    const devices = await fetchDevices();
    const seen = new Set();
    for (const d of devices) {
      const prev = state.beds.get(d.device_id);
      // A reading the stream delivered after the server answered is newer: keep it.
      if (prev) {
        for (const [m, r] of Object.entries(prev.latest || {})) {
          if (!d.latest[m] || d.latest[m].t < r.t) d.latest[m] = r;
        }
        if (prev.last_seen > (d.last_seen ?? 0) && Date.now() - prev.last_seen < FRESH_MS) d.stale = false;
        d.last_seen = Math.max(d.last_seen ?? 0, prev.last_seen ?? 0) || null;
      }
      state.beds.set(d.device_id, d);
      seen.add(d.device_id);
    }
    for (const id of [...state.beds.keys()]) if (!seen.has(id)) state.beds.delete(id);
    state.order = devices.map((d) => d.device_id);
    const since = state.since;
    state.since = [];
    state.refreshing = false;
    for (const ev of since) applyAlert(ev);
    hideBanner("devices");
    renderAll();
  } catch (err) {
    if (first) throw err;
    if (err instanceof AuthError) return authFailed(err);
    showBanner("devices", `Bed list not updated: ${err.message}`, true);
  } finally {
    state.refreshing = false;
  }
}

function applyReadings(ev) {
  const bed = state.beds.get(ev.device_id);
  if (!bed) return void refreshSoon();
  bed.latest = bed.latest || {};
  for (const r of ev.readings || []) {
    const cur = bed.latest[r.metric];
    if (!cur || cur.t <= r.t) bed.latest[r.metric] = { t: r.t, value: r.value, flags: r.flags };
    if (bed.last_seen == null || r.t > bed.last_seen) bed.last_seen = r.t;
  }
  if (bed.last_seen != null && Date.now() - bed.last_seen < FRESH_MS) bed.stale = false;
  renderTile(bed);
  if (bed.device_id === state.selected) renderDetail();
}

function applyAlert(ev) {
  if (state.refreshing) state.since.push(ev);
  const bed = state.beds.get(ev.device_id);
  if (!bed) return void refreshSoon();
  const rest = (bed.open_alerts || []).filter((a) => a.rule !== ev.rule);
  if (ev.event === "open") {
    rest.push({ rule: ev.rule, priority: ev.priority, metric: ev.metric, opened_at: ev.at, value: ev.value });
  }
  bed.open_alerts = rest;
  renderTile(bed);
  renderSummary();
}

let soon = null;
function refreshSoon() {
  if (soon === null) soon = setTimeout(() => { soon = null; refresh(); }, 300);
}

// ------------------------------------------------------------------ rendering

function highest(alerts) {
  let best = null;
  for (const a of alerts || []) if (!best || (RANK[a.priority] || 0) > (RANK[best.priority] || 0)) best = a;
  return best;
}

function fmt(v, digits = 0) {
  return Number.isFinite(v) ? v.toFixed(digits) : "--";
}

function flagNames(bits) {
  return Object.entries(state.flags).filter(([, bit]) => bits & bit).map(([name]) => name).join(", ");
}

/** [{def, text, flags, t}] for the metrics a device reported, in display order. */
function numerics(latest, tile = false) {
  const out = [];
  const names = Object.keys(latest || {});
  const done = new Set();
  for (const def of METRICS) {
    const parts = def.parts || [def.id];
    const vals = parts.map((p) => latest[p]).filter(Boolean);
    if (vals.length === 0) continue;
    if (tile && def.id === "pulse_rate" && latest.heart_rate) continue; // the monitor's HR says it
    parts.forEach((p) => done.add(p));
    let text;
    let mean = "";
    if (def.parts) {
      const [s, d, m] = parts.map((p) => latest[p]?.value);
      text = `${fmt(s)}/${fmt(d)}`;
      if (Number.isFinite(m)) mean = `(${fmt(m)})`;
    } else {
      text = fmt(vals[0].value, def.digits);
    }
    out.push({ def, text, mean, flags: vals.reduce((f, r) => f | (r.flags || 0), 0) });
  }
  for (const name of names.sort()) {
    if (done.has(name) || PART_OF[name]) continue;
    const r = latest[name];
    const digits = Math.abs(r.value) < 10 && !Number.isInteger(r.value) ? 1 : 0;
    out.push({ def: { id: name, label: name.replace(/_/g, " "), unit: "", colour: "--other" }, text: fmt(r.value, digits),
      flags: r.flags || 0 });
  }
  return out;
}

function numElement({ def, text, mean, flags }, primary) {
  const el = document.createElement("div");
  el.className = "num" + (primary ? " primary" : "") + (flags ? " questionable" : "");
  el.dataset.metric = def.id;
  el.style.setProperty("--c", `var(${def.colour})`);
  if (flags) el.title = `Quality flags: ${flagNames(flags) || flags}`;
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = def.label;
  const value = document.createElement("span");
  value.className = "value";
  value.textContent = text;
  if (mean) {
    const small = document.createElement("small");
    small.textContent = ` ${mean}`;
    value.append(small);
  }
  const unit = document.createElement("span");
  unit.className = "unit";
  unit.textContent = def.unit;
  el.append(label, value, unit);
  return el;
}

function ago(ms) {
  if (ms == null) return "never seen";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function makeTile(id) {
  const tile = document.createElement("article");
  tile.className = "tile";
  tile.tabIndex = 0;
  tile.dataset.device = id;
  tile.innerHTML = `<header><span class="loc"></span><span class="pt"></span></header>
    <div class="alarm"></div><div class="nums"></div>
    <footer><span class="dev"></span><span class="signal">NO SIGNAL</span><span class="age"></span></footer>`;
  const select = () => selectBed(state.selected === id ? null : id);
  tile.addEventListener("click", select);
  tile.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(); } });
  return tile;
}

function renderTile(bed) {
  let tile = state.tiles.get(bed.device_id);
  if (!tile) {
    tile = makeTile(bed.device_id);
    state.tiles.set(bed.device_id, tile);
  }
  const top = highest(bed.open_alerts);
  tile.dataset.priority = top ? top.priority : "none";
  tile.dataset.stale = String(Boolean(bed.stale));
  tile.dataset.status = bed.status;
  tile.classList.toggle("selected", bed.device_id === state.selected);
  tile.querySelector(".loc").textContent = bed.location || bed.device_id;
  tile.querySelector(".pt").textContent = bed.patient_ref || "no patient";
  const alarms = [...(bed.open_alerts || [])].sort((a, b) => (RANK[b.priority] || 0) - (RANK[a.priority] || 0));
  const alarm = tile.querySelector(".alarm");
  alarm.textContent = alarms.map((a) => a.rule.replace(/_/g, " ").toUpperCase()
    + (Number.isFinite(a.value) ? ` ${fmt(a.value, Number.isInteger(a.value) ? 0 : 1)}` : "")).join(" · ");
  alarm.title = alarms.map((a) => `${a.priority}: ${a.rule} since ${new Date(a.opened_at).toLocaleTimeString()}`).join("\n");
  const nums = tile.querySelector(".nums");
  const shown = [];
  let cells = 0;
  for (const n of numerics(bed.latest, true)) {
    const need = n.def.parts ? 2 : 1;
    if (cells + need > TILE_CELLS) continue;
    cells += need;
    shown.push(numElement(n, shown.length === 0));
  }
  nums.replaceChildren(...shown);
  const status = bed.status === "active" ? "" : ` · ${bed.status.toUpperCase()}`;
  tile.querySelector(".dev").textContent = `${bed.device_id}${status}`;
  tile.querySelector(".age").textContent = ago(bed.last_seen);
  tile.querySelector(".age").dataset.t = bed.last_seen ?? "";
}

function renderAll() {
  const grid = $("beds");
  const tiles = state.order.map((id) => { renderTile(state.beds.get(id)); return state.tiles.get(id); });
  for (const id of [...state.tiles.keys()]) if (!state.beds.has(id)) state.tiles.delete(id);
  grid.replaceChildren(...tiles);
  $("empty").hidden = tiles.length > 0;
  if (state.selected && !state.beds.has(state.selected)) selectBed(null);
  renderSummary();
  renderDetail();
}

function renderSummary() {
  const beds = [...state.beds.values()];
  const count = (p) => beds.filter((b) => highest(b.open_alerts)?.priority === p).length;
  const parts = [`<span><b>${beds.length}</b> beds</span>`];
  for (const p of ["high", "medium", "low"]) {
    const n = count(p);
    if (n) parts.push(`<span class="${p}"><b>${n}</b> ${p}</span>`);
  }
  const silent = beds.filter((b) => b.stale).length;
  if (silent) parts.push(`<span><b>${silent}</b> no signal</span>`);
  $("summary").innerHTML = parts.join("");
}

// ------------------------------------------------------------------ selected bed

const sweeps = {};

function selectBed(id) {
  state.selected = id;
  if (id) sessionStorage.setItem(SELECTED, id); else sessionStorage.removeItem(SELECTED);
  sweeps.ecg?.reset();
  sweeps.pleth?.reset();
  for (const [dev, tile] of state.tiles) tile.classList.toggle("selected", dev === id);
  renderDetail();
}

function renderDetail() {
  const bed = state.selected && state.beds.get(state.selected);
  $("detail").hidden = !bed;
  if (!bed) return;
  if (!sweeps.ecg) {
    const css = getComputedStyle(document.documentElement);
    sweeps.ecg = new Sweep($("ecg"), css.getPropertyValue("--hr").trim());
    sweeps.pleth = new Sweep($("pleth"), css.getPropertyValue("--spo2").trim());
  }
  $("detail").dataset.device = bed.device_id;
  $("detail-title").textContent = bed.location || bed.device_id;
  $("detail-sub").textContent = [bed.patient_ref || "no patient", bed.device_id, bed.profile].filter(Boolean).join(" · ");
  $("detail-nums").replaceChildren(...numerics(bed.latest).map((n, i) => numElement(n, i === 0)));
  $("ecg").closest(".trace").classList.toggle("none", !sweeps.ecg.hz);
  $("pleth").closest(".trace").classList.toggle("none", !sweeps.pleth.hz);
}

function applyWaveform(ev) {
  if (ev.device_id !== state.selected) return;
  const which = ev.metric === "pleth" ? "pleth" : ev.metric.startsWith("ecg") ? "ecg" : null;
  if (!which || !sweeps[which]) return;
  if (which === "ecg") $("ecg-metric").textContent = ev.metric.replace(/^ecg_?/, "").toUpperCase();
  sweeps[which].push(ev);
  $(which).closest(".trace").classList.remove("none");
}

let lastFrame = performance.now();
function animate(now) {
  const dt = Math.min(250, now - lastFrame);
  lastFrame = now;
  if (state.selected) { sweeps.ecg?.frame(dt); sweeps.pleth?.frame(dt); }
  requestAnimationFrame(animate);
}

// ------------------------------------------------------------------ banner, clock, login

const banners = new Map();
function showBanner(kind, text, error = false) {
  banners.set(kind, { text, error });
  drawBanner();
}
function hideBanner(kind) {
  if (banners.delete(kind)) drawBanner();
}
function drawBanner() {
  const el = $("banner");
  const all = [...banners.values()];
  el.hidden = all.length === 0;
  el.textContent = all.map((b) => b.text).join("  ·  ");
  el.classList.toggle("error", all.some((b) => b.error));
}

function tick() {
  $("clock").textContent = new Date().toLocaleTimeString([], { hour12: false });
  for (const el of document.querySelectorAll(".tile .age")) el.textContent = ago(el.dataset.t ? Number(el.dataset.t) : null);
}

function setLink(s, detail = {}) {
  document.body.dataset.link = s;
  const el = $("link");
  if (s === "live") {
    el.textContent = "live";
    if (banners.has("stream")) refresh(); // catch up with what the reconnect window may have missed
    hideBanner("stream");
  } else if (s === "connecting") {
    el.textContent = detail.attempt ? `reconnecting (${detail.attempt})` : "connecting";
  } else if (s === "lost") {
    el.textContent = "live data lost";
    const at = new Date().toLocaleTimeString([], { hour12: false });
    showBanner("stream", `Live data lost at ${at} (${detail.reason}); reconnecting, attempt ${detail.attempt}. `
      + "Values shown may be out of date.");
  }
}

function authFailed(err) {
  stop();
  const why = err.status === 401
    ? "The gateway did not accept this API key"
    : "This API key may not read telemetry (it needs the scope telemetry:read)";
  showLogin(`${why} (HTTP ${err.status}: ${err.message}).`);
}

function showLogin(message = "") {
  $("login-error").textContent = message;
  $("login-key").value = "";
  $("login-ward").value = ward();
  $("login").hidden = false;
  $("login-key").focus();
}

function stop() {
  state.stream?.stop();
  state.stream = null;
  clearInterval(state.timer);
  state.timer = null;
  banners.clear();
  drawBanner();
  document.body.dataset.link = "idle";
}

async function start() {
  stop();
  $("ward").value = ward();
  try {
    await refresh(true);
  } catch (err) {
    if (err instanceof AuthError) return authFailed(err);
    showBanner("devices", `Bed list not loaded: ${err.message}`, true);
  }
  $("login").hidden = true;
  const q = new URLSearchParams({ location: ward() });
  state.stream = new LiveStream({
    url: `/v1/stream?${q}`,
    key: () => sessionStorage.getItem(KEY) || "",
    onEvent: (name, data) => {
      if (name === "reading") applyReadings(data);
      else if (name === "alert") applyAlert(data);
      else if (name === "waveform") applyWaveform(data);
    },
    onState: setLink,
    onAuthError: authFailed,
  });
  state.stream.start();
  state.timer = setInterval(refresh, REFRESH_MS);
}

async function init() {
  try {
    state.flags = await (await fetch("flags.json")).json();
  } catch { /* tooltips then show the raw bits */ }
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("login-key").value.trim();
    if (!key.startsWith("vgk_")) {
      $("login-error").textContent = "An API key starts with vgk_ (device tokens cannot read telemetry).";
      return;
    }
    sessionStorage.setItem(KEY, key);
    sessionStorage.setItem(WARD, $("login-ward").value.trim());
    start();
  });
  $("ward-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(WARD, $("ward").value.trim());
    state.beds.clear();
    state.order = [];
    start();
  });
  $("ward").addEventListener("change", () => $("ward-form").requestSubmit());
  $("logout").addEventListener("click", () => {
    stop();
    sessionStorage.removeItem(KEY);
    state.beds.clear();
    state.order = [];
    renderAll();
    showLogin("Logged out.");
  });
  $("detail-close").addEventListener("click", () => selectBed(null));
  setInterval(tick, 1000);
  tick();
  requestAnimationFrame(animate);
  const fromUrl = new URLSearchParams(location.search).get("ward");
  if (fromUrl !== null) sessionStorage.setItem(WARD, fromUrl);
  if (sessionStorage.getItem(KEY)) start(); else showLogin();
}

init();
