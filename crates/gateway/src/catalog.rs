//! The tools remit fronts: where each upstream is, how remit authenticates to it, and how each
//! request maps to an action, a class and a resource. Declared in `remit.toml` (`[[tools]]`),
//! parsed raw here and validated once at start-up; anything unclassified is `admin`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method, Uri};
use model::{ActionClass, Secret};
use serde::Deserialize;

/// A tool as written in the configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTool {
    pub name: String,
    pub kind: String,
    pub upstream: String,
    /// `"none"` or a table: `{ bearer = "env:VAR" }` or `{ header = "X-Api-Key", value = "file:/path" }`.
    #[serde(default)]
    pub auth: Option<RawAuth>,
    /// Accept task tokens without a proof of possession (`Authorization: Bearer`), for clients
    /// that cannot sign proofs. Off by default.
    #[serde(default)]
    pub bearer_tokens: bool,
    /// Sensitivity labels of every action of the tool (e.g. `pii`, `secret`).
    #[serde(default)]
    pub sensitivity: Vec<String>,
    /// MCP: tool name → class, or a table with `class`, `sensitivity` and `resource`
    /// (the argument whose value is the call's resource).
    #[serde(default)]
    pub mcp_tools: HashMap<String, RawMcpEntry>,
    /// HTTP: routes in order; the first match classifies the request.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Largest request body an agent may send to this tool, in bytes; overrides the
    /// top-level `max_body_bytes`.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
}

/// The bounds of a tool's `max_body_bytes`, the same as the top-level setting's (checked in
/// the binary's configuration): a body without a declared length is held in memory up to the
/// limit before it is forwarded.
pub const BODY_LIMIT_BOUNDS: std::ops::RangeInclusive<usize> = 1024..=16 * 1024 * 1024;

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RawAuth {
    None(String),
    Table(RawAuthTable),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthTable {
    /// A bearer credential: sent as `Authorization: Bearer <value>`.
    #[serde(default)]
    pub bearer: Option<String>,
    /// A header name, with `value`.
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RawMcpEntry {
    Class(String),
    Table {
        class: String,
        #[serde(default)]
        sensitivity: Vec<String>,
        #[serde(default)]
        resource: Option<String>,
    },
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// An HTTP method, or `*` for any.
    pub method: String,
    /// `/repos/{owner}/{repo}/issues`; `{name}` matches one segment, a final `{*name}` the rest.
    pub path: String,
    pub action: String,
    pub class: String,
    #[serde(default)]
    pub sensitivity: Vec<String>,
    /// The resource named by the request, from the path's parameters, e.g. `{owner}/{repo}`.
    /// Default: the request path without its leading `/`.
    #[serde(default)]
    pub resource: Option<String>,
}

/// What went wrong in a tool declaration; start-up stops with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tool `{tool}`: {reason}")]
pub struct CatalogError {
    pub tool: String,
    pub reason: String,
}

/// How remit reaches the tool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolKind {
    Mcp,
    Http,
}

/// The credential remit adds to every upstream request, never shown to agents.
#[derive(Clone, Debug)]
pub enum UpstreamAuth {
    None,
    Header {
        name: HeaderName,
        value: Secret<String>,
    },
}

impl UpstreamAuth {
    /// The secret's bytes, for scrubbing them from anything that goes back to the agent.
    pub fn secret(&self) -> Option<&str> {
        match self {
            UpstreamAuth::None => None,
            UpstreamAuth::Header { value, .. } => Some(value.expose()),
        }
    }

    pub fn header(&self) -> Option<(HeaderName, HeaderValue)> {
        match self {
            UpstreamAuth::None => None,
            UpstreamAuth::Header { name, value } => {
                let mut header = HeaderValue::from_str(value.expose()).ok()?;
                header.set_sensitive(true);
                Some((name.clone(), header))
            }
        }
    }
}

#[derive(Clone, Debug)]
pub struct McpEntry {
    pub class: ActionClass,
    pub sensitivity: Vec<String>,
    /// The argument holding the resource (a path, a repository, …).
    pub resource_argument: Option<String>,
}

#[derive(Clone, Debug)]
pub struct HttpRoute {
    pub method: Option<Method>,
    pattern: Vec<Segment>,
    pub action: String,
    pub class: ActionClass,
    pub sensitivity: Vec<String>,
    resource: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

/// A validated tool.
#[derive(Clone, Debug)]
pub struct ToolSpec {
    pub name: String,
    pub kind: ToolKind,
    /// For MCP, the endpoint; for HTTP, the base that request paths are appended to.
    pub upstream: Uri,
    pub auth: UpstreamAuth,
    pub bearer_tokens: bool,
    pub sensitivity: Vec<String>,
    pub mcp_tools: HashMap<String, McpEntry>,
    pub routes: Vec<HttpRoute>,
    /// The tool's own body limit, if it declares one; else the node's `max_body_bytes`.
    pub max_body_bytes: Option<usize>,
}

/// One request, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Classified {
    pub action: String,
    pub class: ActionClass,
    pub resource: String,
    pub sensitivity: Vec<String>,
}

/// Every declared tool, by name.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    tools: HashMap<String, Arc<ToolSpec>>,
}

impl Catalog {
    /// Validates every declaration, reading credentials from the environment or files.
    pub fn from_raw(raw: &[RawTool]) -> Result<Catalog, CatalogError> {
        Self::from_raw_with(raw, &|name| std::env::var(name).ok())
    }

    /// As [`Catalog::from_raw`], with the environment supplied (for tests).
    pub fn from_raw_with(
        raw: &[RawTool],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Catalog, CatalogError> {
        let mut tools = HashMap::new();
        for tool in raw {
            let spec = validate(tool, env)?;
            if tools.insert(spec.name.clone(), Arc::new(spec)).is_some() {
                return Err(CatalogError {
                    tool: tool.name.clone(),
                    reason: "declared twice".into(),
                });
            }
        }
        Ok(Catalog { tools })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ToolSpec>> {
        self.tools.get(name)
    }

    pub fn len(&self) -> usize {
        self.tools.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Every upstream secret, for scrubbing.
    pub fn secrets(&self) -> Vec<&str> {
        self.tools
            .values()
            .filter_map(|t| t.auth.secret())
            .collect()
    }
}

impl ToolSpec {
    /// Maps an HTTP request to its action; an unmatched request is `admin`, named after its
    /// method and path.
    pub fn classify_http(&self, method: &Method, path: &str) -> Classified {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for route in &self.routes {
            if route.method.as_ref().is_some_and(|m| m != method) {
                continue;
            }
            if let Some(params) = route.matches(&segments) {
                let resource = match &route.resource {
                    Some(template) => fill(template, &params),
                    None => path.trim_start_matches('/').to_string(),
                };
                return Classified {
                    action: route.action.clone(),
                    class: route.class,
                    resource,
                    sensitivity: merged(&self.sensitivity, &route.sensitivity),
                };
            }
        }
        Classified {
            action: format!("{} {path}", method.as_str()),
            class: ActionClass::Admin,
            resource: path.trim_start_matches('/').to_string(),
            sensitivity: self.sensitivity.clone(),
        }
    }

    /// Maps an MCP tool call; an undeclared tool is `admin`.
    pub fn classify_mcp_tool(
        &self,
        name: &str,
        arguments: Option<&serde_json::Value>,
    ) -> Classified {
        match self.mcp_tools.get(name) {
            Some(entry) => {
                let resource = entry
                    .resource_argument
                    .as_ref()
                    .and_then(|argument| arguments?.get(argument))
                    .map(|value| match value {
                        serde_json::Value::String(text) => text.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default();
                Classified {
                    action: name.to_string(),
                    class: entry.class,
                    resource,
                    sensitivity: merged(&self.sensitivity, &entry.sensitivity),
                }
            }
            None => Classified {
                action: name.to_string(),
                class: ActionClass::Admin,
                resource: String::new(),
                sensitivity: self.sensitivity.clone(),
            },
        }
    }
}

impl HttpRoute {
    fn matches<'a>(&'a self, segments: &[&'a str]) -> Option<Vec<(&'a str, Cow<'a, str>)>> {
        let mut params = Vec::new();
        for (i, segment) in self.pattern.iter().enumerate() {
            match segment {
                Segment::Literal(literal) => {
                    if segments.get(i) != Some(&literal.as_str()) {
                        return None;
                    }
                }
                Segment::Param(name) => {
                    let value = segments.get(i).filter(|s| !s.is_empty())?;
                    params.push((name.as_str(), Cow::Borrowed(*value)));
                }
                Segment::Rest(name) => {
                    let rest = segments[i.min(segments.len())..].join("/");
                    params.push((name.as_str(), Cow::Owned(rest)));
                    return Some(params);
                }
            }
        }
        (segments.len() == self.pattern.len()).then_some(params)
    }
}

/// `template` with each `{name}` or `{*name}` replaced by that parameter's value, in one pass:
/// a value is never searched for placeholders itself, so a path segment that reads `{repo}`
/// stays what it is. A placeholder without a parameter stays as written.
fn fill(template: &str, params: &[(&str, Cow<'_, str>)]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return out;
        };
        let name = &after[..close];
        let bare = name.strip_prefix('*').unwrap_or(name);
        match params.iter().find(|(param, _)| *param == bare) {
            Some((_, value)) => out.push_str(value),
            None => out.push_str(&rest[open..open + close + 2]),
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

fn merged(a: &[String], b: &[String]) -> Vec<String> {
    let mut out = a.to_vec();
    out.extend(b.iter().filter(|label| !a.contains(label)).cloned());
    out
}

fn validate(raw: &RawTool, env: &dyn Fn(&str) -> Option<String>) -> Result<ToolSpec, CatalogError> {
    let fail = |reason: String| CatalogError {
        tool: raw.name.clone(),
        reason,
    };
    let name_ok = !raw.name.is_empty()
        && raw.name.len() <= 64
        && raw
            .name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'));
    if !name_ok {
        return Err(fail(
            "the name must be 1 to 64 lowercase letters, digits, `.`, `-` and `_`".into(),
        ));
    }
    let kind = match raw.kind.as_str() {
        "mcp" => ToolKind::Mcp,
        "http" => ToolKind::Http,
        other => {
            return Err(fail(format!(
                "unknown kind `{other}`: expected `mcp` or `http`"
            )));
        }
    };
    let upstream: Uri = raw
        .upstream
        .parse()
        .map_err(|_| fail(format!("`upstream` `{}` is not a URL", raw.upstream)))?;
    match upstream.scheme_str() {
        Some("http" | "https") if upstream.host().is_some() => {}
        _ => {
            return Err(fail(format!(
                "`upstream` `{}` must be an absolute http:// or https:// URL",
                raw.upstream
            )));
        }
    }
    if upstream.query().is_some() {
        return Err(fail("`upstream` must not carry a query string".into()));
    }
    // Not echoed: a user name alone is often the token itself (`https://ghp_…@host`).
    if let Some((_, host)) = upstream
        .authority()
        .and_then(|a| a.as_str().rsplit_once('@'))
    {
        return Err(fail(format!(
            "`upstream` carries credentials (`[redacted]@{host}`); hint: remove them from the URL and give them as `auth = {{ bearer = \"env:VAR\" }}` or `{{ header = …, value = \"file:PATH\" }}`"
        )));
    }
    let auth = resolve_auth(raw.auth.as_ref(), env).map_err(fail)?;
    if let Some(bytes) = raw.max_body_bytes
        && !BODY_LIMIT_BOUNDS.contains(&bytes)
    {
        return Err(fail(format!(
            "`max_body_bytes` must be between {} and {}, not {bytes}",
            BODY_LIMIT_BOUNDS.start(),
            BODY_LIMIT_BOUNDS.end()
        )));
    }
    let labels = |labels: &[String]| -> Result<Vec<String>, CatalogError> {
        for label in labels {
            if label.is_empty()
                || label.len() > 64
                || label.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(fail(format!("invalid sensitivity label `{label}`")));
            }
        }
        Ok(labels.to_vec())
    };
    let class = |text: &str| -> Result<ActionClass, CatalogError> {
        text.parse()
            .map_err(|e: model::IdError| fail(e.to_string()))
    };

    let mut mcp_tools = HashMap::new();
    let mut routes = Vec::new();
    match kind {
        ToolKind::Mcp => {
            if !raw.routes.is_empty() {
                return Err(fail(
                    "`routes` are for `http` tools; an `mcp` tool declares `mcp_tools`".into(),
                ));
            }
            for (name, entry) in &raw.mcp_tools {
                let entry = match entry {
                    RawMcpEntry::Class(text) => McpEntry {
                        class: class(text)?,
                        sensitivity: Vec::new(),
                        resource_argument: None,
                    },
                    RawMcpEntry::Table {
                        class: text,
                        sensitivity,
                        resource,
                    } => McpEntry {
                        class: class(text)?,
                        sensitivity: labels(sensitivity)?,
                        resource_argument: resource.clone(),
                    },
                };
                mcp_tools.insert(name.clone(), entry);
            }
        }
        ToolKind::Http => {
            if !raw.mcp_tools.is_empty() {
                return Err(fail(
                    "`mcp_tools` are for `mcp` tools; an `http` tool declares `routes`".into(),
                ));
            }
            for route in &raw.routes {
                let named = format!("route `{} {}`", route.method, route.path);
                let method = route_method(&route.method)
                    .map_err(|reason| fail(format!("{named}: {reason}")))?;
                let pattern = parse_pattern(&route.path)
                    .map_err(|reason| fail(format!("route `{}`: {reason}", route.path)))?;
                if let Some(template) = &route.resource {
                    check_resource(template, &pattern)
                        .map_err(|reason| fail(format!("{named}: {reason}")))?;
                }
                // The first matching route classifies a request, so a later route with the same
                // method (or after a `*` one) and the same path would silently never apply.
                if let Some(earlier) = routes.iter().zip(&raw.routes).find_map(
                    |(earlier, written): (&HttpRoute, &RawRoute)| {
                        let shadows = earlier.method.is_none() || earlier.method == method;
                        (shadows && same_shape(&earlier.pattern, &pattern)).then_some(written)
                    },
                ) {
                    return Err(fail(format!(
                        "{named} is declared twice: `{} {}` before it already takes every such request; hint: remove one of them",
                        earlier.method, earlier.path
                    )));
                }
                if route.action.is_empty() || route.action.len() > 256 {
                    return Err(fail(format!(
                        "route `{}`: `action` must be 1 to 256 characters",
                        route.path
                    )));
                }
                routes.push(HttpRoute {
                    method,
                    pattern,
                    action: route.action.clone(),
                    class: class(&route.class)?,
                    sensitivity: labels(&route.sensitivity)?,
                    resource: route.resource.clone(),
                });
            }
        }
    }
    Ok(ToolSpec {
        name: raw.name.clone(),
        kind,
        upstream,
        auth,
        bearer_tokens: raw.bearer_tokens,
        sensitivity: labels(&raw.sensitivity)?,
        mcp_tools,
        routes,
        max_body_bytes: raw.max_body_bytes,
    })
}

/// The methods a route may name: those of RFC 9110 and PATCH that a tool's API can serve;
/// anything else is a typo that would leave the route unreachable.
const ROUTE_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// A route's method (`*`: any), case-insensitively.
fn route_method(text: &str) -> Result<Option<Method>, String> {
    if text == "*" {
        return Ok(None);
    }
    let upper = text.to_ascii_uppercase();
    ROUTE_METHODS
        .iter()
        .find(|method| method.as_str() == upper)
        .map(|method| Some(method.clone()))
        .ok_or_else(|| {
            format!(
                "unknown method `{text}`; hint: use GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, or `*` for any"
            )
        })
}

/// Every `{name}` (or `{*name}`) of a `resource` template must be a parameter of the route's
/// path: [`fill`] leaves any other placeholder as written, which would make every call's
/// resource the same literal text and so quietly defeat resource scoping.
fn check_resource(template: &str, pattern: &[Segment]) -> Result<(), String> {
    let parameters: Vec<&str> = pattern
        .iter()
        .filter_map(|segment| match segment {
            Segment::Param(name) | Segment::Rest(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
        .collect();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!(
                "`resource` `{template}` has a `{{` without its `}}`; hint: write parameters as `{{name}}`"
            ));
        };
        let name = &after[..close];
        let bare = name.strip_prefix('*').unwrap_or(name);
        if !parameters.contains(&bare) {
            let hint = if parameters.is_empty() {
                "the path has no parameters: name them in the path as `{name}`, or give a fixed resource".to_string()
            } else {
                let listed: Vec<String> = parameters.iter().map(|p| format!("`{{{p}}}`")).collect();
                format!("the path's parameters are {}", listed.join(", "))
            };
            return Err(format!(
                "`resource` names `{{{name}}}`, which is not a parameter of the path; hint: {hint}"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Do two patterns match the same requests (whatever their parameters are called)?
fn same_shape(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (Segment::Literal(x), Segment::Literal(y)) => x == y,
            (Segment::Param(_), Segment::Param(_)) | (Segment::Rest(_), Segment::Rest(_)) => true,
            _ => false,
        })
}

fn parse_pattern(path: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err("a path starts with `/`".into());
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut segments = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let segment = if let Some(name) = part.strip_prefix("{*").and_then(|p| p.strip_suffix('}'))
        {
            if i + 1 != parts.len() {
                return Err(format!("`{{*{name}}}` must be the last segment"));
            }
            Segment::Rest(name.to_string())
        } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if name.is_empty() {
                return Err("a parameter needs a name".into());
            }
            Segment::Param(name.to_string())
        } else {
            Segment::Literal((*part).to_string())
        };
        segments.push(segment);
    }
    Ok(segments)
}

/// Resolves `env:VAR` and `file:PATH` references; an inline secret is refused, so that
/// secrets never sit in a configuration file that gets shared or committed.
fn resolve_auth(
    raw: Option<&RawAuth>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamAuth, String> {
    let table = match raw {
        None => return Ok(UpstreamAuth::None),
        Some(RawAuth::None(text)) if text == "none" => return Ok(UpstreamAuth::None),
        Some(RawAuth::None(text)) => {
            return Err(format!("`auth` is `none` or a table, not `{text}`"));
        }
        Some(RawAuth::Table(table)) => table,
    };
    let (name, value) = match (&table.bearer, &table.header, &table.value) {
        (Some(reference), None, None) => (
            HeaderName::from_static("authorization"),
            format!("Bearer {}", secret(reference, env)?),
        ),
        (None, Some(header), Some(reference)) => {
            let name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("invalid header name `{header}`"))?;
            (name, secret(reference, env)?)
        }
        _ => {
            return Err(
                "`auth` takes either `bearer = \"env:VAR\"` or `header` and `value`".into(),
            );
        }
    };
    if HeaderValue::from_str(&value).is_err() {
        return Err("the upstream credential is not a valid header value".into());
    }
    Ok(UpstreamAuth::Header {
        name,
        value: Secret::new(value),
    })
}

fn secret(reference: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if let Some(variable) = reference.strip_prefix("env:") {
        return env(variable).filter(|v| !v.is_empty()).ok_or_else(|| {
            format!("the environment variable `{variable}` named by `auth` is not set")
        });
    }
    if let Some(path) = reference.strip_prefix("file:") {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the credential file `{path}`: {e}"))?;
        let text = text.trim_end_matches(['\n', '\r']).to_string();
        if text.is_empty() {
            return Err(format!("the credential file `{path}` is empty"));
        }
        return Ok(text);
    }
    Err("a credential is given as `env:VAR` or `file:PATH`, never inline".into())
}

/// The one tool declared by `table` (the keys of a `[[tools]]` entry, credentials from no
/// environment), for other modules' unit tests.
#[cfg(test)]
pub(crate) fn tool_for_test(table: &str) -> Arc<ToolSpec> {
    let raw: RawTool = toml::from_str(table).unwrap();
    let name = raw.name.clone();
    let catalog = Catalog::from_raw_with(&[raw], &|_| None).unwrap();
    Arc::clone(catalog.get(&name).unwrap())
}

#[cfg(test)]
mod tests;
