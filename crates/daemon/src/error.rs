//! API errors: an HTTP status, a stable machine-readable code, and a one-line message.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error as the API reports it: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code clients can match on (`not_found`, `invalid_request`, `sandbox_not_running` …).
    pub code: &'static str,
    /// Human-readable reason.
    pub message: String,
}

impl ApiError {
    /// 404.
    pub fn not_found(what: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: what.to_string(),
        }
    }
    /// 400.
    pub fn invalid(msg: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            message: msg.to_string(),
        }
    }
    /// 409.
    pub fn conflict(code: &'static str, msg: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::CONFLICT,
            code,
            message: msg.to_string(),
        }
    }
    /// 500.
    pub fn internal(msg: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: msg.to_string(),
        }
    }
}

impl From<deltabox_runtime::Error> for ApiError {
    fn from(e: deltabox_runtime::Error) -> Self {
        use deltabox_runtime::Error as E;
        match &e {
            E::Invalid(_) => ApiError::invalid(&e),
            E::Spawn(_) => ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "spawn_failed",
                message: e.to_string(),
            },
            E::SandboxDead => ApiError::conflict("sandbox_not_running", &e),
            E::SessionDead => ApiError::conflict("session_ended", &e),
            E::Fs(deltabox_fs::Error::BadImage { .. }) => ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "bad_image",
                message: e.to_string(),
            },
            E::Fs(deltabox_fs::Error::CorruptImage { .. }) => ApiError {
                status: StatusCode::BAD_REQUEST,
                code: "corrupt_image",
                message: e.to_string(),
            },
            _ => ApiError::internal(&e),
        }
    }
}

impl From<deltabox_fs::Error> for ApiError {
    fn from(e: deltabox_fs::Error) -> Self {
        deltabox_runtime::Error::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

/// The body of every error response (for the API document).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// An error's stable code and message.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable (`not_found`, `invalid_request`, `invalid_path`, `sandbox_not_running` …).
    pub code: String,
    pub message: String,
}

/// Why the daemon could not start: what failed and the underlying error.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct StartError {
    what: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
}

pub(crate) fn start_err(
    what: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StartError {
    StartError {
        what,
        source: Box::new(e),
    }
}
