//! The file API: a running sandbox's files as its processes see them (`deltabox_runtime::files` does the
//! resolving inside the sandbox's root). Changes are serialized with checkpoints and rollbacks of the sandbox,
//! so a write lands whole in one generation.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use deltabox_runtime::files::{self, EntryInfo, FileError};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::daemon::Daemon;
use crate::error::ApiError;
use crate::server::ApiQuery;

/// Largest file read or written through the API.
pub const MAX_FILE: u64 = 256 << 20;

/// `?path=/abs/path[&mode=644]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathQuery {
    /// Absolute path in the sandbox.
    pub path: String,
    /// Permission bits of a file written, octal (`644`, `0755`); default 644.
    #[serde(default)]
    pub mode: Option<String>,
}

impl From<FileError> for ApiError {
    fn from(e: FileError) -> Self {
        let (status, code) = match &e {
            FileError::BadPath(_) => (StatusCode::BAD_REQUEST, "invalid_path"),
            FileError::NotFound(_) => (StatusCode::NOT_FOUND, "file_not_found"),
            FileError::IsDir(_) => (StatusCode::BAD_REQUEST, "is_a_directory"),
            FileError::NotDir(_) => (StatusCode::BAD_REQUEST, "not_a_directory"),
            FileError::TooLarge(..) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            FileError::Io(_, io) if io.raw_os_error() == Some(libc::ENOSPC) => {
                (StatusCode::INSUFFICIENT_STORAGE, "disk_full")
            }
            FileError::Io(_, io) if io.raw_os_error() == Some(libc::EACCES) => {
                (StatusCode::FORBIDDEN, "permission_denied")
            }
            FileError::Io(..) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

fn mode_of(q: &PathQuery) -> Result<u32, ApiError> {
    match &q.mode {
        None => Ok(0o644),
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| ApiError::invalid(format!("mode {m:?}: not octal permission bits"))),
    }
}

impl Daemon {
    /// The init pid of running sandbox `id`, whose root the file calls resolve in.
    async fn files_root(&self, id: &str) -> Result<(Arc<crate::sandbox::Sandbox>, i32), ApiError> {
        let sb = self.live_sandbox(id).await?;
        if !sb.handle.is_alive() {
            return Err(ApiError::conflict(
                "sandbox_not_running",
                format!("sandbox {id} is not running"),
            ));
        }
        let pid = sb.handle.init_pid();
        Ok((sb, pid))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("file task: {e}")))?
        .map_err(ApiError::from)
}

type D = State<Arc<Daemon>>;

/// `GET /v1/sandboxes/{id}/files?path=` — the file's bytes.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "sandbox id"), ("path" = String, Query, description = "absolute path in the sandbox")), responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream", body = Vec<u8>), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody), (status = 413, description = "too large", body = crate::error::ErrorBody)))]
pub async fn read(
    State(d): D,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let (_sb, pid) = d.files_root(&id).await?;
    let data = blocking(move || files::read(pid, &q.path, MAX_FILE)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], data))
}

/// `PUT /v1/sandboxes/{id}/files?path=[&mode=]` — the body becomes the file (parents made as needed).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "sandbox id"), ("path" = String, Query, description = "absolute path in the sandbox"), ("mode" = Option<String>, Query, description = "octal permission bits, default 644")), request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 200, body = EntryInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody), (status = 413, description = "too large", body = crate::error::ErrorBody)))]
pub async fn write(
    State(d): D,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
    body: Body,
) -> Result<Json<EntryInfo>, ApiError> {
    let mode = mode_of(&q)?;
    files::relative(&q.path)?;
    let data = http_body_util::Limited::new(body, MAX_FILE as usize)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError {
                    status: StatusCode::PAYLOAD_TOO_LARGE,
                    code: "too_large",
                    message: format!("{}: larger than {MAX_FILE} bytes", q.path),
                }
            } else {
                ApiError::invalid(format!("reading the upload: {e}"))
            }
        })?
        .to_bytes();
    let (sb, pid) = d.files_root(&id).await?;
    let _g = sb.lifecycle.lock().await;
    Ok(Json(
        blocking(move || files::write(pid, &q.path, &data, mode)).await?,
    ))
}

/// `DELETE /v1/sandboxes/{id}/files?path=` — a file, a link, or a directory with everything in it.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path, description = "sandbox id"), ("path" = String, Query, description = "absolute path in the sandbox")), responses((status = 204, description = "removed"), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
pub async fn remove(
    State(d): D,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let (sb, pid) = d.files_root(&id).await?;
    let _g = sb.lifecycle.lock().await;
    blocking(move || files::remove(pid, &q.path)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/sandboxes/{id}/files/list?path=` — a directory's entries.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/list", tag = "files", params(("id" = String, Path, description = "sandbox id"), ("path" = String, Query, description = "absolute path in the sandbox")), responses((status = 200, body = Vec<EntryInfo>), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
pub async fn list(
    State(d): D,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<Vec<EntryInfo>>, ApiError> {
    let (_sb, pid) = d.files_root(&id).await?;
    Ok(Json(blocking(move || files::list(pid, &q.path)).await?))
}

/// `GET /v1/sandboxes/{id}/files/stat?path=` — what a path is.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files/stat", tag = "files", params(("id" = String, Path, description = "sandbox id"), ("path" = String, Query, description = "absolute path in the sandbox")), responses((status = 200, body = EntryInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
pub async fn stat(
    State(d): D,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<EntryInfo>, ApiError> {
    let (_sb, pid) = d.files_root(&id).await?;
    Ok(Json(blocking(move || files::stat(pid, &q.path)).await?))
}

/// `POST /v1/sandboxes/{id}/files/mkdir?path=` — a directory and its missing parents.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/files/mkdir", tag = "files", params(("id" = String, Path, description = "sandbox id"), ("path" = String, Query, description = "absolute path in the sandbox")), responses((status = 200, body = EntryInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
pub async fn mkdir(
    State(d): D,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PathQuery>,
) -> Result<Json<EntryInfo>, ApiError> {
    let (sb, pid) = d.files_root(&id).await?;
    let _g = sb.lifecycle.lock().await;
    Ok(Json(blocking(move || files::mkdir(pid, &q.path)).await?))
}
