//! Online resharding: keys moved to a new layout while writes go on.
//!
//! The steps, each recorded in the control row and resumable after a crash (a
//! resharder that dies is started again and carries on from the last batch it
//! recorded; one resharder at a time, by a lease on the control database):
//!
//! 1. **copy**: routers write a moving key to its old shard and then its new one;
//!    the resharder copies every moving row to its new shard, each batch with its
//!    source rows locked (a concurrent write waits for the copy, then lands on
//!    both).
//! 2. **verify**: still double-writing, every moving row is compared with its copy
//!    (an md5 of the row's JSON on each side) and mended from the source; copies
//!    whose source row is gone are deleted.
//! 3. **freeze**: writes of moving keys are refused (retryable) and the
//!    comparison runs once more, now with nothing changing: the copies become
//!    exact.
//! 4. **cut**: reads and writes go to the new shards; after routers' views have
//!    had time to follow, the old copies are deleted (clean up).
//! 5. The new layout becomes the set's layout.
//!
//! Every phase change raises the epoch on every shard, which waits for writes made
//! under the previous phase to end and refuses any later one, so no router writes
//! by an outdated phase once the resharder acts on the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use sqlx::PgPool;

use crate::DataError;
use crate::control::{self, Phase, Progress, State, TableKey};
use crate::lease::{Lease, Leases};
use crate::shard_map::{Layout, ShardMap};
use crate::shards::{Server, Shards};

/// What a resharding does: the layout to move to, the tables to move.
#[derive(Clone, Debug)]
pub struct ReshardPlan {
    /// The new layout (its shards must be in the set's configuration).
    pub to: Layout,
    /// The tables to move, each with its shard key column.
    pub tables: Vec<TableKey>,
    /// Rows per batch (each batch locks its source rows while it is copied).
    pub batch: usize,
    /// The resharder's lease on the control database: another resharder may take
    /// over this long after this one stops renewing it.
    pub lease: Duration,
}

impl ReshardPlan {
    /// A plan to move `tables` to `to` in batches of 500 rows.
    pub fn new(to: Layout, tables: Vec<TableKey>) -> Self {
        ReshardPlan {
            to,
            tables,
            batch: 500,
            lease: Duration::from_secs(10),
        }
    }
}

/// Drives one resharding of a shard set to its end.
pub struct Resharder {
    shards: Shards,
    plan: ReshardPlan,
    leases: Leases,
    lease: Lease,
}

impl std::fmt::Debug for Resharder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resharder")
            .field("set", &self.shards.inner.name)
            .field("to", &self.plan.to)
            .finish_non_exhaustive()
    }
}

/// A table's names as SQL writes them, and its columns.
struct Table {
    name: String,
    key: String,
    key_type: String,
    /// Every column but the key, quoted.
    columns: Vec<String>,
    label: String,
}

impl Resharder {
    /// Starts the resharding of `shards` to `plan.to`, or resumes the one in
    /// progress if it is the same (the same layout and tables); refuses another.
    pub async fn begin(shards: &Shards, plan: ReshardPlan) -> Result<Self, DataError> {
        let set = shards.inner.name.clone();
        let Some(control) = &shards.inner.control else {
            return Err(
                palisade_core::ConfigErrors::one("control", "resharding needs a control database").into(),
            );
        };
        plan.to.map().map_err(|e| e.under("to"))?;
        if plan.tables.is_empty() {
            return Err(palisade_core::ConfigErrors::one("tables", "name at least one table to move").into());
        }
        if plan.batch == 0 {
            return Err(palisade_core::ConfigErrors::one("batch", "must be at least 1").into());
        }
        let holder = format!("resharder:{}:{:x}", std::process::id(), fastrand::u64(..));
        let leases = Leases::new(control.pool.clone(), holder).await?;
        let lease = leases.acquire(&format!("reshard:{set}"), plan.lease).await?;
        let state = control::load(&control.pool, &set).await?;
        let me = Resharder {
            shards: shards.clone(),
            plan,
            leases,
            lease,
        };
        me.servers_of(&me.plan.to)?;
        match state.phase {
            Phase::Idle if state.layout == me.plan.to => {
                Err(DataError::Control(format!("set {set} already has this layout")))
            }
            Phase::Idle => {
                let next = State {
                    epoch: state.epoch + 1,
                    phase: Phase::Copy,
                    layout: state.layout.clone(),
                    next: Some(me.plan.to.clone()),
                    tables: me.plan.tables.clone(),
                    progress: Progress::default(),
                };
                me.advance(&state, &next).await?;
                Ok(me)
            }
            _ if state.next.as_ref() == Some(&me.plan.to) && state.tables == me.plan.tables => Ok(me),
            _ => Err(DataError::Control(format!(
                "set {set} is being resharded to another layout (phase {})",
                state.phase.as_str()
            ))),
        }
    }

    /// Runs the resharding to its end from wherever it is, calling `report` after
    /// every batch; the progress at the end.
    pub async fn run(self, mut report: impl FnMut(Phase, &Progress)) -> Result<Progress, DataError> {
        loop {
            let state = self.load().await?;
            self.leases.renew(&self.lease).await?;
            let Some(next_layout) = state.next.clone() else {
                return Ok(state.progress);
            };
            self.bump_all(&state, &next_layout).await?;
            let tables = self.tables(&state).await?;
            let mut progress = state.progress.clone();
            let to = match state.phase {
                Phase::Idle => return Ok(progress),
                Phase::Copy => {
                    self.each_batch(&state, &tables, &mut progress, &mut report, Step::Copy)
                        .await?;
                    Phase::Verify
                }
                Phase::Verify => {
                    self.each_batch(&state, &tables, &mut progress, &mut report, Step::Sync)
                        .await?;
                    Phase::Freeze
                }
                Phase::Freeze => {
                    self.each_batch(&state, &tables, &mut progress, &mut report, Step::Sync)
                        .await?;
                    Phase::Cut
                }
                Phase::Cut => {
                    // Routers' reads follow the cut within three refreshes.
                    tokio::time::sleep(self.view_lifetime()).await;
                    self.each_batch(&state, &tables, &mut progress, &mut report, Step::Clean)
                        .await?;
                    Phase::Idle
                }
            };
            progress.cursors.clear();
            let next = State {
                epoch: state.epoch + 1,
                phase: to,
                layout: if to == Phase::Idle {
                    next_layout.clone()
                } else {
                    state.layout.clone()
                },
                next: (to != Phase::Idle).then_some(next_layout),
                tables: if to == Phase::Idle {
                    Vec::new()
                } else {
                    state.tables.clone()
                },
                progress,
            };
            self.advance(&state, &next).await?;
            report(to, &next.progress);
        }
    }

    fn control(&self) -> &PgPool {
        match &self.shards.inner.control {
            Some(c) => &c.pool,
            None => unreachable!("begin refuses a set without a control database"),
        }
    }

    fn view_lifetime(&self) -> Duration {
        self.shards.inner.control.as_ref().map_or(Duration::ZERO, |c| {
            c.refresh.saturating_mul(3) + Duration::from_millis(50)
        })
    }

    async fn load(&self) -> Result<State, DataError> {
        control::load(self.control(), &self.shards.inner.name).await
    }

    async fn advance(&self, from: &State, to: &State) -> Result<(), DataError> {
        let set = &self.shards.inner.name;
        if !control::advance(self.control(), set, from, to).await? {
            return Err(DataError::Control(format!(
                "set {set}'s resharding was moved on by another resharder"
            )));
        }
        tracing::info!(set = %set, epoch = to.epoch, phase = to.phase.as_str(), "resharding: phase changed");
        Ok(())
    }

    /// The servers of `layout`, in its order.
    fn servers_of(&self, layout: &Layout) -> Result<Vec<&Server>, DataError> {
        let all = &self.shards.inner.servers;
        layout
            .shards
            .iter()
            .map(|name| {
                all.iter().find(|s| s.name == *name).map(|s| &**s).ok_or_else(|| {
                    palisade_core::ConfigErrors::one(
                        "to.shards",
                        format!("shard {name:?} is not in this configuration"),
                    )
                    .into()
                })
            })
            .collect()
    }

    /// Raises every shard of both layouts to the state's epoch.
    async fn bump_all(&self, state: &State, next: &Layout) -> Result<(), DataError> {
        let mut servers = self.servers_of(&state.layout)?;
        for s in self.servers_of(next)? {
            if !servers.iter().any(|o| o.name == s.name) {
                servers.push(s);
            }
        }
        for s in servers {
            control::bump(&s.pool, &self.shards.inner.name, state.epoch)
                .await
                .map_err(|e| unavailable(s, e))?;
        }
        Ok(())
    }

    async fn tables(&self, state: &State) -> Result<Vec<Table>, DataError> {
        let first = self.servers_of(&state.layout)?[0];
        let mut out = Vec::new();
        for t in &state.tables {
            out.push(Table::describe(&first.pool, t).await?);
        }
        Ok(out)
    }

    /// One step over every batch of every table on every shard of the old layout,
    /// from the cursors recorded.
    async fn each_batch(
        &self,
        state: &State,
        tables: &[Table],
        progress: &mut Progress,
        report: &mut impl FnMut(Phase, &Progress),
        step: Step,
    ) -> Result<(), DataError> {
        let old_map = state.layout.map()?;
        let Some(next) = &state.next else { return Ok(()) };
        let new_map = next.map()?;
        let old = self.servers_of(&state.layout)?;
        let new = self.servers_of(next)?;
        let maps = Maps {
            old: &old_map,
            new: &new_map,
            old_servers: &old,
            new_servers: &new,
        };
        for table in tables {
            for source in &old {
                self.walk(state, table, source, &maps, progress, report, step)
                    .await?;
            }
            if step == Step::Sync {
                for target in &new {
                    self.walk(state, table, target, &maps, progress, report, Step::Strays)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Walks `server`'s keys of `table` in batches, doing `step` to each batch.
    #[allow(clippy::too_many_arguments)]
    async fn walk(
        &self,
        state: &State,
        table: &Table,
        server: &Server,
        maps: &Maps<'_>,
        progress: &mut Progress,
        report: &mut impl FnMut(Phase, &Progress),
        step: Step,
    ) -> Result<(), DataError> {
        let cursor_key = format!("{}/{}/{}", step.name(), table.label, server.name);
        loop {
            let after = progress.cursors.get(&cursor_key).cloned();
            let keys = table
                .keys_after(&server.pool, after.as_deref(), self.plan.batch)
                .await
                .map_err(|e| unavailable(server, e))?;
            let Some(last) = keys.last().cloned() else {
                return Ok(());
            };
            match step {
                Step::Copy | Step::Sync | Step::Clean => {
                    for (target, moving) in maps.moving_from(server, &keys) {
                        let n = moving.len() as u64;
                        match step {
                            Step::Copy => {
                                copy_rows(table, server, target, &moving).await?;
                                progress.copied += n;
                            }
                            Step::Sync => {
                                let differ = differing(table, server, target, &moving).await?;
                                if !differ.is_empty() {
                                    copy_rows(table, server, target, &differ).await?;
                                }
                                progress.verified += n;
                                progress.repaired += differ.len() as u64;
                            }
                            _ => {
                                table
                                    .delete(&server.pool, &moving)
                                    .await
                                    .map_err(|e| unavailable(server, e))?;
                                progress.cleaned += n;
                            }
                        }
                    }
                }
                Step::Strays => {
                    for (source, copies) in maps.copies_on(server, &keys) {
                        let gone = table
                            .absent(&source.pool, &copies)
                            .await
                            .map_err(|e| unavailable(source, e))?;
                        if !gone.is_empty() {
                            copy_rows(table, source, server, &gone).await?;
                            progress.repaired += gone.len() as u64;
                        }
                    }
                }
            }
            progress.cursors.insert(cursor_key.clone(), last);
            control::record(self.control(), &self.shards.inner.name, state.epoch, progress).await?;
            self.leases.renew(&self.lease).await?;
            report(state.phase, progress);
        }
    }
}

/// What a walk over one shard's keys does to each batch.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Copy the moving rows to their new shard.
    Copy,
    /// Compare the moving rows with their copies and mend the copies.
    Sync,
    /// On a new shard: delete copies whose source row is gone.
    Strays,
    /// Delete the moving rows from their old shard.
    Clean,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Step::Copy => "copy",
            Step::Sync => "sync",
            Step::Strays => "strays",
            Step::Clean => "clean",
        }
    }
}

/// Both layouts' maps and servers.
struct Maps<'a> {
    old: &'a ShardMap,
    new: &'a ShardMap,
    old_servers: &'a [&'a Server],
    new_servers: &'a [&'a Server],
}

impl<'a> Maps<'a> {
    /// `keys` (on `source`, their old shard) that move, grouped by new shard.
    fn moving_from(&self, source: &Server, keys: &[String]) -> Vec<(&'a Server, Vec<String>)> {
        let mut by_target: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for k in keys {
            let old = self.old_servers[self.old.shard_of(k.as_bytes())];
            let new = self.new.shard_of(k.as_bytes());
            if old.name == source.name && self.new_servers[new].name != source.name {
                by_target.entry(new).or_default().push(k.clone());
            }
        }
        by_target
            .into_iter()
            .map(|(i, ks)| (self.new_servers[i], ks))
            .collect()
    }

    /// `keys` on `target` that are copies (their old shard is another), grouped by
    /// their old shard.
    fn copies_on(&self, target: &Server, keys: &[String]) -> Vec<(&'a Server, Vec<String>)> {
        let mut by_source: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for k in keys {
            let old = self.old.shard_of(k.as_bytes());
            let new = self.new_servers[self.new.shard_of(k.as_bytes())];
            if self.old_servers[old].name != target.name && new.name == target.name {
                by_source.entry(old).or_default().push(k.clone());
            }
        }
        by_source
            .into_iter()
            .map(|(i, ks)| (self.old_servers[i], ks))
            .collect()
    }
}

fn unavailable(server: &Server, e: sqlx::Error) -> DataError {
    DataError::ShardUnavailable {
        shard: server.name.clone(),
        reason: e.to_string(),
    }
}

/// `name` quoted as an SQL identifier (`schema.table` quoted part by part).
fn quote(name: &str) -> Result<String, DataError> {
    if name.is_empty() || name.contains('\0') {
        return Err(palisade_core::ConfigErrors::one(
            "tables",
            format!("{name:?} is not a table or column name"),
        )
        .into());
    }
    Ok(name
        .split('.')
        .map(|part| format!("\"{}\"", part.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join("."))
}

impl Table {
    /// The table's key type and columns, as the server describes them.
    async fn describe(pool: &PgPool, t: &TableKey) -> Result<Table, DataError> {
        let name = quote(&t.table)?;
        let columns: Vec<(String, String)> = sqlx::query_as(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
             WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        )
        .bind(&name)
        .fetch_all(pool)
        .await?;
        let Some((_, key_type)) = columns.iter().find(|(c, _)| *c == t.key) else {
            return Err(palisade_core::ConfigErrors::one(
                "tables",
                format!("table {} has no column {:?}", t.table, t.key),
            )
            .into());
        };
        Ok(Table {
            key: quote(&t.key)?,
            key_type: key_type.clone(),
            columns: columns
                .iter()
                .filter(|(c, _)| *c != t.key)
                .map(|(c, _)| quote(c))
                .collect::<Result<_, _>>()?,
            label: t.table.clone(),
            name,
        })
    }

    /// The `$1` key list as the key's type.
    fn keys_param(&self) -> String {
        format!("$1::text[]::{}[]", self.key_type)
    }

    /// Up to `limit` keys after `after` (in key order), as text.
    async fn keys_after(
        &self,
        pool: &PgPool,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, sqlx::Error> {
        let sql = format!(
            // Ordered by the column itself (an unqualified name would be the text
            // output column, in another order than the cursor's comparison).
            "SELECT r.{k}::text FROM {t} r WHERE $1::text IS NULL OR r.{k} > $1::text::{ty} ORDER BY r.{k} LIMIT $2",
            k = self.key,
            t = self.name,
            ty = self.key_type
        );
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await
    }

    /// `SELECT key, <what>` of the rows with the `$1` keys, then `suffix`.
    fn select_by_keys(&self, what: &str, suffix: &str) -> String {
        format!(
            "SELECT r.{k}::text, {what} FROM {t} r WHERE r.{k} = ANY({p}) {suffix}",
            k = self.key,
            t = self.name,
            p = self.keys_param()
        )
    }

    /// `DELETE` of the rows with the `$1` keys.
    fn delete_by_keys(&self) -> String {
        format!(
            "DELETE FROM {t} WHERE {k} = ANY({p})",
            t = self.name,
            k = self.key,
            p = self.keys_param()
        )
    }

    /// Each of `keys`' row hash.
    async fn hashes(&self, pool: &PgPool, keys: &[String]) -> Result<BTreeMap<String, String>, sqlx::Error> {
        let sql = self.select_by_keys("md5(row_to_json(r)::text)", "");
        let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(keys)
            .fetch_all(pool)
            .await?;
        Ok(rows.into_iter().collect())
    }

    /// Which of `keys` have no row.
    async fn absent(&self, pool: &PgPool, keys: &[String]) -> Result<Vec<String>, sqlx::Error> {
        let present = self.hashes(pool, keys).await?;
        Ok(keys
            .iter()
            .filter(|k| !present.contains_key(*k))
            .cloned()
            .collect())
    }

    async fn delete(&self, conn: &PgPool, keys: &[String]) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(self.delete_by_keys()))
            .bind(keys)
            .execute(conn)
            .await?;
        Ok(())
    }
}

/// Which of `keys` differ between `source` and `target` (a different row, or a
/// row on one side only).
async fn differing(
    table: &Table,
    source: &Server,
    target: &Server,
    keys: &[String],
) -> Result<Vec<String>, DataError> {
    let a = table
        .hashes(&source.pool, keys)
        .await
        .map_err(|e| unavailable(source, e))?;
    let b = table
        .hashes(&target.pool, keys)
        .await
        .map_err(|e| unavailable(target, e))?;
    let all: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    Ok(all
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect())
}

/// Makes `keys`' rows on `target` what they are on `source`: the source rows
/// locked (a write to them waits), upserted on the target, and the keys the
/// source lacks deleted there; the target committed before the source lets go.
async fn copy_rows(
    table: &Table,
    source: &Server,
    target: &Server,
    keys: &[String],
) -> Result<(), DataError> {
    let mut src = palisade_core::db::begin(&source.pool)
        .await
        .map_err(|e| unavailable(source, e))?;
    let sql = table.select_by_keys("row_to_json(r)::text", "FOR UPDATE");
    let rows: Vec<(String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(keys)
        .fetch_all(&mut *src)
        .await
        .map_err(|e| unavailable(source, e))?;
    let mut dst = palisade_core::db::begin(&target.pool)
        .await
        .map_err(|e| unavailable(target, e))?;
    if !rows.is_empty() {
        let set = if table.columns.is_empty() {
            "NOTHING".to_string()
        } else {
            let assignments: Vec<String> = table
                .columns
                .iter()
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            format!("UPDATE SET {}", assignments.join(", "))
        };
        let sql = format!(
            "INSERT INTO {t} SELECT * FROM json_populate_recordset(NULL::{t}, $1::json) ON CONFLICT ({k}) DO {set}",
            t = table.name,
            k = table.key
        );
        let json = format!(
            "[{}]",
            rows.iter().map(|(_, j)| j.as_str()).collect::<Vec<_>>().join(",")
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(json)
            .execute(&mut *dst)
            .await
            .map_err(|e| unavailable(target, e))?;
    }
    let present: BTreeSet<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
    let gone: Vec<String> = keys
        .iter()
        .filter(|k| !present.contains(k.as_str()))
        .cloned()
        .collect();
    if !gone.is_empty() {
        let sql = table.delete_by_keys();
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&gone)
            .execute(&mut *dst)
            .await
            .map_err(|e| unavailable(target, e))?;
    }
    dst.commit().await.map_err(|e| unavailable(target, e))?;
    src.commit().await.map_err(|e| unavailable(source, e))?;
    Ok(())
}
