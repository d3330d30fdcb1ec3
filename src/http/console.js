// The console's only script (inline, allowed by its CSP nonce). It does three things:
// refreshes every element marked data-live from a fresh copy of the same page every few
// seconds; sends Replay / Purge to /api/v1/ with the admin token as a bearer token (asked for
// once, kept in sessionStorage for this tab); shows the outcome in #flash. With
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

  document.addEventListener("click", async (ev) => {
    const button = ev.target.closest("button[data-action]");
    if (!button) return;
    const action = button.dataset.action;
    const id = button.dataset.id;
    if (action === "purge" && !confirm("Purge parked turn #" + id + "? Its record is deleted; the AMQP parked queue keeps its copy.")) {
      return;
    }
    let token = sessionStorage.getItem(TOKEN);
    if (!token) {
      token = (prompt("Admin token (http.admin_token) for replay and purge:") || "").trim();
      if (token) sessionStorage.setItem(TOKEN, token);
    }
    busy = true;
    button.disabled = true;
    try {
      const headers = token ? { Authorization: "Bearer " + token } : {};
      const query = action === "replay" ? "?by=console" : "";
      const r = await fetch("/api/v1/parked/" + encodeURIComponent(id) + "/" + action + query, { method: "POST", headers });
      let body = {};
      try { body = await r.json(); } catch (_) { /* not JSON */ }
      if (r.status === 401) {
        show("401: the console session has ended. Reload the page to log in again.", false);
      } else if (r.status === 403) {
        sessionStorage.removeItem(TOKEN);
        show("403 refused: " + (body.error || "forbidden") + ". Click again to enter the token.", false);
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
