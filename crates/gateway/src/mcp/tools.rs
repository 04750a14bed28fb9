//! `tools/list` answers narrowed to what the task may call: a tool is listed when the task's
//! scopes permit calling it, by `model`'s own scope matching (its action and its class, on
//! some resource), so that a listing never shows what a call would be refused as out of scope.

use std::collections::HashMap;
use std::sync::Arc;

use model::{ActionClass, ScopeSet};
use serde_json::Value;

use crate::catalog::ToolSpec;

/// The key of a `tools/list` result's tool array, which [`ToolsFilter`] narrows.
pub(crate) const TOOLS_KEY: &str = "tools";

/// Keeps only the tools a task may call in `tools/list` results.
#[derive(Debug, Clone)]
pub(crate) struct ToolsFilter {
    /// The name of the remit tool whose MCP server answers.
    tool: String,
    /// The task's scopes, shared with the verified token; none when it did not verify.
    scopes: Arc<ScopeSet>,
    /// The class of each declared MCP tool; undeclared tools are `admin`.
    classes: HashMap<String, ActionClass>,
}

impl ToolsFilter {
    /// The filter of `tool`'s answers for a task holding `scopes`.
    pub(crate) fn new(tool: &ToolSpec, scopes: Arc<ScopeSet>) -> ToolsFilter {
        ToolsFilter {
            tool: tool.name.clone(),
            scopes,
            classes: tool
                .mcp_tools
                .iter()
                .map(|(name, entry)| (name.clone(), entry.class))
                .collect(),
        }
    }

    /// A filter for a tool `t` without declared MCP tools, whose task may call `allowed`.
    #[cfg(test)]
    pub(crate) fn for_test(allowed: &[&str]) -> ToolsFilter {
        ToolsFilter {
            tool: "t".to_string(),
            scopes: Arc::new(ScopeSet(vec![model::Scope::new("t", allowed, &[])])),
            classes: HashMap::new(),
        }
    }

    fn permits(&self, name: &str) -> bool {
        let class = self
            .classes
            .get(name)
            .copied()
            .unwrap_or(ActionClass::Admin);
        self.scopes
            .permits_on_some_resource(&self.tool, name, class)
    }

    /// Filters every JSON-RPC response in `value` whose result lists tools. Any result with a
    /// `tools` array is one, whatever the stream it arrives on (a resumed stream may replay
    /// an earlier answer), so the match is on shape, not on the request's id.
    pub(crate) fn apply(&self, value: &mut Value) {
        match value {
            Value::Array(items) => items.iter_mut().for_each(|item| self.apply(item)),
            Value::Object(object) => {
                if let Some(Value::Array(tools)) =
                    object.get_mut("result").and_then(|r| r.get_mut(TOOLS_KEY))
                {
                    tools.retain(|tool| {
                        tool.get("name")
                            .and_then(Value::as_str)
                            .is_some_and(|name| self.permits(name))
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::Scope;
    use serde_json::json;

    fn listed(scopes: Vec<Scope>) -> Vec<String> {
        let tool = crate::catalog::tool_for_test(
            r#"
                name = "files"
                kind = "mcp"
                upstream = "http://127.0.0.1:1/mcp"
                mcp_tools = { read_file = "read", write_file = "write" }
                "#,
        );
        let filter = ToolsFilter::new(&tool, Arc::new(ScopeSet(scopes)));
        let mut answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
            {"name": "read_file"}, {"name": "write_file"}, {"name": "undeclared"}, {}
        ]}});
        filter.apply(&mut answer);
        answer["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tool| tool["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn a_listing_shows_what_the_scopes_permit_calling() {
        assert_eq!(
            listed(vec![Scope::new("files", &["*"], &[])]),
            ["read_file", "write_file", "undeclared"]
        );
        // Resource patterns do not hide a tool: some resource matches them.
        assert_eq!(
            listed(vec![Scope::new("files", &["read_file"], &["docs/*"])]),
            ["read_file"]
        );
        // Classes do: undeclared tools are `admin`.
        assert_eq!(
            listed(vec![Scope::new("files", &["*"], &[]).read_only()]),
            ["read_file"]
        );
        // Another tool's scopes permit nothing here.
        assert!(listed(vec![Scope::new("other", &["*"], &[])]).is_empty());
        assert!(listed(Vec::new()).is_empty());
    }
}
