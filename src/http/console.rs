//! The operator console: one dense page at `/` that answers "what is stuck, since when, and
//! why", and a detail page per parked turn at `/parked/{id}`.
//!
//! Server-rendered from the database on every request with maud (templates are Rust macros,
//! checked and compiled into the binary, escaped by default). The page refreshes its `data-live`
//! parts every 5 s with a small inline script (`console.js`; a `<noscript>` meta refresh without
//! it). Replay, Purge and Cancel buttons, and the bulk replay/purge by filter (count first,
//! then a confirmation that carries the set's hash), exist only when `http.admin_token` is
//! set; they call the JSON API (`api.rs`) with the token as a bearer token, asked for once per
//! browser tab. The Audit section lists the latest operator actions. With
//! `http.read_token` set, a page request without it gets [`login_page`] (see `access.rs`).

use std::fmt::Write as _;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use maud::{DOCTYPE, Markup, PreEscaped, html};
use serde::Deserialize;

use super::AppState;
use super::views::{self, Cluster, Deployments, ParkedDetail, ParkedList, Turns};
use crate::store::{
    AuditRow, ConsoleDeployment, EVENT_BUCKET_SECONDS, EVENT_WINDOW_SECONDS, EventBucket,
    StoreError,
};

/// Audit rows on the main page (the API lists more).
const AUDIT_SHOWN: i64 = 20;

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");
/// Seconds between refreshes without the script.
const NOSCRIPT_REFRESH: u32 = 10;
/// Bodies longer than this are cut on the page (the API gives all of it).
const MAX_BODY_SHOWN: usize = 64 * 1024;

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/parked/{id}", get(parked_page))
}

// ---- pages -------------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct IndexQuery {
    q: Option<String>,
}

/// Everything the main page shows, read in one go.
struct Overview {
    cluster: Cluster,
    deployments: Deployments,
    /// Unfiltered, for the attention list, when a search filters the table.
    all_deployments: Option<Vec<ConsoleDeployment>>,
    turns: Turns,
    parked: ParkedList,
    audit: Vec<AuditRow>,
}

async fn overview(s: &AppState, q: Option<&str>) -> Result<Overview, StoreError> {
    let deployments = views::deployments_view(s, q, views::DEFAULT_DEPLOYMENTS).await?;
    let all_deployments = match deployments.q {
        Some(_) => {
            Some(views::deployments_view(s, None, views::DEFAULT_DEPLOYMENTS).await?.deployments)
        }
        None => None,
    };
    Ok(Overview {
        cluster: views::cluster_view(s).await?,
        deployments,
        all_deployments,
        turns: views::turns_view(s).await?,
        parked: views::parked_view(s, None, views::DEFAULT_PARKED).await?,
        audit: s.store().audit_list(None, AUDIT_SHOWN).await?,
    })
}

async fn index(State(s): State<AppState>, Query(q): Query<IndexQuery>) -> Response {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    match overview(&s, q.q.as_deref()).await {
        Ok(v) => {
            let title = title(&v);
            let body = html! {
                main {
                    (attention_section(&s, &v))
                    (cluster_section(&v.cluster))
                    (turns_section(&v.turns, v.cluster.actions_enabled))
                    (deployments_section(&s, &v.deployments))
                    (parked_section(&v.parked, v.cluster.actions_enabled))
                    @if v.cluster.actions_enabled { (bulk_section()) }
                    (audit_section(&v.audit))
                }
            };
            respond(StatusCode::OK, page(&s, &nonce, &title, body))
        }
        Err(e) => unavailable(&s, &nonce, &e),
    }
}

async fn parked_page(State(s): State<AppState>, Path(id): Path<i64>) -> Response {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    match views::parked_detail(&s, id).await {
        Ok(Some(d)) => {
            let title = format!("turnd · parked #{id} {}", d.parked.code);
            respond(StatusCode::OK, page(&s, &nonce, &title, parked_detail(&s, &d)))
        }
        Ok(None) => {
            let body = html! { main { section.wide {
                h2 { "Parked turn #" (id) }
                p { "No parked turn " (id) " (purged, or never parked). " a href="/" { "Back to the console" } }
            } } };
            respond(
                StatusCode::NOT_FOUND,
                page(&s, &nonce, &format!("turnd · parked #{id} not found"), body),
            )
        }
        Err(e) => unavailable(&s, &nonce, &e),
    }
}

/// The login form, answered with 401 to a page request that lacks the read token (see
/// `access.rs`). It shows nothing of the cluster, not even its prefix, and runs no script.
pub(super) fn login_page(s: &AppState, next: &str, problem: Option<&str>) -> Response {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let hours = super::access::SESSION.as_secs() / 3600;
    let admin = s.admin_token().is_some();
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "turnd · log in" }
                style nonce=(nonce) { (PreEscaped(CSS)) }
            }
            body {
                header { a.brand href="/" { "turnd" } span { "operator console" } }
                main { section.wide #login {
                    h2 { "Log in" }
                    p { "This console needs its read token (" code { "http.read_token" } ")"
                        @if admin { " or the admin token (" code { "http.admin_token" } ")" } "." }
                    @if let Some(problem) = problem { p.bad #login-problem { (problem) } }
                    form method="post" action="/login" {
                        input type="hidden" name="next" value=(next);
                        label { "Token " input #token type="password" name="token" autocomplete="off" autofocus required; }
                        " " button #login-submit type="submit" { "Log in" }
                    }
                    p.mute { "The browser then keeps a session cookie for this site for " (hours)
                        " hours (HttpOnly, SameSite=Strict; it holds a proof of the token, not the token). "
                        "API clients send " code { "Authorization: Bearer <token>" } " instead." }
                } }
            }
        }
    };
    let mut r = respond(StatusCode::UNAUTHORIZED, (nonce, markup));
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"turnd\""));
    r
}

fn unavailable(s: &AppState, nonce: &str, e: &StoreError) -> Response {
    let body = html! { main { section.wide #attention data-live {
        h2 { "Database unavailable" }
        p.bad { "This daemon cannot read PostgreSQL: " (e) }
        p { "The page retries by itself. Intake pauses while the database is down; "
            "/readyz on each daemon says which dependency is down." }
    } } };
    respond(StatusCode::SERVICE_UNAVAILABLE, page(s, nonce, "turnd · database unavailable", body))
}

/// Security headers: the CSP allows only this response's own style and script (by nonce),
/// requests to this origin, and no framing.
fn respond(status: StatusCode, (nonce, markup): (String, Markup)) -> Response {
    let mut r = (status, Html(markup.into_string())).into_response();
    let csp = format!(
        "default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; connect-src 'self'; \
         img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    );
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// The frame of every page: header bar, outcome banner, the body, the script.
fn page(s: &AppState, nonce: &str, title: &str, body: Markup) -> (String, Markup) {
    let actions = s.admin_token().is_some();
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) }
                noscript { meta http-equiv="refresh" content=(NOSCRIPT_REFRESH); }
                style nonce=(nonce) { (PreEscaped(CSS)) }
            }
            body {
                header {
                    a.brand href="/" { "turnd" }
                    span { "prefix " b { (s.config.amqp.prefix) } }
                    span { "served by " b { (s.config.daemon.id) } " · v" (env!("CARGO_PKG_VERSION")) }
                    @if actions {
                        span { "actions: token required " button #forget type="button" { "forget token" } }
                    } @else {
                        span { "read-only (no http.admin_token)" }
                    }
                    @if s.read_token().is_some() {
                        form #logout method="post" action="/logout" { button type="submit" { "log out" } }
                    }
                    span.spacer {}
                    span #updated { "rendered " (now_hms()) " UTC" }
                    button #pause type="button" { "pause refresh" }
                    a href="/api/v1/cluster" { "JSON API" }
                    a href="/metrics" { "metrics" }
                }
                div #flash role="status" aria-live="polite" {}
                (body)
                script nonce=(nonce) { (PreEscaped(JS)) }
            }
        }
    };
    (nonce.to_owned(), markup)
}

fn title(v: &Overview) -> String {
    let pending: i64 = v.turns.pending.iter().map(|p| p.count).sum();
    let oldest = v
        .turns
        .pending
        .iter()
        .filter_map(|p| p.oldest_age_s)
        .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a))));
    let waiting: i64 = v.parked.by_code.iter().map(|p| p.not_replayed).sum();
    let mut t = format!("turnd · {pending} pending");
    if let Some(o) = oldest {
        let _ = write!(t, " (oldest {})", age(o));
    }
    if waiting > 0 {
        let _ = write!(t, " · {waiting} parked");
    }
    t
}

// ---- attention -----------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Bad,
    Warn,
    Info,
}

impl Level {
    fn class(self) -> &'static str {
        match self {
            Level::Bad => "bad",
            Level::Warn => "warn",
            Level::Info => "",
        }
    }
}

/// A pending turn older than this is worth a look (it should have been claimed by now unless
/// its worker is busy with a queue).
fn pending_threshold_s(s: &AppState) -> f64 {
    (s.config.sweep.adoption_delay.as_secs_f64() * 3.0).max(30.0)
}

/// The problems first: dead or unready daemons, crash loops, turns waiting without an owner or
/// for long, a stuck outbox, parked turns, errors of the last hour.
fn attention(s: &AppState, v: &Overview) -> Vec<(Level, Markup)> {
    let mut items = Vec::new();
    let live: Vec<_> = v.cluster.daemons.iter().filter(|d| d.live).collect();
    if live.is_empty() {
        items.push((Level::Bad, html! { "No live daemon: nothing takes turns from the inbox." }));
    }
    for d in v.cluster.daemons.iter().filter(|d| !d.live) {
        items.push((
            Level::Bad,
            html! {
                "Daemon " b { (d.id) } " (" (d.hostname) ") silent for " (age(d.heartbeat_age_s))
                ": down? Its deployments are adopted by the others after sweep.adoption_delay."
            },
        ));
    }
    for d in live.iter().filter(|d| !d.ready) {
        items.push((Level::Bad, html! {
            "Daemon " b { (d.id) } " is not ready: a dependency is down (its /readyz says which)."
        }));
    }
    let deployments = v.all_deployments.as_ref().unwrap_or(&v.deployments.deployments);
    for d in deployments.iter().filter(|d| d.backoff_left_s.is_some()) {
        items.push((Level::Bad, html! {
            "Deployment " a href=(search_href(&d.deployment)) { (d.deployment) } " is in a worker crash loop ("
            (d.crash_count) " deaths): next start in " (age(d.backoff_left_s.unwrap_or(0.0))) "."
        }));
    }
    let unowned: Vec<_> =
        deployments.iter().filter(|d| d.owner.is_none() && d.queued + d.running > 0).collect();
    if let Some(first) = unowned.first() {
        let wait = first.oldest_pending_age_s.unwrap_or(0.0);
        let level = if wait > s.config.sweep.adoption_delay.as_secs_f64() * 2.0 {
            Level::Bad
        } else {
            Level::Warn
        };
        items.push((level, html! {
            (unowned.len()) " deployment(s) with pending turns and no owner, the longest "
            a href=(search_href(&first.deployment)) { (first.deployment) } " waiting " (age(wait))
            " (adoption after sweep.adoption_delay = " (age(s.config.sweep.adoption_delay.as_secs_f64())) ")."
        }));
    }
    for p in v
        .turns
        .pending
        .iter()
        .filter(|p| p.oldest_age_s.is_some_and(|a| a > pending_threshold_s(s)))
    {
        items.push((Level::Warn, html! {
            (p.count) " turn(s) " (p.state) ", the oldest for " b { (age(p.oldest_age_s.unwrap_or(0.0))) } ": "
            @if let Some(d) = &p.oldest_deployment { a href=(search_href(d)) { (d) } }
            @if let Some(m) = &p.oldest_message_id { " messageId " code { (m) } }
        }));
    }
    if v.turns.unpublished_events > 100 {
        items.push((Level::Warn, html! {
            (v.turns.unpublished_events) " terminal events not yet published to " (s.config.amqp.prefix) ".replies "
            "(broker down, or the relays are behind)."
        }));
    }
    let waiting: Vec<_> = v.parked.by_code.iter().filter(|p| p.not_replayed > 0).collect();
    if !waiting.is_empty() {
        let total: i64 = waiting.iter().map(|p| p.not_replayed).sum();
        items.push((
            Level::Warn,
            html! {
                a href="#parked" { (total) " parked turn(s)" } " not replayed: "
                @for (i, p) in waiting.iter().enumerate() {
                    @if i > 0 { ", " }
                    b { (p.code) } " ×" (p.not_replayed) " (newest " (age(p.newest_age_s)) " ago)"
                }
            },
        ));
    }
    let mut errors: Vec<(&str, i64)> = Vec::new();
    for b in v.turns.terminal_events.buckets.iter().filter(|b| b.kind == "error") {
        match errors.iter_mut().find(|(c, _)| *c == b.code) {
            Some((_, n)) => *n += b.count,
            None => errors.push((&b.code, b.count)),
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| std::cmp::Reverse(e.1));
        items.push((
            Level::Info,
            html! {
                "Error events in the last hour: "
                @for (i, (code, n)) in errors.iter().enumerate() {
                    @if i > 0 { ", " }
                    b { (code) } " ×" (n)
                }
            },
        ));
    }
    items.sort_by_key(|(l, _)| *l);
    items
}

fn attention_section(s: &AppState, v: &Overview) -> Markup {
    let items = attention(s, v);
    let problems = items.iter().any(|(l, _)| *l != Level::Info);
    let live = v.cluster.daemons.iter().filter(|d| d.live).count();
    let owned = v.cluster.daemons.iter().map(|d| d.owned_deployments).sum::<i64>();
    html! {
        section.wide #attention data-live {
            h2 { "Attention" }
            @if !problems {
                p.allclear { "All clear: " (live) " daemon(s) live, " (owned) " deployment(s) owned, no turn waiting longer than "
                    (age(pending_threshold_s(s))) ", nothing parked waiting." }
            }
            @if !items.is_empty() {
                ul.attention {
                    @for (level, item) in &items { li class=(level.class()) { (item) } }
                }
            }
        }
    }
}

// ---- sections ------------------------------------------------------------------------------------

fn cluster_section(c: &Cluster) -> Markup {
    let live = c.daemons.iter().filter(|d| d.live).count();
    html! {
        section #cluster data-live {
            h2 { "Cluster" span.count { (live) " live daemon(s); silent after " (age(c.live_within_s)) } }
            table {
                thead { tr {
                    th { "daemon" } th { "host" } th.num { "pid" } th { "version" } th.num { "up" }
                    th.num { "heartbeat" } th.num { "owns" } th.num { "workers" } th { "ready" }
                } }
                tbody {
                    @for d in &c.daemons {
                        tr class=(if !d.live || !d.ready { "bad" } else { "" }) {
                            td { b { (d.id) } }
                            td { (d.hostname) }
                            td.num { (d.pid) }
                            td { (d.version) }
                            td.num { (age(d.uptime_s)) }
                            td.num.bad[!d.live] { (age(d.heartbeat_age_s)) " ago" }
                            td.num { (d.owned_deployments) }
                            td.num { (d.live_workers) }
                            td {
                                @if !d.live { span.bad { "silent" } }
                                @else if d.ready { span.ok { "ready" } }
                                @else { span.bad { "not ready" } }
                            }
                        }
                    }
                    @if c.daemons.is_empty() { tr { td.bad colspan="9" { "no daemon has reported in the last hour" } } }
                }
            }
        }
    }
}

fn turns_section(t: &Turns, actions: bool) -> Markup {
    let total: i64 = t.terminal_events.buckets.iter().map(|b| b.count).sum();
    html! {
        section #turns data-live {
            h2 { "Turns" }
            table {
                thead { tr { th { "pending" } th.num { "count" } th.num { "oldest" } th { "oldest turn" } } }
                tbody {
                    @for p in &t.pending {
                        tr {
                            td { (p.state) }
                            td.num { b { (p.count) } }
                            td.num { (p.oldest_age_s.map(age).unwrap_or_else(|| "–".to_owned())) }
                            td {
                                @if let Some(d) = &p.oldest_deployment { a href=(search_href(d)) { (d) } }
                                @if let Some(m) = &p.oldest_message_id { " " code.mute { (m) } }
                                @if let (true, Some(d), Some(m)) = (actions, &p.oldest_deployment, &p.oldest_message_id) {
                                    " " (cancel_button(d, m))
                                }
                            }
                        }
                    }
                    tr {
                        td { "unpublished events" }
                        td.num.warn[t.unpublished_events > 100] { b { (t.unpublished_events) } }
                        td {} td {}
                    }
                }
            }
            @if actions {
                // Outside data-live: what is typed here survives the refresh.
                div.cancel-form {
                    "Cancel a turn: "
                    input #cancel-message type="text" placeholder="messageId" aria-label="messageId";
                    " "
                    input #cancel-deployment type="text" placeholder="deployment (if ambiguous)" aria-label="deployment";
                    " "
                    button.danger type="button" data-action="cancel" title="Queued: ends TURN_CANCELLED now. Running: its worker gets a cancel line and turn.cancel_grace to answer" { "Cancel" }
                }
            }
            div.chart {
                div {
                    div.mute { "Terminal events, last hour (" (total) "), per " (EVENT_BUCKET_SECONDS / 60) " minutes" }
                    (chart(&t.terminal_events.buckets))
                }
                (legend(&t.terminal_events.buckets))
            }
        }
    }
}

fn deployments_section(s: &AppState, d: &Deployments) -> Markup {
    let threshold = pending_threshold_s(s);
    let adoption = s.config.sweep.adoption_delay.as_secs_f64();
    html! {
        section.wide #deployments {
            h2 {
                "Deployments"
                span.count #deployments-count data-live {
                    (d.deployments.len()) @if d.deployments.len() as i64 >= d.limit { "+ (first " (d.limit) ")" }
                    " owned or with pending turns, longest-waiting first"
                    @if let Some(q) = &d.q { " · matching " b { (q) } " · " a href="/" { "clear" } }
                }
                form method="get" action="/" {
                    input type="search" name="q" value=[d.q.as_deref()] placeholder="organization, agent, conversation, deployment";
                    " " button type="submit" { "search" }
                }
            }
            div #deployments-table data-live {
                table {
                    thead { tr {
                        th { "deployment" } th { "organization" } th { "agent" } th { "conversation" } th { "owner" }
                        th.num { "epoch" } th.num { "since" } th.num { "queued" } th.num { "running" } th.num { "oldest pending" }
                        th.num { "worker pid" } th.num { "worker up" } th.num { "last heartbeat" } th { "notes" }
                    } }
                    tbody {
                        @for x in &d.deployments {
                            @let pending = x.queued + x.running;
                            @let oldest = x.oldest_pending_age_s.unwrap_or(0.0);
                            @let class = if x.backoff_left_s.is_some() || (x.owner.is_none() && pending > 0 && oldest > adoption * 2.0) {
                                "bad"
                            } else if pending > 0 && oldest > threshold { "warn" } else { "" };
                            tr class=(class) {
                                td.mono { (x.deployment) }
                                td { (x.organization_id.as_deref().unwrap_or("–")) }
                                td { (x.agent_id) }
                                td { (x.conversation_key) }
                                td { @match &x.owner { Some(o) => { (o) }, None => { span.bad { "none" } } } }
                                td.num { (x.epoch) }
                                td.num { (opt_age(x.since_s)) }
                                td.num { (x.queued) }
                                td.num { (x.running) }
                                td.num { (opt_age(x.oldest_pending_age_s)) }
                                td.num { @if let Some(p) = x.worker_pid { (p) } @else { "–" } }
                                td.num { (opt_age(x.worker_uptime_s)) }
                                td.num {
                                    @if let Some(h) = x.turn_heartbeat_age_s { (age(h.max(0.0))) " ago" }
                                    @else if x.owner.is_some() { span.mute { "idle" } }
                                    @else { "–" }
                                }
                                td {
                                    @if let Some(b) = x.backoff_left_s { span.bad { "crash loop: " (x.crash_count) " deaths, back-off " (age(b)) } }
                                    @else if x.owner.is_none() && pending > 0 { span.warn { "waiting for adoption" } }
                                }
                            }
                        }
                        @if d.deployments.is_empty() {
                            tr { td.mute colspan="14" {
                                @if d.q.is_some() { "no deployment matches" } @else { "no deployment is owned and no turn is pending" }
                            } }
                        }
                    }
                }
            }
        }
    }
}

fn parked_section(p: &ParkedList, actions: bool) -> Markup {
    html! {
        section.wide #parked data-live {
            h2 {
                "Parked"
                span.count {
                    @for (i, c) in p.by_code.iter().enumerate() {
                        @if i > 0 { " · " }
                        b { (c.code) } " " (c.total) " (" (c.not_replayed) " not replayed, " (c.last_hour) " in the last hour)"
                    }
                    @if p.by_code.is_empty() { "nothing parked" }
                    @else if p.parked.len() as i64 >= views::DEFAULT_PARKED { " · newest " (views::DEFAULT_PARKED) " shown" }
                }
            }
            @if !p.parked.is_empty() {
                table {
                    thead { tr {
                        th.num { "id" } th { "code" } th { "reason" } th { "deployment" } th { "messageId" }
                        th.num { "attempts" } th.num { "parked" } th { "status" }
                        @if actions { th { "actions" } }
                    } }
                    tbody {
                        @for x in &p.parked {
                            tr {
                                td.num { a href={ "/parked/" (x.id) } { "#" (x.id) } }
                                td { b { (x.code) } }
                                td.reason { (shorten(&x.reason, 160)) }
                                td.mono { (x.deployment.as_deref().unwrap_or("–")) }
                                td.mono { (x.message_id.as_deref().unwrap_or("–")) }
                                td.num { (x.attempts) }
                                td.num { (age(x.age_s)) " ago" }
                                td { (replay_status(x.replayed_by.as_deref(), x.replayed_age_s)) }
                                @if actions {
                                    td { (buttons(x.id, x.replayed_by.is_none(), None)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn parked_detail(s: &AppState, d: &ParkedDetail) -> Markup {
    let p = &d.parked;
    let actions = s.admin_token().is_some();
    let body = pretty(&d.body);
    let cut = body.len() > MAX_BODY_SHOWN;
    let shown = if cut { &body[..floor_char_boundary(&body, MAX_BODY_SHOWN)] } else { &body[..] };
    html! {
        main {
            section.wide #detail data-live {
                h2 { a href="/#parked" { "Parked" } " › #" (p.id) " " (p.code) }
                dl.fields {
                    dt { "code" } dd { b { (p.code) } }
                    dt { "reason" } dd { (p.reason) }
                    dt { "deployment" } dd.mono {
                        @match &p.deployment { Some(x) => { a href=(search_href(x)) { (x) } }, None => { "–" } }
                    }
                    dt { "messageId" } dd.mono { (p.message_id.as_deref().unwrap_or("–")) }
                    dt { "attempts" } dd { (p.attempts) }
                    dt { "routing key" } dd.mono { (p.routing_key) }
                    dt { "parked" } dd { (age(p.age_s)) " ago" }
                    dt { "status" } dd #status { (replay_status(p.replayed_by.as_deref(), p.replayed_age_s)) }
                }
                @if actions {
                    div.actions { (buttons(p.id, p.replayed_by.is_none(), Some("/"))) }
                }
            }
            section.wide #body-section {
                h2 { "Body" span.count { (d.body_bytes) " bytes"
                    @if d.payload_hidden { " · payload hidden (http.show_payloads = false)" } } }
                pre #body { (shown) }
                @if cut { p.mute { "Cut at " (MAX_BODY_SHOWN) " bytes; " a href={ "/api/v1/parked/" (p.id) } { "the API" } " has all of it." } }
                h2 { "Headers" }
                pre #headers { (pretty(&d.headers)) }
            }
        }
    }
}

fn cancel_button(deployment: &str, message_id: &str) -> Markup {
    html! {
        button.danger type="button" data-action="cancel" data-deployment=(deployment) data-message=(message_id)
            title="Cancel this turn (queued: TURN_CANCELLED now; running: its worker is told)" { "Cancel" }
    }
}

/// Bulk replay or purge of parked turns by filter: Count shows how many and which, and only
/// then a button that acts on exactly that set (console.js sends its confirmation back).
fn bulk_section() -> Markup {
    html! {
        section.wide #bulk {
            h2 { "Bulk replay or purge" span.count { "parked turns by filter; the count comes first, and a changed set is not acted on" } }
            div.bulk-form {
                select #bulk-action aria-label="action" {
                    option value="replay" { "replay" }
                    option value="purge" { "purge" }
                }
                " code " input #bulk-code type="text" placeholder="e.g. INVALID_TURN" size="16";
                " deployment " input #bulk-deployment type="text" size="24";
                " parked longer ago than " input #bulk-older type="text" placeholder="e.g. 1h, 0s = any" size="10";
                " " button type="button" data-action="bulk-count" { "Count" }
                " " span #bulk-result {}
            }
        }
    }
}

fn audit_section(rows: &[AuditRow]) -> Markup {
    html! {
        section.wide #audit data-live {
            h2 { "Audit" span.count { "operator actions, newest " (AUDIT_SHOWN) " · " a href="/api/v1/audit" { "more in the API" } } }
            @if rows.is_empty() {
                p.mute { "no operator action yet" }
            } @else {
                table {
                    thead { tr { th { "when" } th { "who" } th { "via" } th { "action" } th { "target" } th { "result" } } }
                    tbody {
                        @for r in rows {
                            tr {
                                td.num title=(r.at) { (age(r.age_s)) " ago" }
                                td { (r.who) }
                                td { (r.via) }
                                td { b { (r.action) } }
                                td.mono { (shorten(&r.target, 120)) }
                                td { (r.result) }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn buttons(id: i64, replayable: bool, back: Option<&str>) -> Markup {
    html! {
        @if replayable {
            button type="button" data-action="replay" data-id=(id) title="Republish the original turn to <prefix>.turns, once" { "Replay" }
            " "
        }
        button.danger type="button" data-action="purge" data-id=(id) data-back=[back] title="Delete this record" { "Purge" }
    }
}

fn replay_status(by: Option<&str>, replayed_age_s: Option<f64>) -> Markup {
    html! {
        @match by {
            Some(by) => { span.ok { "replayed by " (by) " " (opt_age(replayed_age_s)) " ago" } },
            None => { span.warn { "parked" } },
        }
    }
}

// ---- the chart ------------------------------------------------------------------------------------

const CHART_W: u32 = 480;
const CHART_H: u32 = 96;
/// Room above the bars for the scale.
const CHART_TOP: u32 = 12;
const REPLY_COLOR: &str = "#3f8f5a";
const ERROR_COLORS: [&str; 8] =
    ["#c0392b", "#e67e22", "#8e44ad", "#d4ac0d", "#2c6fbb", "#a04000", "#7f8c8d", "#e84393"];

/// The series of the chart: replies first, then error codes by count.
fn series(buckets: &[EventBucket]) -> Vec<(String, String, i64, &'static str)> {
    let mut out: Vec<(String, String, i64, &'static str)> = Vec::new();
    for b in buckets {
        match out.iter_mut().find(|(k, c, _, _)| *k == b.kind && *c == b.code) {
            Some(s) => s.2 += b.count,
            None => out.push((b.kind.clone(), b.code.clone(), b.count, "")),
        }
    }
    out.sort_by(|a, b| {
        (a.0 != "reply").cmp(&(b.0 != "reply")).then(b.2.cmp(&a.2)).then(a.1.cmp(&b.1))
    });
    let mut errors = 0;
    for s in &mut out {
        s.3 = if s.0 == "reply" {
            REPLY_COLOR
        } else {
            errors += 1;
            ERROR_COLORS[(errors - 1) % ERROR_COLORS.len()]
        };
    }
    out
}

fn series_name(kind: &str, code: &str) -> String {
    if code.is_empty() { kind.to_owned() } else { code.to_owned() }
}

/// One bar of the chart: its tooltip and its stacked segments (y, height, colour).
struct Bar {
    x: u32,
    title: String,
    segments: Vec<(f64, f64, &'static str)>,
}

/// Stacked bars, one per 5-minute bucket, oldest on the left; each bar's tooltip lists it.
fn chart(buckets: &[EventBucket]) -> Markup {
    let n = (EVENT_WINDOW_SECONDS / EVENT_BUCKET_SECONDS) as u32;
    let series = series(buckets);
    let count = |bucket: u32, kind: &str, code: &str| -> i64 {
        buckets
            .iter()
            .filter(|b| b.bucket as u32 == bucket && b.kind == kind && b.code == code)
            .map(|b| b.count)
            .sum()
    };
    let total = |bucket: u32| -> i64 {
        buckets.iter().filter(|b| b.bucket as u32 == bucket).map(|b| b.count).sum()
    };
    let max = (0..n).map(total).max().unwrap_or(0).max(1);
    let plot_h = CHART_H - 14;
    let slot = CHART_W / n;
    let bar_w = slot - 4;
    let bars: Vec<Bar> = (0..n)
        .map(|slot_i| {
            // Slot 0 is the oldest bucket (55–60 min ago), the last one is now.
            let bucket = n - 1 - slot_i;
            let mut title = format!("{}: {} event(s)", bucket_label(bucket), total(bucket));
            let mut segments = Vec::new();
            let mut y = f64::from(plot_h);
            for (kind, code, _, color) in &series {
                let c = count(bucket, kind, code);
                if c > 0 {
                    let _ = write!(title, "\n{} {c}", series_name(kind, code));
                    let h = (c as f64 / max as f64 * f64::from(plot_h - CHART_TOP)).max(1.0);
                    y -= h;
                    segments.push((y, h, *color));
                }
            }
            Bar { x: slot_i * slot + 2, title, segments }
        })
        .collect();
    html! {
        svg.events width=(CHART_W) height=(CHART_H) viewBox={ "0 0 " (CHART_W) " " (CHART_H) } role="img"
            aria-label="terminal events per 5 minutes over the last hour" {
            line x1="0" y1=(plot_h) x2=(CHART_W) y2=(plot_h) stroke="#bbb" stroke-width="1" {}
            @for bar in &bars {
                g {
                    title { (bar.title) }
                    rect x=(bar.x) y="0" width=(bar_w) height=(plot_h) fill="transparent" {}
                    @for (y, h, color) in &bar.segments {
                        rect x=(bar.x) y=(format!("{y:.1}")) width=(bar_w) height=(format!("{h:.1}")) fill=(color) {}
                    }
                }
            }
            text x="0" y=(CHART_H - 2) font-size="10" fill="#777" { "−60 min" }
            text x=(CHART_W) y=(CHART_H - 2) font-size="10" fill="#777" text-anchor="end" { "now" }
            text x="0" y="9" font-size="10" fill="#777" { "max " (max) " per bar" }
        }
    }
}

fn bucket_label(bucket: u32) -> String {
    let m = EVENT_BUCKET_SECONDS as u32 / 60;
    if bucket == 0 {
        format!("last {m} min")
    } else {
        format!("{}–{} min ago", bucket * m, (bucket + 1) * m)
    }
}

fn legend(buckets: &[EventBucket]) -> Markup {
    html! {
        div.legend {
            @for (kind, code, n, color) in series(buckets) {
                span {
                    svg width="10" height="10" { rect width="10" height="10" fill=(color) {} }
                    " " (series_name(&kind, &code)) " " b { (n) }
                }
            }
            @if buckets.is_empty() { span.mute { "no terminal events in the last hour" } }
        }
    }
}

// ---- formatting ----------------------------------------------------------------------------------

/// A compact duration: 0s, 42s, 3m 07s, 2h 05m, 3d 4h.
pub(super) fn age(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 { secs as u64 } else { 0 };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

fn opt_age(secs: Option<f64>) -> String {
    secs.map(age).unwrap_or_else(|| "–".to_owned())
}

fn search_href(deployment: &str) -> String {
    // Deployment names are [A-Za-z0-9_-] (CONTRACT §3): nothing to escape.
    format!("/?q={deployment}#deployments")
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        s.chars().take(max).collect::<String>() + "…"
    }
}

fn pretty(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => serde_json::to_string_pretty(other).unwrap_or_else(|_| other.to_string()),
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn now_hms() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{:02}:{:02}:{:02}", secs / 3600 % 24, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(bucket: i32, kind: &str, code: &str, count: i64) -> EventBucket {
        EventBucket { bucket, kind: kind.to_owned(), code: code.to_owned(), count }
    }

    #[test]
    fn ages_are_compact() {
        assert_eq!(age(-1.0), "0s");
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(42.9), "42s");
        assert_eq!(age(187.0), "3m 07s");
        assert_eq!(age(7500.0), "2h 05m");
        assert_eq!(age(3.0 * 86400.0 + 4.0 * 3600.0), "3d 4h");
        assert_eq!(age(f64::NAN), "0s");
    }

    #[test]
    fn the_chart_stacks_replies_and_errors_per_bucket() {
        let b = vec![
            bucket(0, "reply", "", 4),
            bucket(0, "error", "WORKER_DIED", 2),
            bucket(11, "error", "INVALID_TURN", 1),
        ];
        let svg = chart(&b).into_string();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("last 5 min: 6 event(s)"), "{svg}");
        assert!(svg.contains("55–60 min ago: 1 event(s)"), "{svg}");
        assert!(svg.contains(REPLY_COLOR));
        assert_eq!(svg.matches("<g>").count(), 12);
        let legend = legend(&b).into_string();
        assert!(
            legend.contains("reply <b>4</b>") && legend.contains("WORKER_DIED <b>2</b>"),
            "{legend}"
        );
        let s = series(&b);
        assert_eq!(s[0].0, "reply", "replies first");
        assert_eq!(s[1].1, "WORKER_DIED", "then errors by count");
    }

    #[test]
    fn an_empty_chart_renders() {
        let svg = chart(&[]).into_string();
        assert!(svg.contains("max 1"));
        assert!(legend(&[]).into_string().contains("no terminal events"));
    }

    #[test]
    fn text_is_escaped_and_shortened() {
        let m = html! { td { (shorten("<script>alert(1)</script>", 100)) } }.into_string();
        assert!(!m.contains("<script>"), "{m}");
        assert_eq!(shorten("abcdef", 3), "abc…");
        assert_eq!(floor_char_boundary("aé", 2), 1);
    }
}
