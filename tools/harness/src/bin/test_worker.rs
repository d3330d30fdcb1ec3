//! `turnd-test-worker`: a scriptable turnd worker (CONTRACT §5) for integration and chaos tests,
//! and the fast worker for benchmarks. Plain synchronous std code, independent of the daemon.
//!
//! Per turn, `turn.payload.action` (default `"reply"`) picks the behaviour:
//!
//! | action | behaviour |
//! |---|---|
//! | `reply` | reply `{"text":<payload.text or null>,"pid":<pid>,"epoch":<line epoch>,"n":<turns seen>}` |
//! | `error` | error line, `error` = `payload.error` or `"test error"`, `code` = `payload.code` (omitted if absent) |
//! | `hang` | never answer; stop reading stdin and sleep forever |
//! | `crash` | SIGKILL itself before answering |
//! | `orphan` | fork a grandchild in its own session that keeps stdout open and exits `payload.orphan_ms` (1000) later, then SIGKILL itself |
//! | `exit0` | exit 0 without answering |
//! | `exit_code` | exit `payload.code_num` (default 3) without answering |
//! | `heartbeat` | heartbeat every `payload.interval_ms` (100) for `payload.duration_ms` (1000), then reply |
//! | `provider_failed` | `provider_failed` with `payload.code` (`PROVIDER_QUOTA_EXHAUSTED`) and `payload.reason`, then heartbeat every `interval_ms` (100) forever; if `payload.recover_after_ms` is set, after that long write `provider_recovered` and reply |
//! | `sleep` | sleep `payload.ms` (100), then reply |
//! | `garbage` | write each of `payload.lines` raw to stdout (each followed by `\n` unless `payload.no_newline`), then reply |
//! | `noise` | write `payload.bytes` (4096) pseudo-random bytes from `payload.seed` (no `\n` among them unless `payload.newlines`), then `\n`, then reply |
//! | `flood` | write `payload.bytes` (100 MiB) bytes of `x` with no newline, in 64 KiB writes; then `\n` unless `payload.no_newline`; then reply |
//! | `stderr` | write each of `payload.lines` to stderr, the whole list `payload.repeat` (1) times, then reply |
//! | `env` | reply with the whole environment as an object |
//! | `echo` | reply `{"line":<the stdin line exactly as received, as a string>}` |
//! | `probe` | try each of `payload.probes` and reply `{"results":[{"ok":bool,"error":<text or null>,"text":<what was read, ≤ 4 KiB, or null>}...]}` in order; a probe is `{"read":PATH}`, `{"write":PATH}` (create/truncate, write `payload.data` or `"x"`), `{"signal":PID}` (signal 0), `{"connect":"HOST:PORT"}` (TCP, 2 s timeout), `{"bind":"HOST:PORT"}` (TCP listen), `{"listen_abstract":NAME}` (an abstract Unix socket kept open for the worker's life) or `{"connect_abstract":NAME}` |
//! | `wait_cancel` | read stdin until `{"type":"cancel"}` for this turn arrives, then per `payload.on_cancel`: `error` (default: an error line with code `payload.code`, default `CANCELLED_BY_WORKER`), `reply` (reply), `ignore` (never answer; keep reading stdin). A `payload.reply_after_ms` replies by itself that long after the turn unless the cancel came first |
//! | `random` | pick one of reply/error/hang/crash/exit0 from `payload.seed` (splitmix64) weighted by `payload.p` |
//!
//! With `payload.exit_after`, `garbage`, `noise` and `flood` exit 0 instead of replying (what they
//! wrote is the last thing on stdout).
//!
//! `payload.stderr` (string) is written to stderr before acting. Unknown actions get an error line
//! with code `TEST_UNKNOWN_ACTION`.
//!
//! Environment options (tests set `TURND_WORKER_ENV_<NAME>` on the daemon):
//!
//! * `TEST_WORKER_LOG=<dir>`: append to `<dir>/<TURND_DEPLOYMENT>.log` one line per event:
//!   `start <pid> <TURND_EPOCH> <unix_nanos>`, `turn <pid> <epoch> <messageId> <unix_nanos>`,
//!   `cancel <pid> <messageId> <unix_nanos>` (a cancel line read), `exit <pid> <unix_nanos>` (on EOF, SIGTERM, `exit0`, `exit_code`). With it, SIGTERM writes
//!   the exit line and `_exit(0)`s.
//! * `TEST_WORKER_EXCLUSIVE=<dir>`: `flock(LOCK_EX|LOCK_NB)` on `<dir>/<TURND_DEPLOYMENT>.lock`;
//!   if already held, append `VIOLATION <pid> <unix_nanos>` to `<dir>/violations.log`.
//! * `TEST_WORKER_IGNORE_TERM=1`: ignore SIGTERM.
//! * `TEST_WORKER_PIDFILE_DIR=<dir>`: write the pid to `<dir>/<TURND_DEPLOYMENT>.pid`.

use std::borrow::Cow;
use std::io::{self, BufRead, Write};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// fd of the event log, or -1. Read by the SIGTERM handler.
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

#[derive(Deserialize)]
struct Input<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    epoch: Option<&'a RawValue>,
    #[serde(borrow)]
    turn: Option<Turn<'a>>,
    /// Of a `cancel` line.
    #[serde(rename = "messageId", borrow)]
    message_id: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Turn<'a> {
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReplyLine<'a, P: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: &'a str,
    payload: P,
}

#[derive(Serialize)]
struct ReplyPayload<'a> {
    text: &'a Value,
    pid: u32,
    epoch: &'a RawValue,
    n: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: &'a str,
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct ProviderFailedLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    reason: &'a str,
}

const HEARTBEAT: &[u8] = b"{\"type\":\"heartbeat\"}\n";
const PROVIDER_RECOVERED: &[u8] = b"{\"type\":\"provider_recovered\"}\n";
const NULL: Value = Value::Null;

struct Worker {
    pid: u32,
    out: io::StdoutLock<'static>,
    buf: Vec<u8>,
    seen: u64,
}

fn main() {
    let pid = std::process::id();
    let deployment = std::env::var("TURND_DEPLOYMENT").unwrap_or_else(|_| "unknown".into());
    let file_stem = deployment.replace('/', "_");
    let epoch_env = std::env::var("TURND_EPOCH").unwrap_or_else(|_| "-".into());
    let ignore_term = std::env::var("TEST_WORKER_IGNORE_TERM").is_ok_and(|v| v == "1");

    if ignore_term {
        // SAFETY: setting a signal disposition to SIG_IGN.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    if let Some(dir) = env_dir("TEST_WORKER_LOG") {
        match open_append(&dir.join(format!("{file_stem}.log"))) {
            Ok(fd) => {
                LOG_FD.store(fd, Ordering::SeqCst);
                if !ignore_term {
                    let handler = on_sigterm as extern "C" fn(libc::c_int);
                    // SAFETY: the handler only calls async-signal-safe functions.
                    unsafe { libc::signal(libc::SIGTERM, handler as libc::sighandler_t) };
                }
            }
            Err(e) => eprintln!("test-worker: cannot open log in {}: {e}", dir.display()),
        }
    }
    if let Some(dir) = env_dir("TEST_WORKER_PIDFILE_DIR") {
        let path = dir.join(format!("{file_stem}.pid"));
        if let Err(e) = std::fs::write(&path, pid.to_string()) {
            eprintln!("test-worker: cannot write {}: {e}", path.display());
        }
    }
    log_event(&format!("start {pid} {epoch_env} {}\n", unix_nanos()));
    if let Some(dir) = env_dir("TEST_WORKER_EXCLUSIVE") {
        take_exclusive(&dir, &file_stem, pid);
    }

    let mut worker =
        Worker { pid, out: io::stdout().lock(), buf: Vec::with_capacity(256), seen: 0 };
    // Our own buffer, not StdinLock's: `wait_cancel` polls the pipe only when nothing is
    // buffered, and must see what is.
    let mut input = io::BufReader::new(stdin_file());
    let mut line = String::new();
    let null = null_raw();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => exit_logged(0),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                eprintln!("test-worker: ignoring a line that is not UTF-8");
                continue;
            }
            Err(e) => {
                eprintln!("test-worker: reading stdin: {e}");
                exit_logged(1);
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let msg: Input = match serde_json::from_str(&line) {
            Ok(msg) => msg,
            Err(e) => {
                eprintln!("test-worker: ignoring malformed line: {e}");
                continue;
            }
        };
        let turn = match (msg.kind.as_ref(), msg.turn) {
            ("turn", Some(turn)) => turn,
            ("cancel", _) => {
                // For a turn already answered: nothing to do but note it.
                let id = msg.message_id.as_deref().unwrap_or("-");
                log_event(&format!("cancel {pid} {id} {}\n", unix_nanos()));
                continue;
            }
            (kind, _) => {
                eprintln!("test-worker: ignoring line of type {kind:?}");
                continue;
            }
        };
        worker.seen += 1;
        let epoch = msg.epoch.unwrap_or(null);
        log_event(&format!(
            "turn {pid} {} {} {}\n",
            epoch_text(epoch),
            turn.message_id,
            unix_nanos()
        ));
        let payload: Value = match turn.payload {
            Some(raw) => serde_json::from_str(raw.get()).unwrap_or_else(|e| {
                eprintln!("test-worker: payload does not parse: {e}");
                Value::Null
            }),
            None => Value::Null,
        };
        if let Some(text) = payload.get("stderr").and_then(Value::as_str) {
            let mut err = io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            if !text.ends_with('\n') {
                let _ = err.write_all(b"\n");
            }
            let _ = err.flush();
        }
        let action = payload.get("action").and_then(Value::as_str).unwrap_or("reply");
        if action == "echo" {
            let raw = line.trim_end_matches(['\n', '\r']);
            worker.send_json(&ReplyLine {
                kind: "reply",
                message_id: &turn.message_id,
                payload: serde_json::json!({ "line": raw }),
            });
            continue;
        }
        if action == "wait_cancel" {
            worker.wait_cancel(&mut input, &turn.message_id, epoch, &payload);
            continue;
        }
        worker.act(action, &turn.message_id, epoch, &payload);
    }
}

impl Worker {
    /// `wait_cancel`: stdin is read on a thread of its own so that `reply_after_ms` can race
    /// the cancel line, as a real worker's own answer races an operator.
    fn wait_cancel(
        &mut self,
        input: &mut StdinReader,
        message_id: &str,
        epoch: &RawValue,
        payload: &Value,
    ) {
        let reply_after =
            payload.get("reply_after_ms").and_then(Value::as_u64).map(Duration::from_millis);
        let started = Instant::now();
        let cancelled = loop {
            let wait = reply_after.map(|d| d.saturating_sub(started.elapsed()));
            if wait.is_some_and(|w| w.is_zero()) {
                break false;
            }
            match read_line_within(input, wait) {
                Some(line) => {
                    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    if v["type"] == "cancel" {
                        let id = v["messageId"].as_str().unwrap_or("-");
                        log_event(&format!("cancel {} {id} {}\n", self.pid, unix_nanos()));
                        if id == message_id {
                            break true;
                        }
                    }
                }
                None if wait.is_some() => break false,
                None => exit_logged(0),
            }
        };
        if !cancelled {
            return self.reply(message_id, epoch, payload);
        }
        match payload.get("on_cancel").and_then(Value::as_str).unwrap_or("error") {
            "reply" => self.reply(message_id, epoch, payload),
            "ignore" => loop {
                // Keep reading (and logging) stdin; never answer.
                if read_line_within(input, None).is_none() {
                    exit_logged(0);
                }
            },
            _ => {
                let code =
                    payload.get("code").and_then(Value::as_str).unwrap_or("CANCELLED_BY_WORKER");
                self.send_json(&ErrorLine {
                    kind: "error",
                    message_id,
                    error: "cancelled",
                    code: Some(code),
                });
            }
        }
    }

    fn act(&mut self, action: &str, message_id: &str, epoch: &RawValue, payload: &Value) {
        match action {
            "reply" => self.reply(message_id, epoch, payload),
            "error" => {
                let error = payload.get("error").and_then(Value::as_str).unwrap_or("test error");
                let code = payload.get("code").and_then(Value::as_str);
                self.send_json(&ErrorLine { kind: "error", message_id, error, code });
            }
            "hang" => loop {
                std::thread::sleep(Duration::from_secs(3600));
            },
            "orphan" => {
                // A grandchild in a session of its own (out of the worker's process group, so
                // the group kill spares it) that holds the worker's stdout and outlives it by
                // `payload.orphan_ms`; then the worker crashes.
                let ms = payload.get("orphan_ms").and_then(Value::as_u64).unwrap_or(1000);
                // SAFETY: this worker is single-threaded; the child only calls async-signal-safe
                // functions (setsid, nanosleep, _exit).
                unsafe {
                    // The worker waits until the grandchild has left its group, or the group
                    // kill after the crash could still reach it.
                    let mut fds = [0; 2];
                    if libc::pipe(fds.as_mut_ptr()) != 0 {
                        libc::abort();
                    }
                    if libc::fork() == 0 {
                        libc::setsid();
                        libc::close(fds[0]);
                        libc::write(fds[1], b"s".as_ptr().cast(), 1);
                        libc::close(fds[1]);
                        let t = libc::timespec {
                            tv_sec: (ms / 1000) as libc::time_t,
                            tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
                        };
                        libc::nanosleep(&t, std::ptr::null_mut());
                        libc::_exit(0);
                    }
                    libc::close(fds[1]);
                    let mut b = 0u8;
                    libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                    libc::kill(libc::getpid(), libc::SIGKILL);
                    libc::abort();
                }
            }
            "crash" => {
                // SAFETY: plain syscalls; SIGKILL cannot be caught.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                    libc::abort();
                }
            }
            "exit0" => exit_logged(0),
            "exit_code" => {
                let code = get_u64(payload, "code_num").unwrap_or(3);
                exit_logged(i32::try_from(code).unwrap_or(3));
            }
            "heartbeat" => {
                let interval = ms(payload, "interval_ms", 100).max(Duration::from_millis(1));
                let duration = ms(payload, "duration_ms", 1000);
                let start = Instant::now();
                while start.elapsed() < duration {
                    std::thread::sleep(interval.min(duration - start.elapsed()));
                    self.send_raw(HEARTBEAT);
                }
                self.reply(message_id, epoch, payload);
            }
            "provider_failed" => {
                let code = payload
                    .get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("PROVIDER_QUOTA_EXHAUSTED");
                let reason = payload
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("test provider failure");
                self.send_json(&ProviderFailedLine { kind: "provider_failed", code, reason });
                let interval = ms(payload, "interval_ms", 100).max(Duration::from_millis(1));
                let recover = get_u64(payload, "recover_after_ms").map(Duration::from_millis);
                let start = Instant::now();
                loop {
                    let sleep = match recover {
                        Some(r) if start.elapsed() >= r => break,
                        Some(r) => interval.min(r - start.elapsed()),
                        None => interval,
                    };
                    std::thread::sleep(sleep);
                    self.send_raw(HEARTBEAT);
                }
                self.send_raw(PROVIDER_RECOVERED);
                self.reply(message_id, epoch, payload);
            }
            "sleep" => {
                std::thread::sleep(ms(payload, "ms", 100));
                self.reply(message_id, epoch, payload);
            }
            "garbage" => {
                let newline = !payload.get("no_newline").and_then(Value::as_bool).unwrap_or(false);
                let lines = payload.get("lines").and_then(Value::as_array);
                for line in lines.into_iter().flatten().filter_map(Value::as_str) {
                    self.buf.clear();
                    self.buf.extend_from_slice(line.as_bytes());
                    if newline {
                        self.buf.push(b'\n');
                    }
                    let buf = std::mem::take(&mut self.buf);
                    self.send_raw(&buf);
                    self.buf = buf;
                }
                self.reply_or_exit(message_id, epoch, payload);
            }
            "noise" => {
                let n = get_u64(payload, "bytes").unwrap_or(4096) as usize;
                let newlines = payload.get("newlines").and_then(Value::as_bool).unwrap_or(false);
                let mut seed = get_u64(payload, "seed").unwrap_or(1);
                let mut noise = Vec::with_capacity(n + 1);
                while noise.len() < n {
                    seed = splitmix64(seed);
                    for b in seed.to_le_bytes() {
                        if noise.len() < n && (newlines || b != b'\n') {
                            noise.push(b);
                        }
                    }
                }
                noise.push(b'\n');
                self.send_raw(&noise);
                self.reply_or_exit(message_id, epoch, payload);
            }
            "stderr" => {
                // `lines` written to stderr `repeat` times each, then the reply.
                use std::io::Write;
                let repeat = get_u64(payload, "repeat").unwrap_or(1);
                let lines = payload.get("lines").and_then(Value::as_array);
                let mut err = std::io::stderr().lock();
                for _ in 0..repeat {
                    for line in lines.into_iter().flatten().filter_map(Value::as_str) {
                        let _ = writeln!(err, "{line}");
                    }
                }
                drop(err);
                self.reply_or_exit(message_id, epoch, payload);
            }
            "flood" => {
                let mut left = get_u64(payload, "bytes").unwrap_or(100 << 20) as usize;
                let chunk = vec![b'x'; 64 * 1024];
                while left > 0 {
                    let n = left.min(chunk.len());
                    self.send_raw(&chunk[..n]);
                    left -= n;
                }
                if !payload.get("no_newline").and_then(Value::as_bool).unwrap_or(false) {
                    self.send_raw(b"\n");
                }
                self.reply_or_exit(message_id, epoch, payload);
            }
            "env" => {
                let env: Map<String, Value> = std::env::vars_os()
                    .map(|(k, v)| {
                        (
                            k.to_string_lossy().into_owned(),
                            Value::String(v.to_string_lossy().into_owned()),
                        )
                    })
                    .collect();
                self.send_json(&ReplyLine { kind: "reply", message_id, payload: env });
            }
            "probe" => {
                let data = payload.get("data").and_then(Value::as_str).unwrap_or("x");
                let results: Vec<Value> = payload
                    .get("probes")
                    .and_then(Value::as_array)
                    .map(|probes| probes.iter().map(|p| probe(p, data)).collect())
                    .unwrap_or_default();
                self.send_json(&ReplyLine {
                    kind: "reply",
                    message_id,
                    payload: serde_json::json!({ "results": results, "pid": self.pid }),
                });
            }
            "random" => {
                let chosen = pick_random(payload);
                eprintln!("test-worker: random picked {chosen} for {message_id}");
                self.act(chosen, message_id, epoch, payload);
            }
            other => {
                let error = format!("unknown test action: {other}");
                self.send_json(&ErrorLine {
                    kind: "error",
                    message_id,
                    error: &error,
                    code: Some("TEST_UNKNOWN_ACTION"),
                });
            }
        }
    }

    /// Reply, or with `payload.exit_after` exit 0 without one.
    fn reply_or_exit(&mut self, message_id: &str, epoch: &RawValue, payload: &Value) {
        if payload.get("exit_after").and_then(Value::as_bool).unwrap_or(false) {
            exit_logged(0);
        }
        self.reply(message_id, epoch, payload);
    }

    fn reply(&mut self, message_id: &str, epoch: &RawValue, payload: &Value) {
        let text = payload.get("text").unwrap_or(&NULL);
        self.send_json(&ReplyLine {
            kind: "reply",
            message_id,
            payload: ReplyPayload { text, pid: self.pid, epoch, n: self.seen },
        });
    }

    /// Serialise `value` as one line and write it with a single write + flush.
    fn send_json<T: Serialize>(&mut self, value: &T) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        if let Err(e) = serde_json::to_writer(&mut buf, value) {
            eprintln!("test-worker: cannot serialise output: {e}");
            self.buf = buf;
            return;
        }
        buf.push(b'\n');
        self.send_raw(&buf);
        self.buf = buf;
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        if let Err(e) = self.out.write_all(bytes).and_then(|()| self.out.flush()) {
            eprintln!("test-worker: writing stdout: {e}");
            exit_logged(1);
        }
    }
}

/// Choose reply/error/hang/crash/exit0 from `payload.seed`, weighted by `payload.p`.
fn pick_random(payload: &Value) -> &'static str {
    const ACTIONS: [&str; 5] = ["reply", "error", "hang", "crash", "exit0"];
    let seed = match payload.get("seed") {
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        Some(v) => v.as_u64().unwrap_or(0),
        None => 0,
    };
    let p = payload.get("p");
    let weights = ACTIONS.map(|a| {
        p.and_then(|p| p.get(a))
            .and_then(Value::as_f64)
            .filter(|w| w.is_finite() && *w > 0.0)
            .unwrap_or(0.0)
    });
    let total: f64 = weights.iter().sum();
    if total <= 0.0 {
        return "reply";
    }
    // Top 53 bits of splitmix64(seed) as a uniform float in [0, 1).
    let unit = (splitmix64(seed) >> 11) as f64 / (1u64 << 53) as f64;
    let mut target = unit * total;
    for (action, weight) in ACTIONS.iter().zip(weights) {
        if weight > 0.0 && target < weight {
            return action;
        }
        target -= weight;
    }
    // Rounding: the last action with a positive weight.
    ACTIONS.iter().zip(weights).rev().find(|(_, w)| *w > 0.0).map_or("reply", |(a, _)| a)
}

/// One `probe` action step: what happened, as JSON.
fn probe(p: &Value, data: &str) -> Value {
    let outcome: io::Result<Option<String>> =
        if let Some(path) = p.get("read").and_then(Value::as_str) {
            std::fs::read(path).map(|bytes| {
                Some(String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]).into_owned())
            })
        } else if let Some(path) = p.get("write").and_then(Value::as_str) {
            std::fs::write(path, data).map(|()| None)
        } else if let Some(pid) = p.get("signal").and_then(Value::as_i64) {
            let pid = libc::pid_t::try_from(pid).unwrap_or(0);
            // SAFETY: signal 0 only checks whether the signal could be sent.
            if pid > 0 && unsafe { libc::kill(pid, 0) } == 0 {
                Ok(None)
            } else {
                Err(io::Error::last_os_error())
            }
        } else if let Some(addr) = p.get("connect").and_then(Value::as_str) {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
                .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)))
                .map(|_| None)
        } else if let Some(addr) = p.get("bind").and_then(Value::as_str) {
            std::net::TcpListener::bind(addr).map(|_| None)
        } else if let Some(name) = p.get("listen_abstract").and_then(Value::as_str) {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| std::os::unix::net::UnixListener::bind_addr(&a))
                // Kept for the life of the process, for other workers to try.
                .map(|l| {
                    std::mem::forget(l);
                    None
                })
        } else if let Some(name) = p.get("connect_abstract").and_then(Value::as_str) {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| std::os::unix::net::UnixStream::connect_addr(&a))
                .map(|_| None)
        } else {
            Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unknown probe {p}")))
        };
    match outcome {
        Ok(text) => serde_json::json!({ "ok": true, "error": null, "text": text }),
        Err(e) => serde_json::json!({ "ok": false, "error": e.to_string(), "text": null }),
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn get_u64(payload: &Value, key: &str) -> Option<u64> {
    payload.get(key).and_then(Value::as_u64)
}

fn ms(payload: &Value, key: &str, default: u64) -> Duration {
    Duration::from_millis(get_u64(payload, key).unwrap_or(default))
}

fn null_raw() -> &'static RawValue {
    // A literal that is valid JSON: cannot fail.
    serde_json::from_str("null").unwrap()
}

/// The epoch as log text: numbers as written, strings unquoted.
fn epoch_text(epoch: &RawValue) -> Cow<'_, str> {
    match serde_json::from_str::<String>(epoch.get()) {
        Ok(s) => Cow::Owned(s),
        Err(_) => Cow::Borrowed(epoch.get()),
    }
}

fn env_dir(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::env::var_os(name).filter(|v| !v.is_empty())?;
    let dir = std::path::PathBuf::from(dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("test-worker: cannot create {}: {e}", dir.display());
    }
    Some(dir)
}

fn open_append(path: &std::path::Path) -> io::Result<i32> {
    let file = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
    Ok(file.into_raw_fd())
}

/// Write one whole log line with a single write(2) on the O_APPEND fd.
fn log_event(line: &str) {
    let fd = LOG_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        write_once(fd, line.as_bytes());
    }
}

fn write_once(fd: i32, bytes: &[u8]) {
    // SAFETY: writing an initialised buffer to an fd we own; async-signal-safe.
    unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

fn exit_logged(code: i32) -> ! {
    log_event(&format!("exit {} {}\n", std::process::id(), unix_nanos()));
    std::process::exit(code)
}

fn take_exclusive(dir: &std::path::Path, stem: &str, pid: u32) {
    let path = dir.join(format!("{stem}.lock"));
    let fd = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
    {
        Ok(file) => file.into_raw_fd(), // kept open (and locked) for the life of the process
        Err(e) => {
            eprintln!("test-worker: cannot open {}: {e}", path.display());
            return;
        }
    };
    // SAFETY: flock on an fd we own.
    let rc = unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return;
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        eprintln!("test-worker: flock {}: {err}", path.display());
        return;
    }
    eprintln!("test-worker: VIOLATION: {} is held by another live worker", path.display());
    match open_append(&dir.join("violations.log")) {
        Ok(vfd) => {
            write_once(vfd, format!("VIOLATION {pid} {}\n", unix_nanos()).as_bytes());
            // SAFETY: closing the fd we just opened.
            unsafe { libc::close(vfd) };
        }
        Err(e) => eprintln!("test-worker: cannot open violations.log: {e}"),
    }
}

/// CLOCK_REALTIME in nanoseconds; async-signal-safe.
fn unix_nanos() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// SIGTERM with `TEST_WORKER_LOG`: write `exit <pid> <unix_nanos>` and `_exit(0)`.
/// Formats on the stack: no allocation, no locks.
extern "C" fn on_sigterm(_: libc::c_int) {
    let mut buf = [0u8; 64];
    buf[..5].copy_from_slice(b"exit ");
    let mut len = 5;
    // SAFETY: getpid is async-signal-safe.
    len += write_decimal(&mut buf[len..], unsafe { libc::getpid() } as u64);
    buf[len] = b' ';
    len += 1;
    len += write_decimal(&mut buf[len..], unix_nanos());
    buf[len] = b'\n';
    len += 1;
    let fd = LOG_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        write_once(fd, &buf[..len]);
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) };
}

/// Write `n` in decimal at the start of `out` (at least 20 bytes); returns the length.
fn write_decimal(out: &mut [u8], mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    out[..len].copy_from_slice(&digits[i..]);
    len
}

/// One stdin line, or None at EOF or once `within` passed (polled: the worker is single
/// threaded and its stdin a pipe).
fn read_line_within(input: &mut StdinReader, within: Option<Duration>) -> Option<String> {
    use std::os::fd::AsRawFd;
    if let Some(within) = within {
        // Lines already buffered need no poll.
        if input.buffer().is_empty() {
            let mut fds =
                libc::pollfd { fd: input.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = libc::c_int::try_from(within.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut fds, 1, ms) } <= 0 {
                return None;
            }
        }
    }
    let mut line = String::new();
    match input.read_line(&mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => Some(line),
    }
}

type StdinReader = io::BufReader<std::fs::File>;

fn stdin_file() -> std::fs::File {
    use std::os::fd::AsFd;
    match io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("test-worker: cannot take stdin: {e}");
            std::process::exit(1);
        }
    }
}
