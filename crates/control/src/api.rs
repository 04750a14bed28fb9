//! The admin and grant API over HTTP. Handlers are thin: they authenticate the caller, decode
//! the body and call [`Authority`]. One function turns every error into a status and a
//! `{"error","message"}` body; nothing internal reaches a client.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use model::{AgentStatus, ScopeSet, TaskStatus};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use store::{AgentRecord, AuditFilter, RevocationKind, TaskRecord};
use utoipa::{OpenApi, ToResponse, ToSchema};

use crate::approvals::ApprovalView;
use crate::authority::{Authority, Grant, TaskRequest, VerifyReport};
use crate::checkpoint::Checkpoint;
use crate::delegation::{Exchanged, TokenExchange};
use crate::error::{Error, ErrorKind};
use crate::operators::Operator;
use crate::timeline::TimelineEntry;

type AppState = Arc<Authority>;

/// Every route of the control plane.
pub fn router(authority: Arc<Authority>) -> Router {
    let body_limit = authority.settings().max_body_bytes;
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/openapi.json", get(openapi_json))
        .route("/v1/agents", post(register_agent).get(list_agents))
        .route("/v1/agents/{name}", get(show_agent))
        .route("/v1/agents/{name}/disable", post(disable_agent))
        .route("/v1/agents/{name}/release", post(release_agent))
        .route("/v1/tasks", post(request_task))
        .route("/v1/tasks/{id}", get(show_task))
        .route("/v1/tasks/{id}/complete", post(complete_task))
        .route("/v1/tasks/{id}/timeline", get(task_timeline))
        .route("/v1/token", post(token_exchange))
        .route("/v1/approvals", get(list_approvals))
        .route("/v1/approvals/{id}", get(show_approval))
        .route("/v1/approvals/{id}/approve", post(approve))
        .route("/v1/approvals/{id}/deny", post(deny))
        .route("/v1/revocations", post(revoke))
        .route("/v1/keys/rotate", post(rotate_keys))
        .route("/v1/audit", get(audit_events))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/audit/checkpoint", get(audit_checkpoint))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(authority)
}

/// The OpenAPI document of this API, generated from the handlers below.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(title = "remit", description = "Task-scoped credentials, policy checks and a hash-chained audit log for AI agents."),
    paths(
        livez, readyz, healthz, jwks, register_agent, list_agents, show_agent, disable_agent, release_agent, request_task, show_task,
        complete_task, task_timeline, token_exchange, list_approvals, show_approval, approve, deny, revoke, rotate_keys, audit_events, audit_verify,
        audit_checkpoint
    ),
    components(responses(OperatorUnauthorized, RoleForbidden, BodyTooLarge, StoreUnavailable), schemas(ErrorBody, ApprovalStatusName, AgentView, RegisterAgent, DisableAgent, TaskRequest, Grant, TaskView, TokenExchange, Exchanged, TimelineEntry, ApprovalView, DecideApproval, Revoke, RevocationView, Rotated, AuditPage, VerifyReport, Checkpoint)),
    modifiers(&SecuritySchemes)
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "operator",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("remit_op_…")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "dpop",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "DPoP",
                "A DPoP proof (RFC 9449) signed by the agent's key; with `Authorization: DPoP <task token>` where a token is needed",
            ))),
        );
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable snake_case code.
    pub error: String,
    /// One line for a human.
    pub message: String,
}

/// 401 on every operator route.
#[derive(ToResponse)]
#[response(
    description = "`operator_token_missing`: no `Authorization: Bearer <operator token>`; `operator_token_invalid`: a token remit does not know, or a disabled operator's",
    headers(("WWW-Authenticate" = String, description = "the error code as `Bearer error=\"…\"`")),
    example = json!({"error": "operator_token_missing", "message": "the admin API needs `Authorization: Bearer <operator token>`; hint: create one with `remit operator create --role admin`"})
)]
#[expect(dead_code, reason = "a response of the document only")]
struct OperatorUnauthorized(ErrorBody);

/// 403 where a role is needed.
#[derive(ToResponse)]
#[response(
    description = "`operator_role`: the operator's role may not do this",
    example = json!({"error": "operator_role", "message": "operator role `auditor` may not do this; it needs `admin` or `approver`"})
)]
#[expect(dead_code, reason = "a response of the document only")]
struct RoleForbidden(ErrorBody);

/// 413 on every route that reads a body.
#[derive(ToResponse)]
#[response(
    description = "`body_too_large`: the body is larger than `max_body_bytes` (64 KiB by default)"
)]
#[expect(dead_code, reason = "a response of the document only")]
struct BodyTooLarge(ErrorBody);

/// 503 on every route that reads or writes the store.
#[derive(ToResponse)]
#[response(
    description = "`store_unavailable`: the store cannot be reached, so remit refuses (fails closed)"
)]
#[expect(dead_code, reason = "a response of the document only")]
struct StoreUnavailable(ErrorBody);

/// The names `store::ApprovalStatus::parse` accepts, for the document.
#[derive(ToSchema)]
#[schema(as = ApprovalStatus, rename_all = "snake_case")]
#[expect(
    dead_code,
    reason = "a schema only: `store::ApprovalStatus` is what the handlers use"
)]
pub(crate) enum ApprovalStatusName {
    Pending,
    Approved,
    Denied,
    Consumed,
    Expired,
}

/// The names `store::RevocationKind::parse` accepts, for the document.
#[derive(ToSchema)]
#[schema(as = RevocationKind, rename_all = "snake_case")]
#[expect(
    dead_code,
    reason = "a schema only: `store::RevocationKind` is what the handlers use"
)]
enum RevocationKindName {
    Token,
    Task,
    Agent,
    Owner,
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = match self.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = if self.kind == ErrorKind::Internal {
            tracing::error!("internal error: {}", self.message);
            "internal error; the server log has the detail".to_string()
        } else {
            self.message
        };
        let mut body = json!({ "error": self.code, "message": message });
        if let (Some(Value::Object(detail)), Value::Object(body)) = (self.detail, &mut body) {
            for (key, value) in detail {
                body.entry(key).or_insert(value);
            }
        }
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            let challenge = format!(
                "DPoP error=\"invalid_token\", algs=\"ES256 EdDSA\", Bearer error=\"{}\"",
                self.code
            );
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
        }
        response
    }
}

/// The request body, read with remit's own errors (axum's rejections are plain text).
struct RawBody(Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = Error;

    async fn from_request(request: Request, state: &S) -> Result<Self, Error> {
        Bytes::from_request(request, state)
            .await
            .map(RawBody)
            .map_err(|rejection| body_rejection(rejection.status()))
    }
}

/// The error for a body that could not be read: too large (413), or cut off (400).
fn body_rejection(status: StatusCode) -> Error {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        Error::new(
            ErrorKind::PayloadTooLarge,
            "body_too_large",
            "the request body is larger than remit accepts",
        )
    } else {
        Error::bad_request("invalid_body", "the request body could not be read")
    }
}

/// A JSON body decoded with remit's own errors.
struct JsonBody<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(request: Request, state: &S) -> Result<Self, Error> {
        let RawBody(bytes) = RawBody::from_request(request, state).await?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            Error::bad_request(
                "invalid_json",
                format!("the request body is not valid JSON for this call: {e}"),
            )
        })
    }
}

/// One path parameter as text, with remit's own error when it is not valid percent-encoded
/// UTF-8 (axum's rejection is plain text).
struct PathText(String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Error> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(text)| PathText(text))
            .map_err(|e| {
                Error::bad_request("invalid_path", format!("invalid path: {}", e.body_text()))
            })
    }
}

/// The operator behind `Authorization: Bearer <operator token>`.
struct OperatorAuth(Operator);

impl FromRequestParts<AppState> for OperatorAuth {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, authority: &AppState) -> Result<Self, Error> {
        let token = bearer(&parts.headers, "Bearer").ok_or_else(|| {
            Error::unauthorized(
                "operator_token_missing",
                "the admin API needs `Authorization: Bearer <operator token>`; hint: create one with `remit operator create --role admin`",
            )
        })?;
        Ok(OperatorAuth(authority.authenticate_operator(token).await?))
    }
}

/// The value of `Authorization: <scheme> <value>`, scheme compared case-insensitively.
fn bearer<'a>(headers: &'a HeaderMap, scheme: &str) -> Option<&'a str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (given, rest) = value.split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

fn dpop_header(headers: &HeaderMap) -> Result<Option<&str>, Error> {
    let mut values = headers.get_all("dpop").iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(Error::bad_request(
            "proof_malformed",
            "send exactly one `DPoP` header",
        ));
    }
    first
        .to_str()
        .map(Some)
        .map_err(|_| Error::bad_request("proof_malformed", "the `DPoP` header is not valid text"))
}

/// A query's `limit`: absent or 0 means 100. One above the store's cap is refused, so that
/// a client never takes a short page for the end of the list.
fn page_limit(limit: Option<u32>) -> Result<u32, Error> {
    match limit {
        Some(limit) if limit > store::QUERY_LIMIT_MAX => Err(Error::bad_request(
            "invalid_query",
            format!(
                "`limit` must be at most {}, not {limit}",
                store::QUERY_LIMIT_MAX
            ),
        )),
        limit => Ok(limit.unwrap_or(100)),
    }
}

fn query<T: DeserializeOwned>(uri: &axum::http::Uri) -> Result<T, Error> {
    Query::<T>::try_from_uri(uri).map(|q| q.0).map_err(|e| {
        Error::bad_request(
            "invalid_query",
            format!("invalid query string: {}", e.body_text()),
        )
    })
}

async fn not_found() -> Error {
    Error::not_found("not_found", "no such route; see /openapi.json")
}

async fn method_not_allowed() -> Error {
    Error::new(
        ErrorKind::MethodNotAllowed,
        "method_not_allowed",
        "this route does not take that method; see /openapi.json",
    )
}

/// Liveness: the process runs and answers. Asks nothing of the store, so that a store outage
/// makes a node unready (`/readyz`) without getting it restarted.
#[utoipa::path(get, path = "/livez", responses(
    (status = 200, description = "the process runs")))]
async fn livez() -> axum::Json<Value> {
    axum::Json(json!({ "status": "ok" }))
}

/// Readiness (also served as `/healthz`): the store file is still the one opened (SQLite), a
/// write reached the store within the last few seconds with none failing since (else the
/// probe writes a heartbeat row itself, within `store_timeout_ms`), a signing key is loaded
/// and policy is loaded. 503 names the first check that failed in `reason`.
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, description = "ready: the store takes writes, keys and policy are loaded"),
    (status = 503, description = "not ready; `reason` is `store`, `keys` or `policy`", body = ErrorBody)))]
async fn readyz(State(authority): State<AppState>) -> Result<axum::Json<Value>, Error> {
    let not_ready = |code, reason, message: &str| {
        Error::new(
            ErrorKind::Unavailable,
            code,
            format!("not ready: {message}"),
        )
        .with_detail(json!({ "reason": reason }))
    };
    if let Err(error) = authority.store().ready(authority.clock.now_ms()).await {
        tracing::warn!("not ready: {error}");
        return Err(not_ready(
            "store_unavailable",
            "store",
            "the store does not take writes, so calls are refused (the server log has the detail)",
        ));
    }
    let signing_key = authority.keys().current_kid();
    if signing_key.is_empty() {
        return Err(not_ready("not_ready", "keys", "no signing key is loaded"));
    }
    let policies = authority.policy().policy_count();
    if policies == 0 {
        return Err(not_ready(
            "not_ready",
            "policy",
            "no policy is loaded, so every call would be refused",
        ));
    }
    Ok(axum::Json(json!({
        "status": "ok",
        "store": authority.store().kind(),
        "signing_key": signing_key,
        "policies": policies,
    })))
}

/// `/readyz` under its older name, kept for the probes and scripts that use it.
#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, description = "ready, as `/readyz`"),
    (status = 503, description = "not ready, as `/readyz`", body = ErrorBody)))]
async fn healthz(state: State<AppState>) -> Result<axum::Json<Value>, Error> {
    readyz(state).await
}

/// The public keys that verify task tokens: a SPIFFE bundle (JWK Set, `use: jwt-svid`).
#[utoipa::path(get, path = "/.well-known/jwks.json", responses((status = 200, description = "JWK Set")))]
async fn jwks(State(authority): State<AppState>) -> impl IntoResponse {
    let bundle = authority
        .keys()
        .bundle(authority.settings().sync_interval.as_secs().max(60));
    ([(header::CACHE_CONTROL, "max-age=60")], axum::Json(bundle))
}

async fn openapi_json() -> impl IntoResponse {
    axum::Json(openapi())
}

/// An agent as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub name: String,
    pub spiffe_id: String,
    pub owner: String,
    #[schema(value_type = AgentStatus, example = "active")]
    pub status: AgentStatus,
    /// Registered public JWKs.
    pub keys: Vec<Value>,
    pub created_at: i64,
}

impl From<AgentRecord> for AgentView {
    fn from(agent: AgentRecord) -> AgentView {
        AgentView {
            name: agent.name.to_string(),
            spiffe_id: agent.spiffe_id.to_string(),
            owner: agent.owner.to_string(),
            status: agent.status,
            keys: agent.keys,
            created_at: agent.created_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgent {
    /// 1 to 64 lowercase letters, digits, `.`, `-` and `_`, starting with a letter or digit.
    #[schema(
        example = "triage-bot",
        pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$",
        min_length = 1,
        max_length = 64
    )]
    pub name: String,
    /// The accountable owner, required: an identity such as an email address, at most 256
    /// bytes, without spaces or control characters.
    #[schema(
        example = "alice@example.org",
        pattern = r"^[^\s\x00-\x1f\x7f-\x9f]+$",
        min_length = 1,
        max_length = 256
    )]
    pub owner: String,
    /// Public JWKs (P-256 `EC` or Ed25519 `OKP`), 1 to 8.
    #[schema(min_items = 1, max_items = 8, example = json!([{"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU", "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]))]
    pub keys: Vec<Value>,
}

/// Register an agent; answers with its SPIFFE ID.
#[utoipa::path(post, path = "/v1/agents", request_body = RegisterAgent, security(("operator" = [])), responses(
    (status = 201, body = AgentView),
    (status = 400, description = "`invalid_json`, `invalid_name` (name or owner) or `invalid_key`", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden),
    (status = 409, description = "`conflict`: an agent of that name exists", body = ErrorBody), (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn register_agent(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    JsonBody(body): JsonBody<RegisterAgent>,
) -> Result<(StatusCode, axum::Json<AgentView>), Error> {
    let agent = authority
        .register_agent(&operator, &body.name, &body.owner, &body.keys)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(agent.into())))
}

/// List agents.
#[utoipa::path(get, path = "/v1/agents", security(("operator" = [])), responses((status = 200, body = [AgentView]), (status = 401, response = OperatorUnauthorized), (status = 503, response = StoreUnavailable)))]
async fn list_agents(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
) -> Result<axum::Json<Vec<AgentView>>, Error> {
    let agents = authority.list_agents(&operator).await?;
    Ok(axum::Json(
        agents.into_iter().map(AgentView::from).collect(),
    ))
}

/// Show one agent.
#[utoipa::path(get, path = "/v1/agents/{name}", security(("operator" = [])), params(("name" = String, Path, description = "an agent name: 1 to 64 lowercase letters, digits, `.`, `-` and `_`, starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64)),
    responses((status = 200, body = AgentView), (status = 400, description = "`invalid_name` or `invalid_path`", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 404, description = "`agent_not_found`", body = ErrorBody), (status = 503, response = StoreUnavailable)))]
async fn show_agent(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(name): PathText,
) -> Result<axum::Json<AgentView>, Error> {
    Ok(axum::Json(
        authority.get_agent(&operator, &name).await?.into(),
    ))
}

/// The `reason` of an optional JSON body `{"reason": "…"}`, or `default` without a body.
fn optional_reason(body: &Bytes, default: &str) -> Result<String, Error> {
    if body.is_empty() {
        return Ok(default.to_string());
    }
    let body: DisableAgent = serde_json::from_slice(body).map_err(|e| {
        Error::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON for this call: {e}"),
        )
    })?;
    Ok(body.reason.unwrap_or_else(|| default.to_string()))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableAgent {
    /// Why, for the audit log: 1 to 1000 bytes of printable text.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1000)]
    pub reason: Option<String>,
}

/// Disable an agent: no new tasks, and its current credentials die on their next use.
#[utoipa::path(post, path = "/v1/agents/{name}/disable", security(("operator" = [])), params(("name" = String, Path, description = "an agent name: 1 to 64 lowercase letters, digits, `.`, `-` and `_`, starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64)),
    request_body(content = Option<DisableAgent>, description = "optional: without a body the reason is `disabled by an operator`"),
    responses((status = 200, body = AgentView), (status = 400, description = "`invalid_json`, `invalid_name`, `invalid_path` or `invalid_text` (the reason)", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 404, description = "`agent_not_found`", body = ErrorBody), (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn disable_agent(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(name): PathText,
    RawBody(body): RawBody,
) -> Result<axum::Json<AgentView>, Error> {
    let reason = optional_reason(&body, "disabled by an operator")?;
    Ok(axum::Json(
        authority
            .disable_agent(&operator, &name, &reason)
            .await?
            .into(),
    ))
}

/// Release a quarantined agent: it may ask for tasks again. Credentials revoked by the
/// quarantine stay revoked.
#[utoipa::path(post, path = "/v1/agents/{name}/release", security(("operator" = [])), params(("name" = String, Path, description = "an agent name: 1 to 64 lowercase letters, digits, `.`, `-` and `_`, starting with a letter or digit", pattern = r"^[a-z0-9][a-z0-9._-]{0,63}$", min_length = 1, max_length = 64)),
    request_body(content = Option<DisableAgent>, description = "optional: without a body the reason is `released by an operator`"),
    responses((status = 200, body = AgentView), (status = 400, description = "`invalid_json`, `invalid_name`, `invalid_path` or `invalid_text` (the reason)", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 404, description = "`agent_not_found`", body = ErrorBody),
    (status = 409, description = "`agent_not_quarantined`", body = ErrorBody), (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn release_agent(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(name): PathText,
    RawBody(body): RawBody,
) -> Result<axum::Json<AgentView>, Error> {
    let reason = optional_reason(&body, "released by an operator")?;
    Ok(axum::Json(
        authority
            .release_agent(&operator, &name, &reason)
            .await?
            .into(),
    ))
}

/// Request a task: the agent proves its key with a DPoP proof (`htm` POST, `htu` this URL).
#[utoipa::path(post, path = "/v1/tasks", request_body = TaskRequest, security(("dpop" = [])), responses(
    (status = 201, body = Grant),
    (status = 400, description = "`invalid_json`, `invalid_name`, `invalid_text` (the intent), `invalid_scope`, `invalid_ttl`, `invalid_budget`, `invalid_obo` or `proof_malformed`", body = ErrorBody),
    (status = 401, description = "`agent_unknown`, `proof_missing` or the proof's own code (`proof_invalid`, `proof_expired`, `proof_replayed`, `proof_key_unknown`, …)", body = ErrorBody),
    (status = 403, description = "`task_refused` by policy (`policies` and `reasons` name why), or `agent_not_active`", body = ErrorBody),
    (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn request_task(
    State(authority): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<TaskRequest>,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, &'static str); 1],
        axum::Json<Grant>,
    ),
    Error,
> {
    let proof = dpop_header(&headers)?;
    let grant = authority.request_task(proof, body).await?;
    Ok((
        StatusCode::CREATED,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(grant),
    ))
}

/// A task as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub id: String,
    pub agent: String,
    pub owner: String,
    pub intent: String,
    pub scopes: ScopeSet,
    pub on_behalf_of: Option<String>,
    pub parent: Option<String>,
    pub depth: u32,
    #[schema(value_type = TaskStatus, example = "active")]
    pub status: TaskStatus,
    pub created_at: i64,
    pub expires_at: i64,
    pub budget: u32,
    pub calls_used: u32,
}

impl From<TaskRecord> for TaskView {
    fn from(task: TaskRecord) -> TaskView {
        TaskView {
            id: task.id.to_string(),
            agent: task.agent.to_string(),
            owner: task.owner.to_string(),
            intent: task.intent,
            scopes: task.scopes,
            on_behalf_of: task.obo,
            parent: task.parent.map(|p| p.to_string()),
            depth: task.depth,
            status: task.status,
            created_at: task.created_at,
            expires_at: task.expires_at,
            budget: task.budget,
            calls_used: task.calls_used,
        }
    }
}

/// Show a task.
#[utoipa::path(get, path = "/v1/tasks/{id}", security(("operator" = [])), params(("id" = String, Path, description = "a task id: `task_` and 26 lowercase base-32 characters", pattern = r"^task_[a-z2-7]{26}$", min_length = 31, max_length = 31)),
    responses((status = 200, body = TaskView), (status = 400, description = "`invalid_name` (not a task id) or `invalid_path`", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 404, description = "`task_not_found`", body = ErrorBody), (status = 503, response = StoreUnavailable)))]
async fn show_task(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(id): PathText,
) -> Result<axum::Json<TaskView>, Error> {
    Ok(axum::Json(authority.get_task(&operator, &id).await?.into()))
}

/// What a task did, in order: its grant, each call with its decision and reasons, approvals,
/// delegations (and what each delegated task did) and revocations.
#[utoipa::path(get, path = "/v1/tasks/{id}/timeline", security(("operator" = [])), params(("id" = String, Path, description = "a task id: `task_` and 26 lowercase base-32 characters", pattern = r"^task_[a-z2-7]{26}$", min_length = 31, max_length = 31)),
    responses((status = 200, body = [TimelineEntry]), (status = 400, description = "`invalid_name` (not a task id) or `invalid_path`", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 404, description = "`task_not_found`", body = ErrorBody), (status = 503, response = StoreUnavailable)))]
async fn task_timeline(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(id): PathText,
) -> Result<axum::Json<Vec<TimelineEntry>>, Error> {
    Ok(axum::Json(authority.timeline(&operator, &id).await?))
}

/// End a task; its tokens stop working. Needs `Authorization: DPoP <task token>` and a proof.
#[utoipa::path(post, path = "/v1/tasks/{id}/complete", security(("dpop" = [])), params(("id" = String, Path, description = "a task id: `task_` and 26 lowercase base-32 characters", pattern = r"^task_[a-z2-7]{26}$", min_length = 31, max_length = 31)),
    responses((status = 200, body = TaskView), (status = 400, description = "`invalid_name` (not a task id), `invalid_path` or `proof_malformed`", body = ErrorBody),
    (status = 401, description = "`token_missing`, `proof_missing`, or the token's or proof's own code", body = ErrorBody),
    (status = 403, description = "`task_mismatch`: the token is for another task", body = ErrorBody),
    (status = 404, description = "no such route (an empty id)", body = ErrorBody),
    (status = 409, description = "`task_not_active`: completed, revoked or expired already", body = ErrorBody), (status = 503, response = StoreUnavailable)))]
async fn complete_task(
    State(authority): State<AppState>,
    headers: HeaderMap,
    PathText(id): PathText,
) -> Result<axum::Json<TaskView>, Error> {
    let token = bearer(&headers, "DPoP").ok_or_else(|| {
        Error::unauthorized(
            "token_missing",
            "completing a task needs `Authorization: DPoP <task token>`",
        )
    })?;
    let proof = dpop_header(&headers)?;
    Ok(axum::Json(
        authority.complete_task(&id, token, proof).await?.into(),
    ))
}

/// RFC 8693 token exchange: delegate part of a task to another agent. Form-encoded; the DPoP
/// proof is signed by the receiving agent's key (`htm` POST, `htu` this URL). The child task
/// only narrows: scopes inside the parent's, no later expiry, no larger budget, bounded depth.
#[utoipa::path(post, path = "/v1/token", request_body(content = TokenExchange, content_type = "application/x-www-form-urlencoded"),
    security(("dpop" = [])), responses(
    (status = 200, body = Exchanged),
    (status = 400, description = "`invalid_request`, `invalid_grant`, `invalid_scope`, `unsupported_grant_type`, `invalid_name` (the agent) or `invalid_text` (the intent)", body = ErrorBody),
    (status = 401, description = "the receiving agent is unknown, or its proof is missing or fails", body = ErrorBody),
    (status = 403, description = "refused by policy, or an agent that is not active", body = ErrorBody), (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn token_exchange(
    State(authority): State<AppState>,
    request: Request,
) -> Result<
    (
        StatusCode,
        [(header::HeaderName, &'static str); 1],
        axum::Json<Exchanged>,
    ),
    Error,
> {
    let proof = dpop_header(request.headers())?.map(str::to_string);
    let axum::Form(form) = axum::Form::<TokenExchange>::from_request(request, &())
        .await
        .map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                return body_rejection(e.status());
            }
            Error::bad_request(
                "invalid_request",
                format!("the token request is not a valid form: {}", e.body_text()),
            )
        })?;
    let exchanged = authority.exchange_token(proof.as_deref(), form).await?;
    Ok((
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(exchanged),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalQuery {
    status: Option<String>,
    limit: Option<u32>,
}

/// Step-up approvals, newest first; `status` (`pending`, `approved`, `denied`, `consumed`,
/// `expired`) keeps those that have it now. Needs the `approver` or `admin` role.
#[utoipa::path(get, path = "/v1/approvals", security(("operator" = [])), params(
    ("status" = Option<ApprovalStatusName>, Query, description = "only approvals that have this status now"),
    ("limit" = Option<u32>, Query, description = "at most this many (0 or absent: 100)", minimum = 0, maximum = 1000)),
    responses((status = 200, body = [ApprovalView]), (status = 400, description = "`invalid_query`", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 503, response = StoreUnavailable)))]
async fn list_approvals(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    uri: axum::http::Uri,
) -> Result<axum::Json<Vec<ApprovalView>>, Error> {
    let q: ApprovalQuery = query(&uri)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(text) => Some(store::ApprovalStatus::parse(text).ok_or_else(|| {
            Error::bad_request(
                "invalid_query",
                format!(
                    "unknown approval status `{text}`: expected `pending`, `approved`, `denied`, `consumed` or `expired`"
                ),
            )
        })?),
    };
    Ok(axum::Json(
        authority
            .list_approvals(&operator, status, page_limit(q.limit)?)
            .await?,
    ))
}

/// Show one approval.
#[utoipa::path(get, path = "/v1/approvals/{id}", security(("operator" = [])), params(("id" = String, Path, description = "an approval id: `apr_` and 32 hex digits", pattern = r"^apr_[0-9a-f]{32}$", min_length = 36, max_length = 36)),
    responses((status = 200, body = ApprovalView), (status = 400, description = "`invalid_path`", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 404, description = "`approval_not_found`", body = ErrorBody), (status = 503, response = StoreUnavailable)))]
async fn show_approval(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(id): PathText,
) -> Result<axum::Json<ApprovalView>, Error> {
    Ok(axum::Json(authority.get_approval(&operator, &id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideApproval {
    /// Why, for the audit log: 1 to 1024 bytes of printable text.
    #[schema(example = "change ticket OPS-1234", min_length = 1, max_length = 1024)]
    pub reason: String,
}

/// Approve a pending approval: the exact call it names may pass once before it expires.
/// Needs the `approver` or `admin` role; the agent's owner may not approve unless configured.
#[utoipa::path(post, path = "/v1/approvals/{id}/approve", request_body = DecideApproval, security(("operator" = [])),
    params(("id" = String, Path, description = "an approval id: `apr_` and 32 hex digits", pattern = r"^apr_[0-9a-f]{32}$", min_length = 36, max_length = 36)), responses((status = 200, body = ApprovalView),
    (status = 400, description = "`invalid_json`, `invalid_path` or `invalid_text` (the reason)", body = ErrorBody), (status = 401, response = OperatorUnauthorized),
    (status = 403, description = "`operator_role`, or `approval_owner`: the operator owns the agent", body = ErrorBody),
    (status = 404, description = "`approval_not_found`", body = ErrorBody),
    (status = 409, description = "`approval_not_pending` or `approval_expired`", body = ErrorBody), (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn approve(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(id): PathText,
    JsonBody(body): JsonBody<DecideApproval>,
) -> Result<axum::Json<ApprovalView>, Error> {
    Ok(axum::Json(
        authority
            .decide_approval(&operator, &id, true, &body.reason)
            .await?,
    ))
}

/// Deny a pending approval: the call it names does not pass on it.
#[utoipa::path(post, path = "/v1/approvals/{id}/deny", request_body = DecideApproval, security(("operator" = [])),
    params(("id" = String, Path, description = "an approval id: `apr_` and 32 hex digits", pattern = r"^apr_[0-9a-f]{32}$", min_length = 36, max_length = 36)), responses((status = 200, body = ApprovalView),
    (status = 400, description = "`invalid_json`, `invalid_path` or `invalid_text` (the reason)", body = ErrorBody), (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden),
    (status = 404, description = "`approval_not_found`", body = ErrorBody),
    (status = 409, description = "`approval_not_pending` or `approval_expired`", body = ErrorBody), (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn deny(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    PathText(id): PathText,
    JsonBody(body): JsonBody<DecideApproval>,
) -> Result<axum::Json<ApprovalView>, Error> {
    Ok(axum::Json(
        authority
            .decide_approval(&operator, &id, false, &body.reason)
            .await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// `token` (by `jti`), `task`, `agent` or `owner`.
    #[schema(value_type = RevocationKindName, example = "task")]
    pub kind: String,
    /// A token's `jti` (at most 128 bytes), a task id, an agent name or an owner.
    #[schema(min_length = 1, max_length = 256)]
    pub target: String,
    /// Why, for the audit log: 1 to 1024 bytes of printable text.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 1024)]
    pub reason: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RevocationView {
    pub seq: i64,
    pub kind: String,
    pub target: String,
    pub reason: String,
    pub created_at: i64,
}

/// Revoke a token, a task (with every task delegated from it), an agent or an owner. The
/// next call on this node is denied.
#[utoipa::path(post, path = "/v1/revocations", request_body = Revoke, security(("operator" = [])),
    responses((status = 201, body = RevocationView),
    (status = 400, description = "`invalid_json`, `invalid_kind`, `invalid_text` (reason or token id) or `invalid_name` (the target)", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 404, description = "`task_not_found` or `agent_not_found`", body = ErrorBody), (status = 413, response = BodyTooLarge), (status = 503, response = StoreUnavailable)))]
async fn revoke(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    JsonBody(body): JsonBody<Revoke>,
) -> Result<(StatusCode, axum::Json<RevocationView>), Error> {
    let kind = RevocationKind::parse(&body.kind).ok_or_else(|| {
        Error::bad_request(
            "invalid_kind",
            format!(
                "unknown revocation kind `{}`: expected `token`, `task`, `agent` or `owner`",
                body.kind
            ),
        )
    })?;
    let reason = body
        .reason
        .unwrap_or_else(|| "revoked by an operator".to_string());
    let revocation = authority
        .revoke(&operator, kind, &body.target, &reason)
        .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(RevocationView {
            seq: revocation.seq,
            kind: revocation.kind.as_str().to_string(),
            target: revocation.target,
            reason: revocation.reason,
            created_at: revocation.created_at,
        }),
    ))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Rotated {
    pub kid: String,
}

/// Rotate the token signing key. The old key stays published until its tokens have expired.
#[utoipa::path(post, path = "/v1/keys/rotate", security(("operator" = [])), responses((status = 200, body = Rotated), (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 503, response = StoreUnavailable)))]
async fn rotate_keys(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
) -> Result<axum::Json<Rotated>, Error> {
    Ok(axum::Json(Rotated {
        kid: authority.rotate_keys(&operator).await?,
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    agent: Option<String>,
    task: Option<String>,
    after: Option<u64>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    limit: Option<u32>,
    newest: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditPage {
    /// Events in sequence order, each with `seq`, `prev_hash` and `hash`.
    pub events: Vec<Value>,
}

/// Audit events, filtered by agent (SPIFFE ID or name), task, sequence and time.
#[utoipa::path(get, path = "/v1/audit", security(("operator" = [])), params(
    ("agent" = Option<String>, Query, description = "a SPIFFE ID, or an agent name in this trust domain"), ("task" = Option<String>, Query),
    ("after" = Option<u64>, Query, description = "events with a greater sequence number", minimum = 0),
    ("since_ms" = Option<i64>, Query, description = "events at or after this time (Unix milliseconds)"),
    ("until_ms" = Option<i64>, Query, description = "events before this time (Unix milliseconds)"),
    ("limit" = Option<u32>, Query, description = "at most this many (0 or absent: 100)", minimum = 0, maximum = 1000),
    ("newest" = Option<bool>, Query, description = "the newest matching events instead of the oldest")),
    responses((status = 200, body = AuditPage), (status = 400, description = "`invalid_query`", body = ErrorBody), (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 503, response = StoreUnavailable)))]
async fn audit_events(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    uri: axum::http::Uri,
) -> Result<axum::Json<AuditPage>, Error> {
    let q: AuditQuery = query(&uri)?;
    let agent = q.agent.map(|agent| {
        if agent.starts_with("spiffe://") {
            agent
        } else {
            format!(
                "spiffe://{}/agent/{agent}",
                authority.settings().trust_domain
            )
        }
    });
    let filter = AuditFilter {
        agent,
        task: q.task,
        after_seq: q.after,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        limit: page_limit(q.limit)?,
        newest: q.newest.unwrap_or(false),
    };
    let events = authority.audit_events(&operator, &filter).await?;
    let events = events
        .iter()
        .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
        .collect();
    Ok(axum::Json(AuditPage { events }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyQuery {
    checkpoint: Option<String>,
}

/// Walk the hash chain and report the first broken sequence number, if any. With
/// `checkpoint`, the log must also reach that signed checkpoint's event with the same hash,
/// which shows a cut-off tail or a rewritten history.
#[utoipa::path(get, path = "/v1/audit/verify", security(("operator" = [])),
    params(("checkpoint" = Option<String>, Query, description = "a checkpoint from `GET /v1/audit/checkpoint`, kept since")),
    responses((status = 200, body = VerifyReport), (status = 400, description = "`invalid_query` or `invalid_checkpoint`", body = ErrorBody),
    (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 503, response = StoreUnavailable)))]
async fn audit_verify(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
    uri: axum::http::Uri,
) -> Result<axum::Json<VerifyReport>, Error> {
    let q: VerifyQuery = query(&uri)?;
    let report = match q.checkpoint {
        Some(checkpoint) => {
            authority
                .verify_audit_against(&operator, &checkpoint)
                .await?
        }
        None => authority.verify_audit(&operator).await?,
    };
    Ok(axum::Json(report))
}

/// Sign the audit chain's current head: a checkpoint to keep outside remit and hand to
/// `GET /v1/audit/verify?checkpoint=` later.
#[utoipa::path(get, path = "/v1/audit/checkpoint", security(("operator" = [])),
    responses((status = 200, body = Checkpoint), (status = 401, response = OperatorUnauthorized), (status = 403, response = RoleForbidden), (status = 503, response = StoreUnavailable)))]
async fn audit_checkpoint(
    State(authority): State<AppState>,
    OperatorAuth(operator): OperatorAuth,
) -> Result<axum::Json<Checkpoint>, Error> {
    Ok(axum::Json(authority.audit_checkpoint(&operator).await?))
}
