//! What a cluster makes on the shared services and removes again: its database, and its
//! prefix's exchanges and queues. The names come from `turnd::broker::Names`, so a queue turnd
//! gains is removed without being listed here again.

use std::time::{Duration, Instant};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};
use turnd::broker::Names;
use turnd::turn::DeploymentName;

/// How long a teardown keeps trying to reach RabbitMQ: the broker may be restarting (chaos,
/// outage tests) when a cluster goes away.
const CONNECT_FOR: Duration = Duration::from_secs(10);

/// The durable queues a prefix may hold: turnd's own (`retry.<k>` for every attempt below
/// `max_attempts`), the thread queues of `deployments` (they also expire on their own) and
/// the caller's `extra` ones (e.g. a durable reply queue).
pub fn queues<'a>(
    prefix: &str,
    max_attempts: u32,
    deployments: impl IntoIterator<Item = &'a str>,
    extra: &[&str],
) -> Vec<String> {
    let names = Names::new(prefix);
    let mut queues = vec![names.inbox(), names.retry(), names.parked(), names.owners()];
    queues.extend((1..max_attempts).map(|k| names.retry_delay(k)));
    queues.extend(
        deployments
            .into_iter()
            .filter_map(|d| DeploymentName::parse(d).ok())
            .map(|d| names.thread(&d)),
    );
    queues.extend(extra.iter().map(|q| format!("{prefix}.{q}")));
    queues
}

/// The exchanges of a prefix.
pub fn exchanges(prefix: &str) -> Vec<String> {
    let names = Names::new(prefix);
    vec![names.turns(), names.replies(), names.retry()]
}

/// Deletes `queues` (pipelined on a few channels: thousands of thread queues take a while
/// otherwise) and `exchanges`; a queue or exchange already gone is not an error. Fails only
/// when RabbitMQ cannot be reached for [`CONNECT_FOR`].
pub async fn delete_broker_objects(
    amqp_url: &str,
    queues: &[String],
    exchanges: &[String],
) -> Result<(), lapin::Error> {
    let started = Instant::now();
    let conn = loop {
        match Connection::connect(amqp_url, ConnectionProperties::default()).await {
            Ok(c) => break c,
            Err(e) if started.elapsed() >= CONNECT_FOR => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    let per = queues.len().div_ceil(8).max(1);
    for chunk in queues.chunks(per) {
        let ch = conn.create_channel().await?;
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            for q in chunk {
                let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let ch = conn.create_channel().await?;
    for name in exchanges {
        let _ = ch.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "teardown".into()).await;
    Ok(())
}

/// `DROP DATABASE … WITH (FORCE)` (its connections are ended) over a connection to `admin_url`.
pub async fn drop_database(admin_url: &str, db_name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let sql = format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)");
    let dropped = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.map(drop);
    let _ = admin.close().await;
    dropped
}

/// Runs `work` to completion on a thread of its own with its own runtime, and waits for it:
/// for a cleanup in `Drop`, which may run inside a runtime (no `block_on` there) or outside.
pub fn on_own_thread<F>(work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(work);
        }
    })
    .join();
}

/// `CREATE DATABASE` over a connection to `admin_url` (the counterpart of [`drop_database`]).
pub async fn create_database(admin_url: &str, db_name: &str) -> Result<(), sqlx::Error> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let sql = format!("CREATE DATABASE \"{db_name}\"");
    let created = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await.map(drop);
    let _ = admin.close().await;
    created
}

/// `admin_url` with its database replaced by `db_name`.
pub fn database_url(admin_url: &str, db_name: &str) -> Result<String, url::ParseError> {
    let mut url = url::Url::parse(admin_url)?;
    url.set_path(&format!("/{db_name}"));
    Ok(url.to_string())
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}
