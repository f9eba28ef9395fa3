//! HTTP routes (`/v1/…`) over the daemon's operations.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::api::{CreateSandbox, ExecBody, RunInSession, StartSession, StreamEvent};
use crate::{ApiError, Daemon};

/// Largest request body accepted.
pub const MAX_BODY: usize = 16 << 20;

/// JSON body extractor whose rejections use the API's error format.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError {
                status: e.status(),
                code: "invalid_request",
                message: e.body_text(),
            })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// Query-string extractor whose rejection is an [`ApiError`] (JSON, stable code) like every other error.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

type D = State<Arc<Daemon>>;

/// The API document (OpenAPI 3.1), generated from the handlers' and types' annotations; served at
/// `GET /v1/openapi.json`.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "DeltaBox",
        description = "Sandboxes for AI agents with millisecond checkpoint, rollback and fork of their files and live \
                       processes. Served on a Unix socket (root only); on TCP every request needs \
                       `Authorization: Bearer <token>`. Errors are `{\"error\": {\"code\", \"message\"}}` with a stable code."
    ),
    paths(
        health, crate::metrics::metrics, list, create, info, remove, pause, resume, checkpoint, list_checkpoints,
        rollback, fork, pin, unpin, gc, remove_checkpoint, diff, export, import, exec, exec_stream,
        start_session, list_sessions, run_in_session, stop_session, crate::files::read, crate::files::write,
        crate::files::remove, crate::files::list, crate::files::stat, crate::files::mkdir, openapi
    ),
    tags(
        (name = "sandboxes"), (name = "checkpoints", description = "checkpoint, rollback, fork, the checkpoint tree"),
        (name = "commands"), (name = "sessions", description = "long-lived interpreters (bash, python3)"),
        (name = "files", description = "files as the sandbox's processes see them"), (name = "daemon")
    )
)]
pub struct ApiDoc;

#[utoipa::path(get, path = "/v1/openapi.json", tag = "daemon", responses((status = 200, description = "this document", body = Object)))]
async fn openapi() -> impl IntoResponse {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// The router.
pub fn router(d: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sandboxes", get(list).post(create))
        .route("/v1/sandboxes/{id}", get(info).delete(remove))
        .route("/v1/sandboxes/{id}/pause", post(pause))
        .route("/v1/sandboxes/{id}/resume", post(resume))
        .route(
            "/v1/sandboxes/{id}/checkpoints",
            get(list_checkpoints).post(checkpoint),
        )
        .route("/v1/sandboxes/{id}/rollback", post(rollback))
        .route(
            "/v1/checkpoints/{id}",
            axum::routing::delete(remove_checkpoint),
        )
        .route("/v1/checkpoints/{id}/fork", post(fork))
        .route("/v1/checkpoints/{id}/pin", post(pin).delete(unpin))
        .route("/v1/gc", post(gc))
        .route("/v1/checkpoints/{id}/export", post(export))
        .route("/v1/import", post(import))
        .route("/v1/checkpoints/{id}/diff/{other}", get(diff))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/exec/stream", post(exec_stream))
        .route(
            "/v1/sandboxes/{id}/sessions",
            get(list_sessions).post(start_session),
        )
        .route(
            "/v1/sandboxes/{id}/sessions/{sid}",
            axum::routing::delete(stop_session),
        )
        .route(
            "/v1/sandboxes/{id}/sessions/{sid}/run",
            post(run_in_session),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(crate::files::read)
                .put(crate::files::write)
                .delete(crate::files::remove),
        )
        .route("/v1/sandboxes/{id}/files/list", get(crate::files::list))
        .route("/v1/sandboxes/{id}/files/stat", get(crate::files::stat))
        .route("/v1/sandboxes/{id}/files/mkdir", post(crate::files::mkdir))
        .route("/v1/metrics", get(crate::metrics::metrics))
        .route("/v1/openapi.json", get(openapi))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            d.clone(),
            crate::metrics::track,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(d)
}

#[utoipa::path(get, path = "/v1/health", tag = "daemon", responses((status = 200, body = crate::api::Health)))]
async fn health(State(d): D) -> impl IntoResponse {
    Json(d.health().await)
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", responses((status = 200, body = Vec<crate::api::SandboxInfo>), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn list(State(d): D) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.list().await?))
}

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandbox, responses((status = 201, body = crate::api::SandboxInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn create(
    State(d): D,
    ApiJson(body): ApiJson<CreateSandbox>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(d.create(body).await?)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id")), responses((status = 200, body = crate::api::SandboxInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn info(State(d): D, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.get(&id).await?))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id")), responses((status = 204, description = "removed"), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn remove(State(d): D, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    d.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id")), responses((status = 200, body = crate::api::SandboxInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn pause(State(d): D, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.pause(&id).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, description = "sandbox id")), responses((status = 200, body = crate::api::SandboxInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn resume(State(d): D, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.resume(&id).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/checkpoints", tag = "checkpoints", params(("id" = String, Path, description = "sandbox id")), request_body(content = Option<crate::api::CheckpointBody>, description = "optional: no body checkpoints the files only"), responses((status = 201, body = crate::api::CheckpointInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn checkpoint(
    State(d): D,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, ApiError> {
    // The body is optional: no body is a files-and-defaults checkpoint.
    let body: crate::api::CheckpointBody = if body.iter().all(u8::is_ascii_whitespace) {
        Default::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("checkpoint body: {e}")))?
    };
    Ok((StatusCode::CREATED, Json(d.checkpoint(&id, &body).await?)))
}

#[utoipa::path(post, path = "/v1/checkpoints/{id}/fork", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")), request_body = crate::api::ForkBody, responses((status = 201, description = "one sandbox per branch, all or none", body = Vec<crate::api::SandboxInfo>), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn fork(
    State(d): D,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<crate::api::ForkBody>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(d.fork(&id, body.n).await?)))
}

#[utoipa::path(post, path = "/v1/checkpoints/{id}/pin", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")), responses((status = 204, description = "pinned"), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn pin(State(d): D, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    d.pin_checkpoint(&id, true).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/checkpoints/{id}/pin", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")), responses((status = 204, description = "unpinned"), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn unpin(State(d): D, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    d.pin_checkpoint(&id, false).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/gc", tag = "checkpoints", request_body = crate::api::GcBody, responses((status = 200, body = crate::api::GcReport), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn gc(
    State(d): D,
    ApiJson(body): ApiJson<crate::api::GcBody>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.gc(body.dry_run).await?))
}

#[utoipa::path(delete, path = "/v1/checkpoints/{id}", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")), responses((status = 204, description = "deleted"), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn remove_checkpoint(
    State(d): D,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    d.remove_checkpoint(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/checkpoints/{id}/diff/{other}", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id"), ("other" = String, Path, description = "checkpoint id")), responses((status = 200, description = "files added, deleted and changed", body = deltabox_runtime::diff::DiffResult), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn diff(
    State(d): D,
    Path((a, b)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.diff(&a, &b).await?))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/checkpoints", tag = "checkpoints", params(("id" = String, Path, description = "sandbox id")), responses((status = 200, description = "the checkpoint tree: each with its parent", body = Vec<crate::api::CheckpointInfo>), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn list_checkpoints(
    State(d): D,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.list_checkpoints(&id).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/rollback", tag = "checkpoints", params(("id" = String, Path, description = "sandbox id")), request_body = crate::api::RollbackBody, responses((status = 200, body = crate::api::RollbackInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn rollback(
    State(d): D,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<crate::api::RollbackBody>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(
        d.rollback_filled(&id, &body.checkpoint, body.memory)
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "commands", params(("id" = String, Path, description = "sandbox id")), request_body = ExecBody, responses((status = 200, body = crate::api::ExecResult), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn exec(
    State(d): D,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.exec(&id, body, None).await?))
}

fn ndjson(ev: &StreamEvent) -> Bytes {
    let mut v = serde_json::to_vec(ev).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Streams output as NDJSON lines (`stdout`/`stderr` with base64 data, then `exit` or `error`). If the client
/// disconnects, the command's process group is killed.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec/stream", tag = "commands", params(("id" = String, Path, description = "sandbox id")), request_body = ExecBody, responses((status = 200, description = "NDJSON: output events as they come, then the exit", content_type = "application/x-ndjson", body = crate::api::StreamEvent), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn exec_stream(
    State(d): D,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<ExecBody>,
) -> Result<Response, ApiError> {
    // Fail fast (with a proper status code) on what can be checked before streaming starts.
    d.get(&id).await?;
    let (out_tx, mut out_rx) = mpsc::channel::<deltabox_runtime::OutputEvent>(64);
    let (line_tx, line_rx) = mpsc::channel::<Bytes>(64);
    let relay_tx = line_tx.clone();
    let relay = tokio::spawn(async move {
        let b64 = base64::engine::general_purpose::STANDARD;
        loop {
            let ev = tokio::select! {
                ev = out_rx.recv() => match ev { Some(ev) => ev, None => return },
                // The response body was dropped (client gone): dropping out_rx makes exec kill the command.
                _ = relay_tx.closed() => return,
            };
            let line = match ev {
                deltabox_runtime::OutputEvent::Stdout(d) => ndjson(&StreamEvent::Stdout {
                    data: b64.encode(d),
                }),
                deltabox_runtime::OutputEvent::Stderr(d) => ndjson(&StreamEvent::Stderr {
                    data: b64.encode(d),
                }),
            };
            if relay_tx.send(line).await.is_err() {
                // The client went away: dropping out_rx makes exec kill the command.
                return;
            }
        }
    });
    tokio::spawn(async move {
        let res = d.exec(&id, body, Some(out_tx)).await;
        let _ = relay.await;
        let last = match res {
            Ok(mut r) => {
                r.stdout.clear();
                r.stderr.clear();
                StreamEvent::Exit(r)
            }
            Err(e) => StreamEvent::Error {
                code: e.code.into(),
                message: e.message,
            },
        };
        let _ = line_tx.send(ndjson(&last)).await;
    });
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(line_rx).map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(ApiError::internal)
}

/// Streams a long operation's progress as NDJSON lines (`{"progress": {"done": …, "total": …}}`, at most one a
/// percent), then `{"result": …}` or `{"error": {"code": …, "message": …}}`.
fn progress_stream<T: serde::Serialize + Send + 'static, F>(
    op: impl FnOnce(Box<dyn FnMut(u64, u64) + Send>) -> F + Send + 'static,
) -> Result<Response, ApiError>
where
    F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let line = |v: serde_json::Value| {
        let mut b = serde_json::to_vec(&v).unwrap_or_default();
        b.push(b'\n');
        Bytes::from(b)
    };
    let ptx = tx.clone();
    let mut last = u64::MAX;
    let progress = Box::new(move |done: u64, total: u64| {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        if pct != last {
            last = pct;
            let _ = ptx.try_send(line(
                serde_json::json!({"progress": {"done": done, "total": total}}),
            ));
        }
    });
    tokio::spawn(async move {
        let last = match op(progress).await {
            Ok(r) => serde_json::json!({ "result": r }),
            Err(e) => serde_json::json!({"error": {"code": e.code, "message": e.message}}),
        };
        let _ = tx.send(line(last)).await;
    });
    let stream =
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .map_err(ApiError::internal)
}

#[utoipa::path(post, path = "/v1/checkpoints/{id}/export", tag = "checkpoints", params(("id" = String, Path, description = "checkpoint id")), request_body = crate::api::ArchiveBody, responses((status = 200, description = "NDJSON progress events, then the result", content_type = "application/x-ndjson", body = Object), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn export(
    State(d): D,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<crate::api::ArchiveBody>,
) -> Result<Response, ApiError> {
    progress_stream(move |p| async move { d.export(&id, body.path.into(), p).await })
}

#[utoipa::path(post, path = "/v1/import", tag = "checkpoints", request_body = crate::api::ArchiveBody, responses((status = 200, description = "NDJSON progress events, then the result", content_type = "application/x-ndjson", body = Object), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn import(
    State(d): D,
    ApiJson(body): ApiJson<crate::api::ArchiveBody>,
) -> Result<Response, ApiError> {
    progress_stream(move |p| async move { d.import(body.path.into(), p).await })
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/sessions", tag = "sessions", params(("id" = String, Path, description = "sandbox id")), request_body = StartSession, responses((status = 201, body = crate::api::SessionInfo), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn start_session(
    State(d): D,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<StartSession>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, Json(d.start_session(&id, body).await?)))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/sessions", tag = "sessions", params(("id" = String, Path, description = "sandbox id")), responses((status = 200, body = Vec<crate::api::SessionInfo>), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn list_sessions(State(d): D, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.list_sessions(&id).await?))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/sessions/{sid}/run", tag = "sessions", params(("id" = String, Path, description = "sandbox id"), ("sid" = String, Path, description = "session id")), request_body = RunInSession, responses((status = 200, body = crate::api::SessionResult), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn run_in_session(
    State(d): D,
    Path((id, sid)): Path<(String, String)>,
    ApiJson(body): ApiJson<RunInSession>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(d.run_in_session(&id, &sid, body).await?))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/sessions/{sid}", tag = "sessions", params(("id" = String, Path, description = "sandbox id"), ("sid" = String, Path, description = "session id")), responses((status = 204, description = "stopped"), (status = 400, description = "bad input", body = crate::error::ErrorBody), (status = 404, description = "unknown id", body = crate::error::ErrorBody), (status = 409, description = "does not fit the current state", body = crate::error::ErrorBody), (status = 500, description = "daemon failure", body = crate::error::ErrorBody)))]
async fn stop_session(
    State(d): D,
    Path((id, sid)): Path<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    d.stop_session(&id, &sid).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Requires `Authorization: Bearer <token>` (used on the TCP listener).
pub async fn require_token(
    State(token): State<Arc<String>>,
    req: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
    if !ok {
        return Err(ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "unauthorized",
            message: "missing or wrong bearer token".into(),
        });
    }
    Ok(next.run(req).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the API until `shutdown` resolves: always on the unix socket, and on TCP (token required) if
/// configured.
pub async fn serve(
    d: Arc<Daemon>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let sock = d.config.socket.clone();
    if let Some(parent) = sock.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // We hold the daemon lock, so a socket file left here belongs to a dead daemon.
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))?;
    let app = router(d.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tcp_task = match (d.config.tcp, d.config.token.clone()) {
        (Some(addr), Some(token)) => {
            let tcp = tokio::net::TcpListener::bind(addr).await?;
            let app = app.clone().layer(axum::middleware::from_fn_with_state(
                Arc::new(token),
                require_token,
            ));
            let mut rx = stop_rx.clone();
            Some(tokio::spawn(async move {
                let _ = axum::serve(tcp, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await;
            }))
        }
        (Some(_), None) => return Err(std::io::Error::other("TCP listening needs a token")),
        _ => None,
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut rx = stop_rx.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await?;
    if let Some(t) = tcp_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
