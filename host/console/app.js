// wasmgate console: a dependency-free single-page app over the admin and
// self-service JSON API. Every value reaches the page as text (never as
// HTML), state-changing calls carry the session's CSRF token, and the
// session itself lives in an HttpOnly cookie this script cannot read.
"use strict";
(() => {
  const app = document.getElementById("app");
  const S = {
    session: null,
    lang: localStorage.getItem("wg.lang") || (navigator.language.startsWith("zh") ? "zh" : "en"),
    range: "day",
    renderId: 0,
  };

  // ---- helpers -----------------------------------------------------------

  function t(key, vars) {
    let s = (I18N[S.lang] && I18N[S.lang][key]) || I18N.en[key] || key;
    for (const k in vars || {}) s = s.replace("{" + k + "}", vars[k]);
    return s;
  }

  function add(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else if (k === "value") el.value = v;
      else if (v === true) el.setAttribute(k, "");
      else if (v !== false && v !== null && v !== undefined) el.setAttribute(k, v);
    }
    return add(el, children);
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    return add(el, children);
  }

  const locale = () => (S.lang === "zh" ? "zh-CN" : "en-US");
  const num = (n) => (n === null || n === undefined ? "—" : new Intl.NumberFormat(locale()).format(n));
  const when = (ms) => (ms ? new Date(ms).toLocaleString(locale()) : "—");
  const ms = (n) => (n === null || n === undefined ? "—" : num(n) + " ms");
  function money(q) {
    if (q === null || q === undefined) return "—";
    const per = (S.session && S.session.quota_per_dollar) || 0;
    if (!per) return num(q);
    const usd = q / per;
    const digits = Math.abs(usd) < 1 && usd !== 0 ? 4 : 2;
    return new Intl.NumberFormat(locale(), { style: "currency", currency: "USD", minimumFractionDigits: digits, maximumFractionDigits: digits }).format(usd);
  }
  const list = (s) => (s || "").split(",").map((x) => x.trim()).filter(Boolean);
  const statusName = (st) => (st && st.state) || st || "enabled";
  const badge = (name, title) => h("span", { class: "badge " + name, title: title || null }, t("st." + name) === "st." + name ? name : t("st." + name));

  class ApiError extends Error {
    constructor(status, body) {
      const e = (body && body.error) || {};
      super(e.message || "HTTP " + status);
      this.status = status;
      this.code = e.code;
      this.param = e.param;
    }
  }

  async function api(method, path, body, raw) {
    const headers = {};
    if (method !== "GET" && S.session) headers["x-csrf-token"] = S.session.csrf_token;
    let payload;
    if (raw !== undefined) {
      payload = raw;
      headers["content-type"] = "application/wasm";
    } else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers["content-type"] = "application/json";
    }
    let res;
    try {
      res = await fetch(path, { method, headers, body: payload, credentials: "same-origin" });
    } catch (_) {
      throw new ApiError(0, { error: { message: t("error.network") } });
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!res.ok) {
      const err = new ApiError(res.status, data);
      if (err.code === "session_expired") {
        S.session = null;
        signIn(t("err.session_expired"));
      }
      throw err;
    }
    return data;
  }

  function notice(target, message, isError) {
    target.replaceChildren(h("div", { class: "notice" + (isError ? " error" : ""), role: isError ? "alert" : "status" }, [message]));
  }

  // The result of the action that rendered the page again, shown once on top.
  function showFlash(out) {
    if (S.flash) notice(out, S.flash.message, S.flash.error);
    S.flash = null;
  }

  // A form's inputs keyed by name; an API error naming a field is shown next to it.
  function fieldError(form, err, out) {
    form.querySelectorAll(".field-error").forEach((e) => e.remove());
    const field = err.param && form.querySelector(`[name="${CSS.escape(err.param.split(/[.[]/)[0])}"]`);
    if (field) {
      field.setAttribute("aria-invalid", "true");
      field.after(h("span", { class: "field-error error", role: "alert" }, err.message));
    } else {
      notice(out, err.message, true);
    }
  }

  function table(columns, rows, opts) {
    if (!rows.length) return h("div", { class: "empty" }, t("empty"));
    const o = opts || {};
    return h("div", { class: "scroll" }, h("table", { "data-test": o.test || null },
      h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, t(c.label))))),
      h("tbody", {}, rows.map((r) => {
        const tr = h("tr", { class: o.onclick ? "clickable" : null, tabindex: o.onclick ? "0" : null, "data-id": r.id ?? null },
          columns.map((c) => h("td", { class: c.num ? "num" : null }, c.cell(r))));
        if (o.onclick) {
          tr.addEventListener("click", (e) => { if (!e.target.closest("button,a")) o.onclick(r); });
          tr.addEventListener("keydown", (e) => { if (e.key === "Enter") o.onclick(r); });
        }
        return tr;
      }))));
  }

  function dialog(title, body) {
    const d = h("dialog", { "aria-label": title },
      h("h2", {}, title), body,
      h("div", { class: "actions" }, h("button", { type: "button", onclick: () => d.close() }, t("close"))));
    d.addEventListener("close", () => d.remove());
    document.body.append(d);
    d.showModal();
    return d;
  }

  function copyButton(text) {
    const b = h("button", { type: "button", "data-test": "copy" }, t("copy"));
    b.addEventListener("click", async () => {
      try { await navigator.clipboard.writeText(text); b.textContent = t("copied"); } catch (_) { b.textContent = "⚠"; }
    });
    return b;
  }

  function lineChart(points, series, format) {
    const W = 420, H = 160, L = 52, B = 18, T = 10;
    const max = Math.max(1, ...points.flatMap((p) => series.map((s) => s.value(p) || 0)));
    const x = (i) => L + (points.length < 2 ? 0 : (i * (W - L - 4)) / (points.length - 1));
    const y = (v) => T + (H - T - B) * (1 - v / max);
    const chart = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img" },
      svg("line", { class: "axis", x1: L, x2: W, y1: H - B, y2: H - B }),
      svg("text", { x: 2, y: T + 8 }, format ? format(max) : num(max)),
      svg("text", { x: 2, y: H - B }, "0"),
      points.length ? svg("text", { x: L, y: H - 4 }, when(points[0].t)) : null,
      points.length ? svg("text", { x: W - 4, y: H - 4, "text-anchor": "end" }, when(points[points.length - 1].t)) : null,
      series.map((s) => svg("polyline", {
        fill: "none", stroke: s.color, "stroke-width": 2,
        points: points.map((p, i) => `${x(i).toFixed(1)},${y(s.value(p) || 0).toFixed(1)}`).join(" "),
      })));
    chart.setAttribute("aria-label", series.map((s) => s.label).join(", "));
    const legend = h("div", { class: "legend" }, series.map((s) => h("span", { class: s.cls }, "● " + s.label)));
    return [chart, legend];
  }

  function accent() { return getComputedStyle(document.documentElement).getPropertyValue("--accent").trim(); }
  function bad() { return getComputedStyle(document.documentElement).getPropertyValue("--bad").trim(); }

  // ---- layout, sign-in and routing ----------------------------------------

  const ADMIN_PAGES = ["dashboard", "channels", "plugins", "users", "tokens", "logs", "settings"];
  const USER_PAGES = ["me", "mytokens", "mylogs"];

  function applyTheme() {
    document.documentElement.classList.toggle("dark", localStorage.getItem("wg.theme") === "dark");
    document.documentElement.lang = S.lang === "zh" ? "zh-CN" : "en";
  }

  function signIn(message) {
    applyTheme();
    const out = h("div", {});
    const input = h("input", { type: "password", name: "token", id: "token", autocomplete: "current-password", required: true });
    const form = h("form", {
      onsubmit: async (e) => {
        e.preventDefault();
        const button = form.querySelector("button");
        button.disabled = true;
        try {
          S.session = await api("POST", "/api/session", { token: input.value });
          location.hash = S.session.role === "admin" ? "#/dashboard" : "#/me";
          route();
        } catch (err) {
          notice(out, err.message, true);
          input.focus();
        } finally {
          button.disabled = false;
        }
      },
    }, h("label", { for: "token" }, t("signin.token")), input, h("button", { class: "primary", type: "submit" }, t("signin.submit")));
    app.replaceChildren(h("main", { id: "main", class: "signin" }, h("div", { class: "panel" },
      h("h1", {}, t("signin.title")), h("p", { class: "muted" }, t("signin.help")), form, out,
      message ? h("div", { class: "notice", role: "status" }, message) : null,
      h("p", {}, h("button", { type: "button", onclick: () => { S.lang = S.lang === "zh" ? "en" : "zh"; localStorage.setItem("wg.lang", S.lang); signIn(message); } }, t("lang"))))));
    input.focus();
  }

  function layout(page) {
    const pages = S.session.role === "admin" ? ADMIN_PAGES : USER_PAGES;
    const dark = h("input", { type: "checkbox", id: "dark", checked: localStorage.getItem("wg.theme") === "dark" });
    dark.addEventListener("change", () => { localStorage.setItem("wg.theme", dark.checked ? "dark" : "light"); applyTheme(); route(); });
    const main = h("main", { id: "main", tabindex: "-1" });
    app.replaceChildren(
      h("header", {},
        h("span", { class: "brand" }, t("brand")),
        h("nav", { "aria-label": "main" }, pages.map((p) => h("a", { href: "#/" + p, "aria-current": p === page ? "page" : null }, t("nav." + p)))),
        h("div", { class: "tools" },
          h("label", { for: "dark" }, dark, " ", t("theme")),
          h("button", { type: "button", onclick: () => { S.lang = S.lang === "zh" ? "en" : "zh"; localStorage.setItem("wg.lang", S.lang); route(); } }, t("lang")),
          h("button", { type: "button", "data-test": "signout", onclick: signOut }, t("signout")))),
      main);
    return main;
  }

  async function signOut() {
    try { await api("DELETE", "/api/session"); } catch (_) { /* signed out either way */ }
    S.session = null;
    // Nothing of this session's view carries over to the next one.
    for (const k of ["logFilter", "logCursor", "channelFilter", "tokenUser", "userQuery", "flash", "newKey"]) delete S[k];
    location.hash = "";
    signIn();
  }

  async function route() {
    applyTheme();
    if (!S.session) return signIn();
    const pages = S.session.role === "admin" ? ADMIN_PAGES : USER_PAGES;
    let page = (location.hash.match(/^#\/(\w+)/) || [])[1];
    if (!pages.includes(page)) page = pages[0];
    // A new key stays on its page until the operator leaves it; a result, until shown.
    if (S.newKey && S.newKey.page !== page) S.newKey = null;
    if (S.flash && S.flash.page !== page) S.flash = null;
    const main = layout(page);
    const id = ++S.renderId;
    main.append(h("p", { class: "muted" }, t("loading")));
    try {
      const content = await PAGES[page]();
      if (id === S.renderId) {
        main.replaceChildren();
        add(main, [content]);
      }
    } catch (err) {
      if (id === S.renderId && S.session) notice(main, err.message, true);
    }
  }

  // ---- dashboard ----------------------------------------------------------

  function rangePicker(onchange) {
    return h("div", { class: "actions", role: "group", "aria-label": "range" }, ["hour", "day", "week"].map((r) =>
      h("button", { type: "button", "aria-pressed": String(S.range === r), class: S.range === r ? "primary" : null, onclick: () => { S.range = r; onchange(); } }, t("range." + r))));
  }

  function card(label, value, test) {
    return h("div", { class: "card" }, h("div", { class: "label" }, t(label)), h("div", { class: "value", "data-test": test }, value));
  }

  function usageCharts(d) {
    const s = d.series;
    return h("div", { class: "grid2" },
      h("div", { class: "panel" }, h("h2", {}, t("dash.chart.requests")), lineChart(s, [
        { label: t("dash.requests"), value: (p) => p.requests, color: accent(), cls: "swatch-a" },
        { label: t("dash.errors"), value: (p) => p.errors, color: bad(), cls: "swatch-b" }])),
      h("div", { class: "panel" }, h("h2", {}, t("dash.chart.tokens")), lineChart(s, [
        { label: t("dash.tokens"), value: (p) => p.prompt_tokens + p.completion_tokens, color: accent(), cls: "swatch-a" }])),
      h("div", { class: "panel" }, h("h2", {}, t("dash.chart.quota")), lineChart(s, [
        { label: t("dash.spent"), value: (p) => p.quota, color: accent(), cls: "swatch-a" }], money)),
      d.top_models ? h("div", { class: "panel" }, h("h2", {}, t("dash.chart.latency")), lineChart(s, [
        { label: "p50", value: (p) => p.p50_ms, color: accent(), cls: "swatch-a" },
        { label: "p99", value: (p) => p.p99_ms, color: bad(), cls: "swatch-b" }], ms)) : null);
  }

  function totalsCards(d) {
    const x = d.totals;
    const all = x.requests + x.errors;
    return h("div", { class: "cards" },
      card("dash.requests", num(x.requests), "requests"),
      card("dash.errors", num(x.errors), "errors"),
      card("dash.error_rate", all ? ((100 * x.errors) / all).toFixed(1) + " %" : "—", "error-rate"),
      card("dash.tokens", num(x.prompt_tokens + x.completion_tokens), "tokens"),
      card("dash.spent", money(x.quota), "spent"),
      d.top_models ? card("dash.p50", ms(x.p50_ms), "p50") : null,
      d.top_models ? card("dash.p99", ms(x.p99_ms), "p99") : null);
  }

  async function pageDashboard() {
    const [d, channels] = await Promise.all([api("GET", "/api/dashboard?range=" + S.range), api("GET", "/api/channels?per_page=100")]);
    const names = Object.fromEntries(channels.data.map((c) => [String(c.id), c.name]));
    const top = (title, rows, label) => h("div", { class: "panel" }, h("h2", {}, t(title)), table([
      { label, cell: (r) => r.label },
      { label: "col.requests", num: true, cell: (r) => num(r.requests) },
      { label: "col.errors", num: true, cell: (r) => num(r.errors) },
      { label: "col.spent", num: true, cell: (r) => money(r.quota) }], rows));
    const health = Object.entries(d.channels.by_status).map(([k, n]) => h("span", {}, badge(k), " ", num(n), " "));
    return [
      h("h1", {}, t("nav.dashboard")),
      rangePicker(route),
      totalsCards(d),
      h("div", { class: "cards" },
        h("div", { class: "card", "data-test": "health" }, h("div", { class: "label" }, t("dash.health")), health),
        h("div", { class: "card" }, h("div", { class: "label" }, t("dash.plugins")),
          h("div", {}, num(d.plugins.adapters), " ", t("dash.adapters"), ", ", num(d.plugins.routers), " ", t("dash.routers"))),
        h("div", { class: "card" }, h("div", { class: "label" }, t("dash.writer")),
          h("div", {}, num(d.billing.pending_rows), " ", t("dash.pending"), "; ", t("dash.last_commit"), " ", ms(d.billing.last_commit_age_ms)))),
      usageCharts(d),
      h("div", { class: "grid2" },
        top("dash.top_models", d.top_models.map((r) => ({ ...r, label: r.key })), "col.model"),
        top("dash.top_channels", d.top_channels.map((r) => ({ ...r, label: `#${r.key} ${names[r.key] || ""}` })), "col.channel"),
        top("dash.top_users", d.top_users.map((r) => ({ ...r, label: r.key === "0" ? "config" : "#" + r.key })), "col.user")),
    ];
  }

  // ---- channels -----------------------------------------------------------

  // Loaded adapters by name → the models each offers on a channel listing none.
  async function adapters() {
    const p = await api("GET", "/api/plugins");
    const loaded = p.data.filter((x) => x.loaded && x.kind === "adapter").sort((a, b) => a.name.localeCompare(b.name));
    return Object.fromEntries(loaded.map((x) => [x.name, x.default_models || []]));
  }

  function channelForm(rec, adapterNames, done) {
    const out = h("div", {});
    const v = rec || {};
    const json = (x) => (x && Object.keys(x).length ? JSON.stringify(x, null, 2) : "");
    const form = h("form", { class: "fields", "data-test": "channel-form" },
      h("label", {}, t("col.name"), h("input", { name: "name", required: true, value: v.name || "" })),
      h("label", {}, t("col.adapter"), h("select", { name: "adapter", required: true },
        Object.keys(adapterNames).map((a) => h("option", { value: a, selected: a === v.adapter }, a)))),
      h("label", {}, t("ch.base_url"), h("input", { name: "base_url", required: true, value: v.base_url || "", type: "url" })),
      h("label", {}, t("ch.models_hint"), h("input", { name: "models", value: (v.models || []).join(", ") })),
      h("label", {}, t("col.groups"), h("input", { name: "groups", value: (v.groups || ["default"]).join(", ") })),
      h("label", {}, t("col.tags"), h("input", { name: "tags", value: (v.tags || []).join(", ") })),
      h("label", {}, t("col.priority"), h("input", { name: "priority", type: "number", value: v.priority ?? 0 })),
      h("label", {}, t("col.weight"), h("input", { name: "weight", type: "number", min: 0, value: v.weight ?? 1 })),
      h("label", { class: "wide" }, t("ch.keys_hint"), h("textarea", { name: "key", rows: 3, "aria-describedby": "keys-current" })),
      rec ? h("p", { id: "keys-current", class: "muted wide" }, (v.keys || []).map((k) => k.key + (k.enabled ? "" : " (off)")).join(", ")) : null,
      h("label", { class: "wide" }, t("ch.mapping"), h("textarea", { name: "model_mapping", rows: 3, value: json(v.model_mapping) })),
      h("label", { class: "wide" }, t("ch.settings"), h("textarea", { name: "settings", rows: 3, value: json(v.settings) })),
      h("div", { class: "actions wide" }, h("button", { class: "primary", type: "submit" }, rec ? t("save") : t("create"))));
    form.querySelectorAll("textarea").forEach((x) => { x.style.minHeight = "70px"; });
    // An empty model list offers the adapter's defaults: show them as the placeholder.
    const models = form.querySelector("[name=models]");
    const adapter = form.querySelector("[name=adapter]");
    const defaults = () => { models.placeholder = t("ch.defaults", { models: (adapterNames[adapter.value] || []).join(", ") || "—" }); };
    adapter.addEventListener("change", defaults);
    defaults();
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(form);
      const body = {
        name: f.get("name"), adapter: f.get("adapter"), base_url: f.get("base_url"),
        models: list(f.get("models")), groups: list(f.get("groups")), tags: list(f.get("tags")),
        priority: Number(f.get("priority")), weight: Number(f.get("weight")),
      };
      if (f.get("key").trim()) body.key = f.get("key").trim();
      for (const name of ["model_mapping", "settings"]) {
        const raw = f.get(name).trim();
        if (!raw) { body[name] = {}; continue; }
        try { body[name] = JSON.parse(raw); } catch (err) { return fieldError(form, { param: name, message: err.message }, out); }
      }
      try {
        await api(rec ? "PATCH" : "POST", rec ? "/api/channels/" + rec.id : "/api/channels", body);
        done();
      } catch (err) { fieldError(form, err, out); }
    });
    return [form, out];
  }

  function channelHistory(rec) {
    return [
      h("h3", {}, t("ch.key_status")),
      table([{ label: "col.id", cell: (k) => k.index }, { label: "col.key", cell: (k) => h("span", { class: "key" }, k.key) },
        { label: "col.status", cell: (k) => badge(k.enabled ? "enabled" : "disabled", k.auto ? JSON.stringify(k.auto) : null) }], rec.keys || []),
      h("h3", {}, t("ch.history")),
      table([{ label: "col.time", cell: (e) => when(e.at_ms) }, { label: "col.status", cell: (e) => `${e.from} → ${e.to}` },
        { label: "col.kind", cell: (e) => e.source }, { label: "ch.note", cell: (e) => e.reason }], [...(rec.history || [])].reverse()),
    ];
  }

  async function pageChannels() {
    const out = h("div", { "data-test": "channel-notice" });
    const q = S.channelFilter || {};
    const params = new URLSearchParams({ per_page: "100" });
    for (const [k, v] of Object.entries(q)) if (v) params.set(k, v);
    const [channels, names] = await Promise.all([api("GET", "/api/channels?" + params), adapters()]);
    const filters = h("form", { class: "filters", onsubmit: (e) => {
      e.preventDefault();
      S.channelFilter = Object.fromEntries(new FormData(filters));
      route();
    } },
      h("label", {}, t("search"), h("input", { name: "q", value: q.q || "", type: "search" })),
      h("label", {}, t("col.groups"), h("input", { name: "group", value: q.group || "" })),
      h("label", {}, t("col.model"), h("input", { name: "model", value: q.model || "" })),
      h("label", {}, t("col.tags"), h("input", { name: "tag", value: q.tag || "" })),
      h("label", {}, t("col.status"), h("select", { name: "status" }, h("option", { value: "" }, t("ch.filter_status")),
        ["enabled", "manually_disabled", "auto_disabled", "cooling_down", "needs_attention"].map((s) => h("option", { value: s, selected: q.status === s }, t("st." + s))))),
      h("button", { type: "submit" }, t("apply")));
    const act = async (fn) => { try { await fn(); } catch (err) { notice(out, err.message, true); } };
    const test = (c) => act(async () => {
      const r = await api("POST", `/api/channels/${c.id}/test`);
      const message = r.success ? t("ch.tested", { ms: r.time_ms }) : t("ch.test_failed", { msg: r.message || r.error_kind });
      // Render again at once (the row shows the new response time), the result on top.
      S.flash = { page: "channels", message, error: !r.success };
      route();
    });
    const toggle = (c) => {
      const disabled = statusName(c.status) === "manually_disabled";
      const note = h("input", { name: "note", "data-test": "note" });
      const d = dialog(disabled ? t("ch.enable") : t("ch.disable"), h("form", { class: "fields", onsubmit: (e) => {
        e.preventDefault();
        act(async () => {
          await api("POST", `/api/channels/${c.id}/${disabled ? "enable" : "disable"}`, { note: note.value });
          d.close();
          route();
        });
      } }, h("label", {}, t("ch.note"), note), h("button", { class: "primary", type: "submit", "data-test": "confirm" }, disabled ? t("ch.enable") : t("ch.disable"))));
      note.focus();
    };
    const edit = (c) => { const d = dialog(c ? t("edit") + " #" + c.id : t("ch.new"), channelForm(c, names, () => { d.close(); route(); })); };
    const remove = (c) => act(async () => { if (confirm(t("confirm.delete"))) { await api("DELETE", "/api/channels/" + c.id); route(); } });
    const rows = channels.data;
    showFlash(out);
    return [
      h("h1", {}, t("nav.channels")),
      filters,
      h("div", { class: "actions" },
        h("button", { class: "primary", type: "button", onclick: () => edit(null) }, t("ch.new")),
        h("button", { type: "button", "data-test": "test-all", onclick: () => act(async () => {
          const r = await api("POST", "/api/channels/test");
          const ok = r.data.filter((x) => x.success).length;
          // The table shows each channel's new response time.
          S.flash = { page: "channels", message: t("ch.tested_all", { ok, total: r.data.length }), error: ok !== r.data.length };
          route();
        }) }, t("ch.test_all"))),
      out,
      h("div", { class: "panel" }, table([
        { label: "col.id", num: true, cell: (c) => c.id },
        { label: "col.name", cell: (c) => c.name },
        { label: "col.adapter", cell: (c) => c.adapter },
        { label: "col.status", cell: (c) => h("span", { "data-test": "status" }, badge(statusName(c.status), c.status.note || c.status.reason)) },
        { label: "col.groups", cell: (c) => c.groups.join(", ") },
        { label: "col.models", cell: (c) => h("span", { title: c.models.join(", ") }, c.models.slice(0, 3).join(", ") + (c.models.length > 3 ? " …" : "")) },
        { label: "col.priority", num: true, cell: (c) => c.priority },
        { label: "col.weight", num: true, cell: (c) => c.weight },
        { label: "col.latency", num: true, cell: (c) => h("span", { title: t("ch.tested_at") }, ms(c.response_time_ms)) },
        { label: "col.live_latency", num: true, cell: (c) => ms(c.stats && c.stats.latency_ms !== null ? Math.round(c.stats.latency_ms) : null) },
        { label: "col.error_rate", num: true, cell: (c) => (c.stats && c.stats.error_rate !== null ? (100 * c.stats.error_rate).toFixed(1) + " %" : "—") },
        { label: "col.used", num: true, cell: (c) => money(c.used_quota) },
        { label: "col.keys", num: true, cell: (c) => `${c.keys.filter((k) => k.enabled).length}/${c.keys.length}` },
        { label: "col.actions", cell: (c) => h("div", { class: "actions" },
          h("button", { type: "button", "data-test": "test", onclick: () => test(c) }, t("ch.test")),
          h("button", { type: "button", "data-test": "toggle", onclick: () => toggle(c) }, statusName(c.status) === "manually_disabled" ? t("ch.enable") : t("ch.disable")),
          h("button", { type: "button", onclick: () => edit(c) }, t("edit")),
          h("button", { type: "button", onclick: () => dialog(c.name, channelHistory(c)) }, t("ch.history")),
          h("button", { type: "button", class: "danger", onclick: () => remove(c) }, t("delete"))) },
      ], rows, { test: "channels" })),
    ];
  }

  // ---- plugins ------------------------------------------------------------

  async function pagePlugins() {
    const out = h("div", { "data-test": "plugin-notice" });
    const [plugins, channels, routing, filters] = await Promise.all([api("GET", "/api/plugins"), api("GET", "/api/channels?per_page=100"), api("GET", "/api/routing"), api("GET", "/api/filters")]);
    const usedBy = (name) => [
      ...channels.data.filter((c) => c.adapter === name).map((c) => "#" + c.id + " " + c.name),
      ...(routing.policy === name ? ["routing: default"] : []),
      ...(routing.rules || []).filter((r) => r.policy === name).map((r) => `routing: ${r.group || "*"}/${r.model || "*"}`),
      ...(filters.filters || []).filter((r) => r.plugin === name).map((r) => `filter: ${(r.groups || ["*"]).join("|")}/${(r.models || ["*"]).join("|")}`),
    ].join(", ") || t("pl.none");
    const name = h("input", { name: "plugin-name", id: "plugin-name", pattern: "[a-z0-9][a-z0-9_-]*" });
    const file = h("input", { type: "file", accept: ".wasm", id: "plugin-file", "data-test": "plugin-file" });
    const upload = async (f) => {
      const target = name.value.trim() || f.name.replace(/\.wasm$/, "");
      try {
        const r = await api("PUT", "/api/plugins/" + encodeURIComponent(target), undefined, await f.arrayBuffer());
        const cases = (r.check && r.check.cases) || [];
        const failed = cases.filter((c) => !c.passed);
        S.flash = { page: "plugins", message: [
          t("pl.uploaded", { name: r.name, kind: r.kind, version: r.version || "" }),
          " — ", t("pl.checked", { passed: cases.length - failed.length, total: cases.length }),
          failed.length ? h("ul", {}, failed.map((c) => h("li", { class: "error" }, c.name + ": " + c.detail))) : null,
        ] };
        route();
      } catch (err) { notice(out, t("pl.rejected", { msg: err.message }), true); }
    };
    file.addEventListener("change", () => file.files[0] && upload(file.files[0]));
    const zone = h("div", { class: "dropzone", "data-test": "dropzone" }, t("pl.drop"), " ", file);
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); });
    showFlash(out);
    const remove = async (p) => {
      if (!confirm(t("confirm.delete"))) return;
      try { await api("DELETE", "/api/plugins/" + encodeURIComponent(p.name)); route(); } catch (err) { notice(out, err.message, true); }
    };
    return [
      h("h1", {}, t("nav.plugins")),
      h("p", { class: "muted" }, plugins.wit),
      h("div", { class: "panel" }, h("h2", {}, t("pl.upload")), h("label", { for: "plugin-name" }, t("pl.name"), " "), name, zone, out),
      h("div", { class: "panel" }, table([
        { label: "col.name", cell: (p) => p.name },
        { label: "col.kind", cell: (p) => p.kind || "—" },
        { label: "col.version", cell: (p) => p.version || "—" },
        { label: "col.status", cell: (p) => badge(p.loaded ? "enabled" : "disabled") },
        { label: "col.sha", cell: (p) => h("span", { class: "key", title: p.sha256 || "" }, (p.sha256 || "").slice(0, 12)) },
        { label: "col.loaded_at", cell: (p) => when(p.loaded_at && p.loaded_at * 1000) },
        { label: "col.calls", num: true, cell: (p) => num(p.calls) },
        { label: "col.failures", num: true, cell: (p) => num(p.failed_calls) },
        { label: "col.last_error", cell: (p) => p.last_error || p.last_call_error || "" },
        { label: "col.used_by", cell: (p) => usedBy(p.name) },
        { label: "col.actions", cell: (p) => h("button", { type: "button", class: "danger", onclick: () => remove(p) }, t("delete")) },
      ], [...plugins.data].sort((a, b) => a.name.localeCompare(b.name)), { test: "plugins" })),
    ];
  }

  // ---- users and tokens ---------------------------------------------------

  async function pageUsers() {
    const out = h("div", {});
    const users = await api("GET", "/api/users?per_page=100" + (S.userQuery ? "&q=" + encodeURIComponent(S.userQuery) : ""));
    const form = h("form", { class: "fields", "data-test": "user-form" },
      h("label", {}, t("col.name"), h("input", { name: "name", required: true })),
      h("label", {}, t("col.group"), h("input", { name: "group", value: "default" })),
      h("label", {}, t("col.role"), h("select", { name: "role" }, h("option", { value: "user" }, "user"), h("option", { value: "admin" }, "admin"))),
      h("label", {}, t("col.quota"), h("input", { name: "quota", type: "number", value: "0" })),
      h("button", { class: "primary", type: "submit" }, t("create")));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(form);
      try {
        await api("POST", "/api/users", { name: f.get("name"), group: f.get("group"), role: f.get("role"), quota: Number(f.get("quota")) });
        route();
      } catch (err) { fieldError(form, err, out); }
    });
    const topUp = (u) => {
      const msg = h("div", {});
      const f = h("form", { class: "fields" },
        h("label", {}, t("us.amount"), h("input", { name: "amount", type: "number", required: true })),
        h("label", {}, t("us.note"), h("input", { name: "note" })),
        h("button", { class: "primary", type: "submit" }, t("us.topup")));
      const d = dialog(t("us.topup") + " — " + u.name, [f, msg]);
      f.addEventListener("submit", async (e) => {
        e.preventDefault();
        const v = new FormData(f);
        try {
          const r = await api("POST", `/api/users/${u.id}/topup`, { amount: Number(v.get("amount")), note: v.get("note") });
          d.close();
          S.flash = { page: "users", message: t("us.topped", { q: money(r.quota) }) };
          route();
        } catch (err) { fieldError(f, err, msg); }
      });
    };
    const edit = (u) => {
      const msg = h("div", {});
      const f = h("form", { class: "fields" },
        h("label", {}, t("col.name"), h("input", { name: "name", required: true, value: u.name })),
        h("label", {}, t("col.group"), h("input", { name: "group", required: true, value: u.group })),
        h("label", {}, t("col.role"), h("select", { name: "role" }, ["user", "admin"].map((r) => h("option", { value: r, selected: u.role === r }, r)))),
        h("button", { class: "primary", type: "submit" }, t("save")));
      const d = dialog(t("edit") + " — " + u.name, [f, msg]);
      f.addEventListener("submit", async (e) => {
        e.preventDefault();
        const v = new FormData(f);
        try {
          await api("PATCH", "/api/users/" + u.id, { name: v.get("name"), group: v.get("group"), role: v.get("role") });
          d.close();
          route();
        } catch (err) { fieldError(f, err, msg); }
      });
    };
    const setStatus = async (u) => {
      try { await api("PATCH", "/api/users/" + u.id, { status: u.status === "enabled" ? "disabled" : "enabled" }); route(); } catch (err) { notice(out, err.message, true); }
    };
    showFlash(out);
    const search = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); S.userQuery = new FormData(search).get("q"); route(); } },
      h("label", {}, t("search"), h("input", { name: "q", type: "search", value: S.userQuery || "" })), h("button", { type: "submit" }, t("apply")));
    return [
      h("h1", {}, t("nav.users")),
      h("div", { class: "panel" }, h("h2", {}, t("us.new")), form),
      out, search,
      h("div", { class: "panel" }, table([
        { label: "col.id", num: true, cell: (u) => u.id },
        { label: "col.name", cell: (u) => u.name },
        { label: "col.role", cell: (u) => u.role },
        { label: "col.group", cell: (u) => u.group },
        { label: "col.status", cell: (u) => badge(u.status) },
        { label: "col.balance", num: true, cell: (u) => money(u.quota) },
        { label: "col.used", num: true, cell: (u) => money(u.used_quota) },
        { label: "col.requests", num: true, cell: (u) => num(u.request_count) },
        { label: "col.actions", cell: (u) => h("div", { class: "actions" },
          h("button", { type: "button", "data-test": "topup", onclick: () => topUp(u) }, t("us.topup")),
          h("button", { type: "button", onclick: () => edit(u) }, t("edit")),
          h("button", { type: "button", onclick: () => setStatus(u) }, u.status === "enabled" ? t("us.disable") : t("us.enable")),
          h("button", { type: "button", onclick: () => { location.hash = "#/tokens"; S.tokenUser = String(u.id); } }, t("nav.tokens"))) },
      ], users.data, { test: "users" })),
    ];
  }

  // The key of a just-created token, shown this once.
  function createdKey(key) {
    return h("div", { class: "notice", role: "status", "data-test": "new-key" }, t("tk.created"), " ",
      h("code", { class: "key", "data-test": "key" }, key), " ", copyButton(key));
  }

  function tokenColumns(revoke) {
    return [
      { label: "col.id", num: true, cell: (k) => k.id },
      { label: "col.name", cell: (k) => k.name },
      { label: "col.user", num: true, cell: (k) => k.user_id },
      { label: "col.key", cell: (k) => h("span", { class: "key" }, k.key) },
      { label: "col.status", cell: (k) => badge(k.status) },
      { label: "col.expires", cell: (k) => (k.expires_at ? when(k.expires_at * 1000) : t("tk.never")) },
      { label: "col.quota", num: true, cell: (k) => (k.unlimited_quota ? t("tk.unlimited") : money(k.remain_quota)) },
      { label: "col.used", num: true, cell: (k) => money(k.used_quota) },
      { label: "col.actions", cell: (k) => h("button", { type: "button", class: "danger", "data-test": "revoke", onclick: () => revoke(k) }, t("tk.revoke")) },
    ];
  }

  const seconds = (local) => (local ? Math.floor(new Date(local).getTime() / 1000) : undefined);

  async function pageTokens() {
    const out = h("div", {});
    const user = S.tokenUser || "";
    const tokens = await api("GET", "/api/tokens?per_page=100" + (user ? "&user_id=" + encodeURIComponent(user) : ""));
    const form = h("form", { class: "fields", "data-test": "token-form" },
      h("label", {}, t("tk.user"), h("input", { name: "user_id", type: "number", required: true, value: user })),
      h("label", {}, t("col.name"), h("input", { name: "name", required: true })),
      h("label", {}, t("tk.expires"), h("input", { name: "expires_at", type: "datetime-local" })),
      h("label", {}, t("tk.quota"), h("input", { name: "remain_quota", type: "number", min: 0 })),
      h("label", {}, t("tk.models"), h("input", { name: "models" })),
      h("label", {}, t("tk.subnets"), h("input", { name: "subnets" })),
      h("label", {}, t("tk.rpm"), h("input", { name: "rpm", type: "number", min: 1 })),
      h("label", {}, t("tk.tpm"), h("input", { name: "tpm", type: "number", min: 1 })),
      h("label", {}, t("tk.concurrency"), h("input", { name: "concurrency", type: "number", min: 1 })),
      h("button", { class: "primary", type: "submit" }, t("create")));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(form);
      const body = { user_id: Number(f.get("user_id")), name: f.get("name"), models: list(f.get("models")), subnets: list(f.get("subnets")) };
      if (f.get("expires_at")) body.expires_at = seconds(f.get("expires_at"));
      for (const k of ["remain_quota", "rpm", "tpm", "concurrency"]) if (f.get(k) !== "") body[k] = Number(f.get(k));
      try {
        const r = await api("POST", "/api/tokens", body);
        S.newKey = { key: r.key, page: "tokens" };
        route();
      } catch (err) { fieldError(form, err, out); }
    });
    const revoke = async (k) => {
      if (!confirm(t("confirm.delete"))) return;
      try { await api("DELETE", "/api/tokens/" + k.id); route(); } catch (err) { notice(out, err.message, true); }
    };
    const shown = S.newKey ? createdKey(S.newKey.key) : null;
    const filter = h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); S.tokenUser = new FormData(filter).get("user"); route(); } },
      h("label", {}, t("tk.user"), h("input", { name: "user", type: "number", value: user })), h("button", { type: "submit" }, t("apply")));
    return [
      h("h1", {}, t("nav.tokens")),
      h("div", { class: "panel" }, h("h2", {}, t("tk.new")), form),
      shown, out, filter,
      h("div", { class: "panel" }, table(tokenColumns(revoke), tokens.data, { test: "tokens" })),
    ];
  }

  // ---- logs (admin and self) ----------------------------------------------

  async function pageLogs(self) {
    const base = self ? "/api/self/logs" : "/api/logs";
    const f = S.logFilter || {};
    const cursor = S.logCursor || [];
    const params = new URLSearchParams({ limit: "50" });
    for (const [k, v] of Object.entries(f)) if (v) params.set(k, k.endsWith("_ms") ? String(new Date(v).getTime()) : v);
    const exportParams = new URLSearchParams(params);
    exportParams.delete("limit");
    if (cursor.length) params.set("before_id", cursor[cursor.length - 1]);
    const page = await api("GET", base + "?" + params);
    const filters = h("form", { class: "filters", "data-test": "log-filters", onsubmit: (e) => {
      e.preventDefault();
      S.logFilter = Object.fromEntries(new FormData(filters));
      S.logCursor = [];
      route();
    } },
      self ? null : h("label", {}, t("lg.user"), h("input", { name: "user_id", type: "number", value: f.user_id || "" })),
      h("label", {}, t("lg.token"), h("input", { name: "token", value: f.token || "" })),
      h("label", {}, t("lg.model"), h("input", { name: "model", value: f.model || "" })),
      self ? null : h("label", {}, t("lg.channel"), h("input", { name: "channel_id", type: "number", value: f.channel_id || "" })),
      h("label", {}, t("lg.type"), h("select", { name: "type" }, h("option", { value: "" }, t("lg.any")),
        ["consume", "error", "topup"].map((k) => h("option", { value: k, selected: f.type === k }, t("lg." + k))))),
      h("label", {}, t("lg.request"), h("input", { name: "request_id", value: f.request_id || "" })),
      h("label", {}, t("col.status"), h("input", { name: "status", type: "number", min: 100, max: 599, value: f.status || "" })),
      h("label", {}, t("lg.from"), h("input", { name: "start_ms", type: "datetime-local", value: f.start_ms || "" })),
      h("label", {}, t("lg.to"), h("input", { name: "end_ms", type: "datetime-local", value: f.end_ms || "" })),
      h("button", { type: "submit" }, t("apply")),
      h("button", { type: "button", onclick: () => { S.logFilter = {}; S.logCursor = []; route(); } }, t("reset")));
    const detail = async (r) => {
      // A request's rows are made within its longest duration of each other.
      const around = new URLSearchParams({ limit: "50", request_id: r.request_id, start_ms: String(r.at_ms - 7_200_000), end_ms: String(r.at_ms + 7_200_000) });
      const same = await api("GET", base + "?" + around);
      dialog(t("lg.detail") + " " + r.request_id, [
        h("pre", { "data-test": "log-detail" }, JSON.stringify(r, null, 2)),
        h("h3", {}, t("lg.rows")),
        table(logColumns(), same.data),
      ]);
    };
    const pager = h("div", { class: "actions" },
      h("button", { type: "button", disabled: !cursor.length, onclick: () => { S.logCursor = cursor.slice(0, -1); route(); } }, t("lg.newer")),
      h("button", { type: "button", disabled: !page.has_more, "data-test": "older", onclick: () => { S.logCursor = [...cursor, page.next_before_id]; route(); } }, t("lg.older")),
      self ? null : h("a", { class: "button", href: "/api/logs/export?" + exportParams, download: "wasmgate-logs.csv" }, t("lg.export")));
    return [
      h("h1", {}, self ? t("nav.mylogs") : t("nav.logs")),
      filters, pager,
      h("div", { class: "panel" }, table(logColumns(), page.data, { test: "logs", onclick: detail })),
    ];
  }

  function logColumns() {
    return [
      { label: "col.time", cell: (r) => when(r.at_ms) },
      { label: "col.type", cell: (r) => h("span", { class: "badge " + ({ error: "bad", topup: "warn" }[r.kind] || "ok"), title: r.error_kind || r.note || null }, t("lg." + r.kind)) },
      { label: "col.user", cell: (r) => r.user_id ?? "config" },
      { label: "col.token", cell: (r) => r.token_name },
      { label: "col.model", cell: (r) => (r.kind === "topup" ? h("em", {}, r.note || "") : r.model) },
      { label: "col.channel", num: true, cell: (r) => (r.kind === "topup" ? "" : r.channel_id) },
      { label: "col.prompt", num: true, cell: (r) => num(r.prompt_tokens) },
      { label: "col.completion", num: true, cell: (r) => num(r.completion_tokens) },
      { label: "col.charge", num: true, cell: (r) => (r.kind === "topup" ? "+" + money(r.quota) : money(r.quota)) },
      { label: "col.latency", num: true, cell: (r) => (r.kind === "topup" ? "—" : ms(r.latency_ms)) },
      { label: "col.status", num: true, cell: (r) => r.status },
    ];
  }

  // ---- pricing and routing --------------------------------------------------

  function jsonEditor(title, path, value) {
    const out = h("div", {});
    const area = h("textarea", { name: "body", spellcheck: "false", "aria-label": title, value: JSON.stringify(value, null, 2) });
    const form = h("form", {}, area, h("div", { class: "actions" },
      h("button", { class: "primary", type: "submit" }, t("save")),
      h("button", { type: "button", onclick: async () => {
        try { area.value = JSON.stringify(await api("DELETE", path), null, 2); notice(out, t("set.saved")); } catch (err) { notice(out, err.message, true); }
      } }, t("set.reset"))), out);
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      let body;
      try { body = JSON.parse(area.value); } catch (err) { return notice(out, err.message, true); }
      try {
        area.value = JSON.stringify(await api("PUT", path, body), null, 2);
        notice(out, t("set.saved"));
      } catch (err) { notice(out, (err.param ? err.param + ": " : "") + err.message, true); }
    });
    return h("div", { class: "panel" }, h("h2", {}, title), form);
  }

  async function pageSettings() {
    const [pricing, routing, filters] = await Promise.all([api("GET", "/api/pricing"), api("GET", "/api/routing"), api("GET", "/api/filters")]);
    return [h("h1", {}, t("nav.settings")), h("div", { class: "grid2" },
      jsonEditor(t("set.pricing"), "/api/pricing", pricing), jsonEditor(t("set.routing"), "/api/routing", routing),
      jsonEditor(t("set.filters"), "/api/filters", filters))];
  }

  // ---- self-service -----------------------------------------------------------

  async function pageMe() {
    const [me, d] = await Promise.all([api("GET", "/api/self"), api("GET", "/api/self/dashboard?range=" + S.range)]);
    return [
      h("h1", {}, t("nav.me")),
      h("div", { class: "cards" },
        card("me.balance", money(me.quota), "balance"),
        card("me.used", money(me.used_quota), "used"),
        card("me.requests", num(me.request_count), "my-requests"),
        card("me.group", me.group, "group")),
      h("h2", {}, t("me.usage")),
      rangePicker(route),
      totalsCards(d),
      usageCharts(d),
    ];
  }

  async function pageMyTokens() {
    const out = h("div", {});
    const tokens = await api("GET", "/api/self/tokens");
    const form = h("form", { class: "fields", "data-test": "my-token-form" },
      h("label", {}, t("col.name"), h("input", { name: "name", required: true })),
      h("label", {}, t("tk.expires"), h("input", { name: "expires_at", type: "datetime-local" })),
      h("label", {}, t("tk.quota"), h("input", { name: "remain_quota", type: "number", min: 0 })),
      h("button", { class: "primary", type: "submit" }, t("create")));
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const f = new FormData(form);
      const body = { name: f.get("name") };
      if (f.get("expires_at")) body.expires_at = seconds(f.get("expires_at"));
      if (f.get("remain_quota") !== "") body.remain_quota = Number(f.get("remain_quota"));
      try { S.newKey = { key: (await api("POST", "/api/self/tokens", body)).key, page: "mytokens" }; route(); } catch (err) { fieldError(form, err, out); }
    });
    const revoke = async (k) => {
      if (!confirm(t("confirm.delete"))) return;
      try { await api("DELETE", "/api/self/tokens/" + k.id); route(); } catch (err) { notice(out, err.message, true); }
    };
    const shown = S.newKey ? createdKey(S.newKey.key) : null;
    return [
      h("h1", {}, t("nav.mytokens")),
      h("div", { class: "panel" }, h("h2", {}, t("tk.new")), form),
      shown, out,
      h("div", { class: "panel" }, table(tokenColumns(revoke), tokens.data, { test: "tokens" })),
    ];
  }

  const PAGES = {
    dashboard: pageDashboard, channels: pageChannels, plugins: pagePlugins, users: pageUsers, tokens: pageTokens,
    logs: () => pageLogs(false), settings: pageSettings, me: pageMe, mytokens: pageMyTokens, mylogs: () => pageLogs(true),
  };

  window.addEventListener("hashchange", route);
  (async () => {
    try {
      S.session = await api("GET", "/api/session");
    } catch (err) {
      S.session = null;
      if (err.code === "session_expired") return; // the sign-in page already says so
    }
    route();
  })();
})();
