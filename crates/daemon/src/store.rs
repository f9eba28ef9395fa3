//! Sandbox metadata in SQLite (`<state>/deltabox.db`): what exists survives daemon restarts.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::api::SandboxInfo;

/// The metadata store.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
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
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new sandbox.
    pub fn insert(&self, s: &SandboxInfo) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO sandboxes (id, status, reason, image, image_digest, created_at, memory_bytes, pids, cpus, network)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
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
            ],
        )?;
        Ok(())
    }

    /// Updates status and reason.
    pub fn set_status(
        &self,
        id: &str,
        status: &str,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET status = ?2, reason = ?3 WHERE id = ?1",
            params![id, status, reason],
        )?;
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
        })
    }

    /// One sandbox.
    pub fn get(&self, id: &str) -> Result<Option<SandboxInfo>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT id, status, reason, image, image_digest, created_at, memory_bytes, pids, cpus, network FROM sandboxes WHERE id = ?1",
                params![id],
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

impl From<StoreError> for crate::ApiError {
    fn from(e: StoreError) -> Self {
        crate::ApiError::internal(e)
    }
}
