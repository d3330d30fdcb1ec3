// The console's only script (inline, allowed by its CSP nonce). It does three things:
// refreshes every element marked data-live from a fresh copy of the same page every few
// seconds; sends Replay / Purge / Cancel and the bulk actions to /api/v1/ with the admin token
// as a bearer token (asked for once, kept in sessionStorage for this tab; the audit log
// records them via "console"); shows the outcome in #flash. A bulk action counts first and
// sends the count's confirmation back, so a set that changed meanwhile is not acted on. With
// http.read_token set, the read session is an HttpOnly cookie that the browser sends by
// itself (this script never sees it); when it lapses, a refresh answers 401 and the page
// reloads into the login form.
(() => {
  "use strict";
  const TOKEN = "turnd-admin-token";
  const FLASH = "turnd-flash";
  const EVERY_MS = 5000;
  const flash = document.getElementById("flash");
  const stamp = document.getElementById("updated");
  const pause = document.getElementById("pause");
  const forget = document.getElementById("forget");
  let paused = false;
  let busy = false;

  function show(message, ok) {
    flash.textContent = message;
    flash.className = ok ? "ok" : "bad";
  }

  // An outcome carried over a navigation (a purge on a detail page goes back to the list).
  const carried = sessionStorage.getItem(FLASH);
  if (carried) {
    sessionStorage.removeItem(FLASH);
    try { const f = JSON.parse(carried); show(f.message, f.ok); } catch (_) { /* ignore */ }
  }

  async function refresh() {
    if (paused || busy || document.hidden) return;
    try {
      const r = await fetch(location.href, { cache: "no-store", headers: { Accept: "text/html" } });
      if (r.status === 401) { location.reload(); return; }
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const el of document.querySelectorAll("[data-live]")) {
        const fresh = doc.getElementById(el.id);
        if (fresh) el.replaceWith(document.importNode(fresh, true));
      }
      document.title = doc.title;
      stamp.textContent = (r.ok ? "updated " : "HTTP " + r.status + " at ") + new Date().toLocaleTimeString();
      stamp.className = r.ok ? "" : "bad";
    } catch (e) {
      stamp.textContent = "refresh failed (" + e.message + "), retrying";
      stamp.className = "bad";
    }
  }
  setInterval(refresh, EVERY_MS);

  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "resume refresh" : "pause refresh";
    if (!paused) refresh();
  });
  if (forget) {
    forget.addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN);
      show("admin token forgotten for this tab", true);
    });
  }

  function adminToken() {
    let token = sessionStorage.getItem(TOKEN);
    if (!token) {
      token = (prompt("Admin token (http.admin_token) for console actions:") || "").trim();
      if (token) sessionStorage.setItem(TOKEN, token);
    }
    return token;
  }

  async function call(method, url) {
    const headers = {};
    if (method !== "GET") {
      const token = adminToken();
      headers["X-Turnd-Via"] = "console";
      if (token) headers.Authorization = "Bearer " + token;
    }
    const r = await fetch(url, { method, headers });
    let body = {};
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    if (r.status === 401) {
      show("401: the console session has ended. Reload the page to log in again.", false);
    } else if (r.status === 403) {
      sessionStorage.removeItem(TOKEN);
      show("403 refused: " + (body.error || "forbidden") + ". Click again to enter the token.", false);
    }
    return { r, body };
  }

  function value(id) {
    const el = document.getElementById(id);
    return el ? el.value.trim() : "";
  }

  function bulkQuery() {
    const q = new URLSearchParams();
    q.set("action", value("bulk-action"));
    for (const [key, id] of [["code", "bulk-code"], ["deployment", "bulk-deployment"], ["older_than", "bulk-older"]]) {
      if (value(id)) q.set(key, value(id));
    }
    return q;
  }

  // Shows a bulk count and, when there is something to act on, the button that acts on
  // exactly that set (it carries the count's confirmation).
  function offer(preview, query) {
    const out = document.getElementById("bulk-result");
    out.textContent = "";
    let text = preview.count + " parked turn(s) to " + preview.action;
    if (preview.more) text += " (a full batch: act again for the rest)";
    if (preview.sample.length) text += ": #" + preview.sample.join(", #") + (preview.count > preview.sample.length ? ", …" : "");
    out.append(text);
    if (preview.count > 0) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "danger";
      b.dataset.action = "bulk-do";
      b.dataset.confirm = preview.confirm;
      b.dataset.count = preview.count;
      b.dataset.query = query.toString();
      b.textContent = preview.action + " these " + preview.count;
      out.append(" ", b);
    }
  }

  async function other(button, action) {
    if (action === "bulk-count") {
      const query = bulkQuery();
      const { r, body } = await call("GET", "/api/v1/parked/bulk?" + query);
      if (r.ok) offer(body, query);
      else show("count failed (HTTP " + r.status + "): " + (body.error || r.statusText), false);
      return;
    }
    if (action === "bulk-do") {
      const query = new URLSearchParams(button.dataset.query);
      if (!confirm(query.get("action") + " " + button.dataset.count + " parked turn(s)?")) return;
      query.set("confirm", button.dataset.confirm);
      const { r, body } = await call("POST", "/api/v1/parked/bulk?" + query);
      if (r.ok) {
        const done = (body.results || []).filter((x) => x.result === "replayed" || x.result === "purged").length;
        document.getElementById("bulk-result").textContent = "";
        show(query.get("action") + ": " + done + " of " + button.dataset.count + " done", done === Number(button.dataset.count));
      } else if (r.status === 409 && body.preview) {
        query.delete("confirm");
        offer(body.preview, query);
        show("the set changed since it was counted (now " + body.preview.count + "); nothing was done: confirm again", false);
      } else if (r.status !== 401 && r.status !== 403) {
        show("bulk action failed (HTTP " + r.status + "): " + (body.error || r.statusText), false);
      }
      return;
    }
    // cancel
    const message = button.dataset.message || value("cancel-message");
    const deployment = button.dataset.deployment || value("cancel-deployment");
    if (!message) { show("name the messageId to cancel", false); return; }
    if (!confirm("Cancel turn " + message + (deployment ? " in " + deployment : "") + "?")) return;
    const q = deployment ? "?deployment=" + encodeURIComponent(deployment) : "";
    const { r, body } = await call("POST", "/api/v1/turns/" + encodeURIComponent(message) + "/cancel" + q);
    if (r.status === 401 || r.status === 403) return;
    let text = message + ": " + (body.result || body.error || r.statusText);
    if (body.candidates) text += " — in " + body.candidates.join(", ") + "; name the deployment";
    if (body.result === "already_done") text += " (" + (body.code || body.kind || "event no longer kept") + "); nothing changed";
    show(text, r.ok);
  }

  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    if (action === "cancel" || action === "bulk-count" || action === "bulk-do") {
      busy = true;
      button.disabled = true;
      try {
        await other(button, action);
      } catch (e) {
        show(action + " failed: " + e.message, false);
      } finally {
        busy = false;
        button.disabled = false;
        refresh();
      }
      return;
    }
    const id = button.dataset.id;
    if (action === "purge" && !confirm("Purge parked turn #" + id + "? Its record is deleted; the AMQP parked queue keeps its copy.")) {
      return;
    }
    busy = true;
    button.disabled = true;
    try {
      const query = action === "replay" ? "?by=console" : "";
      const { r, body } = await call("POST", "/api/v1/parked/" + encodeURIComponent(id) + "/" + action + query);
      if (r.status === 401 || r.status === 403) {
        // call() said so.
      } else if (r.ok) {
        const message = "#" + id + " " + (body.result || action);
        if (action === "purge" && button.dataset.back) {
          sessionStorage.setItem(FLASH, JSON.stringify({ message, ok: true }));
          location.href = button.dataset.back;
          return;
        }
        show(message, true);
      } else {
        show(action + " #" + id + " failed (HTTP " + r.status + "): " + (body.result || body.error || r.statusText), false);
      }
    } catch (e) {
      show(action + " #" + id + " failed: " + e.message, false);
    } finally {
      busy = false;
      button.disabled = false;
      refresh();
    }
  });
})();
