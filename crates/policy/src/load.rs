//! Turning schema and policy text into an engine: parse each file on its own (so that error
//! spans point into the right file), name the policies, validate them strictly and index
//! them by scope so that a decision only evaluates the policies that can match.
//!
//! Parsing and validation use cedar-policy's stable API; the compiled form (conditions and
//! entity ids) uses cedar-policy-core's types, which the evaluator in `decide` works on.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Display;
use std::path::Path;
use std::str::FromStr;

use cedar_policy::{
    ActionConstraint, Effect, EntityUid, Policy, PolicyId, PolicySet, PrincipalConstraint,
    ResourceConstraint, Schema, ValidationMode, Validator,
};
use cedar_policy_core::ast;
use miette::Diagnostic;

use crate::{PolicyEngine, PolicyError};

/// One policy, ready for the evaluator.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) id: String,
    pub(crate) effect: Effect,
    /// Scope and conditions as one expression, for unsliced evaluation. Cedar rebuilds this
    /// on every evaluation; building it once at load time saves part of each policy's cost.
    pub(crate) condition: ast::Expr,
    /// For sliced evaluation the slice already settles the action, and the principal and
    /// resource scopes are checked against the request's entities directly (they are a
    /// few comparisons), so only the `when`/`unless` conditions go to the evaluator.
    pub(crate) principal: ScopeCheck,
    pub(crate) resource: ScopeCheck,
    pub(crate) conditions: Option<ast::Expr>,
    pub(crate) reason: Option<String>,
    pub(crate) step_up: Option<String>,
}

/// A principal or resource scope constraint, in the evaluator's types.
#[derive(Debug)]
pub(crate) enum ScopeCheck {
    Any,
    Eq(ast::EntityUID),
    In(ast::EntityUID),
    Is(ast::EntityType),
    IsIn(ast::EntityType, ast::EntityUID),
}

impl ScopeCheck {
    /// Does the scope hold for `uid`, whose only ancestor (remit's hierarchy is one level
    /// deep: agent in owner, resource in tool) is `parent`?
    pub(crate) fn holds(&self, uid: &ast::EntityUID, parent: Option<&ast::EntityUID>) -> bool {
        let within = |group: &ast::EntityUID| group == uid || Some(group) == parent;
        match self {
            ScopeCheck::Any => true,
            ScopeCheck::Eq(group) => group == uid,
            ScopeCheck::In(group) => within(group),
            ScopeCheck::Is(entity_type) => uid.entity_type() == entity_type,
            ScopeCheck::IsIn(entity_type, group) => {
                uid.entity_type() == entity_type && within(group)
            }
        }
    }

    fn principal(constraint: PrincipalConstraint) -> ScopeCheck {
        match constraint {
            PrincipalConstraint::Any => ScopeCheck::Any,
            PrincipalConstraint::Eq(uid) => ScopeCheck::Eq(uid.as_ref().clone()),
            PrincipalConstraint::In(uid) => ScopeCheck::In(uid.as_ref().clone()),
            PrincipalConstraint::Is(name) => ScopeCheck::Is(name.as_ref().clone()),
            PrincipalConstraint::IsIn(name, uid) => {
                ScopeCheck::IsIn(name.as_ref().clone(), uid.as_ref().clone())
            }
        }
    }

    fn resource(constraint: ResourceConstraint) -> ScopeCheck {
        match constraint {
            ResourceConstraint::Any => ScopeCheck::Any,
            ResourceConstraint::Eq(uid) => ScopeCheck::Eq(uid.as_ref().clone()),
            ResourceConstraint::In(uid) => ScopeCheck::In(uid.as_ref().clone()),
            ResourceConstraint::Is(name) => ScopeCheck::Is(name.as_ref().clone()),
            ResourceConstraint::IsIn(name, uid) => {
                ScopeCheck::IsIn(name.as_ref().clone(), uid.as_ref().clone())
            }
        }
    }
}

/// The policies of one action, by position in the engine's list: those pinned to a principal
/// (or a group of it), those pinned to a resource (or a group of it), and the rest.
#[derive(Debug, Default)]
pub(crate) struct ActionIndex {
    pub(crate) general: Vec<u32>,
    pub(crate) by_principal: HashMap<ast::EntityUID, Vec<u32>>,
    pub(crate) by_resource: HashMap<ast::EntityUID, Vec<u32>>,
}

/// Where a policy was written, for error messages.
struct Origin {
    file: String,
    text_index: usize,
    offset: usize,
}

pub(crate) fn load_dir(dir: &Path) -> Result<PolicyEngine, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut schemas = Vec::new();
    let mut policy_files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        match path.extension().and_then(|ext| ext.to_str()) {
            Some("cedarschema") => schemas.push(path),
            Some("cedar") => policy_files.push(path),
            _ => {}
        }
    }
    let schema_path = match schemas.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(PolicyError::Schema {
                reason: format!(
                    "no `*.cedarschema` file in `{0}`, so its policies cannot be validated; hint: `remit policy init {0}` writes the example schema and policies to start from",
                    dir.display()
                ),
            });
        }
        many => {
            let mut names: Vec<String> =
                many.iter().map(|p| format!("`{}`", p.display())).collect();
            names.sort();
            return Err(PolicyError::Schema {
                reason: format!(
                    "more than one schema in `{}`: {}; hint: keep exactly one `*.cedarschema` file",
                    dir.display(),
                    names.join(", ")
                ),
            });
        }
    };
    policy_files.sort();
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let schema_text = read(&schema_path)?;
    let mut texts = Vec::with_capacity(policy_files.len());
    for path in &policy_files {
        texts.push((path.display().to_string(), read(path)?));
    }
    let sources: Vec<(&str, &str)> = texts
        .iter()
        .map(|(name, text)| (name.as_str(), text.as_str()))
        .collect();
    build(&schema_path.display().to_string(), &schema_text, &sources)
}

pub(crate) fn build(
    schema_file: &str,
    schema_text: &str,
    sources: &[(&str, &str)],
) -> Result<PolicyEngine, PolicyError> {
    let (schema, _warnings) = Schema::from_cedarschema_str(schema_text)
        .map_err(|error| invalid(schema_file, schema_text, &error))?;

    // Name every policy and remember where it came from.
    let mut policies: Vec<Policy> = Vec::new();
    let mut origins: HashMap<PolicyId, Origin> = HashMap::new();
    for (text_index, (file, text)) in sources.iter().enumerate() {
        let parsed = PolicySet::from_str(text).map_err(|error| invalid(file, text, &error))?;
        if let Some(template) = parsed.templates().next() {
            return Err(PolicyError::Invalid {
                file: (*file).to_string(),
                line: 1,
                reason: format!(
                    "`{}` is a template (it has slots such as `?principal`); hint: remit loads static policies only",
                    template.id()
                ),
            });
        }
        // Cedar numbers a text's policies `policy0`, `policy1`, … in source order.
        let mut in_file: Vec<(usize, &Policy)> = parsed
            .policies()
            .map(|policy| (source_position(policy.id()), policy))
            .collect();
        in_file.sort_by_key(|(position, _)| *position);
        let stem = Path::new(file)
            .file_stem()
            .and_then(|stem| stem.to_str())
            .unwrap_or(file)
            .to_string();
        let mut cursor = 0;
        for (position, policy) in in_file {
            // The policy's own text locates it in the file for duplicate-id messages.
            let offset = policy
                .to_cedar()
                .and_then(|own| text.get(cursor..)?.find(own.as_str()).map(|at| cursor + at))
                .unwrap_or(cursor);
            cursor = offset;
            let id = match policy.annotation("id") {
                Some(id) => id.to_string(),
                None => format!("{stem}.{}", position + 1),
            };
            let id = PolicyId::new(id);
            let origin = Origin {
                file: (*file).to_string(),
                text_index,
                offset,
            };
            if let Some(first) = origins.get(&id) {
                return Err(PolicyError::DuplicateId {
                    id: id.to_string(),
                    file: origin.file.clone(),
                    line: line_of(text, offset),
                    first: format!(
                        "`{}:{}`",
                        first.file,
                        line_of(sources[first.text_index].1, first.offset)
                    ),
                });
            }
            origins.insert(id.clone(), origin);
            policies.push(policy.new_id(id));
        }
    }

    let whole = PolicySet::from_policies(policies.iter().cloned()).map_err(|error| {
        PolicyError::Schema {
            reason: one_line(&format!("cannot assemble the policy set: {error}")),
        }
    })?;
    let validator = Validator::new(schema.clone());
    let result = validator.validate(&whole, ValidationMode::Strict);
    if let Some(error) = result.validation_errors().next() {
        let (file, text) = match origins.get(error.policy_id()) {
            Some(origin) => sources[origin.text_index],
            None => ("<policies>", ""),
        };
        let mut reason = error.to_string();
        // Cedar prefixes "for policy `<id>`, "; the file and line say that better.
        if let Some(rest) = reason.strip_prefix("for policy `")
            && let Some((_, rest)) = rest.split_once("`, ")
        {
            reason = rest.to_string();
        }
        return Err(PolicyError::Invalid {
            file: file.to_string(),
            line: label_line(text, error),
            reason: with_hint(reason, error),
        });
    }

    let action_entities = schema
        .action_entities()
        .map_err(|error| PolicyError::Schema {
            reason: one_line(&format!("cannot read the schema's actions: {error}")),
        })?;
    // Every action a request can name, with the groups it belongs to (`read in call`).
    let actions: Vec<(EntityUid, BTreeSet<EntityUid>)> = action_entities
        .iter()
        .map(|entity| {
            let uid = entity.uid();
            let groups = action_entities
                .ancestors(&uid)
                .map(|ancestors| ancestors.cloned().collect())
                .unwrap_or_default();
            (uid, groups)
        })
        .collect();

    let mut compiled = Vec::with_capacity(policies.len());
    let mut index: HashMap<ast::EntityUID, ActionIndex> = HashMap::new();
    for (position, policy) in policies.iter().enumerate() {
        let position = u32::try_from(position).map_err(|_| PolicyError::Schema {
            reason: "more than 4,294,967,295 policies".to_string(),
        })?;
        compiled.push(Compiled {
            id: policy.id().to_string(),
            effect: policy.effect(),
            condition: AsRef::<ast::Policy>::as_ref(policy).condition(),
            principal: ScopeCheck::principal(policy.principal_constraint()),
            resource: ScopeCheck::resource(policy.resource_constraint()),
            conditions: AsRef::<ast::Policy>::as_ref(policy)
                .non_scope_constraints()
                .cloned(),
            reason: policy.annotation("reason").map(str::to_string),
            step_up: policy.annotation("step_up").map(str::to_string),
        });
        let place = Place::of(policy);
        for (action, groups) in &actions {
            let applies = match policy.action_constraint() {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(uid) => uid == *action,
                ActionConstraint::In(uids) => {
                    uids.iter().any(|uid| uid == action || groups.contains(uid))
                }
            };
            if !applies {
                continue;
            }
            let slices = index.entry(action.as_ref().clone()).or_default();
            let list = match &place {
                Place::Principal(uid) => {
                    slices.by_principal.entry(uid.as_ref().clone()).or_default()
                }
                Place::Resource(uid) => slices.by_resource.entry(uid.as_ref().clone()).or_default(),
                Place::General => &mut slices.general,
            };
            list.push(position);
        }
    }

    Ok(PolicyEngine {
        index,
        policies: compiled,
        action_entities: action_entities
            .iter()
            .map(|entity| {
                let entity: &ast::Entity = entity.as_ref();
                (entity.uid().clone(), std::sync::Arc::new(entity.clone()))
            })
            .collect(),
        agents: Default::default(),
        types: crate::decide::Types::new()?,
        empty_slots: ast::SlotEnv::new(),
        #[cfg(test)]
        whole,
    })
}

/// Which bucket of an action a policy belongs in. A policy pinned to both a principal and
/// a resource goes with its principal: either is sound, since it can only match requests
/// from that principal.
enum Place {
    Principal(EntityUid),
    Resource(EntityUid),
    General,
}

impl Place {
    fn of(policy: &Policy) -> Place {
        // `principal in X` holds only for X itself or X's ancestors, so it is indexed by X and
        // looked up with the principal's own uid and each of its ancestors' uids.
        match policy.principal_constraint() {
            PrincipalConstraint::Eq(uid)
            | PrincipalConstraint::In(uid)
            | PrincipalConstraint::IsIn(_, uid) => return Place::Principal(uid),
            PrincipalConstraint::Any | PrincipalConstraint::Is(_) => {}
        }
        match policy.resource_constraint() {
            ResourceConstraint::Eq(uid)
            | ResourceConstraint::In(uid)
            | ResourceConstraint::IsIn(_, uid) => Place::Resource(uid),
            ResourceConstraint::Any | ResourceConstraint::Is(_) => Place::General,
        }
    }
}

/// `policy7` → 7; anything else sorts last (Cedar has always used this naming).
fn source_position(id: &PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn invalid(file: &str, text: &str, error: &(impl Diagnostic + Display)) -> PolicyError {
    PolicyError::Invalid {
        file: file.to_string(),
        line: label_line(text, error),
        reason: with_hint(error.to_string(), error),
    }
}

/// The line of the first labelled span of a Cedar error, or 1 when it has none.
fn label_line(text: &str, error: &dyn Diagnostic) -> usize {
    error
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| line_of(text, label.offset()))
        .unwrap_or(1)
}

fn with_hint(reason: String, error: &dyn Diagnostic) -> String {
    match error.help() {
        Some(help) => one_line(&format!("{reason}; hint: {help}")),
        None => one_line(&reason),
    }
}

pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
