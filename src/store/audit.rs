//! The audit log of operator actions (`turnd_audit`): appended to by every replay, purge and
//! cancel, from the command line, the API and the console; listed by `turnd audit`, the API
//! and the console. Append-only: nothing here updates or deletes a row, and a trigger refuses
//! it to anyone else (migration 0003).

use super::*;

/// Who acted and through what: the admin token's name (`http.admin_token_name`) for the API
/// and the console, the OS user for the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub who: String,
    /// "cli", "api" or "console".
    pub via: &'static str,
}

/// One recorded action.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    /// RFC 3339, UTC.
    pub at: String,
    pub age_s: f64,
    pub who: String,
    pub via: String,
    pub action: String,
    pub target: String,
    pub result: String,
}

/// Appends one row, in the caller's transaction (or on the pool).
pub(super) async fn append<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    actor: &Actor,
    action: &str,
    target: &str,
    result: &str,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO turnd_audit (who, via, action, target, result) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&actor.who)
    .bind(actor.via)
    .bind(action)
    .bind(target)
    .bind(result)
    .execute(executor)
    .await?;
    Ok(())
}

impl Store {
    /// Records an action whose own statement ran elsewhere (a replay's publish, a purge).
    pub async fn audit(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        result: &str,
    ) -> Result<()> {
        append(&self.pool, actor, action, target, result).await
    }

    /// The newest actions first, at most `limit` (clamped to [`MAX_LIST_ROWS`]); with
    /// `action`, only those.
    pub async fn audit_list(&self, action: Option<&str>, limit: i64) -> Result<Vec<AuditRow>> {
        Ok(sqlx::query_as(
            "SELECT id, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') AS at,
                    EXTRACT(EPOCH FROM now() - at)::float8 AS age_s,
                    who, via, action, target, result
             FROM turnd_audit WHERE ($1::text IS NULL OR action = $1)
             ORDER BY id DESC LIMIT $2",
        )
        .bind(action)
        .bind(list_limit(limit))
        .fetch_all(&self.pool)
        .await?)
    }
}
