//! Scopes: what a task may touch. A scope names a tool, the actions allowed on it and,
//! optionally, resource patterns. Scopes only ever narrow: a child task's scopes must lie
//! inside its parent's, and a call must lie inside its task's.

use serde::{Deserialize, Serialize};

use crate::ActionClass;

/// Bounds on what a client may ask for, so that checking a scope set stays cheap.
pub const MAX_SCOPES: usize = 32;
pub const MAX_ITEMS: usize = 64;
pub const MAX_TEXT: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("a task needs at least one scope")]
    Empty,
    #[error("too many scopes: {0} (at most {MAX_SCOPES})")]
    TooManyScopes(usize),
    #[error("scope for tool `{tool}` has too many {what} (at most {MAX_ITEMS})")]
    TooManyItems { tool: String, what: &'static str },
    #[error("invalid tool name `{0}`: use 1 to 64 lowercase letters, digits, `.`, `-` and `_`")]
    ToolName(String),
    #[error("scope for tool `{0}` names no action: list actions, or `*` for all of them")]
    NoActions(String),
    #[error(
        "invalid {what} `{value}` in scope for tool `{tool}`: 1 to {MAX_TEXT} printable characters"
    )]
    Text {
        tool: String,
        what: &'static str,
        value: String,
    },
}

/// One grant of authority over one tool.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    /// 1 to 64 lowercase letters, digits, `.`, `-` and `_`.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[a-z0-9._-]{1,64}$", min_length = 1, max_length = 64)
    )]
    pub tool: String,
    /// Action names, or `*` for every action of the tool: 1 to 64 of them, each 1 to 256
    /// printable characters.
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 64))]
    pub actions: Vec<String>,
    /// Resource patterns (`*` matches any run of characters). Empty means any resource. At
    /// most 64, each 1 to 256 printable characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "openapi", schema(max_items = 64))]
    pub resources: Vec<String>,
    /// The classes of action allowed (`read`, `write`, `admin`). Empty means every class; a
    /// read-only task for discovery has `["read"]` on every scope.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<ActionClass>,
}

impl Scope {
    pub fn new(tool: &str, actions: &[&str], resources: &[&str]) -> Scope {
        Scope {
            tool: tool.to_string(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
            resources: resources.iter().map(|r| r.to_string()).collect(),
            classes: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), ScopeError> {
        let tool = &self.tool;
        let tool_ok = !tool.is_empty()
            && tool.len() <= 64
            && tool.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')
            });
        if !tool_ok {
            return Err(ScopeError::ToolName(tool.clone()));
        }
        if self.actions.is_empty() {
            return Err(ScopeError::NoActions(tool.clone()));
        }
        for (what, items) in [("actions", &self.actions), ("resources", &self.resources)] {
            if items.len() > MAX_ITEMS {
                return Err(ScopeError::TooManyItems {
                    tool: tool.clone(),
                    what,
                });
            }
            for item in items {
                if item.is_empty() || item.len() > MAX_TEXT || item.chars().any(char::is_control) {
                    let what = if what == "actions" {
                        "action"
                    } else {
                        "resource pattern"
                    };
                    return Err(ScopeError::Text {
                        tool: tool.clone(),
                        what,
                        value: item.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn allows_action(&self, action: &str) -> bool {
        self.actions.iter().any(|a| a == "*" || a == action)
    }

    fn allows_resource(&self, resource: &str) -> bool {
        self.resources.is_empty() || self.resources.iter().any(|p| pattern_matches(p, resource))
    }

    /// Does this scope permit `action` on `resource` of `tool`, whatever its class?
    pub fn permits(&self, tool: &str, action: &str, resource: &str) -> bool {
        self.tool == tool && self.allows_action(action) && self.allows_resource(resource)
    }

    /// Does this scope permit the call, its class included?
    pub fn permits_call(
        &self,
        tool: &str,
        action: &str,
        resource: &str,
        class: ActionClass,
    ) -> bool {
        self.permits(tool, action, resource) && self.allows_class(class)
    }

    /// Does this scope permit `action` of `class` on `tool` on at least one resource? What a
    /// listing shows: a `tools/list` result names tools, not the resources they will touch.
    /// Every resource pattern matches some resource, so only the tool, the action and the
    /// class decide.
    pub fn permits_on_some_resource(&self, tool: &str, action: &str, class: ActionClass) -> bool {
        self.tool == tool && self.allows_action(action) && self.allows_class(class)
    }

    fn allows_class(&self, class: ActionClass) -> bool {
        self.classes.is_empty() || self.classes.contains(&class)
    }

    /// The same scope, limited to `read` actions.
    pub fn read_only(mut self) -> Scope {
        self.classes = vec![ActionClass::Read];
        self
    }

    /// Is every call this scope permits also permitted by `outer`?
    pub fn is_within(&self, outer: &Scope) -> bool {
        if self.tool != outer.tool {
            return false;
        }
        let actions_within = self.actions.iter().all(|a| {
            outer
                .actions
                .iter()
                .any(|o| o == "*" || (o == a && a != "*"))
        });
        let classes_within = outer.classes.is_empty()
            || (!self.classes.is_empty() && self.classes.iter().all(|c| outer.classes.contains(c)));
        let resources_within = outer.resources.is_empty()
            || (!self.resources.is_empty()
                && self
                    .resources
                    .iter()
                    .all(|r| outer.resources.iter().any(|o| pattern_covers(o, r))));
        actions_within && resources_within && classes_within
    }
}

/// The scopes of one task.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScopeSet(pub Vec<Scope>);

impl ScopeSet {
    pub fn validate(&self) -> Result<(), ScopeError> {
        if self.0.is_empty() {
            return Err(ScopeError::Empty);
        }
        if self.0.len() > MAX_SCOPES {
            return Err(ScopeError::TooManyScopes(self.0.len()));
        }
        self.0.iter().try_for_each(Scope::validate)
    }

    /// Does any scope permit this action, whatever its class?
    pub fn permits(&self, tool: &str, action: &str, resource: &str) -> bool {
        self.0.iter().any(|s| s.permits(tool, action, resource))
    }

    /// The ceiling check of the call path: does any scope permit this call, class included?
    pub fn permits_call(
        &self,
        tool: &str,
        action: &str,
        resource: &str,
        class: ActionClass,
    ) -> bool {
        self.0
            .iter()
            .any(|s| s.permits_call(tool, action, resource, class))
    }

    /// Does any scope permit `action` of `class` on `tool` on at least one resource?
    /// ([`Scope::permits_on_some_resource`].)
    pub fn permits_on_some_resource(&self, tool: &str, action: &str, class: ActionClass) -> bool {
        self.0
            .iter()
            .any(|s| s.permits_on_some_resource(tool, action, class))
    }

    /// True when every scope is limited to `read` actions.
    pub fn is_read_only(&self) -> bool {
        self.0.iter().all(|s| s.classes == [ActionClass::Read])
    }

    /// Attenuation: is every scope here inside some scope of `outer`? Conservative: a scope
    /// covered only by the union of several outer scopes counts as a widening.
    pub fn is_within(&self, outer: &ScopeSet) -> bool {
        self.0
            .iter()
            .all(|s| outer.0.iter().any(|o| s.is_within(o)))
    }

    /// The scopes that reach beyond `outer`, for error messages.
    pub fn outside<'a>(&'a self, outer: &ScopeSet) -> Vec<&'a Scope> {
        self.0
            .iter()
            .filter(|s| !outer.0.iter().any(|o| s.is_within(o)))
            .collect()
    }

    pub fn tools(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|s| s.tool.as_str())
    }
}

/// Does glob `pattern` match `text`? `*` matches any run of characters, including `/`.
pub fn pattern_matches(pattern: &str, text: &str) -> bool {
    glob(pattern.as_bytes(), text.as_bytes(), false)
}

/// Does every text matched by `inner` also match `outer`? Exact for patterns whose `*`s are
/// matched by `*`s; it never answers yes wrongly.
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    glob(outer.as_bytes(), inner.as_bytes(), true)
}

/// Wildcard matching with one backtracking point, linear in practice. With `text_is_pattern`,
/// a `*` in the text is a wildcard that only a `*` of the pattern may absorb.
fn glob(pattern: &[u8], text: &[u8], text_is_pattern: bool) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let literal_ok = p < pattern.len()
            && pattern[p] != b'*'
            && pattern[p] == text[t]
            && !(text_is_pattern && text[t] == b'*');
        if literal_ok {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match() {
        let check = |p: &str, t: &str| pattern_matches(p, t);
        assert!(check("*", ""));
        assert!(check("*", "repos/acme/api"));
        assert!(check("repos/acme/*", "repos/acme/api"));
        assert!(check("repos/*/api", "repos/acme/api"));
        assert!(check("repos/acme/api", "repos/acme/api"));
        assert!(!check("repos/acme/api", "repos/acme/api2"));
        assert!(!check("repos/acme/*", "repos/other/api"));
        assert!(check("a*b*c", "axxbyyc"));
        assert!(!check("a*b*c", "axxbyy"));
    }

    #[test]
    fn coverage_is_sound() {
        assert!(pattern_covers("*", "repos/*"));
        assert!(pattern_covers("repos/*", "repos/acme/*"));
        assert!(pattern_covers("repos/*", "repos/acme/api"));
        assert!(!pattern_covers("repos/acme/*", "repos/*"));
        assert!(!pattern_covers("repos/acme/api", "repos/acme/*"));
        assert!(!pattern_covers("repos/a*", "repos/*"));
    }

    #[test]
    fn scopes_permit_and_attenuate() {
        let parent = ScopeSet(vec![Scope::new(
            "github",
            &["read_issue", "create_issue"],
            &["acme/*"],
        )]);
        assert!(parent.permits("github", "read_issue", "acme/api"));
        assert!(!parent.permits("github", "delete_repo", "acme/api"));
        assert!(!parent.permits("github", "read_issue", "other/api"));
        assert!(!parent.permits("jira", "read_issue", "acme/api"));

        let narrower = ScopeSet(vec![Scope::new("github", &["read_issue"], &["acme/api"])]);
        assert!(narrower.is_within(&parent));
        let wider_action = ScopeSet(vec![Scope::new("github", &["*"], &["acme/api"])]);
        assert!(!wider_action.is_within(&parent));
        let wider_resource = ScopeSet(vec![Scope::new("github", &["read_issue"], &[])]);
        assert!(!wider_resource.is_within(&parent));
        assert_eq!(wider_resource.outside(&parent).len(), 1);
    }

    #[test]
    fn classes_narrow_a_scope() {
        let everything = ScopeSet(vec![Scope::new("iam", &["*"], &[])]);
        let discovery = ScopeSet(vec![Scope::new("iam", &["*"], &[]).read_only()]);
        assert!(discovery.is_read_only() && !everything.is_read_only());
        assert!(discovery.permits_call("iam", "list_roles", "", ActionClass::Read));
        assert!(!discovery.permits_call("iam", "attach_policy", "", ActionClass::Write));
        assert!(everything.permits_call("iam", "attach_policy", "", ActionClass::Write));
        // Read-only lies within everything; widening back to every class does not.
        assert!(discovery.is_within(&everything));
        assert!(!everything.is_within(&discovery));
        let round_trip: ScopeSet =
            serde_json::from_value(serde_json::to_value(&discovery).unwrap()).unwrap();
        assert_eq!(round_trip, discovery);
    }

    #[test]
    fn a_listing_shows_what_some_resource_permits() {
        let mut files = Scope::new("files", &["read_file", "write_file"], &["docs/*"]);
        files.classes = vec![ActionClass::Read, ActionClass::Write];
        let scopes = ScopeSet(vec![files, Scope::new("iam", &["*"], &[]).read_only()]);
        // Resources do not matter: `docs/*` matches some resource.
        assert!(scopes.permits_on_some_resource("files", "read_file", ActionClass::Read));
        assert!(!scopes.permits_call("files", "read_file", "", ActionClass::Read));
        // The tool, the action and the class do.
        assert!(!scopes.permits_on_some_resource("files", "delete_file", ActionClass::Read));
        assert!(!scopes.permits_on_some_resource("files", "write_file", ActionClass::Admin));
        assert!(!scopes.permits_on_some_resource("other", "read_file", ActionClass::Read));
        assert!(scopes.permits_on_some_resource("iam", "list_roles", ActionClass::Read));
        assert!(!scopes.permits_on_some_resource("iam", "attach_policy", ActionClass::Write));
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(ScopeSet(vec![]).validate(), Err(ScopeError::Empty));
        let no_actions = ScopeSet(vec![Scope::new("github", &[], &[])]);
        assert_eq!(
            no_actions.validate(),
            Err(ScopeError::NoActions("github".into()))
        );
        let bad_tool = ScopeSet(vec![Scope::new("Git Hub", &["x"], &[])]);
        assert!(matches!(bad_tool.validate(), Err(ScopeError::ToolName(_))));
    }
}
