//! `turnd-demo-worker`: the smallest useful turnd worker, meant to be read in one minute.
//!
//! The protocol (CONTRACT §5) is plain JSON lines:
//!
//! * stdin: one turn per line, one at a time:
//!   `{"type":"turn","epoch":7,"traceparent":"00-…","turn":{"messageId":"m1","agentId":"a1","payload":{...},...}}`
//!   (`traceparent`/`tracestate`: the W3C trace context to parent the worker's own spans on;
//!   this worker, like any, ignores fields it does not use)
//! * stdout: one answer per turn, one line each, flushed:
//!   `{"type":"reply","messageId":"m1","payload":<any JSON>}` or
//!   `{"type":"error","messageId":"m1","error":"text","code":"OPTIONAL_CODE"}`.
//!   A long turn may also write `{"type":"heartbeat"}` now and then to say it is progressing.
//! * environment: `TURND_DEPLOYMENT`, `TURND_AGENT_ID`, `TURND_EPOCH`, `TURND_WORKSPACE` (also
//!   `HOME`, the agent's private directory), `TURND_TURN_DEADLINE_MS`, ...
//! * end of stdin means "stop": exit 0. SIGTERM also means stop (the default action is fine).
//!
//! This demo answers each turn with
//! `{"text":"echo: <payload.text>","turns":<turns answered so far>,"deployment":"<TURND_DEPLOYMENT>"}`.
//! The process lives as long as the deployment is active, so `turns` keeps counting across turns.

use std::borrow::Cow;
use std::io::{self, BufRead, Write};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One input line. Only the fields this worker needs; everything else is ignored.
#[derive(Deserialize)]
struct Input<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    turn: Option<Turn<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Turn<'a> {
    #[serde(borrow)]
    message_id: Cow<'a, str>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TextPayload<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Reply<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message_id: &'a str,
    payload: Echo<'a>,
}

#[derive(Serialize)]
struct Echo<'a> {
    text: String,
    turns: u64,
    deployment: &'a str,
}

fn main() {
    let deployment = std::env::var("TURND_DEPLOYMENT").unwrap_or_default();
    let stdin = io::stdin();
    let mut input = stdin.lock();
    let mut stdout = io::stdout().lock();
    let mut line = String::new();
    let mut out = Vec::new();
    let mut answered: u64 = 0;

    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => return, // EOF: the daemon wants us gone.
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                eprintln!("demo-worker: ignoring a line that is not UTF-8");
                continue;
            }
            Err(e) => {
                eprintln!("demo-worker: reading stdin: {e}");
                std::process::exit(1);
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let msg: Input = match serde_json::from_str(&line) {
            Ok(msg) => msg,
            Err(e) => {
                eprintln!("demo-worker: ignoring malformed line: {e}");
                continue;
            }
        };
        let turn = match (msg.kind.as_ref(), msg.turn) {
            ("turn", Some(turn)) => turn,
            // An operator cancelled a turn: this worker answers each turn before reading the
            // next line, so the turn named is already answered and there is nothing to stop.
            ("cancel", _) => continue,
            (kind, _) => {
                eprintln!("demo-worker: ignoring line of type {kind:?}");
                continue;
            }
        };

        // payload.text if it is a string, else the whole payload as JSON text.
        let raw = turn.payload.map_or("null", RawValue::get);
        let text = match serde_json::from_str::<TextPayload>(raw) {
            Ok(TextPayload { text: Some(text) }) => format!("echo: {text}"),
            _ => format!("echo: {raw}"),
        };
        answered += 1;
        let reply = Reply {
            kind: "reply",
            message_id: &turn.message_id,
            payload: Echo { text, turns: answered, deployment: &deployment },
        };

        out.clear();
        serde_json::to_writer(&mut out, &reply).expect("serialising to a Vec cannot fail");
        out.push(b'\n');
        if let Err(e) = stdout.write_all(&out).and_then(|()| stdout.flush()) {
            eprintln!("demo-worker: writing stdout: {e}");
            std::process::exit(1);
        }
    }
}
