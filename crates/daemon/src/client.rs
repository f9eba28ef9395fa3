//! A small HTTP/1.1 client for the daemon's unix socket (used by the CLI and the tests).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A client error: transport trouble, or the daemon's own error (code and message).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon is listening.
    #[error("cannot reach the daemon at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The connection broke mid-request (e.g. the daemon was killed).
    #[error("lost the connection to the daemon: {0}")]
    Transport(String),
    /// The daemon answered with an error.
    #[error("{message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The daemon's answer did not parse.
    #[error("bad response from the daemon: {0}")]
    Decode(String),
}

/// Connects per request; cheap on a unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the daemon at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "deltabox")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        ClientError::Api {
            status: status.as_u16(),
            code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
            message: v["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        }
    }

    /// A JSON request; `T = ()` for empty answers.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b))
            .transpose()
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            return Err(Self::api_error(status, &bytes));
        }
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A streaming request: calls `on_line` with each NDJSON line as it arrives.
    pub async fn stream(
        &self,
        path: &str,
        body: &impl Serialize,
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<(), ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        let resp = self.send(Method::POST, path, Some(body)).await?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| ClientError::Transport(e.to_string()))?
                .to_bytes();
            return Err(Self::api_error(status, &bytes));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Transport(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    on_line(&line[..line.len() - 1]);
                }
            }
        }
        Ok(())
    }
}

/// Percent-encodes a path segment (an id), so that `../x` cannot walk the API's URL space.
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

use crate::api::{
    CheckpointInfo, CreateSandbox, ExecBody, ExecResult, ForkBody, RollbackBody, RollbackInfo,
    RunInSession, SandboxInfo, SessionInfo, SessionResult, StartSession,
};

/// Typed calls, one per endpoint.
impl Client {
    /// `POST /v1/sandboxes`.
    pub async fn create(&self, body: &CreateSandbox) -> Result<SandboxInfo, ClientError> {
        self.call(Method::POST, "/v1/sandboxes", Some(body)).await
    }

    /// `DELETE /v1/sandboxes/{id}`.
    pub async fn remove(&self, id: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/sandboxes/{}", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/exec`.
    pub async fn exec(&self, id: &str, body: &ExecBody) -> Result<ExecResult, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/exec", seg(id)),
            Some(body),
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/sessions`.
    pub async fn start_session(
        &self,
        id: &str,
        body: &StartSession,
    ) -> Result<SessionInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/sessions", seg(id)),
            Some(body),
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/sessions/{sid}/run`.
    pub async fn run_in_session(
        &self,
        id: &str,
        sid: &str,
        body: &RunInSession,
    ) -> Result<SessionResult, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/sessions/{}/run", seg(id), seg(sid)),
            Some(body),
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/checkpoints`.
    pub async fn checkpoint(&self, id: &str) -> Result<CheckpointInfo, ClientError> {
        self.checkpoint_with(id, false).await
    }

    /// `POST /v1/sandboxes/{id}/checkpoints`, with the processes when `processes`.
    pub async fn checkpoint_with(
        &self,
        id: &str,
        processes: bool,
    ) -> Result<CheckpointInfo, ClientError> {
        let body = crate::api::CheckpointBody {
            processes,
            ..Default::default()
        };
        self.checkpoint_body(id, &body).await
    }

    /// `DELETE /v1/checkpoints/{id}`.
    pub async fn remove_checkpoint(&self, checkpoint: &str) -> Result<(), ClientError> {
        self.call(
            Method::DELETE,
            &format!("/v1/checkpoints/{}", seg(checkpoint)),
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/sandboxes/{id}/checkpoints`: the sandbox's checkpoints, oldest first.
    pub async fn list_checkpoints(&self, id: &str) -> Result<Vec<CheckpointInfo>, ClientError> {
        self.call(
            Method::GET,
            &format!("/v1/sandboxes/{}/checkpoints", seg(id)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/checkpoints` with every option.
    pub async fn checkpoint_body(
        &self,
        id: &str,
        body: &crate::api::CheckpointBody,
    ) -> Result<CheckpointInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/checkpoints", seg(id)),
            Some(body),
        )
        .await
    }

    /// `POST /v1/sandboxes/{id}/rollback`.
    pub async fn rollback(&self, id: &str, checkpoint: &str) -> Result<RollbackInfo, ClientError> {
        let body = RollbackBody {
            checkpoint: checkpoint.to_string(),
            memory: Default::default(),
        };
        self.rollback_body(id, &body).await
    }

    /// `POST /v1/sandboxes/{id}/rollback` with every option.
    pub async fn rollback_body(
        &self,
        id: &str,
        body: &RollbackBody,
    ) -> Result<RollbackInfo, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/sandboxes/{}/rollback", seg(id)),
            Some(body),
        )
        .await
    }

    /// `POST /v1/checkpoints/{id}/fork`.
    pub async fn fork(&self, checkpoint: &str, n: usize) -> Result<Vec<SandboxInfo>, ClientError> {
        self.call(
            Method::POST,
            &format!("/v1/checkpoints/{}/fork", seg(checkpoint)),
            Some(&ForkBody { n }),
        )
        .await
    }
}
