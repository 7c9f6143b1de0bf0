//! API errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, and
//! the one place engine errors become HTTP statuses.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dsv2_engine::EngineError;
use serde_json::json;

/// An error answered to one request (never fatal to the server).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable description.
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, ...
    pub kind: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code (`invalid_api_key`, ...).
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (503 answers).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: a malformed or out-of-range value of `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            message.into(),
        );
        e.param = Some(param.to_string());
        e.code = Some("invalid_value");
        e
    }

    /// 400: a request that is wrong as a whole (bad JSON, ...).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 404: an unknown model name.
    pub fn model_not_found(model: &str, available: &[String]) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{model}` does not exist; this server serves {}",
                available.join(", ")
            ),
        );
        e.param = Some("model".into());
        e.code = Some("model_not_found");
        e
    }

    /// 404: an unknown path.
    pub fn not_found(path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("Unknown endpoint `{path}`"),
        );
        e.code = Some("unknown_url");
        e
    }

    /// 405: a known path with the wrong method.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "Method not allowed on this endpoint",
        )
    }

    /// 401: a missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            message.into(),
        );
        e.code = Some("invalid_api_key");
        e
    }

    /// 503 with `Retry-After`: try again later.
    pub fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        let mut e = Self::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
        e.code = Some("service_unavailable");
        e.retry_after = Some(retry_after);
        e
    }

    /// 504: the request ran past the server's request timeout.
    pub fn timeout(secs: f64) -> Self {
        let mut e = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout_error",
            format!("The request did not finish within the server's request timeout of {secs}s"),
        );
        e.code = Some("request_timeout");
        e
    }

    /// 500: the engine failed this request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// Maps an engine error to its HTTP answer.
pub fn from_engine(e: EngineError) -> ApiError {
    match e {
        EngineError::Request(msg) => ApiError::invalid("prompt", msg),
        EngineError::PromptTooLong { .. } => {
            let mut err = ApiError::invalid("messages", e.to_string());
            err.code = Some("context_length_exceeded");
            err
        }
        EngineError::QueueFull { .. } => ApiError::unavailable(e.to_string(), 1),
        EngineError::ShuttingDown | EngineError::Stopped => ApiError::unavailable(e.to_string(), 5),
        EngineError::Config(_) | EngineError::Model(_) | EngineError::Backend(_) => {
            ApiError::internal(e.to_string())
        }
    }
}
