//! Sandbox metadata in SQLite (`<state>/deltabox.db`): what exists survives daemon restarts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::api::SandboxInfo;
use crate::compaction::MergedLayer;

/// The metadata store.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
    /// How many checkpoint chains use each layer (kept in step with the `checkpoints` table), so that layer GC
    /// checks a candidate in O(1) instead of parsing every chain: with 10,000 checkpoints that parse took 35 ms.
    refs: Mutex<HashMap<String, usize>>,
}

/// Store errors are internal errors for the API.
#[derive(Debug, thiserror::Error)]
#[error("state database: {0}")]
pub struct StoreError(#[from] rusqlite::Error);

impl Store {
    /// Opens (creating if needed) the database.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS sandboxes (
                id TEXT PRIMARY KEY,
                status TEXT NOT NULL,
                reason TEXT,
                image TEXT NOT NULL,
                image_digest TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                memory_bytes INTEGER,
                pids INTEGER,
                cpus REAL,
                network TEXT NOT NULL
             );",
        )?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version < 1 {
            // Step 2: layer chains. A sandbox runs on `upper` (its writable layer) over `chain` (frozen layers,
            // topmost first) over `base` (image layers, host paths); `head` is the checkpoint it last took or
            // rolled back to.
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE sandboxes ADD COLUMN upper TEXT NOT NULL DEFAULT '';
                 ALTER TABLE sandboxes ADD COLUMN chain TEXT NOT NULL DEFAULT '[]';
                 ALTER TABLE sandboxes ADD COLUMN base TEXT NOT NULL DEFAULT '[]';
                 ALTER TABLE sandboxes ADD COLUMN head TEXT;
                 CREATE TABLE IF NOT EXISTS checkpoints (
                    id TEXT PRIMARY KEY,
                    sandbox_id TEXT NOT NULL,
                    parent TEXT,
                    chain TEXT NOT NULL,
                    base TEXT NOT NULL,
                    created_at INTEGER NOT NULL
                 );
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        if version < 2 {
            // Compaction: merged layers (each replaces a run of `parts`, topmost first, covering `span`
            // checkpoints), and each checkpoint's chain length so that long chains are found without parsing all.
            conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS merged_layers (
                    id TEXT PRIMARY KEY,
                    parts TEXT NOT NULL,
                    span INTEGER NOT NULL,
                    created_at INTEGER NOT NULL
                 );
                 ALTER TABLE checkpoints ADD COLUMN chain_len INTEGER NOT NULL DEFAULT 0;
                 UPDATE checkpoints SET chain_len = json_array_length(chain);
                 CREATE INDEX IF NOT EXISTS checkpoints_chain_len ON checkpoints(chain_len);
                 PRAGMA user_version = 2;
                 COMMIT;",
            )?;
        }
        if version < 3 {
            // Step 3: whether a checkpoint holds its processes too.
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE checkpoints ADD COLUMN processes INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 3;
                 COMMIT;",
            )?;
        }
        if version < 4 {
            // Step 4: pinned checkpoints survive `gc`.
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE checkpoints ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
                 PRAGMA user_version = 4;
                 COMMIT;",
            )?;
        }
        let mut refs = HashMap::new();
        {
            let mut stmt = conn.prepare("SELECT chain FROM checkpoints")?;
            for chain in stmt.query_map([], |r| r.get::<_, String>(0))? {
                for l in from_json::<Vec<String>>(chain?) {
                    *refs.entry(l).or_insert(0) += 1;
                }
            }
        }
        Ok(Store {
            conn: Mutex::new(conn),
            refs: Mutex::new(refs),
        })
    }

    fn add_refs(&self, chain: &[String]) {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        for l in chain {
            *refs.entry(l.clone()).or_insert(0) += 1;
        }
    }

    /// Drops one reference per layer of `chain`; returns the layers no checkpoint uses any more.
    fn drop_refs(&self, chain: &[String]) -> Vec<String> {
        let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
        let mut orphans = Vec::new();
        for l in chain {
            if let Some(n) = refs.get_mut(l) {
                *n -= 1;
                if *n == 0 {
                    refs.remove(l);
                    orphans.push(l.clone());
                }
            }
        }
        orphans
    }

    /// Whether some checkpoint's chain uses `layer`.
    pub fn checkpoint_uses(&self, layer: &str) -> bool {
        self.refs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(layer)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new sandbox.
    pub fn insert(&self, s: &SandboxInfo) -> Result<(), StoreError> {
        self.conn().prepare_cached("INSERT INTO sandboxes (id, status, reason, image, image_digest, created_at, memory_bytes, pids, cpus, network)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)")?.execute(params![
                s.id,
                s.status,
                s.reason,
                s.image,
                s.image_digest,
                s.created_at,
                s.memory_bytes.map(|v| v as i64),
                s.pids.map(|v| v as i64),
                s.cpus,
                s.network
            ])?;
        Ok(())
    }

    /// Updates status and reason.
    pub fn set_status(
        &self,
        id: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached("UPDATE sandboxes SET status = ?2, reason = ?3 WHERE id = ?1")?
            .execute(params![id, status, reason])?;
        Ok(())
    }

    /// Removes a sandbox's record.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        Ok(())
    }

    fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SandboxInfo> {
        Ok(SandboxInfo {
            id: r.get(0)?,
            status: r.get(1)?,
            reason: r.get(2)?,
            image: r.get(3)?,
            image_digest: r.get(4)?,
            created_at: r.get(5)?,
            memory_bytes: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            pids: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
            cpus: r.get(8)?,
            network: r.get(9)?,
            init_pid: None,
            sessions: 0,
            upper: None,
            head: None,
            depth: 0,
            branch_of: None,
            forked_processes: Vec::new(),
            note: None,
        })
    }

    /// One sandbox.
    pub fn get(&self, id: &str) -> Result<Option<SandboxInfo>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT id, status, reason, image, image_digest, created_at, memory_bytes, pids, cpus, network FROM sandboxes WHERE id = ?1")?
            .query_row(params![id],
                Self::row,
            )
            .optional()?)
    }

    /// Every sandbox, oldest first.
    pub fn list(&self) -> Result<Vec<SandboxInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, status, reason, image, image_digest, created_at, memory_bytes, pids, cpus, network FROM sandboxes ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], Self::row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }
}

/// Where a sandbox's files are: its writable layer, its frozen chain and its base.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsState {
    /// Writable layer id.
    pub upper: String,
    /// Frozen layer ids, topmost first.
    pub chain: Vec<String>,
    /// Base image layers (host paths), topmost first.
    pub base: Vec<std::path::PathBuf>,
    /// Checkpoint last taken or rolled back to.
    pub head: Option<String>,
}

/// A checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRow {
    /// Id (`c-…`).
    pub id: String,
    /// Sandbox it was taken of.
    pub sandbox_id: String,
    /// The checkpoint this one extends (the sandbox's head when it was taken).
    pub parent: Option<String>,
    /// Frozen layer ids, topmost first: the checkpoint's files.
    pub chain: Vec<String>,
    /// Base image layers.
    pub base: Vec<std::path::PathBuf>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Whether its processes were checkpointed too.
    #[serde(default)]
    pub processes: bool,
    /// Kept by `gc`.
    #[serde(default)]
    pub pinned: bool,
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".into())
}

fn from_json<T: serde::de::DeserializeOwned + Default>(s: String) -> T {
    serde_json::from_str(&s).unwrap_or_default()
}

impl Store {
    /// A sandbox's layers.
    pub fn fs_state(&self, id: &str) -> Result<Option<FsState>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT upper, chain, base, head FROM sandboxes WHERE id = ?1")?
            .query_row(params![id], |r| {
                Ok(FsState {
                    upper: r.get(0)?,
                    chain: from_json(r.get(1)?),
                    base: from_json(r.get(2)?),
                    head: r.get(3)?,
                })
            })
            .optional()?)
    }

    /// Records a sandbox's layers.
    pub fn set_fs_state(&self, id: &str, fs: &FsState) -> Result<(), StoreError> {
        self.conn()
            .prepare_cached(
                "UPDATE sandboxes SET upper = ?2, chain = ?3, base = ?4, head = ?5 WHERE id = ?1",
            )?
            .execute(params![
                id,
                fs.upper,
                json(&fs.chain),
                json(&fs.base),
                fs.head
            ])?;
        Ok(())
    }

    /// Records a checkpoint and the sandbox's new layers in one transaction: both or neither.
    pub fn record_checkpoint(&self, c: &CheckpointRow, fs: &FsState) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO checkpoints (id, sandbox_id, parent, chain, base, created_at, chain_len, processes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![c.id, c.sandbox_id, c.parent, json(&c.chain), json(&c.base), c.created_at, c.chain.len() as i64, c.processes],
        )?;
        tx.execute(
            "UPDATE sandboxes SET upper = ?2, chain = ?3, base = ?4, head = ?5 WHERE id = ?1",
            params![
                c.sandbox_id,
                fs.upper,
                json(&fs.chain),
                json(&fs.base),
                fs.head
            ],
        )?;
        tx.commit()?;
        self.add_refs(&c.chain);
        Ok(())
    }

    fn checkpoint_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CheckpointRow> {
        Ok(CheckpointRow {
            id: r.get(0)?,
            sandbox_id: r.get(1)?,
            parent: r.get(2)?,
            chain: from_json(r.get(3)?),
            base: from_json(r.get(4)?),
            created_at: r.get(5)?,
            processes: r.get(6)?,
            pinned: r.get(7)?,
        })
    }

    /// Pins or unpins checkpoint `id` (`gc` keeps pinned checkpoints and everything they need).
    pub fn set_pinned(&self, id: &str, pinned: bool) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("UPDATE checkpoints SET pinned = ?2 WHERE id = ?1")?
            .execute(params![id, pinned])?
            == 1)
    }

    /// Whether checkpoint `id` was taken with its processes.
    pub fn checkpoint_has_processes(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT processes FROM checkpoints WHERE id = ?1")?
            .query_row(params![id], |r| r.get(0))
            .optional()?
            .unwrap_or(false))
    }

    /// One checkpoint.
    pub fn checkpoint(&self, id: &str) -> Result<Option<CheckpointRow>, StoreError> {
        Ok(self
            .conn()
            .prepare_cached("SELECT id, sandbox_id, parent, chain, base, created_at, processes, pinned FROM checkpoints WHERE id = ?1")?
            .query_row(params![id],
                Self::checkpoint_row,
            )
            .optional()?)
    }

    /// A sandbox's checkpoints, oldest first.
    pub fn checkpoints_of(&self, sandbox: &str) -> Result<Vec<CheckpointRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, sandbox_id, parent, chain, base, created_at, processes, pinned FROM checkpoints WHERE sandbox_id = ?1 ORDER BY created_at, rowid",
        )?;
        let rows = stmt.query_map(params![sandbox], Self::checkpoint_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Every checkpoint.
    pub fn all_checkpoints(&self) -> Result<Vec<CheckpointRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, sandbox_id, parent, chain, base, created_at, processes, pinned FROM checkpoints ORDER BY created_at, rowid")?;
        let rows = stmt.query_map([], Self::checkpoint_row)?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Deletes one checkpoint record; returns the layers no checkpoint uses any more.
    pub fn delete_checkpoint(&self, id: &str) -> Result<Vec<String>, StoreError> {
        self.delete_checkpoints_where("id", id)
    }

    /// Deletes a sandbox's checkpoints; returns the layers no checkpoint uses any more.
    pub fn delete_checkpoints_of(&self, sandbox: &str) -> Result<Vec<String>, StoreError> {
        self.delete_checkpoints_where("sandbox_id", sandbox)
    }

    fn delete_checkpoints_where(
        &self,
        column: &str,
        value: &str,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let chains: Vec<Vec<String>> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT chain FROM checkpoints WHERE {column} = ?1"
            ))?;
            let rows = stmt.query_map(params![value], |r| Ok(from_json(r.get(0)?)))?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        tx.execute(
            &format!("DELETE FROM checkpoints WHERE {column} = ?1"),
            params![value],
        )?;
        tx.commit()?;
        Ok(chains.iter().flat_map(|c| self.drop_refs(c)).collect())
    }

    /// Every layer id some sandbox or checkpoint still uses.
    pub fn referenced_layers(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut out = self.sandbox_layers()?;
        out.extend(
            self.refs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned(),
        );
        Ok(out)
    }

    /// Every layer id a sandbox uses (writable layer and mounted chain).
    pub fn sandbox_layers(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let conn = self.conn();
        let mut out = std::collections::HashSet::new();
        let mut stmt = conn.prepare("SELECT upper, chain FROM sandboxes")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (upper, chain) = row?;
            out.insert(upper);
            out.extend(from_json::<Vec<String>>(chain));
        }
        Ok(out)
    }
}

impl Store {
    /// Every merged layer.
    pub fn merged_layers(&self) -> Result<Vec<MergedLayer>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, parts, span FROM merged_layers")?;
        let rows = stmt.query_map([], |r| {
            Ok(MergedLayer {
                id: r.get(0)?,
                parts: from_json(r.get(1)?),
                span: r.get::<_, i64>(2)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Checkpoints whose chains have at least `min_len` layers: (id, chain).
    pub fn long_chains(&self, min_len: usize) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, chain FROM checkpoints WHERE chain_len >= ?1")?;
        let rows = stmt.query_map(params![min_len as i64], |r| {
            Ok((r.get::<_, String>(0)?, from_json(r.get(1)?)))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    }

    /// Records merged layers and the checkpoint chains rewritten to use them, in one transaction; returns the
    /// layers no checkpoint uses any more.
    pub fn record_merges(
        &self,
        merged: &[MergedLayer],
        rewritten: &[(String, Vec<String>)],
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for m in merged {
            tx.execute(
                "INSERT INTO merged_layers (id, parts, span, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![m.id, json(&m.parts), m.span as i64, now],
            )?;
        }
        let mut old = Vec::new();
        for (id, chain) in rewritten {
            let before: Option<String> = tx
                .query_row(
                    "SELECT chain FROM checkpoints WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(before) = before else { continue };
            tx.execute(
                "UPDATE checkpoints SET chain = ?2, chain_len = ?3 WHERE id = ?1",
                params![id, json(chain), chain.len() as i64],
            )?;
            old.push((from_json::<Vec<String>>(before), chain));
        }
        tx.commit()?;
        let mut orphans = Vec::new();
        for (before, after) in old {
            self.add_refs(after);
            orphans.extend(self.drop_refs(&before));
        }
        Ok(orphans)
    }

    /// Forgets merged layers (their directories are being deleted).
    pub fn delete_merged(&self, ids: &[String]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for id in ids {
            tx.execute("DELETE FROM merged_layers WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        Ok(())
    }
}

impl From<StoreError> for crate::ApiError {
    fn from(e: StoreError) -> Self {
        crate::ApiError::internal(e)
    }
}
