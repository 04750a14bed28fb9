//! Which JSON-RPC message needs what before it may pass: nothing beyond an authenticated
//! caller (protocol messages), a decision of its own (a tool call, a resource read, a prompt,
//! any method remit does not know), or a refusal here. The method alone decides, never the
//! presence of an `id`.

use model::ActionClass;
use serde_json::{Value, json};

use super::rpc::{INVALID_PARAMS, INVALID_REQUEST};
use crate::catalog::{Classified, ToolSpec};

/// Methods that act on nothing: they pass once the caller is authenticated.
const DISCOVERY: [&str; 6] = [
    "initialize",
    "ping",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "prompts/list",
];

/// The prefix of the methods that are notifications by the MCP specification: they act on
/// nothing and pass once the caller is authenticated, with or without an `id`.
const NOTIFICATIONS: &str = "notifications/";

/// What one JSON-RPC message needs before it may pass.
pub(super) enum Need {
    /// Nothing beyond an authenticated caller.
    Session,
    /// A decision of its own.
    Decision {
        classified: Classified,
        arguments: String,
    },
    /// Refused here, never forwarded.
    Refused { code: i64, message: String },
}

impl Need {
    /// Classifies one JSON-RPC message sent to `tool`.
    pub(super) fn of(tool: &ToolSpec, message: &Value) -> Need {
        let Some(object) = message.as_object() else {
            return Need::Refused {
                code: INVALID_REQUEST,
                message: "a JSON-RPC message is an object".into(),
            };
        };
        let method = object.get("method").and_then(Value::as_str);
        let params = object.get("params");
        let name = || params.and_then(|p| p.get("name")).and_then(Value::as_str);
        // The method decides, never the presence of an `id`: a `tools/call` shaped as a
        // notification is still a tool call, and an upstream may well execute it.
        match method {
            // Responses from the client (to sampling, elicitation, roots) act on no tool.
            None if object.contains_key("result") || object.contains_key("error") => Need::Session,
            None => Need::Refused {
                code: INVALID_REQUEST,
                message: "a JSON-RPC message needs a `method`".into(),
            },
            // Notifications by the specification's own name, and methods that act on nothing.
            Some(method) if method.starts_with(NOTIFICATIONS) || DISCOVERY.contains(&method) => {
                Need::Session
            }
            Some("tools/call") => {
                let Some(name) = name() else {
                    return Need::Refused {
                        code: INVALID_PARAMS,
                        message: "`tools/call` needs `params.name`".into(),
                    };
                };
                let arguments = params.and_then(|p| p.get("arguments"));
                Need::Decision {
                    classified: tool.classify_mcp_tool(name, arguments),
                    arguments: canonical(arguments),
                }
            }
            Some("resources/read") => {
                let Some(uri) = params.and_then(|p| p.get("uri")).and_then(Value::as_str) else {
                    return Need::Refused {
                        code: INVALID_PARAMS,
                        message: "`resources/read` needs `params.uri`".into(),
                    };
                };
                read_decision(tool, "resources/read", uri, params)
            }
            Some("prompts/get") => {
                let Some(name) = name() else {
                    return Need::Refused {
                        code: INVALID_PARAMS,
                        message: "`prompts/get` needs `params.name`".into(),
                    };
                };
                read_decision(tool, name, "", params.and_then(|p| p.get("arguments")))
            }
            // Anything else may act on the server (subscriptions, log levels, methods of later
            // protocol versions): it fails closed as an `admin` action named after the method.
            Some(method) => Need::Decision {
                classified: Classified {
                    action: method.to_string(),
                    class: ActionClass::Admin,
                    resource: String::new(),
                    sensitivity: tool.sensitivity.clone(),
                },
                arguments: canonical(params),
            },
        }
    }
}

/// A read of `resource` on `tool`, decided on its own.
fn read_decision(tool: &ToolSpec, action: &str, resource: &str, arguments: Option<&Value>) -> Need {
    Need::Decision {
        classified: Classified {
            action: action.to_string(),
            class: ActionClass::Read,
            resource: resource.to_string(),
            sensitivity: tool.sensitivity.clone(),
        },
        arguments: canonical(arguments),
    }
}

/// A short name for a request that calls no tool, for the audit record.
pub(super) fn summary(messages: &[Value]) -> String {
    let first = messages
        .iter()
        .find_map(|m| m.get("method").and_then(Value::as_str))
        .unwrap_or("response");
    if messages.len() > 1 {
        format!("batch:{first}")
    } else {
        first.to_string()
    }
}

fn canonical(value: Option<&Value>) -> String {
    let mut out = String::new();
    audit::canonical_json(value.unwrap_or(&json!({})), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(message: Value) -> String {
        let tool = crate::catalog::tool_for_test(
            r#"
                name = "files"
                kind = "mcp"
                upstream = "http://127.0.0.1:1/mcp"
                sensitivity = ["pii"]
                mcp_tools = { read_file = { class = "read", resource = "path" } }
                "#,
        );
        match Need::of(&tool, &message) {
            Need::Session => "session".into(),
            Need::Decision {
                classified,
                arguments,
            } => format!(
                "{:?} {} `{}` {:?} {arguments}",
                classified.class, classified.action, classified.resource, classified.sensitivity
            ),
            Need::Refused { code, message } => format!("refused {code}: {message}"),
        }
    }

    #[test]
    fn the_method_decides_what_a_message_needs() {
        let call = json!({"method": "tools/call", "params": {"name": "read_file", "arguments": {"path": "a.txt", "b": 1}}});
        let decided = r#"Read read_file `a.txt` ["pii"] {"b":1,"path":"a.txt"}"#;
        assert_eq!(check(call.clone()), decided);
        // Without an `id` (a notification's shape) it is still a call.
        let mut with_id = call;
        with_id["id"] = json!(7);
        assert_eq!(check(with_id), decided);
        for session in [
            json!({"id": 1, "method": "initialize"}),
            json!({"id": 2, "method": "tools/list"}),
            json!({"method": "notifications/initialized"}),
            json!({"id": 3, "result": {}}),
        ] {
            assert_eq!(check(session.clone()), "session", "{session}");
        }
        assert_eq!(
            check(json!({"id": 4, "method": "resources/read", "params": {"uri": "file:///x"}})),
            r#"Read resources/read `file:///x` ["pii"] {"uri":"file:///x"}"#
        );
        assert_eq!(
            check(json!({"id": 5, "method": "logging/setLevel", "params": {"level": "debug"}})),
            r#"Admin logging/setLevel `` ["pii"] {"level":"debug"}"#
        );
        assert_eq!(
            check(json!({"id": 6, "method": "tools/call", "params": {}})),
            "refused -32602: `tools/call` needs `params.name`"
        );
        assert_eq!(
            check(json!([1])),
            "refused -32600: a JSON-RPC message is an object"
        );
        assert_eq!(
            check(json!({"id": 8})),
            "refused -32600: a JSON-RPC message needs a `method`"
        );
    }
}
