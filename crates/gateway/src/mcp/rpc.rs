//! remit's own JSON-RPC answers: the error codes it uses, the error objects of refused
//! messages, and how they join (or replace) what the upstream answers.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::classify::Need;

/// JSON-RPC error codes remit answers with.
pub(super) const PARSE_ERROR: i64 = -32700;
pub(super) const INVALID_REQUEST: i64 = -32600;
pub(super) const INVALID_PARAMS: i64 = -32602;
/// The call is outside the task's scopes or policy denies it.
pub(super) const CALL_DENIED: i64 = -32003;
/// The task's budget is spent or the caller is over its rate.
pub(super) const CALL_LIMITED: i64 = -32004;

/// Splits a request's messages into those that pass and remit's JSON-RPC errors for those
/// refused; when none passes, `Err` holds the whole answer.
#[expect(
    clippy::result_large_err,
    reason = "the answer is built once per request, and `Err` ends it"
)]
pub(super) fn sort(
    batch: bool,
    messages: Vec<Value>,
    needs: Vec<Need>,
    denial_data: Option<Value>,
) -> Result<(Vec<Value>, Vec<Value>), Response> {
    let mut errors = Vec::new();
    let mut passing = Vec::new();
    // Refusals of messages without an `id` (shaped as notifications), which JSON-RPC
    // would leave unanswered: with id `null`, sent only when nothing else in the request
    // is answered, so that the client learns of the refusal all the same.
    let mut unanswered: Vec<(i64, Value)> = Vec::new();
    for (message, need) in messages.into_iter().zip(needs) {
        match need {
            Need::Refused {
                code,
                message: text,
            } => {
                let data = denial_data
                    .clone()
                    .filter(|_| code == CALL_DENIED || code == CALL_LIMITED);
                match message.get("id") {
                    Some(id) => errors.push(rpc_error(id.clone(), code, &text, data)),
                    None if message.get("method").is_none() => {
                        errors.push(rpc_error(Value::Null, code, &text, data));
                    }
                    None => unanswered.push((code, rpc_error(Value::Null, code, &text, data))),
                }
            }
            Need::Session | Need::Decision { .. } => passing.push(message),
        }
    }
    let answered = !errors.is_empty()
        || passing
            .iter()
            .any(|m| m.get("method").is_some() && m.get("id").is_some());
    if !answered && let Some((code, _)) = unanswered.first() {
        // MCP: input that is not a request and is not accepted gets an HTTP error status,
        // its body a JSON-RPC error without an id.
        let status = match *code {
            CALL_DENIED => StatusCode::FORBIDDEN,
            CALL_LIMITED => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        };
        errors.extend(unanswered.into_iter().map(|(_, error)| error));
        if passing.is_empty() {
            return Err(json_response(status, shape(batch, errors)));
        }
    }
    if passing.is_empty() {
        return Err(json_response(StatusCode::OK, shape(batch, errors)));
    }
    Ok((passing, errors))
}

pub(super) fn rpc_error(id: Value, code: i64, message: &str, data: Option<Value>) -> Value {
    let mut error = json!({ "code": code, "message": message });
    if let (Some(data), Some(object)) = (data, error.as_object_mut()) {
        object.insert("data".into(), data);
    }
    json!({ "jsonrpc": "2.0", "id": id, "error": error })
}

pub(super) fn shape(batch: bool, mut items: Vec<Value>) -> Value {
    if !batch && items.len() == 1 {
        items.remove(0)
    } else {
        Value::Array(items)
    }
}

pub(super) fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// A request that cannot be read as JSON-RPC: an error without an id.
pub(super) fn rpc_refusal(status: StatusCode, code: i64, message: &str) -> Response {
    json_response(status, rpc_error(Value::Null, code, message, None))
}
