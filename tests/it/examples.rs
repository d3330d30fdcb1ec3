//! The TypeScript and Python examples (examples/typescript, examples/python; issue 20) against a
//! real daemon: the example worker is `worker.command`, the example producer publishes the
//! turns, the example consumer reads the terminal events. Every turn gets exactly one reply, in
//! order, from one long-lived worker per conversation; an event delivered twice is handled once
//! by the consumer. Each test skips, saying why, when its runtime or libraries are missing
//! (scripts/test-tools.sh installs them).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::schemas::{
    assert_valid, assert_worker_lines, run_worker, turn_input, validator,
};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use serde_json::{Value, json};
use turnd_harness::*;

const T: Duration = Duration::from_secs(60);

/// argv prefixes of one language's three programs.
struct Example {
    name: &'static str,
    worker: Vec<String>,
    producer: Vec<String>,
    consumer: Vec<String>,
}

fn examples_dir(language: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(language)
}

fn text(p: &Path) -> String {
    p.display().to_string()
}

/// The first line a command prints, if it succeeds.
fn probe(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let line = String::from_utf8_lossy(&out.stdout).lines().next()?.trim().to_owned();
    (out.status.success() && !line.is_empty()).then_some(line)
}

fn python() -> Result<Example, String> {
    // The interpreter's absolute path: workers get a cleared environment (CONTRACT §5), so a
    // pyenv shim or a virtualenv's activation would not follow them.
    let python = probe("python3", &["-c", "import sys, pika; print(sys.executable)"])
        .ok_or("python3 with pika is missing (scripts/test-tools.sh installs python3-pika)")?;
    let dir = examples_dir("python");
    let run = |script: &str| vec![python.clone(), text(&dir.join(script))];
    Ok(Example {
        name: "python",
        worker: run("worker.py"),
        producer: run("producer.py"),
        consumer: run("consumer.py"),
    })
}

fn typescript() -> Result<Example, String> {
    let node = probe("node", &["-p", "process.execPath"])
        .ok_or("node is missing (scripts/test-tools.sh installs nodejs)")?;
    let dir = examples_dir("typescript");
    let tsc = dir.join("node_modules/typescript/bin/tsc");
    if !tsc.exists() {
        return Err(format!(
            "{} is missing: run `npm ci` in examples/typescript (scripts/test-tools.sh does)",
            tsc.display()
        ));
    }
    // Compiling is part of the test: the examples' types must hold.
    let out = Command::new(&node).arg(&tsc).args(["-p", &text(&dir)]).output().expect("run tsc");
    assert!(
        out.status.success(),
        "tsc failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = |script: &str| vec![node.clone(), text(&dir.join("dist").join(script))];
    Ok(Example {
        name: "typescript",
        worker: run("worker.js"),
        producer: run("producer.js"),
        consumer: run("consumer.js"),
    })
}

/// A running program whose stdout and stderr lines are collected as they come.
struct Captured {
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Captured {
    fn spawn(argv: &[String], args: &[&str]) -> Captured {
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
        let collect = |pipe: Box<dyn Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().expect("lines").push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().expect("stdout")));
        let stderr = collect(Box::new(child.stderr.take().expect("stderr")));
        Captured { child, stdout, stderr }
    }

    fn stdout(&self) -> Vec<String> {
        self.stdout.lock().expect("lines").clone()
    }

    fn stderr(&self) -> Vec<String> {
        self.stderr.lock().expect("lines").clone()
    }

    /// Waits (bounded) for the exit; panics with what the program said when it fails.
    async fn success(mut self, within: Duration, what: &str) -> Vec<String> {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!("{what} still running after {within:?}; stderr: {:#?}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The reader threads end at EOF, right after the exit.
        wait_until(Duration::from_secs(5), "the last output lines", || {
            Arc::strong_count(&self.stdout) == 1 && Arc::strong_count(&self.stderr) == 1
        })
        .await;
        assert!(status.success(), "{what} exited {status}; stderr: {:#?}", self.stderr());
        self.stdout()
    }
}

impl Drop for Captured {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The example worker on its own: its lines validate against the schemas and turnd parses
/// them; a line type it does not know (a later protocol's) is ignored.
fn worker_lines(example: &Example) {
    let inputs = [
        turn_input("m1", json!({"text": "hi"})),
        json!({"type": "cancel", "messageId": "m1"}),
        turn_input("m2", json!({"text": "slow", "heartbeats": 2})),
        turn_input("m3", json!({"fail": "no"})),
    ];
    let out = run_worker(&example.worker, &inputs);
    assert_worker_lines(example.name, &out, 5);
    let types: Vec<String> = out
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).expect("JSON")["type"].to_string())
        .collect();
    assert_eq!(
        types,
        ["\"reply\"", "\"heartbeat\"", "\"heartbeat\"", "\"reply\"", "\"error\""],
        "{out:?}"
    );
}

async fn end_to_end(example: Example) {
    worker_lines(&example);
    let mut cluster = Cluster::new().await;
    let command = serde_json::to_string(&example.worker).expect("argv as a TOML array");
    cluster.set("TURND_WORKER__COMMAND", &command);
    cluster.start_daemon(&[]).await;
    let prefix = cluster.prefix.clone();
    // What turnd published, seen independently of the example consumer.
    let mut client = cluster.client().await;

    let conversations: [(&str, Option<&str>); 3] =
        [("c1", Some("o1")), ("c2", None), ("c3", Some("o2"))];
    let per_conversation = 3;
    let total = conversations.len() * per_conversation;
    let queue = format!("{prefix}.example-replies");
    let consumer = Captured::spawn(
        &example.consumer,
        &[
            "--prefix",
            &prefix,
            "--queue",
            &queue,
            "--expect",
            &total.to_string(),
            "--timeout",
            "90",
        ],
    );
    wait_until(T, "the consumer's queue bound", || {
        consumer.stderr().iter().any(|l| l == "consumer: ready")
    })
    .await;

    let mut published: Vec<(String, Vec<String>)> = Vec::new();
    for (i, (conversation, org)) in conversations.iter().enumerate() {
        let mut args =
            vec!["--prefix", &prefix, "--agent", "example", "--conversation", conversation];
        if let Some(org) = org {
            args.extend(["--org", org]);
        }
        let texts: Vec<String> =
            (1..=per_conversation).map(|n| format!("{conversation} turn {n}")).collect();
        args.extend(texts.iter().map(String::as_str));
        let ids = Captured::spawn(&example.producer, &args).success(T, "the producer").await;
        assert_eq!(ids.len(), per_conversation, "one messageId per confirmed turn: {ids:?}");
        published.push((conversation.to_string(), ids));

        if i == 0 {
            // Deliver the first event a second time, as the relay may after a failure (same
            // AMQP message_id): the consumer must drop it.
            let first = published[0].1[0].clone();
            client.wait_for(std::slice::from_ref(&first), T).await;
            let event = client.event(&first).cloned().expect("first event");
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"))
                .with_correlation_id(ShortString::from(event.correlation_id.as_str()))
                .with_message_id(ShortString::from(event.event_id.as_str()));
            let confirm = client
                .publisher
                .basic_publish(
                    format!("{prefix}.replies").as_str().into(),
                    event.routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    event.body.to_string().as_bytes(),
                    props,
                )
                .await
                .expect("republish an event");
            assert!(confirm.await.expect("confirm").is_ack());
            let duplicate = format!("consumer: duplicate {} dropped", event.event_id);
            wait_until(T, "the consumer dropping the duplicate", || {
                consumer.stderr().contains(&duplicate)
            })
            .await;
        }
    }

    let lines = consumer.success(Duration::from_secs(90), "the consumer").await;
    let schema = validator("terminal-event.schema.json");
    let events: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("consumer line {l}: {e}")))
        .collect();
    assert_eq!(events.len(), total, "{lines:#?}");
    for (conversation, ids) in &published {
        let mine: Vec<&Value> =
            events.iter().filter(|e| e["conversationId"] == *conversation).collect();
        let got: Vec<&str> = mine.iter().map(|e| e["messageId"].as_str().unwrap_or("")).collect();
        // Exactly one event per turn, in publish order (replies of one deployment are
        // published in commit order).
        assert_eq!(got, ids.iter().map(String::as_str).collect::<Vec<_>>(), "{conversation}");
        for (n, event) in mine.iter().enumerate() {
            assert_valid(&schema, event, "an event the example consumer received");
            assert_eq!(event["kind"], "reply", "{event}");
            assert_eq!(event["payload"]["worker"], example.name, "{event}");
            assert_eq!(event["payload"]["text"], format!("echo: {conversation} turn {}", n + 1));
            // One long-lived worker per conversation: it counts the turns it answered.
            assert_eq!(event["payload"]["turns"], n + 1, "{event}");
            assert_eq!(event["payload"]["deployment"], event["deployment"], "{event}");
        }
    }

    // turnd's side: one distinct terminal event per turn, nothing else.
    let all: Vec<String> = published.iter().flat_map(|(_, ids)| ids.clone()).collect();
    client.wait_for(&all, T).await;
    let by_message = client.by_message();
    assert_eq!(by_message.len(), total, "{by_message:#?}");
    for id in &all {
        assert_eq!(by_message[id].len(), 1, "{id}: {:#?}", by_message[id]);
    }
    assert_eq!(cluster.pending().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_example_end_to_end() {
    match python() {
        Ok(example) => end_to_end(example).await,
        Err(why) => eprintln!("SKIPPED: {why}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn typescript_example_end_to_end() {
    match typescript() {
        Ok(example) => end_to_end(example).await,
        Err(why) => eprintln!("SKIPPED: {why}"),
    }
}
