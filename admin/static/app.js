// bgproxy dashboard: a client of the admin API, like the CLI. No framework, no build step.
//
// Two views, chosen by the URL's hash: the overview of every service (#/, polling
// GET /services) and one service's view (#/services/NAME, polling
// GET /services/NAME/status and .../events; its charts start from .../history, then grow
// with each poll). A proxy with one service goes straight to that service's view.
// Mutations are JSON POSTs with an Authorization: Bearer header and no cookies, so
// another site cannot forge them. All text from the API is inserted with textContent,
// never as HTML: an event reason is operator input.
"use strict";

(() => {
  const POLL_MS = 1000;
  const EVENTS_EVERY_MS = 5000;
  const HISTORY_MS = 5 * 60 * 1000;
  const STALE_MS = 3500;
  const TOKEN_KEY = "bgproxy.adminToken";
  const COLORS = ["blue", "green"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  const app = {
    // {kind: "overview"} or {kind: "service", name, base, implicit}; null until /services says.
    view: null,
    seq: 0, // bumped on every route change: answers for an older view are dropped
    timer: null,
    services: null,
    status: null,
    events: [],
    // [{t, gap, blue: {rps, error_rate, p99}, green: {...}}], oldest first; gap: the
    // longest distance to the point before that still draws a line between them.
    history: [],
    lastOk: 0,
    lastError: null,
    eventsGen: null,
    eventsAt: 0,
    eventsBusy: false,
    tokenWaiter: null,
    tokenDeclined: false,
    weightsDirty: false,
    action: null, // the confirm dialog's pending action
  };

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
      this.detail = detail;
    }
    describe() {
      return this.status ? `${this.status} ${this.code}: ${this.detail}` : this.detail;
    }
  }

  // --- DOM helpers -----------------------------------------------------------------------

  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    setProps(el, props);
    for (const c of children.flat()) {
      if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }

  function s(tag, props) {
    const el = document.createElementNS(SVG_NS, tag);
    setProps(el, props);
    return el;
  }

  function setProps(el, props) {
    if (!props) return;
    for (const [k, v] of Object.entries(props)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") el.textContent = v;
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function shape(color) {
    return h("span", { class: `shape shape-${color}`, "aria-hidden": "true" });
  }

  function colorName(color) {
    return h("span", { class: `cname cname-${color}` }, shape(color), color);
  }

  // --- formatting ------------------------------------------------------------------------

  const num = (v) => typeof v === "number" && Number.isFinite(v);

  function fmtRps(v) {
    if (!num(v)) return "—";
    return v < 10 ? v.toFixed(1) : String(Math.round(v));
  }

  function fmtPct(v) {
    if (!num(v)) return "—";
    const p = v * 100;
    return `${p < 10 ? p.toFixed(1) : Math.round(p)}%`;
  }

  function fmtLatency(v) {
    if (!num(v)) return "—";
    if (v < 0.001) return "<1 ms";
    if (v < 1) return `${Math.round(v * 1000)} ms`;
    return `${v.toFixed(2)} s`;
  }

  // /status mixes epoch seconds (drain) and RFC 3339 strings (changed_at, events).
  function toDate(v) {
    if (num(v)) return new Date(v * 1000);
    if (typeof v === "string" && v) {
      const d = new Date(v);
      return Number.isNaN(d.getTime()) ? null : d;
    }
    return null;
  }

  function fmtClock(d) {
    if (!d) return "—";
    const time = d.toLocaleTimeString([], { hour12: false });
    const today = new Date().toDateString() === d.toDateString();
    return today ? time : `${d.toLocaleDateString()} ${time}`;
  }

  function fmtSpan(ms) {
    const sec = Math.max(0, Math.round(ms / 1000));
    if (sec < 60) return `${sec} s`;
    const m = Math.floor(sec / 60);
    if (m < 60) return `${m}:${String(sec % 60).padStart(2, "0")} min`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function fmtAgo(d) {
    if (!d) return "";
    const ms = Date.now() - d.getTime();
    return ms >= 0 ? `${fmtSpan(ms)} ago` : `in ${fmtSpan(-ms)}`;
  }

  function timeEl(v) {
    const d = toDate(v);
    if (!d) return h("span", { text: "—" });
    return h("time", { datetime: d.toISOString(), title: d.toISOString() }, fmtClock(d), " ",
      h("span", { class: "muted", text: `(${fmtAgo(d)})` }));
  }

  // --- the admin API ---------------------------------------------------------------------

  function storedToken() {
    try {
      return sessionStorage.getItem(TOKEN_KEY);
    } catch {
      return null;
    }
  }

  async function api(method, path, body) {
    // A 401 asks for the token (once, shared by concurrent calls) and retries.
    for (let attempt = 0; attempt < 3; attempt += 1) {
      const token = storedToken();
      const headers = { Accept: "application/json" };
      if (token) headers.Authorization = `Bearer ${token}`;
      const init = { method, headers, cache: "no-store", credentials: "omit", redirect: "error" };
      if (body !== undefined) {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      // Gates (smoke probes, warm-up) can take a while; reads must not hang the poll loop.
      const ctrl = new AbortController();
      const timer = setTimeout(() => ctrl.abort(), method === "GET" ? 5000 : 120000);
      init.signal = ctrl.signal;
      let resp;
      let data = null;
      try {
        resp = await fetch(path, init);
        const text = await resp.text();
        if (text) {
          try {
            data = JSON.parse(text);
          } catch {
            data = null;
          }
        }
      } catch {
        const why = ctrl.signal.aborted ? "the admin API did not answer in time" : "cannot reach the admin API";
        throw new ApiError(0, "unreachable", why);
      } finally {
        clearTimeout(timer);
      }
      if (resp.status === 401) {
        await askToken(token ? "The token was refused. Enter the current admin token." : null);
        continue;
      }
      if (!resp.ok) {
        const code = (data && data.error) || `http_${resp.status}`;
        const detail = (data && data.detail) || resp.statusText || "request failed";
        throw new ApiError(resp.status, code, detail);
      }
      return data;
    }
    throw new ApiError(401, "unauthorized", "a valid bearer token is required");
  }

  function askToken(message) {
    if (app.tokenWaiter) return app.tokenWaiter;
    if (app.tokenDeclined) {
      return Promise.reject(new ApiError(401, "unauthorized", "this admin API needs a token"));
    }
    const dlg = $("token-dialog");
    const form = $("token-form");
    const input = $("token-input");
    app.tokenWaiter = new Promise((resolve, reject) => {
      const finish = (ok) => {
        form.removeEventListener("submit", onSubmit);
        $("token-cancel").removeEventListener("click", onCancel);
        dlg.removeEventListener("cancel", onCancel);
        if (dlg.open) dlg.close();
        input.value = "";
        app.tokenWaiter = null;
        renderTokenButton();
        if (ok) {
          resolve();
        } else {
          app.tokenDeclined = true;
          showBanner("This admin API needs a bearer token.", { label: "Enter token", run: retryToken });
          reject(new ApiError(401, "unauthorized", "no token given"));
        }
      };
      const onSubmit = (ev) => {
        ev.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        try {
          sessionStorage.setItem(TOKEN_KEY, value);
        } catch {
          // sessionStorage off (private mode policies): nothing to keep it in; fail closed.
        }
        finish(true);
      };
      const onCancel = (ev) => {
        ev.preventDefault();
        finish(false);
      };
      form.addEventListener("submit", onSubmit);
      $("token-cancel").addEventListener("click", onCancel);
      dlg.addEventListener("cancel", onCancel);
      $("token-text").textContent = message
        || "This admin API requires a bearer token ($BGPROXY_ADMIN_TOKEN on the proxy). It is kept in this browser tab only.";
      input.value = "";
      dlg.showModal();
      input.focus();
    });
    return app.tokenWaiter;
  }

  function retryToken() {
    app.tokenDeclined = false;
    hideBanner();
    askToken(null).catch(() => {});
  }

  function renderTokenButton() {
    const btn = $("token-btn");
    if (storedToken()) {
      btn.textContent = "Forget token";
      btn.hidden = false;
    } else if (app.tokenDeclined) {
      btn.textContent = "Enter token";
      btn.hidden = false;
    } else {
      btn.hidden = true;
    }
  }

  // --- routing and polling --------------------------------------------------------------

  function hashService() {
    const m = /^#\/services\/([^/?#]+)\/?$/.exec(location.hash);
    if (!m) return null;
    try {
      return decodeURIComponent(m[1]);
    } catch {
      return null;
    }
  }

  function serviceView(name, implicit) {
    const base = name === null ? "" : `/services/${encodeURIComponent(name)}`;
    return { kind: "service", name, base, implicit };
  }

  function base() {
    return app.view && app.view.kind === "service" ? app.view.base : "";
  }

  function route() {
    app.seq += 1;
    clearTimeout(app.timer);
    app.status = null;
    app.history = [];
    app.events = [];
    app.eventsGen = null;
    app.eventsAt = 0;
    app.weightsDirty = false;
    hideBanner();
    const name = hashService();
    app.view = name === null ? null : serviceView(name, false);
    showView();
    if (app.view) loadHistory(app.seq);
    poll(app.seq);
  }

  function showView() {
    const v = app.view;
    $("view-overview").hidden = !(v && v.kind === "overview");
    $("view-service").hidden = !(v && v.kind === "service");
    const crumbs = $("crumbs");
    if (v && v.kind === "service" && v.name !== null) {
      crumbs.hidden = false;
      $("crumb-all").hidden = v.implicit;
      $("crumb-sep").hidden = v.implicit;
      $("svc-name").textContent = v.name;
    } else {
      crumbs.hidden = true;
    }
    if (v && v.kind === "overview") document.title = "Services · bgproxy";
  }

  async function resolveView(seq) {
    // "#/": the overview, unless the proxy has one service; then that service's view.
    let list;
    try {
      const data = await api("GET", "/services");
      list = (data && data.services) || [];
    } catch (e) {
      if (e.status !== 404) throw e;
      list = null; // a proxy from before services: its unscoped endpoints are the one view
    }
    if (seq !== app.seq) return;
    if (list === null) app.view = serviceView(null, true);
    else if (list.length === 1) app.view = serviceView(list[0].name, true);
    else app.view = { kind: "overview" };
    showView();
    if (app.view.kind === "overview") onServices(list);
    else loadHistory(seq);
  }

  async function poll(seq) {
    try {
      if (!app.view) await resolveView(seq);
      else if (app.view.kind === "overview") {
        const data = await api("GET", "/services");
        if (seq === app.seq) onServices((data && data.services) || []);
      }
      if (seq === app.seq && app.view && app.view.kind === "service") {
        const status = await api("GET", `${base()}/status`);
        if (seq === app.seq) onStatus(status);
      }
      if (seq !== app.seq) return;
      app.lastOk = Date.now();
      app.lastError = null;
    } catch (e) {
      if (seq !== app.seq) return;
      app.lastError = e;
      if (e.code === "unknown_service") {
        showBanner(`There is no service "${app.view.name}" on this proxy.`, { label: "All services", run: () => { location.hash = "#/"; } });
      } else if (e.status && e.status !== 401) {
        showBanner(`GET ${app.view && app.view.kind === "service" ? `${base()}/status` : "/services"}: ${e.describe()}`);
      }
    }
    renderConn();
    app.timer = setTimeout(() => poll(seq), POLL_MS);
  }

  async function loadHistory(seq) {
    // The charts show the last minutes at once, not only what this page has polled.
    let data;
    try {
      data = await api("GET", `${base()}/history`);
    } catch {
      return; // an older proxy without /history: the charts fill from the polls
    }
    if (seq !== app.seq || !data || !Array.isArray(data.points)) return;
    const gap = 3 * 1000 * (num(data.interval) && data.interval > 0 ? data.interval : 5);
    const cutoff = Date.now() - HISTORY_MS;
    const firstLive = app.history.length ? app.history[0].t : Infinity;
    const seeded = [];
    for (const p of data.points) {
      const d = toDate(p.at);
      if (!d || d.getTime() < cutoff || d.getTime() >= firstLive - 500) continue;
      seeded.push({ t: d.getTime(), gap, blue: p.blue || {}, green: p.green || {} });
    }
    if (!seeded.length) return;
    if (app.history.length) app.history[0].gap = Math.max(app.history[0].gap, gap);
    app.history = seeded.concat(app.history);
    if (app.status) renderCharts(app.status);
  }

  async function refreshEvents(force) {
    if (app.eventsBusy || !app.view) return;
    const seq = app.seq;
    const overview = app.view.kind === "overview";
    const gen = overview ? (app.services || []).map((x) => `${x.name}:${x.generation}`).join(",")
      : app.status ? app.status.generation : null;
    if (!force && gen === app.eventsGen && Date.now() - app.eventsAt < EVENTS_EVERY_MS) return;
    app.eventsBusy = true;
    try {
      const data = await api("GET", `${base()}/events?limit=50`);
      if (seq !== app.seq) return;
      app.events = (data && data.events) || [];
      app.eventsGen = gen;
      app.eventsAt = Date.now();
      if (overview) renderEvents("ov-events", true);
      else renderEvents("events", false);
    } catch {
      // The status poll reports an unreachable API; events just stay as they were.
    } finally {
      app.eventsBusy = false;
    }
  }

  function onStatus(status) {
    app.status = status;
    const t = status.traffic;
    if (t && typeof t === "object") {
      const now = Date.now();
      const prev = app.history.length ? app.history[app.history.length - 1] : null;
      // The first poll after the seeded history may be up to one history interval later.
      const gap = prev && !prev.live ? Math.max(3 * POLL_MS, prev.gap) : 3 * POLL_MS;
      app.history.push({ t: now, gap, live: true, blue: t.blue || {}, green: t.green || {} });
      const cutoff = now - HISTORY_MS;
      while (app.history.length && app.history[0].t < cutoff) app.history.shift();
    }
    render();
    refreshEvents(false);
  }

  function onServices(list) {
    app.services = list;
    renderOverview();
    refreshEvents(false);
  }

  // --- rendering -------------------------------------------------------------------------

  function renderConn() {
    const el = $("conn");
    const age = Date.now() - app.lastOk;
    el.className = "conn";
    if (!app.lastOk && !app.lastError) {
      el.classList.add("conn-wait");
      el.textContent = "connecting…";
    } else if (app.lastError && (!app.lastOk || age > STALE_MS)) {
      el.classList.add("conn-bad");
      const since = app.lastOk ? ` — last update ${fmtSpan(age)} ago` : "";
      el.textContent = `✖ STALE: ${app.lastError.detail}${since}`;
    } else {
      el.classList.add("conn-ok");
      el.textContent = `● live · updated ${fmtClock(new Date(app.lastOk))}`;
    }
    document.body.classList.toggle("stale", Boolean(app.lastError) && age > STALE_MS);
  }

  function weightOf(st, color) {
    return (st.weights && st.weights[color]) || 0;
  }

  function roleOf(st, color) {
    const w = weightOf(st, color);
    const other = weightOf(st, color === "blue" ? "green" : "blue");
    if (w > 0 && other === 0) return { label: "LIVE", cls: "role-live" };
    if (w === 0) {
      const d = st.drain || {};
      if (d.color === color && d.state === "draining") return { label: "DRAINING", cls: "role-drain" };
      return { label: "IDLE", cls: "role-idle" };
    }
    return { label: `SPLIT ${Math.round((100 * w) / (w + other))}%`, cls: "role-split" };
  }

  function render() {
    const st = app.status;
    if (!st) return;
    const active = st.active || "";
    const split = weightOf(st, "blue") > 0 && weightOf(st, "green") > 0;

    const badge = $("active");
    badge.dataset.color = active;
    $("active-shape").className = `shape shape-${active}`;
    $("active-color").textContent = active.toUpperCase();
    $("active-tag").textContent = split ? "SPLIT" : "LIVE";
    const named = app.view && app.view.name !== null && !app.view.implicit ? `${app.view.name}: ` : "";
    document.title = `${named}${active.toUpperCase()} live · bgproxy`;

    const wb = weightOf(st, "blue");
    const wg = weightOf(st, "green");
    const total = wb + wg || 1;
    $("wbar-blue").style.width = `${(100 * wb) / total}%`;
    $("wbar-green").style.width = `${(100 * wg) / total}%`;
    $("weights").replaceChildren(
      h("span", { class: "nowrap" }, colorName("blue"), ` ${wb}`), " · ",
      h("span", { class: "nowrap" }, colorName("green"), ` ${wg}`));
    $("generation").textContent = String(st.generation ?? "—");
    $("previous").replaceChildren(st.previous ? colorName(st.previous) : "—");
    $("changed").replaceChildren(timeEl(st.changed_at));

    for (const color of COLORS) {
      const btn = $(`switch-${color}`);
      const fullyLive = weightOf(st, color) > 0 && !split;
      btn.disabled = fullyLive;
      btn.title = fullyLive ? `${color} is already live` : "";
    }
    renderRollbackButton(st);
    if (!app.weightsDirty) {
      $("w-blue").value = String(wb);
      $("w-green").value = String(wg);
    }

    for (const color of COLORS) renderColor(st, color);
    renderCharts(st);
    renderDrain(st);
    renderRollback(st);
    renderRollout(st);
    renderInstances(st);
    renderCertificates(st);
    renderTokenButton();
  }

  function renderRollbackButton(st) {
    // Right after an automatic rollback, /rollback would restore the state before it:
    // traffic back on the color that just failed. The button stays off until a new change.
    const rb = st.rollback || {};
    const btn = $("rollback-btn");
    const note = $("rollback-note");
    if (rb.state === "rolled_back") {
      const failed = rb.color || "the failed color";
      const why = `Disabled: ${failed} was just rolled back automatically, and rolling back now would send traffic back to ${failed}, the color that failed. To retry ${failed}, switch to it (its gates run first).`;
      btn.disabled = true;
      btn.title = why;
      note.textContent = why;
      note.hidden = false;
    } else {
      btn.disabled = !st.previous;
      btn.title = st.previous ? `back to ${st.previous}` : "nothing to roll back to";
      note.hidden = true;
    }
  }

  function stat(label, value, extra) {
    return h("div", { class: "stat" }, h("div", { class: "stat-label", text: label }),
      h("div", { class: `stat-value ${extra || ""}`, text: value }));
  }

  function renderColor(st, color) {
    const c = (st.colors && st.colors[color]) || {};
    const targets = c.targets || [];
    const up = targets.filter((t) => t.healthy).length;
    const role = roleOf(st, color);
    const traffic = (st.traffic && st.traffic[color]) || null;

    const head = h("div", { class: "card-head" },
      h("h2", { class: "card-title color-title" }, shape(color), color.toUpperCase()),
      h("span", { class: `pill ${role.cls}`, text: `${role.label} · weight ${weightOf(st, color)}` }));

    const health = c.healthy
      ? h("p", { class: "health ok" }, "✔ ", `${up} of ${targets.length} target${targets.length === 1 ? "" : "s"} healthy`)
      : h("p", { class: "health bad" }, "✖ ", "NO HEALTHY TARGET — a switch to this color is refused");

    const list = h("ul", { class: "targets" }, targets.map((t) => h("li", { class: t.healthy ? "t-up" : "t-down" },
      h("span", { class: "t-state", text: t.healthy ? "✔ up" : "✖ DOWN" }),
      h("code", { text: t.url }))));

    const stats = h("div", { class: "stats" },
      stat("In flight", String(c.in_flight ?? 0)),
      stat("WebSockets", String(c.websockets ?? 0)),
      stat("Requests/s", traffic ? fmtRps(traffic.rps) : "—"),
      stat("Errors", traffic ? fmtPct(traffic.error_rate) : "—",
        traffic && num(traffic.error_rate) && traffic.error_rate >= 0.05 ? "warn" : ""),
      stat("p99", traffic ? fmtLatency(traffic.p99) : "—"));

    $(`card-${color}`).replaceChildren(head, health, list, stats);
  }

  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const mag = 10 ** Math.floor(Math.log10(v));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * mag >= v) return step * mag;
    return 10 * mag;
  }

  const CHARTS = [
    { id: "chart-rps", key: "rps", floor: 1, fmt: (v) => `${fmtRps(v)}/s` },
    { id: "chart-err", key: "error_rate", floor: 0.05, fmt: fmtPct },
    { id: "chart-p99", key: "p99", floor: 0.1, fmt: fmtLatency },
  ];

  function renderCharts(st) {
    const note = $("charts-note");
    if (!st.traffic) {
      note.hidden = false;
      note.textContent = "This proxy does not report per-color traffic in /status yet; the charts stay empty.";
    } else {
      note.hidden = true;
    }
    for (const spec of CHARTS) renderChart(spec);
  }

  function renderChart(spec) {
    const W = 300;
    const H = 80;
    const now = Date.now();
    const t0 = now - HISTORY_MS;
    let max = spec.floor;
    for (const p of app.history) {
      for (const c of COLORS) {
        const v = p[c][spec.key];
        if (num(v) && v > max) max = v;
      }
    }
    max = niceCeil(max);
    const svg = s("svg", {
      viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", class: "chart-svg", role: "img",
      "aria-label": `${spec.key} for blue and green over the last 5 minutes`,
    });
    for (const f of [0, 0.5, 1]) {
      const y = H - f * (H - 2) - 1;
      svg.append(s("line", { x1: 0, x2: W, y1: y, y2: y, class: "grid" }));
    }
    for (const c of COLORS) {
      // A gap in the polling (proxy unreachable) breaks the line instead of bridging it.
      let seg = [];
      let lastT = null;
      const flush = () => {
        if (seg.length > 1) svg.append(s("polyline", { points: seg.join(" "), class: `line-${c}` }));
        else if (seg.length === 1) {
          const [x, y] = seg[0].split(",");
          svg.append(s("circle", { cx: x, cy: y, r: 1.5, class: `pt-${c}` }));
        }
        seg = [];
      };
      for (const p of app.history) {
        const v = p[c][spec.key];
        if (!num(v) || (lastT !== null && p.t - lastT > p.gap)) flush();
        if (num(v)) {
          const x = ((p.t - t0) / HISTORY_MS) * W;
          const y = H - (Math.min(v, max) / max) * (H - 2) - 1;
          seg.push(`${x.toFixed(1)},${y.toFixed(1)}`);
        }
        lastT = p.t;
      }
      flush();
    }
    const last = app.history.length ? app.history[app.history.length - 1] : null;
    const current = h("div", { class: "chart-now" }, COLORS.map((c) => h("span", { class: "chart-cur" },
      colorName(c), " ", h("b", { text: last ? spec.fmt(last[c][spec.key]) : "—" }))));
    const body = $(spec.id).querySelector(".chart-body");
    body.replaceChildren(
      current,
      h("div", { class: "chart-plot" }, h("span", { class: "chart-max", text: spec.fmt(max) }), svg),
      h("div", { class: "chart-axis" }, h("span", { text: "−5 min" }), h("span", { text: "now" })));
  }

  function progress(fraction, cls) {
    const pct = Math.max(0, Math.min(1, fraction)) * 100;
    const fill = h("div", { class: "progress-fill" });
    // CSSOM, not a style attribute: the CSP (style-src 'self') refuses inline styles.
    fill.style.width = `${pct.toFixed(1)}%`;
    return h("div", { class: `progress ${cls || ""}`, role: "progressbar", "aria-valuemin": "0",
      "aria-valuemax": "100", "aria-valuenow": String(Math.round(pct)) }, fill);
  }

  function pill(el, text, cls) {
    el.className = `pill ${cls}`;
    el.textContent = text;
  }

  function renderDrain(st) {
    const d = st.drain || {};
    const body = [];
    const color = d.color;
    const started = toDate(d.started_at);
    const deadline = toDate(d.deadline);
    const done = toDate(d.completed_at);
    const forced = num(d.forced) ? d.forced : d.forced ? 1 : 0;
    if (d.state === "draining") {
      pill($("drain-state"), "DRAINING", "pill-busy");
      const c = (st.colors && st.colors[color]) || {};
      body.push(h("p", { class: "big-line" }, colorName(color), `: ${c.in_flight ?? 0} request(s) in flight, `,
        `${c.websockets ?? 0} WebSocket(s) being handed off`));
      if (started && deadline) {
        const total = deadline - started;
        body.push(progress((Date.now() - started) / total, "progress-busy"));
        body.push(h("p", { class: "muted" }, `deadline ${fmtClock(deadline)} (${fmtAgo(deadline)}); `,
          "requests still running then are cut"));
      }
    } else if (d.state === "done") {
      pill($("drain-state"), forced ? "DONE · FORCED" : "DONE", forced ? "pill-warn" : "pill-ok");
      const took = started && done ? ` in ${((done - started) / 1000).toFixed(1)} s` : "";
      body.push(h("p", { class: "big-line" }, colorName(color || "—"), ` drained${took}`));
      body.push(h("p", { class: "muted" }, "finished ", timeEl(d.completed_at)));
      if (forced) {
        body.push(h("p", { class: "warn-text", text: `⚠ ${forced} request(s) were still running at the deadline and were cut` }));
      }
    } else {
      pill($("drain-state"), (d.state || "idle").toUpperCase(), "pill-idle");
      body.push(h("p", { class: "muted", text: "No drain in progress. After a switch, the old color's in-flight requests finish here." }));
    }
    $("drain-body").replaceChildren(...body);
  }

  const VERDICTS = {
    passing: "passing",
    inconclusive: "inconclusive",
    failing: "failing",
    roll_back: "rolled back",
  };
  const VERDICTS_OK = new Set(["passing", "inconclusive"]);

  function thresholdsLine(th) {
    if (!th) return null;
    return h("p", { class: "muted" }, "limits: errors ≤ ", fmtPct(th.max_error_rate), ", p99 ≤ ",
      fmtLatency(th.max_p99_latency), `, judged from ${th.min_requests ?? "?"} requests per interval, `,
      `rollback after ${th.failure_limit ?? "?"} failing interval(s)`);
  }

  function renderRollback(st) {
    const r = st.rollback || {};
    const body = [];
    const last = r.last && typeof r.last === "object" ? r.last : null;
    const lastLine = last
      ? h("p", {}, "last interval: ", h("b", { text: `${last.requests ?? "—"} requests` }), " · ",
        h("b", { text: `${fmtPct(last.error_rate)} errors` }), " · p99 ", h("b", { text: fmtLatency(last.p99) }),
        last.verdict ? h("span", { class: VERDICTS_OK.has(last.verdict) ? "muted" : "warn-text", text: ` — ${VERDICTS[last.verdict] || last.verdict}` }) : null,
        last.reason ? h("span", { class: "muted", text: ` (${last.reason})` }) : null)
      : h("p", { class: "muted", text: "No interval evaluated yet." });
    if (r.state === "watching") {
      pill($("rb-state"), "WATCHING", "pill-busy");
      const until = toDate(r.until);
      body.push(h("p", { class: "big-line" }, "watching ", colorName(r.color || "—"),
        until ? ` until ${fmtClock(until)} (${fmtSpan(until - Date.now())} left)` : ""));
      const start = toDate(r.started_at) || toDate(st.changed_at);
      if (until && start && until > start) body.push(progress((Date.now() - start) / (until - start), "progress-busy"));
      body.push(lastLine);
      const next = toDate(r.next_evaluation);
      const fails = num(r.consecutive_failures) ? r.consecutive_failures : 0;
      body.push(h("p", { class: fails ? "warn-text" : "muted" },
        `${fails} consecutive failing interval(s)`, next ? ` · next check ${fmtClock(next)}` : ""));
      const th = thresholdsLine(r.thresholds);
      if (th) body.push(th);
    } else if (r.state === "rolled_back") {
      pill($("rb-state"), "ROLLED BACK", "pill-bad");
      body.push(h("p", { class: "big-line warn-text" }, "⚠ automatic rollback: ", colorName(r.color || "—"),
        " failed its thresholds; traffic went back to ", colorName(st.active || "—")));
      body.push(lastLine);
      const th = thresholdsLine(r.thresholds);
      if (th) body.push(th);
    } else {
      pill($("rb-state"), (r.state || "idle").toUpperCase(), "pill-idle");
      body.push(h("p", { class: "muted", text: r.enabled === false
        ? "Automatic rollback is off (rollback.enabled: false)."
        : "Not watching. After a change that gives a color new traffic, its error rate and p99 are watched and a bad release is rolled back automatically." }));
      if (last) body.push(lastLine);
    }
    $("rb-body").replaceChildren(...body);
  }

  const RUNNING = new Set(["progressing", "paused", "waiting_promotion"]);
  const RO_PILLS = { progressing: "pill-busy", paused: "pill-warn", waiting_promotion: "pill-warn",
    promoted: "pill-ok", aborted: "pill-bad", cancelled: "pill-idle", idle: "pill-idle" };

  // One figure of the current step against its limit: red when over it.
  function figure(label, value, limit, fmt) {
    const over = num(value) && num(limit) && value > limit;
    return h("span", {}, `${label} `, h("b", { class: over ? "figure-over" : "", text: fmt(value) }),
      num(limit) ? h("span", { class: "muted", text: ` / ≤ ${fmt(limit)}` }) : null);
  }

  function renderRollout(st) {
    const r = st.rollout || { state: "idle" };
    const state = r.state || "idle";
    const running = RUNNING.has(state);
    pill($("ro-state"), state.replace("_", " ").toUpperCase(), RO_PILLS[state] || "pill-idle");
    const steps = Array.isArray(r.steps) ? r.steps : [];
    $("ro-steps").replaceChildren(...steps.map((w, i) => {
      const n = i + 1;
      let kind = "todo";
      let note = "to come";
      if (state === "promoted" || n < r.step) {
        kind = "done";
        note = "done";
      } else if (n === r.step && state === "aborted") {
        kind = "failed";
        note = "aborted";
      } else if (n === r.step && running) {
        kind = "current";
        const next = toDate(r.next_at);
        note = state === "paused" ? "paused" : state === "waiting_promotion" ? "waiting for promote"
          : r.held ? "held" : next ? `${fmtSpan(Math.max(0, next - Date.now()))} left` : "now";
      }
      return h("li", { class: `step step-${kind}`, "data-state": kind },
        h("span", { class: "step-weight", text: `${w}%` }), h("span", { class: "step-note", text: note }));
    }));
    const body = [];
    if (running) {
      body.push(h("p", { class: "big-line" }, "rolling out ", colorName(r.color),
        `: step ${r.step} of ${steps.length}, ${r.weight}% of traffic`));
      const last = r.last && typeof r.last === "object" ? r.last : null;
      const th = r.thresholds || {};
      if (last) {
        body.push(h("div", { class: "figures" },
          h("span", { text: `${last.requests ?? 0} requests` }),
          figure("errors", last.error_rate, th.max_error_rate, fmtPct),
          figure("p99", last.p99, th.max_p99_latency, fmtLatency),
          last.verdict ? h("span", { class: VERDICTS_OK.has(last.verdict) ? "muted" : "warn-text", text: VERDICTS[last.verdict] || last.verdict }) : null));
      } else {
        body.push(h("p", { class: "muted", text: r.driving === false ? "Driven by another instance of the fleet." : "No interval judged yet at this step." }));
      }
      if (r.held) body.push(h("p", { class: "warn-text", text: r.held }));
    } else if (state === "idle") {
      body.push(h("p", { class: "muted", text: "No rollout. Start one to move traffic to the other color in steps, each watched against the rollback thresholds." }));
    } else {
      body.push(h("p", { class: state === "aborted" ? "big-line warn-text" : "big-line" },
        colorName(r.color), ` ${state} `, timeEl(r.ended_at)));
    }
    $("ro-body").replaceChildren(...body);
    const target = st.active === "blue" && weightOf(st, "green") < 100 ? "green" : "blue";
    $("ro-start").hidden = running;
    $("ro-start").textContent = `Start rollout to ${target}`;
    $("ro-start").dataset.color = target;
    $("ro-pause").hidden = state !== "progressing";
    $("ro-resume").hidden = state !== "paused";
    $("ro-promote").hidden = !running;
    $("ro-abort").hidden = !running;
  }

  function rolloutAction(verb, text) {
    const names = { pause: "Pause", resume: "Resume", promote: "Promote", abort: "Abort" };
    return { title: `${names[verb]} the rollout`, text, path: `/rollout/${verb}`, body: {},
      canForce: false, button: names[verb], done: `Rollout: ${verb}` };
  }

  function pair(obj) {
    const o = obj || {};
    return `${o.blue ?? 0} / ${o.green ?? 0}`;
  }

  function renderInstances(st) {
    const rows = (st.instances || []).map((i) => {
      const behind = num(i.generation) && num(st.generation) && i.generation < st.generation;
      return h("tr", {},
        h("td", {}, h("code", { text: i.id ?? "?" })),
        h("td", { text: i.host ?? "" }),
        h("td", { class: `num ${behind ? "warn-text" : ""}`, text: behind ? `${i.generation} (behind)` : String(i.generation ?? "—") }),
        h("td", { class: "num", text: pair(i.in_flight) }),
        h("td", { class: "num", text: pair(i.websockets) }),
        h("td", {}, timeEl(i.last_seen)));
    });
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: "6", class: "muted", text: "no instance reported" })));
    $("instances").tBodies[0].replaceChildren(...rows);
    const store = st.store;
    if (store && typeof store === "object") {
      const where = store.url ? ` ${store.url}` : "";
      if (store.available) pill($("store"), `state: ${store.backend}${where} · available`, "pill-idle");
      else pill($("store"), `state: ${store.backend}${where} · UNAVAILABLE — changes refused`, "pill-bad");
    } else {
      $("store").hidden = true;
    }
  }

  // /status "tls": the certificates served, each with days to expiry; under 14 left
  // is a warning (what `bgproxy check` warns about), expired is an error.
  function renderCertificates(st) {
    const tls = st.tls;
    $("tls-card").hidden = !tls;
    if (!tls) return;
    let worst = Infinity;
    const rows = (tls.certificates || []).map((c) => {
      const left = (Date.parse(c.not_after) - Date.now()) / 86400000;
      worst = Math.min(worst, left);
      const cls = left <= 0 ? "warn-text" : left <= 14 ? "soon-text" : "";
      const days = left <= 0 ? "expired" : String(Math.floor(left));
      return h("tr", { class: "cert" },
        h("td", {}, h("code", { text: (c.names || []).join(", ") })),
        h("td", {}, h("time", { datetime: c.not_after, title: c.not_after, text: String(c.not_after).slice(0, 10) })),
        h("td", { class: `num ${cls}`, text: days }),
        h("td", { text: c.source === "file" && c.file ? `file ${c.file}` : (c.source ?? "") }));
    });
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: "4", class: "muted", text: "no certificate" })));
    $("certificates").tBodies[0].replaceChildren(...rows);
    if (worst <= 0) pill($("tls-state"), "a certificate has EXPIRED", "pill-bad");
    else if (worst <= 14) pill($("tls-state"), `expires in ${Math.floor(worst)} days`, "pill-warn");
    else pill($("tls-state"), `https ${tls.listen ?? ""}`, "pill-idle");
  }

  function renderEvents(tableId, withService) {
    const rows = app.events.map((e) => {
      const auto = e.trigger === "auto";
      const cells = [
        h("td", {}, timeEl(e.at)),
        h("td", { class: "num", text: String(e.generation ?? "") }),
        h("td", { text: e.action ?? "" }),
        h("td", {}, h("code", { text: `${e.from ?? "—"} → ${e.to ?? "—"}` })),
        h("td", {}, h("span", { class: `pill ${auto ? "pill-bad" : "pill-idle"}`, text: auto ? "AUTO" : "manual" })),
        h("td", { text: e.actor ?? "" }),
        h("td", { class: "reason", text: e.reason ?? "" }),
      ];
      if (withService) {
        const name = e.service ?? "";
        cells.splice(1, 0, h("td", {}, name ? serviceLink(name) : "—"));
      }
      return h("tr", { class: auto ? "ev-auto" : "" }, cells);
    });
    const cols = withService ? 8 : 7;
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: String(cols), class: "muted", text: "no changes yet" })));
    $(tableId).tBodies[0].replaceChildren(...rows);
  }

  // --- the overview of every service ---------------------------------------------------------

  function serviceLink(name) {
    return h("a", { href: `#/services/${encodeURIComponent(name)}`, class: "svc-link", text: name });
  }

  // One figure per service from its two colors: req/s summed, the error rate over both
  // colors' requests, and the higher p99 (a percentile of the whole cannot be rebuilt).
  function serviceTraffic(traffic) {
    const per = COLORS.map((c) => (traffic && traffic[c]) || {});
    const rates = per.map((t) => t.rps).filter(num);
    let requests = 0;
    let errors = 0;
    for (const t of per) {
      if (num(t.error_rate) && num(t.requests)) {
        requests += t.requests;
        errors += t.error_rate * t.requests;
      }
    }
    const known = per.map((t) => t.error_rate).filter(num);
    const p99s = per.map((t) => t.p99).filter(num);
    return {
      rps: rates.length ? rates.reduce((a, b) => a + b, 0) : null,
      error_rate: requests > 0 ? errors / requests : known.length ? Math.max(...known) : null,
      p99: p99s.length ? Math.max(...p99s) : null,
    };
  }

  function serviceBadges(svc) {
    const out = [];
    const d = svc.drain || {};
    if (d.state === "draining") out.push(h("span", { class: "pill pill-busy", text: `DRAINING ${(d.color || "").toUpperCase()}` }));
    const ro = svc.rollout || {};
    if (RUNNING.has(ro.state)) out.push(h("span", { class: "pill pill-busy", text: `ROLLING OUT ${(ro.color || "").toUpperCase()} ${ro.weight}%${ro.state === "progressing" ? "" : " · " + ro.state.replace("_", " ").toUpperCase()}` }));
    else if (ro.state === "aborted") out.push(h("span", { class: "pill pill-bad", text: `ROLLOUT ABORTED ${(ro.color || "").toUpperCase()}` }));
    const r = svc.rollback || {};
    if (r.state === "watching") out.push(h("span", { class: "pill pill-busy", text: `WATCHING ${(r.color || "").toUpperCase()}` }));
    else if (r.state === "rolled_back") out.push(h("span", { class: "pill pill-bad", text: `ROLLED BACK ${(r.color || "").toUpperCase()}` }));
    const healthy = svc.healthy || {};
    for (const c of COLORS) {
      if (healthy[c] === false) out.push(h("span", { class: "pill pill-bad", text: `${c.toUpperCase()} UNHEALTHY` }));
    }
    if (!out.length) out.push(h("span", { class: "pill pill-idle", text: "STEADY" }));
    return out;
  }

  function splitCell(weights) {
    const wb = (weights && weights.blue) || 0;
    const wg = (weights && weights.green) || 0;
    const total = wb + wg || 1;
    const blue = h("div", { class: "wbar wbar-blue" });
    const green = h("div", { class: "wbar wbar-green" });
    // CSSOM, not a style attribute: the CSP (style-src 'self') refuses inline styles.
    blue.style.width = `${(100 * wb) / total}%`;
    green.style.width = `${(100 * wg) / total}%`;
    const pb = Math.round((100 * wb) / total);
    return h("td", { class: "split-cell" },
      h("div", { class: "weights-bar weights-bar-mini", "aria-hidden": "true" }, blue, green),
      h("span", { class: "split-text", text: `${pb} / ${100 - pb}` }));
  }

  function renderOverview() {
    const list = app.services || [];
    const rows = list.map((svc) => {
      const t = serviceTraffic(svc.traffic);
      const active = svc.active || "";
      const split = (svc.weights && svc.weights.blue > 0 && svc.weights.green > 0);
      return h("tr", { "data-service": svc.name },
        h("td", { class: "svc-name" }, serviceLink(svc.name)),
        h("td", {},
          h("div", {}, (svc.hosts || []).map((x) => h("code", { class: "host", text: x }))),
          (svc.paths || []).some((x) => x !== "/")
            ? h("div", { class: "muted" }, (svc.paths || []).map((x) => h("code", { class: "host", text: x })))
            : null),
        h("td", { class: "svc-live" }, active ? colorName(active) : "—", split ? h("span", { class: "muted", text: " (split)" }) : null),
        splitCell(svc.weights),
        h("td", { class: "num", text: fmtRps(t.rps) }),
        h("td", { class: `num ${num(t.error_rate) && t.error_rate >= 0.05 ? "warn-text" : ""}`, text: fmtPct(t.error_rate) }),
        h("td", { class: "num", text: fmtLatency(t.p99) }),
        h("td", {}, h("div", { class: "badges" }, serviceBadges(svc))));
    });
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: "8", class: "muted", text: "this proxy has no services" })));
    $("services").tBodies[0].replaceChildren(...rows);
    pill($("ov-count"), `${list.length} service${list.length === 1 ? "" : "s"}`, "pill-idle");
    renderTokenButton();
  }

  // --- messages --------------------------------------------------------------------------

  function showBanner(text, action) {
    $("banner-text").textContent = text;
    const old = $("banner").querySelector(".banner-action");
    if (old) old.remove();
    if (action) {
      const btn = h("button", { type: "button", class: "btn banner-action", text: action.label });
      btn.addEventListener("click", action.run);
      $("banner-close").before(btn);
    }
    $("banner").hidden = false;
  }

  function hideBanner() {
    $("banner").hidden = true;
  }

  let toastTimer = null;
  function toast(text) {
    const el = $("toast");
    el.textContent = text;
    el.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => {
      el.hidden = true;
    }, 6000);
  }

  // --- actions ---------------------------------------------------------------------------

  function openConfirm(action) {
    const st = app.status;
    if (!st) return;
    app.action = { ...action, generation: st.generation, base: base(), seq: app.seq };
    $("confirm-title").textContent = action.title;
    const v = app.view;
    const where = v && v.name !== null && !v.implicit ? `Service ${v.name}: ` : "";
    $("confirm-text").textContent = where + action.text;
    $("confirm-reason").value = "";
    $("confirm-force").checked = false;
    $("confirm-force-row").hidden = !action.canForce;
    $("confirm-error").hidden = true;
    $("confirm-ok").textContent = action.button;
    $("confirm-ok").disabled = false;
    $("confirm").showModal();
    $("confirm-reason").focus();
  }

  async function runConfirm(ev) {
    ev.preventDefault();
    const action = app.action;
    if (!action) return;
    const ok = $("confirm-ok");
    ok.disabled = true;
    ok.textContent = "Working…";
    $("confirm-error").hidden = true;
    const body = { ...action.body, expected_generation: action.generation };
    const reason = $("confirm-reason").value.trim();
    if (reason) body.reason = reason;
    if (action.canForce && $("confirm-force").checked) body.force = true;
    try {
      const status = await api("POST", `${action.base}${action.path}`, body);
      app.action = null;
      $("confirm").close();
      toast(`${action.done} — generation ${status.generation}`);
      if (action.seq === app.seq) {
        if (action.path === "/weights") app.weightsDirty = false;
        app.lastOk = Date.now();
        onStatus(status);
        refreshEvents(true);
      }
    } catch (e) {
      const err = $("confirm-error");
      let text = `Refused — ${e.describe()}`;
      if (e.code === "generation_mismatch") text += ". Someone changed the state meanwhile: cancel, look again, retry.";
      else if (action.canForce && e.status === 409) text += ". Fix the cause, or tick Force to switch anyway.";
      err.textContent = text;
      err.hidden = false;
      ok.disabled = false;
      ok.textContent = action.button;
    }
  }

  function switchAction(color) {
    const st = app.status;
    const from = st ? st.active : "?";
    return {
      title: `Switch live traffic to ${color.toUpperCase()}`,
      text: `All new requests go to ${color} (weights reset to 100/0); ${from === color ? "the split ends" : `${from}'s in-flight requests drain`}. `
        + "The pre-switch gates (health, smoke probes, warm-up) run first; a failing gate refuses the switch.",
      path: "/switch",
      body: { color },
      canForce: true,
      button: `Switch to ${color}`,
      done: `Switched to ${color}`,
    };
  }

  function wire() {
    for (const color of COLORS) {
      $(`switch-${color}`).addEventListener("click", () => openConfirm(switchAction(color)));
    }
    $("rollback-btn").addEventListener("click", () => {
      const prev = app.status && app.status.previous;
      openConfirm({
        title: "Roll back",
        text: `Restore the previous routing state (live color ${prev || "?"} with its weights).`,
        path: "/rollback",
        body: {},
        canForce: false,
        button: "Roll back",
        done: "Rolled back",
      });
    });
    $("ro-start").addEventListener("click", () => {
      const color = $("ro-start").dataset.color || "green";
      openConfirm({
        title: `Roll out ${color.toUpperCase()}`,
        text: `Move traffic to ${color} in steps; each step is held while ${color}'s error rate and p99 stay within the rollback thresholds, and a failing step aborts by itself. The pre-switch gates run first.`,
        path: "/rollout",
        body: { color },
        canForce: true,
        button: `Roll out ${color}`,
        done: `Rollout of ${color} started`,
      });
    });
    $("ro-pause").addEventListener("click", () => openConfirm(rolloutAction("pause", "Hold at this step. The new color keeps its traffic and is still watched.")));
    $("ro-resume").addEventListener("click", () => openConfirm(rolloutAction("resume", "Carry on: the step's remaining time counts again.")));
    $("ro-promote").addEventListener("click", () => openConfirm(rolloutAction("promote", "Send all traffic to the new color now, skipping the remaining steps.")));
    $("ro-abort").addEventListener("click", () => openConfirm(rolloutAction("abort", "Send all traffic back to the stable color now.")));
    for (const id of ["w-blue", "w-green"]) $(id).addEventListener("input", () => { app.weightsDirty = true; });
    $("weights-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const blue = Number($("w-blue").value);
      const green = Number($("w-green").value);
      const valid = (v) => Number.isInteger(v) && v >= 0;
      if (!valid(blue) || !valid(green) || (blue === 0 && green === 0)) {
        showBanner("Weights must be whole numbers ≥ 0, not both 0.");
        return;
      }
      const total = blue + green;
      openConfirm({
        title: "Set weights",
        text: `Split new traffic: blue ${blue} (${Math.round((100 * blue) / total)}%), green ${green} (${Math.round((100 * green) / total)}%). `
          + "Clients stay on the color they first got (sticky cookie).",
        path: "/weights",
        body: { blue, green },
        canForce: true,
        button: "Set weights",
        done: `Weights set to blue ${blue} / green ${green}`,
      });
    });
    $("confirm-form").addEventListener("submit", runConfirm);
    $("confirm-cancel").addEventListener("click", () => {
      app.action = null;
      $("confirm").close();
    });
    $("confirm").addEventListener("close", () => { app.action = null; });
    $("banner-close").addEventListener("click", hideBanner);
    $("token-btn").addEventListener("click", () => {
      if (storedToken()) {
        try {
          sessionStorage.removeItem(TOKEN_KEY);
        } catch {
          // nothing stored
        }
        renderTokenButton();
        toast("Token forgotten for this tab");
      } else {
        retryToken();
      }
    });
    // Relative times and the stale marker move even when nothing else does.
    setInterval(renderConn, 1000);
  }

  wire();
  renderTokenButton();
  window.addEventListener("hashchange", route);
  route();
})();
