"""The status page at `GET /` on the admin port: one HTML document, its CSS
and script inline, nothing fetched from anywhere but this port's own
`/admin/status` (every 2 s) and `POST /admin/refresh`, so it works with no
network. The admin token, when there is one, comes in the URL's fragment
(`/#token=...`, never sent to any server) or from the form the page shows
when it is refused; it is kept in this tab only (sessionStorage)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>wechat-token-sidecar</title>
<style>
  :root { --ok: #1a7f37; --bad: #cf222e; --warn: #9a6700; --ink: #1f2328; --mute: #656d76; --line: #d0d7de; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); background: #f6f8fa; }
  header { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: baseline; padding: .8rem 1rem; background: #fff; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1.05rem; margin: 0; }
  #state { font-size: .9rem; color: var(--mute); }
  #state.bad { color: var(--bad); font-weight: 600; }
  main { display: flex; flex-wrap: wrap; gap: 1rem; padding: 1rem; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: .8rem 1rem; flex: 1 1 22rem; max-width: 40rem; }
  .card h2 { font-size: 1rem; margin: 0 0 .2rem; }
  .sub { color: var(--mute); font-size: .85rem; margin-bottom: .6rem; word-break: break-all; }
  .cred { display: grid; grid-template-columns: 9rem 1fr 4.5rem 4.5rem; gap: .4rem; align-items: center; margin: .35rem 0; }
  .bar { height: .6rem; background: #eaeef2; border-radius: 4px; overflow: hidden; }
  .bar > span { display: block; height: 100%; background: var(--ok); }
  .bar.low > span { background: var(--warn); }
  .bar.none > span { background: var(--bad); width: 100% !important; }
  .countdown { font-variant-numeric: tabular-nums; text-align: right; }
  button { font: inherit; padding: .15rem .4rem; border: 1px solid var(--line); border-radius: 5px; background: #f6f8fa; cursor: pointer; }
  button:disabled { opacity: .5; }
  .chart { display: flex; align-items: flex-end; gap: 1px; height: 2.2rem; margin: .4rem 0 .1rem; border-bottom: 1px solid var(--line); }
  .chart i { flex: 1; background: #8c959f; min-height: 0; }
  .chart i.f { background: var(--bad); }
  .figures { display: flex; flex-wrap: wrap; gap: .2rem 1rem; color: var(--mute); font-size: .85rem; }
  .figures b { color: var(--ink); }
  .errors { margin: .4rem 0 0; padding-left: 1.1rem; color: var(--bad); font-size: .85rem; }
  .msg { font-size: .85rem; color: var(--mute); min-height: 1.2em; }
  #login { display: none; padding: 1rem; }
  #login.shown { display: block; }
  #login input { font: inherit; padding: .3rem; width: min(24rem, 90vw); }
  @media (max-width: 480px) { .cred { grid-template-columns: 7rem 1fr 4rem; } .cred button { grid-column: 1 / -1; } }
</style>
</head>
<body>
<header><h1>wechat-token-sidecar</h1><span id="state">loading...</span></header>
<section id="login"><p><b>401</b>: this admin port needs its token (<code>admin.token</code>).</p>
  <form id="login-form"><input id="token-input" type="password" autocomplete="off" placeholder="admin token">
  <button type="submit">open</button></form></section>
<main id="apps"></main>
<script>
"use strict";
const KEY = "wts-admin-token";
let token = "";
const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromHash) { sessionStorage.setItem(KEY, fromHash); history.replaceState(null, "", location.pathname); }
token = sessionStorage.getItem(KEY) || "";
let last = null, receivedAt = 0;
const notes = {};                 // app -> the last refresh's outcome, kept across redraws

function headers() { return token ? {"Authorization": "Bearer " + token} : {}; }
function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const kid of kids) if (kid) node.append(kid);
  return node;
}
function clock(seconds) {
  if (seconds === null || seconds === undefined) return "none";
  const s = Math.max(0, Math.floor(seconds)), h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60);
  return (h ? h + ":" + String(m).padStart(2, "0") : m) + ":" + String(s % 60).padStart(2, "0");
}
function setState(text, bad) { const s = document.getElementById("state"); s.textContent = text; s.className = bad ? "bad" : ""; }
function chart(history) {
  const box = el("div", {class: "chart", title: "fetches (grey) and failed fetches (red) a minute, last hour"});
  const top = Math.max(1, ...history.fetches);
  history.fetches.forEach((n, i) => {
    const failed = history.failures[i];
    box.append(el("i", {class: failed ? "f" : "", style: "height:" + Math.round(100 * n / top) + "%"}));
  });
  return box;
}
function note(app, msg, text) { notes[app] = text; msg.textContent = text; }
async function refresh(app, credential, button, msg) {
  button.disabled = true; note(app, msg, "refreshing " + credential + "...");
  try {
    const url = "/admin/refresh?app=" + encodeURIComponent(app) + "&credential=" + encodeURIComponent(credential);
    const resp = await fetch(url, {method: "POST", headers: headers(), cache: "no-store"});
    const body = await resp.json();
    note(app, msg, resp.ok ? credential + " refreshed: expires in " + clock(body.expires_in)
                           : credential + ": " + resp.status + " " + (body.errmsg || ""));
    poll();
  } catch (e) { note(app, msg, "the sidecar cannot be reached"); }
  finally { button.disabled = false; }
}
function render(data) {
  const box = document.getElementById("apps");
  box.replaceChildren();
  for (const app of data.apps) {
    const msg = el("div", {class: "msg note", text: notes[app.name] || ""});
    const card = el("section", {class: "card", "data-app": app.name},
      el("h2", {text: app.name}), el("div", {class: "sub", text: app.appid + " \\u00b7 " + app.token_api}));
    for (const c of app.credentials) {
      const share = c.expires_in_s && c.lifetime_s ? Math.min(1, c.expires_in_s / c.lifetime_s) : 0;
      const bar = el("div", {class: "bar" + (!c.usable ? " none" : share < 0.1 ? " low" : "")},
                     el("span", {style: "width:" + Math.round(share * 100) + "%"}));
      const button = el("button", {type: "button", class: "refresh", text: "refresh"});
      button.addEventListener("click", () => refresh(app.name, c.credential, button, msg));
      card.append(el("div", {class: "cred", "data-credential": c.credential},
        el("span", {text: c.credential + (c.usable ? "" : " (no usable one)")}), bar,
        el("span", {class: "countdown", "data-expires": c.expires_in_s === null ? "" : c.expires_in_s,
                    text: clock(c.expires_in_s)}), button));
      if (c.last_fetch !== "ok") card.append(el("div", {class: "msg", text: c.credential + ": " + c.last_fetch}));
    }
    card.append(msg, chart(app.history));
    const fetched = app.history.fetches.reduce((a, b) => a + b, 0);
    const failed = app.history.failures.reduce((a, b) => a + b, 0);
    const replayed = app.history.replays.reduce((a, b) => a + b, 0);
    const figures = el("div", {class: "figures"},
      el("span", {}, "fetches, last hour: ", el("b", {class: "fetch-count", text: String(fetched)})),
      el("span", {}, "failed: ", el("b", {class: "failure-count", text: String(failed)})),
      el("span", {}, "replays, last hour: ", el("b", {class: "replay-count", text: String(replayed)})));
    if (app.platform) figures.append(el("span", {class: "platform"}, "authorizers: ",
      el("b", {text: String(app.platform.registered)}), " registered, ", el("b", {text: String(app.platform.cached)}),
      " cached, ", el("b", {text: String(app.platform.refreshing)}), " refreshing"));
    if (app.pushes) figures.append(el("span", {class: "pushes"}, "pushes: ", el("b", {text: String(app.pushes.delivered)}),
      " delivered, ", el("b", {text: String(app.pushes.queued)}), " queued, ",
      el("b", {text: String(Object.values(app.pushes.dropped).reduce((a, b) => a + b, 0))}), " dropped"));
    if (app.egress_ip_not_whitelisted) figures.append(el("span", {class: "bad"},
      "WeChat refuses egress IP ", el("b", {text: app.egress_ip_not_whitelisted})));
    card.append(figures);
    if (app.history.errors.length) {
      const list = el("ul", {class: "errors"});
      for (const e of app.history.errors) list.append(el("li", {text: clock(e.s_ago) + " ago, " + e.credential + ": " + e.error}));
      card.append(list);
    }
    box.append(card);
  }
  const merchants = el("section", {class: "card", "data-section": "merchants"}, el("h2", {text: "WeChat Pay merchants"}));
  if (!data.merchants.length) merchants.append(el("div", {class: "sub", text: "none configured"}));
  for (const m of data.merchants) {
    merchants.append(el("div", {class: "sub", "data-merchant": m.name, text: m.name + " \u00b7 mchid " + m.mchid +
      (m.public_key_id ? " \u00b7 public key " + m.public_key_id : "")}));
    if (!m.certificates.length) merchants.append(el("div", {class: "msg", text: "no platform certificate held"}));
    for (const c of m.certificates) merchants.append(el("div", {class: "figures"},
      el("span", {}, "certificate ", el("b", {text: c.serial})), el("span", {text: "expires in " + c.expires_in_days + " days"})));
  }
  box.append(merchants);
}
function tick() {
  if (!last) return;
  const elapsed = (Date.now() - receivedAt) / 1000;
  for (const node of document.querySelectorAll(".countdown")) {
    const left = node.dataset.expires;
    if (left !== "") node.textContent = clock(parseFloat(left) - elapsed);
  }
}
async function poll() {
  let resp;
  try { resp = await fetch("/admin/status", {headers: headers(), cache: "no-store"}); }
  catch (e) { setState("the sidecar cannot be reached (retrying)", true); return; }
  if (resp.status === 401 || resp.status === 403) {
    setState(resp.status + ": " + ((await resp.json()).errmsg || "refused"), true);
    document.getElementById("login").className = "shown";
    document.getElementById("apps").replaceChildren();
    last = null;
    return;
  }
  if (!resp.ok) { setState("status answered " + resp.status, true); return; }
  document.getElementById("login").className = "";
  last = await resp.json(); receivedAt = Date.now();
  render(last);
  setState("up \\u00b7 " + last.apps.length + " app(s) \\u00b7 store: " + last.store + " \\u00b7 " + new Date().toLocaleTimeString(), false);
}
document.getElementById("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token-input").value; sessionStorage.setItem(KEY, token); poll();
});
poll(); setInterval(poll, 2000); setInterval(tick, 1000);
</script>
</body>
</html>
"""
