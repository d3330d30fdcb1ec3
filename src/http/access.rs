//! Who may use the console listener (`http.listen`): the Host check, and the read token.
//!
//! ```text
//! request ─► /metrics, /healthz, /readyz                (always open)
//!         ─► Host check ─► /login, /logout               (the session cookie)
//!                       ─► read gate ─► /api/v1/…, /, /parked/{id}
//! ```
//!
//! **Host check.** A page on `http://evil.example:9187/` whose name the attacker re-points at
//! 127.0.0.1 (DNS rebinding) is same-origin with itself and reaches whatever listens on the
//! operator's 127.0.0.1:9187 — an SSH tunnel to a pod's console, say — and reads it. Its
//! requests always carry the attacker's name in `Host`, so this listener answers only a
//! `Host` that is `localhost`, a loopback address, or the address it listens on (any IP
//! address when it listens on all of them: a rebinding attack can never produce an IP
//! literal, which is why no list of names is configured). The port is not compared: a tunnel
//! may map the console to any local port (`ssh -L 8080:127.0.0.1:9187`), and the port is not
//! what an attacker forges. A request without `Host` (HTTP/1.0 tools; every browser sends
//! one) is answered. Anything else gets 421 Misdirected Request, which says how to open
//! the console instead. `/metrics`, `/healthz` and `/readyz` are not checked, here or on the
//! ops listener (`http.ops_listen`): probes and scrapers address a pod by IP or by whatever
//! name their platform gives it, and those three hold nothing the check protects (they are
//! open, no token, to whoever reaches the port, by contract; the metrics name no tenant).
//!
//! **Read token.** With `http.read_token` set, the console pages and every `/api/v1/` request
//! need it, or the admin token: as `Authorization: Bearer <token>` (API clients, and the
//! page's own Replay/Purge calls, which send the admin token), or as the session cookie that
//! the page's login form sets. API refusals are 401 with a JSON error; a page refusal is 401
//! with the login form. Tokens are compared in constant time and never logged.
//!
//! Why a cookie and not a token in `sessionStorage` sent by the script: the console is
//! server-rendered pages that a person navigates with links, a search form and the back
//! button, and a browser adds no `Authorization` header to a navigation. A script-held token
//! would turn every page into a shell that fetches itself; a cookie goes with each navigation
//! and with the script's refreshes, and works without JavaScript. It is `HttpOnly` (a script
//! injected into the page cannot read it), `SameSite=Strict` (no other site's page can make
//! the browser send it: no cross-site request forgery of reads, and actions need the admin
//! bearer token anyway), `Path=/`, and lasts [`SESSION`]. Its value is not the token but
//! `<expiry>.<HMAC-SHA256(read_token, expiry)>`: a copied cookie lapses, changing the token
//! ends every session, and any daemon with the same token accepts it (no session store).
//! It is not `Secure` because the listener speaks plain HTTP (loopback, or behind a proxy).
//! Browsers keep cookies per host, not per port: consoles of clusters with different tokens
//! tunnelled to the same `localhost` share one cookie, so logging into one logs out of the
//! other (daemons of one cluster share the token, and so the session).

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::api::bearer;
use super::console;
use crate::config::{Secret, constant_time_eq};

/// The session cookie's name.
const COOKIE: &str = "turnd_read";
/// How long a browser stays logged in: a working day, so an operator types the token about
/// once a shift; shorter would limit what a copied cookie is worth, at the price of typing.
pub(super) const SESSION: Duration = Duration::from_secs(12 * 3600);
/// Bytes of a login form that are read; the form holds a token and a path.
pub(super) const MAX_LOGIN_BYTES: usize = 8 * 1024;
/// Longest `next` path the login form returns to.
const MAX_NEXT: usize = 2048;

// ---- Host check ---------------------------------------------------------------------------------

/// Whether the console listener serves a request addressed to `authority` (a `Host` value,
/// `name[:port]` or `[v6]:port`), when it listens on `listen`.
pub(super) fn host_allowed(authority: &str, listen: Option<SocketAddr>) -> bool {
    let Some((name, bracketed)) = host_name(authority) else {
        return false;
    };
    let ip = if bracketed {
        match name.parse::<Ipv6Addr>() {
            Ok(ip) => IpAddr::V6(ip),
            Err(_) => return false,
        }
    } else {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        match name.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => return false,
        }
    };
    let ip = ip.to_canonical();
    ip.is_loopback()
        || listen.is_some_and(|l| l.ip().is_unspecified() || l.ip().to_canonical() == ip)
}

/// The host part of an authority and whether it was a bracketed IPv6 literal; None when the
/// authority is malformed (a port that is not a number, an unbracketed colon).
fn host_name(authority: &str) -> Option<(&str, bool)> {
    let is_port = |p: &str| p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = authority.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        return port_ok.then_some((ip, true));
    }
    let name = match authority.rsplit_once(':') {
        Some((name, port)) if is_port(port) => name,
        Some(_) => return None,
        None => authority,
    };
    (!name.is_empty() && !name.contains(':')).then_some((name, false))
}

/// The request's authority: the URI's (absolute form) or its `Host` header. `Some(None)`
/// when there is one that is not text.
fn authority(req: &Request) -> Option<Option<String>> {
    if let Some(a) = req.uri().authority() {
        return Some(Some(a.as_str().to_owned()));
    }
    let host = req.headers().get(header::HOST)?;
    Some(host.to_str().ok().map(str::to_owned))
}

/// Middleware of the console listener: a foreign `Host` gets 421 (see the module doc).
pub(super) async fn check_host(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let listen = s.config.http.listen;
    let refused = match authority(&req) {
        None => None,
        Some(Some(a)) if host_allowed(&a, listen) => None,
        Some(a) => Some(a.unwrap_or_default()),
    };
    let Some(host) = refused else {
        return next.run(req).await;
    };
    let shown: String = host.chars().take(100).collect();
    tracing::debug!(host = %shown.escape_debug(), path = req.uri().path(), "request for a foreign Host refused");
    let port = listen.map_or(9187, |l| l.port());
    let message = format!(
        "this turnd console answers only requests addressed to localhost, a loopback address or \
         the address it listens on, not Host {shown:?} (a guard against DNS rebinding); open it \
         as http://127.0.0.1:{port}/ (through ssh -L if it is remote) or by IP address"
    );
    let mut r = if req.uri().path().starts_with("/api/") {
        (StatusCode::MISDIRECTED_REQUEST, Json(serde_json::json!({ "error": message })))
            .into_response()
    } else {
        (StatusCode::MISDIRECTED_REQUEST, format!("421 Misdirected Request: {message}\n"))
            .into_response()
    };
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

// ---- read token -----------------------------------------------------------------------------------

/// Middleware of the console pages and the API: with `http.read_token` set, a request needs
/// it or the admin token as a bearer token, or a valid session cookie.
pub(super) async fn require_read(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(read) = s.read_token() else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let given = bearer(headers);
    let bearer_ok = given.is_some_and(|g| token_ok(&s, g));
    if bearer_ok || session_ok(&read, headers, now()) {
        return next.run(req).await;
    }
    let path = req.uri().path();
    if given.is_some() {
        tracing::warn!(path, peer = %peer(&req), "console read refused: wrong bearer token");
    } else {
        tracing::debug!(path, "console read refused: no read token");
    }
    if path.starts_with("/api/") {
        let message = if given.is_some() {
            "wrong bearer token: reads need Authorization: Bearer <http.read_token> (or <http.admin_token>)"
        } else {
            "this API needs a token: send Authorization: Bearer <http.read_token> (or <http.admin_token>)"
        };
        let mut r = (StatusCode::UNAUTHORIZED, Json(serde_json::json!({ "error": message })))
            .into_response();
        let h = r.headers_mut();
        h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"turnd\""));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        return r;
    }
    let next_path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let problem = given.is_some().then_some("The bearer token sent was wrong.");
    console::login_page(&s, safe_next(next_path), problem)
}

/// Whether `given` is the read token or the admin token.
fn token_ok(s: &AppState, given: &str) -> bool {
    // Both are checked, so the time does not say which one (if either) was configured.
    let read = s.read_token().is_some_and(|t| t.matches(given));
    let admin = s.admin_token().is_some_and(|t| t.matches(given));
    read | admin
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn session_message(expires: u64) -> String {
    format!("turnd console read session\0{expires}")
}

/// The cookie value for a session that lasts until `expires` (Unix seconds).
fn session_value(read: &Secret, expires: u64) -> String {
    format!("{expires}.{}", hex::encode(read.mac(session_message(expires).as_bytes())))
}

/// Whether a `Cookie` header holds a session minted with `read` that has not lapsed.
fn session_ok(read: &Secret, headers: &HeaderMap, now: u64) -> bool {
    let cookies = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok());
    let mut values = cookies
        .flat_map(|c| c.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value);
    values.any(|v| session_value_ok(read, v, now))
}

fn session_value_ok(read: &Secret, value: &str, now: u64) -> bool {
    let Some((expires, mac)) = value.split_once('.') else {
        return false;
    };
    let Ok(expires) = expires.parse::<u64>() else {
        return false;
    };
    // Lapsed, or further ahead than any session this code mints (with room for clock skew
    // between daemons).
    if expires <= now || expires > now + SESSION.as_secs() + 3600 {
        return false;
    }
    let mut given = [0u8; 32];
    if hex::decode_to_slice(mac, &mut given).is_err() {
        return false;
    }
    constant_time_eq(&read.mac(session_message(expires).as_bytes()), &given)
}

/// `next` if it is a path on this site, else `/` (no open redirect through the login form).
pub(super) fn safe_next(next: &str) -> &str {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/login")
        && !next.starts_with("/logout")
        && next.len() <= MAX_NEXT
        && next.bytes().all(|b| b.is_ascii_graphic() && b != b'\\');
    if ok { next } else { "/" }
}

fn peer(req: &Request) -> String {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_else(|| "-".to_owned())
}

fn see_other(location: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    let location = HeaderValue::from_str(location).unwrap_or(HeaderValue::from_static("/"));
    r.headers_mut().insert(header::LOCATION, location);
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `POST /login` (form: `token`, `next`): with the read or admin token, sets the session
/// cookie and returns to `next`; otherwise the form again, saying the token was wrong.
pub(super) async fn login(State(s): State<AppState>, req: Request) -> Response {
    let peer = peer(&req);
    let body = match axum::body::to_bytes(req.into_body(), MAX_LOGIN_BYTES).await {
        Ok(b) => b,
        Err(_) => Bytes::new(),
    };
    let mut token = String::new();
    let mut next = String::from("/");
    for (k, v) in url::form_urlencoded::parse(&body) {
        match &*k {
            "token" => token = v.trim().to_owned(),
            "next" => next = v.into_owned(),
            _ => {}
        }
    }
    let next = safe_next(&next);
    let Some(read) = s.read_token() else {
        return see_other(next); // reads are open: nothing to log into
    };
    if token.is_empty() || !token_ok(&s, &token) {
        if !token.is_empty() {
            tracing::warn!(peer = %peer, "console login refused: wrong token");
        }
        let problem = if token.is_empty() { "Enter the token." } else { "Wrong token." };
        return console::login_page(&s, next, Some(problem));
    }
    let expires = now() + SESSION.as_secs();
    let cookie = format!(
        "{COOKIE}={}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict",
        session_value(&read, expires),
        SESSION.as_secs()
    );
    tracing::info!(peer = %peer, "console login");
    let mut r = see_other(next);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /logout`: clears the session cookie and returns to the console (its login form).
pub(super) async fn logout() -> Response {
    let mut r = see_other("/");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("turnd_read=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn loopback_names_and_the_listen_address_are_served_on_any_port() {
        let listen = at("127.0.0.1:9187");
        for host in [
            "localhost",
            "localhost:9187",
            "LocalHost:8080",
            "localhost.:9187",
            "127.0.0.1:9187",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:9187",
            "[::1]:9187",
            "[::1]",
            "[::ffff:127.0.0.1]:9187",
        ] {
            assert!(host_allowed(host, listen), "{host}");
        }
        let listen = at("10.0.0.5:9187");
        assert!(host_allowed("10.0.0.5:9187", listen));
        assert!(host_allowed("localhost:9187", listen));
        assert!(!host_allowed("10.0.0.6:9187", listen));
        let listen = at("[fd00::5]:9187");
        assert!(host_allowed("[fd00::5]:9187", listen));
        assert!(!host_allowed("[fd00::6]:9187", listen));
    }

    #[test]
    fn a_listener_on_every_address_serves_any_ip_literal_but_no_other_name() {
        for listen in [at("0.0.0.0:9187"), at("[::]:9187")] {
            assert!(host_allowed("10.1.2.3:9187", listen));
            assert!(host_allowed("[fd00::1]:9187", listen));
            assert!(!host_allowed("turnd-0.turnd.svc:9187", listen));
        }
    }

    #[test]
    fn foreign_and_malformed_hosts_are_refused() {
        let listen = at("127.0.0.1:9187");
        for host in [
            "evil.example:9187",
            "evil.example",
            "localhost.evil.example:9187",
            "127.0.0.1.nip.io:9187",
            "10.0.0.1:9187",
            "",
            ":9187",
            "localhost:http",
            "localhost:123456",
            "::1",
            "[::1",
            "[::1]x",
            "[127.0.0.1]:9187",
            "127.0.0.1:9187:1",
            "user@localhost:9187",
        ] {
            assert!(!host_allowed(host, listen), "{host:?}");
        }
        assert!(!host_allowed("10.0.0.1:9187", None));
        assert!(host_allowed("localhost", None));
    }

    #[test]
    fn sessions_are_bound_to_the_token_and_lapse() {
        let read = Secret::new("read-token-1");
        let now = 1_800_000_000;
        let good = session_value(&read, now + 60);
        assert!(session_value_ok(&read, &good, now));
        assert!(!session_value_ok(&Secret::new("read-token-2"), &good, now), "another token");
        assert!(!session_value_ok(&read, &good, now + 60), "lapsed");
        let far = session_value(&read, now + SESSION.as_secs() * 10);
        assert!(!session_value_ok(&read, &far, now), "further ahead than a session lasts");
        let (expires, mac) = good.split_once('.').unwrap();
        let later = format!("{}.{mac}", expires.parse::<u64>().unwrap() + 3600);
        assert!(!session_value_ok(&read, &later, now), "the expiry is under the MAC");
        for bad in ["", ".", "x.y", &format!("{}.", now + 60), &format!("{}.zz", now + 60)] {
            assert!(!session_value_ok(&read, bad, now), "{bad:?}");
        }

        let mut h = HeaderMap::new();
        assert!(!session_ok(&read, &h, now));
        let cookie = format!("other=1; {COOKIE}={good}; x=y");
        h.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert!(session_ok(&read, &h, now));
        h.insert(header::COOKIE, HeaderValue::from_static("turnd_read=1.00"));
        assert!(!session_ok(&read, &h, now));
        assert!(!good.contains("read-token-1"), "the cookie does not hold the token");
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next("/parked/7?x=1"), "/parked/7?x=1");
        assert_eq!(safe_next("/?q=acme#deployments"), "/?q=acme#deployments");
        for bad in [
            "//evil.example/",
            "/\\evil.example",
            "https://evil.example/",
            "",
            "x",
            "/login",
            "/a b",
        ] {
            assert_eq!(safe_next(bad), "/", "{bad:?}");
        }
        assert_eq!(safe_next(&format!("/{}", "a".repeat(MAX_NEXT))), "/");
    }
}
