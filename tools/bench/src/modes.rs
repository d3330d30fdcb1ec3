//! The modes. Each one starts its own daemon on a fresh database and prefix, warms up,
//! measures, checks exactly-once, stops the daemon and cleans up; it returns its figures as
//! JSON (the report derives its rows and targets from that JSON, like floor-bench's).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::client::{Client, ExactlyOnce, Turn, Turns};
use crate::cluster::{Cluster, Settings, admin_connection};
use crate::cpu::{Meter, Usage};
use crate::report::num;
use crate::statements::{self, Table, harness_sql};
use crate::stats::{Dist, ms, short, short_ms};

/// What one mode produced.
pub struct Measured {
    /// "throughput", "latency", "cold", "crash", "scale".
    pub mode: &'static str,
    /// The row label: "throughput 50×40", "scale 50,5000", …
    pub label: String,
    pub json: Value,
    /// One human line (progress output).
    pub line: String,
    /// Extra human lines: CPU, daemon log, shutdown.
    pub notes: Vec<String>,
    pub check: ExactlyOnce,
    /// PostgreSQL's statements over the measured window (`--statements`).
    pub statements: Option<Table>,
}

/// Turns the database still owes when the mode ends; both must be 0.
struct DbState {
    pending: i64,
    unpublished: i64,
    outbox: i64,
}

// ---------------------------------------------------------------------------------------------
// throughput
// ---------------------------------------------------------------------------------------------

pub async fn throughput(s: &Settings, conversations: usize, turns: u32) -> Result<Measured> {
    throughput_on(s, conversations, turns, 1).await
}

/// `throughput` with `daemons` daemons on one database and prefix (`pods`): one of them is
/// the active intake, workers spread over all of them.
pub async fn throughput_on(
    s: &Settings,
    conversations: usize,
    turns: u32,
    daemons: usize,
) -> Result<Measured> {
    ensure!(conversations > 0 && turns > 0, "throughput needs conversations and turns > 0");
    ensure!(daemons > 0, "pods needs at least one daemon");
    let label = if daemons == 1 {
        format!("throughput {conversations}×{turns}")
    } else {
        format!("throughput {conversations}×{turns} on {daemons} daemons")
    };
    let max_workers = (conversations + 16).max(256).to_string();
    let extra = [("TURND_WORKER__MAX_WORKERS", max_workers)];
    run(s, "throughput", label.clone(), &extra, async |cluster, client| {
        cluster.add_peers(s, daemons - 1).await?;
        let mut maker = Turns::default();
        warm_up(cluster, client, &mut maker, 4).await?;
        let convs: Vec<String> = (0..conversations).map(|i| format!("t{i:04}")).collect();
        let mut batch: Vec<Turn> = Vec::with_capacity(conversations * turns as usize);
        // Round-robin over conversations, as floor-bench publishes them.
        for seq in 0..turns {
            for c in &convs {
                batch.push(maker.make(c, format!("{c}-{seq:05}"), "reply")?);
            }
        }
        cluster.deployments.extend(batch.iter().map(|t| t.deployment.clone()));
        cluster.tombstones(s.tombstones).await?;
        statements_reset(s).await?;
        let meter = Meter::start(Some(cluster.pid()));
        let perf = Perf::start(s, cluster.pid(), &label);
        let started = Instant::now();
        let publish = client.publish_all(&batch).await?;
        let last = client.wait_all().await?;
        let elapsed = last.saturating_duration_since(started);
        let cpu = meter.stop();
        let perf = Perf::stop(perf).await;
        let total = batch.len();
        let statements = statements_read(s, cluster, total).await?;
        let lat = Dist::new(
            batch.iter().filter_map(|t| client.latency(&t.message_id)).map(nanos).collect(),
        );
        let rate = total as f64 / elapsed.as_secs_f64().max(1e-9);
        let owners = cluster.owners().await;
        let mut notes = vec![cpu.human(total)];
        if daemons > 1 {
            notes.push(format!(
                "{daemons} daemons, {owners} of them own deployments (CPU above: the first daemon only)"
            ));
        }
        notes.extend(perf.iter().map(|p| format!("perf profile: {}", p.display())));
        Ok(Partial {
            line: format!(
                "{rate:.0} turns/s ({conversations} conversations × {turns} turns = {total} in \
                 {:.2} s; all published and confirmed after {:.2} s); latency {}",
                elapsed.as_secs_f64(),
                publish.as_secs_f64(),
                lat.human()
            ),
            json: json!({
                "conversations": conversations,
                "turns_per_conversation": turns,
                "turns": total,
                "elapsed_s": elapsed.as_secs_f64(),
                "publish_s": publish.as_secs_f64(),
                "turns_per_s": rate,
                "daemons": daemons,
                "owning_daemons": owners,
                "latency": lat.json(),
                "cpu": cpu.json(total),
                "perf_data": perf,
            }),
            notes,
            statements,
        })
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// latency
// ---------------------------------------------------------------------------------------------

pub async fn latency(s: &Settings, turns: u32, warmup: u32) -> Result<Measured> {
    ensure!(turns > 0, "latency needs turns > 0");
    let label = "latency".to_owned();
    let wlog = WorkerLog::new()?;
    run(s, "latency", label.clone(), &wlog.env(), async |cluster, client| {
        let mut maker = Turns::default();
        statements_reset(s).await?;
        let meter = Meter::start(Some(cluster.pid()));
        let perf = Perf::start(s, cluster.pid(), &label);
        let seq = one_at_a_time(cluster, client, &mut maker, "lat0", "l", warmup, turns).await?;
        let cpu = meter.stop();
        let perf = Perf::stop(perf).await;
        let statements = statements_read(s, cluster, (warmup + turns) as usize).await?;
        let (phases, phases_human) = wlog.phases(client, &seq.measured, false);
        let mut notes = vec![phases_human, cpu.human((warmup + turns) as usize)];
        notes.extend(perf.iter().map(|p| format!("perf profile: {}", p.display())));
        Ok(Partial {
            line: format!(
                "{} (1 conversation, {turns} turns one at a time, {warmup} warm-up); \
                 publish→confirm p50 {} p99 {}",
                seq.round_trip.human(),
                short(seq.confirm.p50),
                short(seq.confirm.p99)
            ),
            json: json!({
                "turns": turns,
                "warmup": warmup,
                "round_trip": seq.round_trip.json(),
                "inbox_confirm": seq.confirm.json(),
                "phases": phases,
                "cpu": cpu.json((warmup + turns) as usize),
                "perf_data": perf,
            }),
            notes,
            statements,
        })
    })
    .await
}

/// What [`one_at_a_time`] measured.
struct Sequential {
    round_trip: Dist,
    confirm: Dist,
    /// (messageId, deployment) of the measured turns.
    measured: Vec<(String, String)>,
}

/// One turn in flight on `conv`: publish (confirmed), wait for its event, next. Measures
/// publish → event and publish → confirm for the turns after the warm-up.
async fn one_at_a_time(
    cluster: &mut Cluster,
    client: &mut Client,
    maker: &mut Turns,
    conv: &str,
    tag: &str,
    warmup: u32,
    turns: u32,
) -> Result<Sequential> {
    let mut round_trips = Vec::with_capacity(turns as usize);
    let mut confirms = Vec::with_capacity(turns as usize);
    let mut measured = Vec::with_capacity(turns as usize);
    for i in 0..warmup + turns {
        let turn = maker.make(conv, format!("{conv}-{tag}{i:05}"), "reply")?;
        cluster.deployments.insert(turn.deployment.clone());
        let confirm = client.publish_confirmed(&turn).await?;
        client.wait_for(&turn.message_id).await?;
        if i >= warmup {
            confirms.push(nanos(confirm));
            round_trips.extend(client.latency(&turn.message_id).map(nanos));
            measured.push((turn.message_id, turn.deployment));
        }
    }
    Ok(Sequential { round_trip: Dist::new(round_trips), confirm: Dist::new(confirms), measured })
}

/// The test worker's event log (TEST_WORKER_LOG): `start <pid> <epoch> <ns>` when a worker
/// starts and `turn <pid> <epoch> <messageId> <ns>` when it has read a turn, CLOCK_REALTIME.
/// With the harness's own publish and arrival times it splits a turn's latency into phases.
struct WorkerLog {
    dir: PathBuf,
}

impl WorkerLog {
    fn new() -> Result<WorkerLog> {
        // In memory where the machine has it: a worker's first line creates its file, and on
        // a disk that waits behind the journal's commit of PostgreSQL's fsyncs (up to 200 ms
        // seen at 5,000 files), which would time the disk, not turnd.
        let shm = std::path::Path::new("/dev/shm");
        let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
        let dir = base.join(format!("turnd-bench-wlog-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(WorkerLog { dir })
    }

    /// Where the worker logs, and leave to write there: the folder lies outside its
    /// workspace, and with `--daemon-env TURND_WORKER__SANDBOX=landlock` a worker could not
    /// log otherwise (the crash mode waits for its turn line).
    fn env(&self) -> [(&'static str, String); 2] {
        let dir = self.dir.display().to_string();
        [
            ("TURND_WORKER__SANDBOX_WRITE", format!("[{dir:?}]")),
            ("TURND_WORKER_ENV_TEST_WORKER_LOG", dir),
        ]
    }

    fn lines(&self, deployment: &str) -> Vec<Vec<String>> {
        let path = self.dir.join(format!("{deployment}.log"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').map(str::to_owned).collect())
            .collect()
    }

    /// When the deployment's first worker started.
    fn started(&self, deployment: &str) -> Option<u64> {
        self.lines(deployment)
            .into_iter()
            .find(|f| f.first().is_some_and(|k| k == "start"))
            .and_then(|f| f.get(3)?.parse().ok())
    }

    /// (pid, when) the worker read the turn.
    fn turn(&self, deployment: &str, message_id: &str) -> Option<(i32, u64)> {
        self.lines(deployment).into_iter().find_map(|f| {
            if f.first()? != "turn" || f.get(3)? != message_id {
                return None;
            }
            Some((f.get(1)?.parse().ok()?, f.get(4)?.parse().ok()?))
        })
    }

    /// Splits each measured turn at the worker's start (`spawn`) and at its reading the turn.
    fn phases(
        &self,
        client: &Client,
        measured: &[(String, String)],
        spawn: bool,
    ) -> (Value, String) {
        let mut to_start = Vec::new();
        let mut start_to_turn = Vec::new();
        let mut to_turn = Vec::new();
        let mut turn_to_event = Vec::new();
        for (mid, deployment) in measured {
            let (Some((published, arrived)), Some((_, read))) =
                (client.wall(mid), self.turn(deployment, mid))
            else {
                continue;
            };
            to_turn.push(read.saturating_sub(published));
            turn_to_event.push(arrived.saturating_sub(read));
            if spawn && let Some(started) = self.started(deployment) {
                to_start.push(started.saturating_sub(published));
                start_to_turn.push(read.saturating_sub(started));
            }
        }
        let (to_turn, turn_to_event) = (Dist::new(to_turn), Dist::new(turn_to_event));
        if spawn {
            let (to_start, start_to_turn) = (Dist::new(to_start), Dist::new(start_to_turn));
            let human = format!(
                "phases p50 (p99): publish → worker process started {} ({}), started → turn \
                 written to it {} ({}), worker read the turn → event received {} ({})",
                short(to_start.p50),
                short(to_start.p99),
                short(start_to_turn.p50),
                short(start_to_turn.p99),
                short(turn_to_event.p50),
                short(turn_to_event.p99)
            );
            let json = json!({
                "publish_to_worker_started": to_start.json(),
                "worker_started_to_turn_read": start_to_turn.json(),
                "turn_read_to_event_received": turn_to_event.json(),
            });
            (json, human)
        } else {
            let human = format!(
                "phases p50 (p99): publish → worker read the turn {} ({}), worker read the turn \
                 → event received {} ({})",
                short(to_turn.p50),
                short(to_turn.p99),
                short(turn_to_event.p50),
                short(turn_to_event.p99)
            );
            let json = json!({
                "publish_to_turn_read": to_turn.json(),
                "turn_read_to_event_received": turn_to_event.json(),
            });
            (json, human)
        }
    }
}

impl Drop for WorkerLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// cold
// ---------------------------------------------------------------------------------------------

pub async fn cold(s: &Settings, count: usize, warmup: usize, landlock: bool) -> Result<Measured> {
    ensure!(count > 0, "cold needs count > 0");
    let label = if landlock { "cold (landlock)" } else { "cold" }.to_owned();
    let wlog = WorkerLog::new()?;
    // Room for every conversation: an eviction would add a stop to the figure.
    let max_workers = (count + warmup + 16).max(256).to_string();
    let mut extra = vec![("TURND_WORKER__MAX_WORKERS", max_workers)];
    extra.extend(wlog.env());
    if landlock {
        extra.push(("TURND_WORKER__SANDBOX", "landlock".to_owned()));
    }
    run(s, "cold", label.clone(), &extra, async |cluster, client| {
        let mut maker = Turns::default();
        statements_reset(s).await?;
        let meter = Meter::start(Some(cluster.pid()));
        let perf = Perf::start(s, cluster.pid(), &label);
        let mut samples = Vec::with_capacity(count);
        let mut measured = Vec::with_capacity(count);
        for i in 0..warmup + count {
            let conv = format!("cold{i:05}");
            let turn = maker.make(&conv, format!("{conv}-00000"), "reply")?;
            cluster.deployments.insert(turn.deployment.clone());
            client.publish_confirmed(&turn).await?;
            client.wait_for(&turn.message_id).await?;
            if i >= warmup {
                samples.extend(client.latency(&turn.message_id).map(nanos));
                measured.push((turn.message_id, turn.deployment));
            }
        }
        let cpu = meter.stop();
        let perf = Perf::stop(perf).await;
        let statements = statements_read(s, cluster, warmup + count).await?;
        let d = Dist::new(samples);
        let (phases, phases_human) = wlog.phases(client, &measured, true);
        let mut notes = vec![phases_human, cpu.human(warmup + count)];
        notes.extend(perf.iter().map(|p| format!("perf profile: {}", p.display())));
        Ok(Partial {
            line: format!(
                "{} (a new conversation per turn: lock + spawn + reply; {count} turns one at a \
                 time, {warmup} warm-up)",
                d.human()
            ),
            json: json!({
                "count": count,
                "warmup": warmup,
                "round_trip": d.json(),
                "phases": phases,
                "cpu": cpu.json(warmup + count),
                "perf_data": perf,
            }),
            notes,
            statements,
        })
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// crash
// ---------------------------------------------------------------------------------------------

pub async fn crash(s: &Settings, trials: usize, warmup: usize) -> Result<Measured> {
    ensure!(trials > 0, "crash needs trials > 0");
    let label = "crash".to_owned();
    let max_workers = (trials + warmup + 16).max(256).to_string();
    // The worker logs "turn <pid> <epoch> <messageId> <ns>" when it has read a turn: the
    // moment the kill is sure to hit a worker that holds it.
    let wlog = WorkerLog::new()?;
    let [write, log] = wlog.env();
    let extra = [("TURND_WORKER__MAX_WORKERS", max_workers), write, log];
    run(s, "crash", label, &extra, async |cluster, client| {
        let mut maker = Turns::default();
        statements_reset(s).await?;
        let meter = Meter::start(Some(cluster.pid()));
        let mut kill_to_event = Vec::with_capacity(trials);
        let mut publish_to_worker = Vec::with_capacity(trials);
        for i in 0..warmup + trials {
            let conv = format!("crash{i:05}");
            let turn = maker.make(&conv, format!("{conv}-00000"), "hang")?;
            cluster.deployments.insert(turn.deployment.clone());
            let published = Instant::now();
            client.publish_confirmed(&turn).await?;
            let pid = worker_has_turn(&wlog, &turn, s.timeout).await?;
            let has_it = published.elapsed();
            let killed = Instant::now();
            // SAFETY: kill(2); the pid is the worker the log line named, which hangs.
            let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
            ensure!(rc == 0, "cannot SIGKILL worker {pid}: {}", std::io::Error::last_os_error());
            let got = client.wait_for(&turn.message_id).await?;
            if i >= warmup {
                kill_to_event.push(nanos(got.at.saturating_duration_since(killed)));
                publish_to_worker.push(nanos(has_it));
            }
            cluster.running()?;
        }
        let cpu = meter.stop();
        let statements = statements_read(s, cluster, warmup + trials).await?;
        let d = Dist::new(kill_to_event);
        let w = Dist::new(publish_to_worker);
        Ok(Partial {
            line: format!(
                "SIGKILL → WORKER_DIED event {} ({trials} trials, {warmup} warm-up; a hanging \
                 turn on a fresh conversation each); publish → worker has the turn p50 {}",
                d.human(),
                short(w.p50)
            ),
            json: json!({
                "trials": trials,
                "warmup": warmup,
                "kill_to_error_event": d.json(),
                "publish_to_worker_has_turn": w.json(),
                "cpu": cpu.json(warmup + trials),
            }),
            notes: vec![cpu.human(warmup + trials)],
            statements,
        })
    })
    .await
}

/// Polls the test worker's event log until it shows `turn`; returns the worker's pid.
async fn worker_has_turn(wlog: &WorkerLog, turn: &Turn, timeout: Duration) -> Result<i32> {
    let started = Instant::now();
    loop {
        if let Some((pid, _)) = wlog.turn(&turn.deployment, &turn.message_id) {
            return Ok(pid);
        }
        ensure!(
            started.elapsed() < timeout,
            "no worker took turn {} within {timeout:?} (no turn line in {})",
            turn.message_id,
            wlog.dir.display()
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// scale
// ---------------------------------------------------------------------------------------------

pub struct ScaleArgs {
    pub levels: Vec<usize>,
    pub latency_turns: u32,
    pub latency_warmup: u32,
    pub alter_system: bool,
    /// New conversations in flight during bring-up; 0 = all at once.
    pub bring_up_window: usize,
    /// New conversations started one at a time at each level.
    pub cold_probes: usize,
    /// Rounds the latency turns and new conversations are split into at each level, each
    /// followed by a floor-bench latency run when `--floor` is given.
    pub rounds: usize,
}

pub async fn scale(s: &Settings, a: &ScaleArgs) -> Result<Measured> {
    let mut levels = a.levels.clone();
    levels.sort_unstable();
    levels.dedup();
    levels.retain(|&n| n >= 2);
    ensure!(!levels.is_empty(), "scale needs --deployments of at least 2");
    let capacity = lock_capacity(s).await?;
    let (levels, skipped, capacity_note) =
        fit_levels(&levels, &capacity, s, a.alter_system).await?;
    if let Some(note) = &capacity_note {
        eprintln!("turnd-bench: {note}");
    }
    ensure!(!levels.is_empty(), "{}", capacity_note.unwrap_or_default());
    let max = levels.last().copied().unwrap_or(2);
    let label =
        format!("scale {}", levels.iter().map(ToString::to_string).collect::<Vec<_>>().join(","));
    // Where a new conversation's time goes at each size.
    let wlog = WorkerLog::new()?;
    let extra = [
        // Room for every probe: at the cap each new conversation would evict an idle worker
        // (and scan the registry for it), which is not what this mode measures.
        ("TURND_WORKER__MAX_WORKERS", (max + COLD_PROBE_WARMUP + a.cold_probes + 64).to_string()),
        ("TURND_WORKER__IDLE_TIMEOUT", "1h".to_owned()),
    ];
    let extra: Vec<_> = extra.into_iter().chain(wlog.env()).collect();
    let (lt, lw, window, probes, rounds) =
        (a.latency_turns, a.latency_warmup, a.bring_up_window, a.cold_probes, a.rounds.max(1));
    run(s, "scale", label, &extra, async |cluster, client| {
        let mut maker = Turns::default();
        // Deployment 1 of N: the conversation latency is measured on.
        one_at_a_time(cluster, client, &mut maker, "lat0", "w", lw.max(5), 0).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let base = Snapshot::take(cluster).await;
        let fd_limit = nofile_limit(cluster.pid());
        let mut live = 1;
        let mut out = Vec::new();
        let mut notes = Vec::new();
        let mut fds_per_deployment: Option<f64> = None;
        for (li, &level) in levels.iter().enumerate() {
            // Say so before the daemon runs out of file descriptors.
            if let (Some(per), Some(limit)) = (fds_per_deployment, fd_limit) {
                let need = base.fds as f64 + per * level as f64;
                if need > limit as f64 {
                    let note = format!(
                        "turnd holds about {per:.1} file descriptors per live deployment (its \
                         stdin, stdout and stderr pipes); {level} need about {need:.0}, more than its \
                         RLIMIT_NOFILE {limit}: expect WORKER_START_FAILED \"Too many open \
                         files\" (systemd: LimitNOFILE=)"
                    );
                    eprintln!("turnd-bench: {note}");
                    notes.push(note);
                }
            }
            let batch: Vec<Turn> = (live..level)
                .map(|i| {
                    let conv = format!("s{i:06}");
                    maker.make(&conv, format!("{conv}-00000"), "reply")
                })
                .collect::<Result<_>>()?;
            cluster.deployments.extend(batch.iter().map(|t| t.deployment.clone()));
            let meter = Meter::start(Some(cluster.pid()));
            let perf_up = Perf::start(s, cluster.pid(), &format!("scale {level} bring-up"));
            let started = Instant::now();
            let last = client.publish_paced(&batch, window).await?;
            let bring_up = last.saturating_duration_since(started);
            let cpu = meter.stop();
            let perf_up = Perf::stop(perf_up).await;
            live = level;
            cluster.running()?;
            // Measure a quiet daemon: every worker up (spawns may trail the replies).
            let quiet = workers_settle(cluster, level).await;
            let snap = Snapshot::take(cluster).await;
            // Latency, new conversations and (with --floor) floor-bench's latency in interleaved
            // rounds: on this machine a burst moves one round's samples, not a level's, and
            // floor-bench runs in the same seconds as turnd (how far the machine moved).
            let perf = Perf::start(s, cluster.pid(), &format!("scale {level} latency"));
            let mut lat_cpu: Option<Usage> = None;
            let mut warm_measured = Vec::with_capacity(lt as usize);
            let mut cold_measured = Vec::with_capacity(probes);
            let mut round_figures = Vec::with_capacity(rounds);
            for r in 0..rounds {
                let meter = Meter::start(Some(cluster.pid()));
                let warmup = if r == 0 { lw } else { ROUND_WARMUP };
                let tag = format!("m{li}r{r}-");
                let turns = share(lt as usize, rounds, r) as u32;
                let warm =
                    one_at_a_time(cluster, client, &mut maker, "lat0", &tag, warmup, turns).await?;
                let used = meter.stop();
                match &mut lat_cpu {
                    Some(u) => u.add(&used),
                    None => lat_cpu = Some(used),
                }
                warm_measured.extend(warm.measured);
                // What one more conversation costs at this size (lock + spawn + reply). A few
                // first, unmeasured, as in the cold mode: the first new conversations after a
                // bring-up or a latency window paid for caches the rest find warm.
                let skip = if r == 0 { COLD_PROBE_WARMUP } else { 0 };
                let mut cold = Vec::with_capacity(probes);
                for p in 0..skip + share(probes, rounds, r) {
                    let conv = format!("p{li}-{r}-{p:04}");
                    let turn = maker.make(&conv, format!("{conv}-00000"), "reply")?;
                    cluster.deployments.insert(turn.deployment.clone());
                    client.publish_confirmed(&turn).await?;
                    client.wait_for(&turn.message_id).await?;
                    live += 1;
                    if p >= skip {
                        cold.extend(client.latency(&turn.message_id).map(nanos));
                        cold_measured.push((turn.message_id, turn.deployment));
                    }
                }
                // The bare steps beside this many live deployments: what the services' load and
                // the machine's state at this moment cost any client, turnd or not.
                let floor = match &s.floor {
                    Some(path) => floor_latency(path, &s.amqp_url, level, r, &mut notes).await,
                    None => None,
                };
                round_figures.push(Round {
                    latency_p50: warm.round_trip.p50,
                    new_conversation_p50: Dist::new(cold).p50,
                    floor,
                });
            }
            let perf = Perf::stop(perf).await;
            let lat_cpu = lat_cpu.unwrap_or_else(|| Meter::start(None).stop());
            let pooled = |measured: &[(String, String)]| {
                Dist::new(measured.iter().filter_map(|(m, _)| client.latency(m).map(nanos)).collect())
            };
            let (lat, cold) = (pooled(&warm_measured), pooled(&cold_measured));
            let (warm_phases, warm_phases_human) = wlog.phases(client, &warm_measured, false);
            notes.push(format!("a turn of a live conversation at {level}: {warm_phases_human}"));
            let (cold_phases, cold_phases_human) = wlog.phases(client, &cold_measured, true);
            notes.push(format!("a new conversation at {level}: {cold_phases_human}"));
            notes.push(format!("rounds at {level}: {}", Round::human(&round_figures)));
            let added = batch.len().max(1);
            let kb_per_deployment = (snap.rss_kb as f64 - base.rss_kb as f64) / (level - 1).max(1) as f64;
            fds_per_deployment = Some((snap.fds as f64 - base.fds as f64) / (level - 1).max(1) as f64);
            if snap.workers != level || snap.owned != level as i64 {
                notes.push(format!(
                    "at {level}: {} live worker processes and {} deployments owned in the database \
                     (expected {level} each; waited {:.1} s for the workers to settle)",
                    snap.workers,
                    snap.owned,
                    quiet.as_secs_f64()
                ));
            }
            notes.push(format!("bring-up to {level}: {}", cpu.human(added)));
            let line = format!(
                "{level} live: up in {:.2} s ({:.0}/s); daemon RSS {} kB ({:+.1} kB/deployment), \
                 {} threads, {} fds; lock connections {}, database connections {}, advisory locks {}; \
                 AMQP {}; thread queues {}; latency {}; a new conversation {}",
                bring_up.as_secs_f64(),
                batch.len() as f64 / bring_up.as_secs_f64().max(1e-9),
                snap.rss_kb,
                kb_per_deployment,
                snap.threads,
                snap.fds,
                snap.pg_lock,
                snap.pg_total,
                snap.advisory_locks,
                snap.amqp_human(),
                snap.queues_human(),
                lat.human(),
                cold.human()
            );
            notes.push(line);
            out.push(json!({
                "deployments": level,
                "bring_up_s": bring_up.as_secs_f64(),
                "bring_up_added": batch.len(),
                "bring_up_per_s": batch.len() as f64 / bring_up.as_secs_f64().max(1e-9),
                "bring_up_cpu": cpu.json(added),
                "bring_up_window": window,
                "workers_settled_s": quiet.as_secs_f64(),
                "rss_kb": snap.rss_kb,
                "rss_anon_kb": snap.rss_anon_kb,
                "rss_kb_per_deployment": (kb_per_deployment * 10.0).round() / 10.0,
                "threads": snap.threads,
                "open_fds": snap.fds,
                "workers": snap.workers,
                "workers_rss_kb": snap.workers_rss_kb,
                "owned_in_db": snap.owned,
                "lock_connections": snap.pg_lock,
                "db_connections": snap.pg_total,
                "advisory_locks": snap.advisory_locks,
                "amqp_connections": snap.amqp.map(|a| a.0),
                "amqp_channels": snap.amqp.map(|a| a.1),
                "amqp_note": snap.amqp_note,
                "thread_queues": snap.queues.map(|q| q.0),
                "thread_queue_consumers": snap.queues.map(|q| q.1),
                "latency": lat.json(),
                "latency_cpu": lat_cpu.json((lw + lt + ROUND_WARMUP * (rounds as u32 - 1)) as usize),
                "new_conversation": cold.json(),
                "new_conversation_phases": cold_phases,
                "latency_phases": warm_phases,
                "rounds": round_figures.iter().map(Round::json).collect::<Vec<_>>(),
                "floor_latency": Round::floor_median(&round_figures),
                "perf_data": perf,
                "perf_data_bring_up": perf_up,
            }));
        }
        let (first, last) = (&out[0], &out[out.len() - 1]);
        let ratio = |path: &str| match (num(last, path), num(first, path)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let summary = format!(
            "{} deployments on one daemon: lock connections {}, RSS {:.1} kB/deployment, latency p50 {:.2}× and p99 {:.2}× that with {}",
            max,
            last["lock_connections"],
            last["rss_kb_per_deployment"].as_f64().unwrap_or(f64::NAN),
            ratio("/latency/p50_ms").unwrap_or(f64::NAN),
            ratio("/latency/p99_ms").unwrap_or(f64::NAN),
            levels[0]
        );
        Ok(Partial {
            line: summary,
            json: json!({
                "levels": out,
                "baseline": {
                    "rss_kb": base.rss_kb,
                    "rss_anon_kb": base.rss_anon_kb,
                    "threads": base.threads,
                    "open_fds": base.fds,
                    "lock_connections": base.pg_lock,
                    "db_connections": base.pg_total,
                    "amqp_connections": base.amqp.map(|a| a.0),
                    "amqp_channels": base.amqp.map(|a| a.1),
                },
                "latency_turns": lt,
                "latency_warmup": lw,
                "rounds": rounds,
                "latency_ratio_p50": ratio("/latency/p50_ms"),
                "latency_ratio_p99": ratio("/latency/p99_ms"),
                "new_conversation_ratio_p50": ratio("/new_conversation/p50_ms"),
                "floor_latency_ratio_p50": ratio("/floor_latency/p50_ms"),
                "skipped_levels": skipped,
                "daemon_nofile_limit": fd_limit,
                "capacity_note": capacity_note,
                "pg_lock_table": capacity.json(),
            }),
            notes,
            // Its windows interleave levels, bring-ups and floor-bench: not measured.
            statements: None,
        })
    })
    .await
}

/// New conversations started and not measured before the scale mode's probes at each level.
const COLD_PROBE_WARMUP: usize = 5;
/// Unmeasured turns before each scale latency round after the first.
const ROUND_WARMUP: u32 = 5;
/// floor-bench latency turns (and warm-up) per scale round.
const FLOOR_ROUND_TURNS: u32 = 100;
const FLOOR_ROUND_WARMUP: u32 = 10;

/// Round `r`'s share of `total` split over `rounds` (the first rounds take the remainder).
fn share(total: usize, rounds: usize, r: usize) -> usize {
    let rounds = rounds.max(1);
    total / rounds + usize::from(r < total % rounds)
}

/// One scale round at one level: turnd's p50s and floor-bench's latency right after.
struct Round {
    latency_p50: u64,
    new_conversation_p50: u64,
    /// floor-bench's round trip (p50_ms, p99_ms …), when it ran.
    floor: Option<Value>,
}

impl Round {
    fn floor_p50_ms(&self) -> Option<f64> {
        self.floor.as_ref().and_then(|f| num(f, "/p50_ms")).filter(|v| *v > 0.0)
    }

    fn json(&self) -> Value {
        json!({
            "latency_p50_ms": ms(self.latency_p50),
            "new_conversation_p50_ms": ms(self.new_conversation_p50),
            "floor_latency": self.floor,
        })
    }

    fn human(rounds: &[Round]) -> String {
        let each: Vec<String> = rounds
            .iter()
            .map(|r| {
                let floor = r
                    .floor_p50_ms()
                    .map_or(String::new(), |f| format!(", floor-bench {}", short_ms(f)));
                format!(
                    "latency {}, new conversation {}{floor}",
                    short(r.latency_p50),
                    short(r.new_conversation_p50)
                )
            })
            .collect();
        format!("p50 per round: {}", each.join("; "))
    }

    /// The median over rounds of floor-bench's p50 and p99 (null when it did not run).
    fn floor_median(rounds: &[Round]) -> Value {
        let of = |path: &str| {
            median(
                rounds.iter().filter_map(|r| r.floor.as_ref().and_then(|f| num(f, path))).collect(),
            )
        };
        match (of("/p50_ms"), of("/p99_ms")) {
            (Some(p50), Some(p99)) => {
                json!({ "p50_ms": p50, "p99_ms": p99, "runs": rounds.iter().filter(|r| r.floor.is_some()).count() })
            }
            _ => Value::Null,
        }
    }
}

/// The median (mean of the middle two for an even count); None for no values.
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// floor-bench's latency mode beside `level` live deployments, round `r`; a failure is a note.
async fn floor_latency(
    path: &std::path::Path,
    amqp_url: &str,
    level: usize,
    r: usize,
    notes: &mut Vec<String>,
) -> Option<Value> {
    eprintln!(
        "turnd-bench: floor-bench latency beside {level} live deployments (round {}) …",
        r + 1
    );
    let args = [
        "latency".to_owned(),
        "--turns".to_owned(),
        FLOOR_ROUND_TURNS.to_string(),
        "--warmup".to_owned(),
        FLOOR_ROUND_WARMUP.to_string(),
    ];
    match crate::floor::run(path, amqp_url, &args).await {
        Ok(v) => v.pointer("/round_trip").cloned(),
        Err(e) => {
            notes.push(format!("floor-bench latency at {level}, round {}: {e:#}", r + 1));
            None
        }
    }
}

/// The soft RLIMIT_NOFILE of a process, from /proc/<pid>/limits.
fn nofile_limit(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Waits until the daemon has `expected` live workers, or their number has not moved for 5 s
/// (at most 120 s); returns how long it waited.
async fn workers_settle(cluster: &Cluster, expected: usize) -> Duration {
    let started = Instant::now();
    let mut last = (usize::MAX, Instant::now());
    loop {
        let (n, _) = cluster.children();
        if n == expected || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    started.elapsed()
}

/// The server's lock table: max_locks_per_transaction × (backends + prepared transactions).
struct LockCapacity {
    per_transaction: i64,
    slots: i64,
    in_use: i64,
}

impl LockCapacity {
    fn json(&self) -> Value {
        json!({ "max_locks_per_transaction": self.per_transaction, "slots": self.slots, "in_use": self.in_use })
    }
}

async fn lock_capacity(s: &Settings) -> Result<LockCapacity> {
    let mut admin = admin_connection(&s.admin_url).await?;
    let (per_transaction, slots, in_use): (i64, i64, i64) = sqlx::query_as(
        "SELECT current_setting('max_locks_per_transaction')::bigint,
                current_setting('max_locks_per_transaction')::bigint * (
                    current_setting('max_connections')::bigint
                  + current_setting('autovacuum_max_workers')::bigint + 1
                  + current_setting('max_worker_processes')::bigint
                  + current_setting('max_wal_senders')::bigint
                  + current_setting('max_prepared_transactions')::bigint),
                (SELECT count(*) FROM pg_locks)",
    )
    .fetch_one(&mut admin)
    .await
    .context("read PostgreSQL's lock settings")?;
    Ok(LockCapacity { per_transaction, slots, in_use })
}

/// Keeps the levels the server's lock table can hold (with room for everything else), says
/// what to change otherwise, and optionally changes it (a restart is still needed).
async fn fit_levels(
    levels: &[usize],
    cap: &LockCapacity,
    s: &Settings,
    alter_system: bool,
) -> Result<(Vec<usize>, Vec<usize>, Option<String>)> {
    // Room for the locks other sessions hold now and a margin for ordinary relation locks.
    let room = (cap.slots - cap.in_use - 256).max(0) as usize;
    let (fit, skipped): (Vec<usize>, Vec<usize>) = levels.iter().partition(|&&n| n <= room);
    if skipped.is_empty() {
        return Ok((fit, skipped, None));
    }
    let need = skipped.iter().max().copied().unwrap_or(0);
    let backends = cap.slots / cap.per_transaction.max(1);
    let suggest = ((need as u64 * 2 / backends.max(1) as u64) + 1).max(256).next_power_of_two();
    let mut note = format!(
        "PostgreSQL's lock table holds about {} locks (max_locks_per_transaction {} × {} \
         backends), {} in use now; {need} live deployments need {need} advisory locks on one \
         session (cluster-wide), so scale level(s) {skipped:?} would end in \"out of shared \
         memory\" and were skipped. Raise it: ALTER SYSTEM SET max_locks_per_transaction = \
         {suggest}; then restart PostgreSQL.",
        cap.slots, cap.per_transaction, backends, cap.in_use
    );
    if alter_system {
        let mut admin = admin_connection(&s.admin_url).await?;
        let sql = format!("ALTER SYSTEM SET max_locks_per_transaction = {suggest}");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut admin)
            .await
            .context("ALTER SYSTEM SET max_locks_per_transaction")?;
        note += &format!(
            " Done (--alter-system): max_locks_per_transaction = {suggest} is in \
             postgresql.auto.conf and takes effect after a PostgreSQL restart, which the \
             harness does not do."
        );
    }
    Ok((fit, skipped, Some(note)))
}

/// The daemon's footprint at one moment.
struct Snapshot {
    rss_kb: u64,
    rss_anon_kb: u64,
    threads: u64,
    fds: usize,
    workers: usize,
    workers_rss_kb: u64,
    owned: i64,
    pg_lock: i64,
    pg_total: i64,
    advisory_locks: i64,
    amqp: Option<(usize, usize)>,
    amqp_note: Option<String>,
    queues: Option<(usize, usize)>,
}

impl Snapshot {
    async fn take(cluster: &Cluster) -> Snapshot {
        let (workers, workers_rss_kb) = cluster.children();
        let lock_name = format!("turnd-lock:{}", cluster.daemon_id);
        let db: Result<(i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT (SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND application_name = $1),
                    (SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND application_name LIKE 'turnd%'),
                    (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                      WHERE l.locktype = 'advisory' AND a.application_name = $1),
                    (SELECT count(*) FROM turnd_deployments WHERE owner = $2)",
        )
        .bind(&lock_name)
        .bind(&cluster.daemon_id)
        .fetch_one(&cluster.pool)
        .await
        .context("count the daemon's database connections");
        let (pg_lock, pg_total, advisory_locks, owned) = db.unwrap_or((-1, -1, -1, -1));
        let (amqp, amqp_note) =
            match rabbitmq_connection(&format!("turnd {}", cluster.daemon_id)).await {
                Ok(a) => (Some(a), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
        let queues = rabbitmq_thread_queues(&cluster.prefix).await.ok();
        Snapshot {
            rss_kb: cluster.proc_status("VmRSS").unwrap_or(0),
            rss_anon_kb: cluster.proc_status("RssAnon").unwrap_or(0),
            threads: cluster.proc_status("Threads").unwrap_or(0),
            fds: cluster.open_fds().unwrap_or(0),
            workers,
            workers_rss_kb,
            owned,
            pg_lock,
            pg_total,
            advisory_locks,
            amqp,
            amqp_note,
            queues,
        }
    }

    fn amqp_human(&self) -> String {
        match (self.amqp, &self.amqp_note) {
            (Some((c, ch)), _) => format!("{c} connection(s), {ch} channels"),
            (None, Some(n)) => format!("unknown ({n})"),
            (None, None) => "unknown".into(),
        }
    }

    fn queues_human(&self) -> String {
        match self.queues {
            Some((q, c)) => format!("{q} ({c} consumers)"),
            None => "unknown".into(),
        }
    }
}

pub async fn rabbitmqctl(args: &[&str]) -> Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("rabbitmqctl").args(args).stdin(Stdio::null()).kill_on_drop(true).output(),
    )
    .await
    .context("rabbitmqctl did not answer within 60 s")?
    .context("run rabbitmqctl (is it on PATH, and may this user run it?)")?;
    ensure!(
        output.status.success(),
        "rabbitmqctl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// (connections, channels) whose client-provided connection_name is `name`, from
/// `rabbitmqctl list_connections channels client_properties` (the `name` column is the peer
/// address).
async fn rabbitmq_connection(name: &str) -> Result<(usize, usize)> {
    let text = rabbitmqctl(&[
        "-q",
        "list_connections",
        "--no-table-headers",
        "channels",
        "client_properties",
    ])
    .await?;
    let tag = format!("{{\"connection_name\",\"{name}\"}}");
    let mut found = (0, 0);
    for line in text.lines() {
        let Some((channels, properties)) = line.split_once('\t') else {
            continue;
        };
        if properties.contains(&tag) {
            found.0 += 1;
            found.1 += channels.trim().parse::<usize>().unwrap_or(0);
        }
    }
    ensure!(found.0 > 0, "no AMQP connection named {name:?} in rabbitmqctl list_connections");
    Ok(found)
}

/// (thread queues, their consumers) of `prefix`.
async fn rabbitmq_thread_queues(prefix: &str) -> Result<(usize, usize)> {
    let text =
        rabbitmqctl(&["-q", "list_queues", "--no-table-headers", "name", "consumers"]).await?;
    let head = format!("{prefix}.thread.");
    let mut found = (0, 0);
    for line in text.lines() {
        let Some((n, c)) = line.rsplit_once('\t') else {
            continue;
        };
        if n.trim().starts_with(&head) {
            found.0 += 1;
            found.1 += c.trim().parse::<usize>().unwrap_or(0);
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------------------------
// the frame every mode runs in
// ---------------------------------------------------------------------------------------------

/// What a mode's measurement returns before the common checks.
pub struct Partial {
    pub line: String,
    pub json: Value,
    pub notes: Vec<String>,
    /// PostgreSQL's statements over the measured window (`--statements`).
    pub statements: Option<Table>,
}

/// Starts a cluster and a client, runs `measure`, then checks exactly-once (after `settle`)
/// and the database, stops the daemon and cleans up whatever happened.
async fn run(
    s: &Settings,
    mode: &'static str,
    label: String,
    extra: &[(&str, String)],
    measure: impl AsyncFnOnce(&mut Cluster, &mut Client) -> Result<Partial>,
) -> Result<Measured> {
    let mut cluster = Cluster::start(s, mode, extra).await?;
    let mut client = match Client::connect(&cluster, &s.amqp_url, s.timeout).await {
        Ok(c) => c,
        Err(e) => {
            cluster.cleanup().await;
            return Err(e);
        }
    };
    let measured = measure(&mut cluster, &mut client).await;
    let partial = match measured {
        Ok(p) => p,
        Err(e) => {
            let tail = cluster.log_tail(15);
            let check = client.check();
            client.close().await;
            let _ = cluster.stop().await;
            cluster.cleanup().await;
            // The cause first: a table row shows the first line.
            return Err(anyhow::anyhow!(
                "{e:#} ({} of {} turns answered so far)\nturnd log ends:\n{tail}",
                check.answered,
                check.sent
            ));
        }
    };
    let settled = client.settle(s.settle).await;
    let mut check = client.check();
    if let Err(e) = settled {
        check.examples.push(format!("{e:#}"));
    }
    let db = db_state(&cluster).await;
    client.close().await;
    let stopped = cluster.stop().await;
    let log = cluster.log_summary();
    let daemon_log = cluster.log.clone();
    cluster.cleanup().await;

    let mut notes = partial.notes;
    let mut json = partial.json;
    match &db {
        Ok(d) => {
            if d.pending != 0 || d.unpublished != 0 || d.outbox != check.sent as i64 {
                check.database = Some(format!(
                    "database after the run: {} turns not done, {} events unpublished, {} outbox rows for {} turns",
                    d.pending, d.unpublished, d.outbox, check.sent
                ));
            }
            json["database"] = json!({ "pending": d.pending, "unpublished": d.unpublished, "outbox_rows": d.outbox });
        }
        Err(e) => notes.push(format!("database check failed: {e:#}")),
    }
    match &stopped {
        Ok(st) => {
            json["shutdown"] =
                json!({ "s": st.took.as_secs_f64(), "status": st.status, "clean": st.clean });
            notes.push(format!("SIGTERM → exit {:.2} s ({})", st.took.as_secs_f64(), st.status));
        }
        Err(e) => notes.push(format!("stopping turnd: {e:#}")),
    }
    if log.warn + log.error + log.panics > 0 {
        notes.push(format!(
            "turnd log: {} WARN, {} ERROR, {} panic lines{}; e.g.\n      {}",
            log.warn,
            log.error,
            log.panics,
            if s.keep { format!(" ({})", daemon_log.display()) } else { String::new() },
            log.samples.join("\n      ")
        ));
    }
    json["daemon_log"] = json!({ "warn": log.warn, "error": log.error, "panics": log.panics, "samples": log.samples });
    json["exactly_once"] = check.json();
    json["mode"] = json!(mode);
    json["label"] = json!(label);
    Ok(Measured {
        mode,
        label,
        json,
        line: partial.line,
        notes,
        check,
        statements: partial.statements,
    })
}

/// Waits (up to 10 s) until the database owes nothing: every turn done and every event
/// marked published (the relay's update trails the publish a little).
async fn db_state(cluster: &Cluster) -> Result<DbState> {
    let started = Instant::now();
    loop {
        let (pending, unpublished, outbox): (i64, i64, i64) = sqlx::query_as(harness_sql!(
            "SELECT (SELECT count(*) FROM turnd_turns WHERE state <> 'done'),
                    (SELECT count(*) FROM turnd_outbox WHERE published_at IS NULL),
                    (SELECT count(*) FROM turnd_outbox)"
        ))
        .fetch_one(&cluster.pool)
        .await
        .context("count pending turns and unpublished events")?;
        if (pending == 0 && unpublished == 0) || started.elapsed() > Duration::from_secs(10) {
            return Ok(DbState { pending, unpublished, outbox });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `--statements`: zeroes pg_stat_statements right before a measured window.
async fn statements_reset(s: &Settings) -> Result<()> {
    if s.statements {
        statements::reset(&s.admin_url).await?;
    }
    Ok(())
}

/// With `--statements`: the mode database's statements since [`statements_reset`], over
/// `turns`, read once the database owes nothing more for them (the relay marks events
/// published a little after they arrived; those marks are part of a turn's cost).
async fn statements_read(s: &Settings, cluster: &Cluster, turns: usize) -> Result<Option<Table>> {
    if !s.statements {
        return Ok(None);
    }
    db_state(cluster).await?;
    statements::read(&s.admin_url, &cluster.db_name, turns, "turnd").await.map(Some)
}

/// A few turns on their own conversation: connections, channels and caches warm.
async fn warm_up(
    cluster: &mut Cluster,
    client: &mut Client,
    maker: &mut Turns,
    n: u32,
) -> Result<()> {
    one_at_a_time(cluster, client, maker, "warm0", "w", n, 0).await.map(|_| ())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `perf record` of the daemon during a measurement window (with --perf).
pub struct Perf {
    child: Child,
    path: PathBuf,
}

impl Perf {
    pub fn start(s: &Settings, pid: u32, label: &str) -> Option<Perf> {
        let dir = s.perf.as_ref()?;
        let name: String =
            label.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let path = dir.join(format!("{name}.perf.data"));
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "1999", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match child {
            Ok(child) => Some(Perf { child, path }),
            Err(e) => {
                eprintln!("turnd-bench: cannot run perf record: {e}");
                None
            }
        }
    }

    pub async fn stop(perf: Option<Perf>) -> Option<PathBuf> {
        let mut perf = perf?;
        if let Some(pid) = perf.child.id() {
            // SAFETY: kill(2) on our own child; SIGINT makes perf write its data and exit.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        match tokio::time::timeout(Duration::from_secs(60), perf.child.wait()).await {
            Ok(Ok(_)) => Some(perf.path),
            _ => {
                let _ = perf.child.kill().await;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_share_every_turn() {
        let shares: Vec<usize> = (0..5).map(|r| share(53, 5, r)).collect();
        assert_eq!(shares, [11, 11, 11, 10, 10]);
        assert_eq!(share(7, 0, 0), 7, "no rounds is one round");
    }

    #[test]
    fn median_of_rounds() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn floor_bench_median_over_rounds() {
        let round = |floor_ms: Option<f64>| Round {
            latency_p50: 1_000_000,
            new_conversation_p50: 2_000_000,
            floor: floor_ms.map(|f| json!({ "p50_ms": f, "p99_ms": 2.0 * f })),
        };
        let rounds = [round(Some(4.0)), round(None), round(Some(2.0)), round(Some(3.0))];
        let m = Round::floor_median(&rounds);
        assert_eq!((m["p50_ms"].as_f64(), m["p99_ms"].as_f64()), (Some(3.0), Some(6.0)));
        assert_eq!(m["runs"], 3);
        assert_eq!(Round::floor_median(&[round(None)]), Value::Null, "no floor-bench, no median");
    }
}
