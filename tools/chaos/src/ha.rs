//! The faults past one machine (issue 19): a RabbitMQ node stops (the one a daemon is
//! connected to, or the one leading the inbox) and comes back; the PostgreSQL primary dies and
//! its standby is promoted. They need the services of `scripts/rabbit-cluster.sh` and
//! `scripts/pg-pair.sh` (README "Running past one machine"):
//!
//! ```sh
//! scripts/rabbit-cluster.sh up && scripts/pg-pair.sh up sync
//! target/debug/turnd-chaos --amqp-url "$(scripts/rabbit-cluster.sh urls)" \
//!   --database-url postgres://postgres@127.0.0.1:5441/postgres \
//!   --faults node-stop,leader-stop,pg-failover --rounds 2
//! ```
//!
//! Each fault restores what it stopped before it returns (the node is started again; the
//! failed primary is rebuilt as the new standby), so rounds repeat.

use std::time::{Duration, Instant};

use crate::Rng;
use crate::cluster::Cluster;
use crate::faults::run;

/// What one injection did: (target, skipped, problems), as [`crate::faults::Injected`] has them.
pub type Outcome = (String, Option<String>, Vec<String>);

fn script(name: &str) -> String {
    format!("{}/scripts/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The node numbers (1–3) of `scripts/rabbit-cluster.sh` that `--amqp-url` lists.
fn cluster_nodes(cluster: &Cluster) -> Vec<u16> {
    cluster
        .amqp_url
        .split(',')
        .filter_map(|u| url::Url::parse(u.trim()).ok()?.port())
        .filter(|p| (5681..=5683).contains(p))
        .map(|p| p - 5680)
        .collect()
}

fn needs_cluster(cluster: &Cluster) -> Option<String> {
    (cluster_nodes(cluster).len() < 3).then(|| {
        "needs --amqp-url with the three nodes of scripts/rabbit-cluster.sh (`scripts/rabbit-cluster.sh urls`)"
            .to_owned()
    })
}

/// The node (1–3) daemon `i` is connected to now, from its log's last connection line.
fn connected_node(cluster: &Cluster, i: usize) -> Option<u16> {
    let log = cluster.daemon_log(i);
    let line =
        log.lines().rev().find(|l| l.contains("connected to RabbitMQ; topology declared"))?;
    let at = line.find("127.0.0.1:568")?;
    line[at + "127.0.0.1:568".len()..].chars().next()?.to_digit(10).map(|d| d as u16)
}

/// The node (1–3) leading `<prefix>.inbox`, asked of any node that answers.
async fn inbox_leader(cluster: &Cluster) -> Option<u16> {
    let inbox = format!("{}.inbox", cluster.prefix);
    for n in cluster_nodes(cluster) {
        let node = format!("turnd-r{n}@localhost");
        let args = ["-q", "-n", &node, "list_queues", "name", "leader", "--formatter", "json"];
        let Ok(out) = run("rabbitmqctl", &args, Duration::from_secs(30)).await else { continue };
        let rows: Vec<serde_json::Value> = serde_json::from_str(out.trim()).unwrap_or_default();
        let leader = rows.iter().find(|r| r["name"] == inbox.as_str())?["leader"].as_str()?;
        return leader.strip_prefix("turnd-r")?.split('@').next()?.parse().ok();
    }
    None
}

/// Stops node `n`, holds it down 2–5 s, starts it again; then every running daemon must be
/// ready within 30 s.
async fn stop_and_restart(cluster: &mut Cluster, n: u16, rng: &mut Rng, why: &str) -> Outcome {
    let mut problems = Vec::new();
    let began = Instant::now();
    let stop = script("rabbit-cluster.sh");
    if let Err(e) = run(&stop, &["stop", &n.to_string()], Duration::from_secs(120)).await {
        return (String::new(), Some(format!("cannot stop node {n}: {e:#}")), problems);
    }
    let stopped = began.elapsed();
    let hold = Duration::from_millis(2000 + rng.next_u64() % 3000);
    tokio::time::sleep(hold).await;
    if let Err(e) = run(&stop, &["start", &n.to_string()], Duration::from_secs(180)).await {
        problems.push(format!("node {n} did not come back: {e:#}"));
    }
    for i in 0..cluster.daemons.len() {
        if !cluster.running(i) {
            continue;
        }
        let until = Instant::now() + Duration::from_secs(30);
        while cluster.readyz(i).await != Some(200) {
            if Instant::now() > until {
                problems.push(format!(
                    "{} not ready 30 s after node {n} came back",
                    cluster.daemons[i].id
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let target = format!(
        "node {n} ({why}): stopped in {:.1} s, down {:.1} s more",
        stopped.as_secs_f64(),
        hold.as_secs_f64()
    );
    (target, None, problems)
}

/// `node-stop`: the node a (seeded) running daemon is connected to.
pub async fn node_stop(cluster: &mut Cluster, rng: &mut Rng) -> Outcome {
    if let Some(why) = needs_cluster(cluster) {
        return (String::new(), Some(why), Vec::new());
    }
    let live: Vec<usize> = (0..cluster.daemons.len()).filter(|i| cluster.running(*i)).collect();
    if live.is_empty() {
        return (String::new(), Some("no running daemon".into()), Vec::new());
    }
    let i = live[(rng.next_u64() % live.len() as u64) as usize];
    let Some(n) = connected_node(cluster, i) else {
        return (
            String::new(),
            Some(format!("{}'s node is not in its log", cluster.daemons[i].id)),
            Vec::new(),
        );
    };
    let why = format!("{}'s", cluster.daemons[i].id);
    stop_and_restart(cluster, n, rng, &why).await
}

/// `leader-stop`: the node leading `<prefix>.inbox`.
pub async fn leader_stop(cluster: &mut Cluster, rng: &mut Rng) -> Outcome {
    if let Some(why) = needs_cluster(cluster) {
        return (String::new(), Some(why), Vec::new());
    }
    match inbox_leader(cluster).await {
        Some(n) => stop_and_restart(cluster, n, rng, "the inbox's leader").await,
        None => (String::new(), Some("no node names a leader of the inbox".into()), Vec::new()),
    }
}

/// `pg-failover`: the primary stops as a crash would, the standby is promoted, every way to
/// the database (each daemon's proxy, the harness's pool) moves to it, and the old primary is
/// rebuilt as the new standby.
pub async fn pg_failover(cluster: &mut Cluster) -> Outcome {
    let pair = script("pg-pair.sh");
    let current = match run(&pair, &["primary"], Duration::from_secs(30)).await {
        Ok(port) => port.trim().parse::<u16>().ok(),
        Err(_) => None,
    };
    if current.is_none() || current != cluster.database_port() {
        return (
            String::new(),
            Some(
                "needs --database-url postgres://postgres@127.0.0.1:5441/postgres with `scripts/pg-pair.sh up sync|async`"
                    .into(),
            ),
            Vec::new(),
        );
    }
    let mut problems = Vec::new();
    let began = Instant::now();
    let port = match run(&pair, &["failover"], Duration::from_secs(120)).await {
        Ok(out) => match out.lines().last().and_then(|l| l.trim().parse::<u16>().ok()) {
            Some(p) => p,
            None => {
                return (String::new(), Some(format!("failover printed no port: {out}")), problems);
            }
        },
        Err(e) => return (String::new(), Some(format!("{e:#}")), problems),
    };
    let promoted = began.elapsed();
    if let Err(e) = cluster.move_database(port).await {
        problems.push(format!("cannot move to the promoted server: {e:#}"));
    }
    let rebuilt = Instant::now();
    if let Err(e) = run(&pair, &["restandby"], Duration::from_secs(180)).await {
        problems.push(format!("the old primary was not rebuilt as a standby: {e:#}"));
    }
    let target = format!(
        "primary stopped and standby on {port} promoted in {:.1} s; old primary rebuilt as standby in {:.1} s",
        promoted.as_secs_f64(),
        rebuilt.elapsed().as_secs_f64()
    );
    (target, None, problems)
}
