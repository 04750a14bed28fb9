//! The control plane's one error type. Every failure carries the HTTP status class it maps to,
//! a stable snake_case code and a one-line message that is safe to show a client: it never
//! holds token bytes, keys or internal detail.

use serde_json::Value;

/// How an error is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    /// The caller did not prove who it is (or the proof failed).
    Unauthorized,
    /// The caller is known but may not do this.
    Forbidden,
    NotFound,
    Conflict,
    MethodNotAllowed,
    PayloadTooLarge,
    TooManyRequests,
    /// A dependency (the store) cannot be reached: remit refuses rather than guesses.
    Unavailable,
    Internal,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub code: &'static str,
    pub message: String,
    /// Structured detail for the client, e.g. the policies behind a refusal.
    pub detail: Option<Value>,
}

impl Error {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Error {
        Error {
            kind,
            code,
            message: message.into(),
            detail: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::BadRequest, code, message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unauthorized, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Forbidden, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, "internal", message)
    }

    pub fn with_detail(mut self, detail: Value) -> Error {
        self.detail = Some(detail);
        self
    }
}

impl From<store::StoreError> for Error {
    fn from(error: store::StoreError) -> Error {
        use store::StoreError as S;
        match error {
            S::Unavailable(_) => Error::new(
                ErrorKind::Unavailable,
                "store_unavailable",
                "the store cannot be reached, so remit refuses (fails closed); try again shortly",
            ),
            S::Conflict { .. } => Error::new(ErrorKind::Conflict, "conflict", error.to_string()),
            S::NotFound { .. } => Error::not_found("not_found", error.to_string()),
            // Only where creating was turned off (admin commands): the path is the operator's.
            S::Missing(_) => Error::new(ErrorKind::NotFound, "store_missing", error.to_string()),
            S::BadUrl(_) | S::Corrupt(_) => Error::internal(error.to_string()),
        }
    }
}

impl From<model::ScopeError> for Error {
    fn from(error: model::ScopeError) -> Error {
        Error::bad_request("invalid_scope", error.to_string())
    }
}

impl From<model::IdError> for Error {
    fn from(error: model::IdError) -> Error {
        Error::bad_request("invalid_name", error.to_string())
    }
}

impl From<credentials::KeyError> for Error {
    fn from(error: credentials::KeyError) -> Error {
        Error::bad_request("invalid_key", error.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
