//! Operator actions on parked turns: replay once, purge (shared by `turnd parked` and the
//! API through `crate::parked`).

use super::views::PARKED_COLUMNS;
use super::*;

impl Store {
    /// Claims a parked turn for replay, once: marks it replayed by `who` and, in the same
    /// transaction, clears the turn's record (its tombstone and its published error event) so
    /// the republished turn is accepted again (CONTRACT §2). None if already replayed.
    pub async fn parked_claim_replay(&self, id: i64, who: &str) -> Result<Option<ParkedTurn>> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE turnd_parked SET replayed_at = now(), replayed_by = $2
             WHERE id = $1 AND replayed_at IS NULL RETURNING {PARKED_COLUMNS}, body, headers"
        );
        let parked: Option<ParkedTurn> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .bind(who)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(p) = &parked
            && let (Some(d), Some(m)) = (&p.parked.deployment, &p.parked.message_id)
        {
            sqlx::query("DELETE FROM turnd_turns WHERE deployment = $1 AND message_id = $2 AND state = 'done'")
                    .bind(d)
                    .bind(m)
                    .execute(&mut *tx)
                    .await?;
            sqlx::query("DELETE FROM turnd_outbox WHERE deployment = $1 AND message_id = $2")
                .bind(d)
                .bind(m)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(parked)
    }

    /// Undoes a replay claim whose publish failed.
    pub async fn parked_unclaim_replay(&self, id: i64) -> Result<()> {
        sqlx::query("UPDATE turnd_parked SET replayed_at = NULL, replayed_by = NULL WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes parked records by id, or by code and/or age. Returns the ids deleted.
    pub async fn parked_purge(
        &self,
        ids: &[i64],
        code: Option<&str>,
        older_than: Option<Duration>,
    ) -> Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "DELETE FROM turnd_parked
             WHERE (cardinality($1::bigint[]) = 0 OR id = ANY($1))
               AND ($2::text IS NULL OR code = $2)
               AND ($3::bigint IS NULL OR parked_at < now() - $3::bigint * interval '1 millisecond')
             RETURNING id",
        )
        .bind(ids)
        .bind(code)
        .bind(older_than.map(millis))
        .fetch_all(&self.pool)
        .await?)
    }
}
