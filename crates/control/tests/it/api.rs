//! The HTTP API in-process: status codes, `{"error","message"}` bodies, authentication of
//! operators and agents, and the documents it serves.

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::harness::{BASE, Harness, github_scopes};

async fn send(h: &Harness, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = control::api::router(h.authority.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, headers, body)
}

/// A GET without credentials, as a monitor would send it.
pub async fn get_json(h: &Harness, path: &str) -> (StatusCode, Value) {
    let (status, _, body) = send(h, get(path, None)).await;
    (status, body)
}

fn post(path: &str, auth: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut builder = Request::post(path).header(header::CONTENT_TYPE, "application/json");
    if let Some(auth) = auth {
        builder = builder.header(header::AUTHORIZATION, auth);
    }
    builder.body(body.into()).unwrap()
}

fn get(path: &str, auth: Option<&str>) -> Request<Body> {
    let mut builder = Request::get(path);
    if let Some(auth) = auth {
        builder = builder.header(header::AUTHORIZATION, auth);
    }
    builder.body(Body::empty()).unwrap()
}

async fn admin_bearer(h: &Harness, role: model::Role) -> String {
    let (_, token) = h
        .authority
        .create_operator(&h.admin, "t", role)
        .await
        .unwrap();
    format!("Bearer {}", token.expose())
}

#[tokio::test]
async fn client_mistakes_are_4xx_with_an_error_body() {
    let h = Harness::new().await;
    let admin = admin_bearer(&h, model::Role::Admin).await;
    let too_big = format!("{{\"name\":\"{}\"}}", "x".repeat(70 * 1024));
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post("/v1/agents", Some(&admin), "{not json"),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            post("/v1/agents", Some(&admin), r#"{"name":"x"}"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            post(
                "/v1/agents",
                Some(&admin),
                r#"{"name":"x","owner":"a@b","keys":[],"extra":1}"#,
            ),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            post("/v1/agents", Some(&admin), too_big.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            post("/v1/agents", None, "{}"),
            StatusCode::UNAUTHORIZED,
            "operator_token_missing",
        ),
        (
            post("/v1/agents", Some("Bearer remit_op_nope"), "{}"),
            StatusCode::UNAUTHORIZED,
            "operator_token_invalid",
        ),
        (get("/v1/nowhere", None), StatusCode::NOT_FOUND, "not_found"),
        (
            Request::delete("/v1/agents").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            get("/v1/agents/ghost", Some(&admin)),
            StatusCode::NOT_FOUND,
            "agent_not_found",
        ),
        (
            get("/v1/agents/Not%20A%20Name", Some(&admin)),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            get("/v1/tasks/task_nope", Some(&admin)),
            StatusCode::BAD_REQUEST,
            "invalid_name",
        ),
        (
            get("/v1/audit?limit=abc", Some(&admin)),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        // A limit above the store's cap is refused, not answered with a short page.
        (
            get("/v1/audit?limit=1001", Some(&admin)),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            get("/v1/approvals?limit=5000", Some(&admin)),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        // axum's own rejections (a path that is not UTF-8, a body too large for the routes
        // that read it raw or as a form) answer with the same JSON body as everything else.
        (
            get("/v1/agents/%FF", Some(&admin)),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            post("/v1/agents/ghost/disable", Some(&admin), too_big.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            post("/v1/agents/ghost/release", Some(&admin), too_big.clone()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            Request::post("/v1/token")
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(format!("agent={}", "x".repeat(70 * 1024))))
                .unwrap(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            post(
                "/v1/revocations",
                Some(&admin),
                r#"{"kind":"galaxy","target":"x"}"#,
            ),
            StatusCode::BAD_REQUEST,
            "invalid_kind",
        ),
        (
            post(
                "/v1/tasks",
                None,
                r#"{"agent":"ghost","intent":"x","scopes":[{"tool":"github","actions":["r"]}]}"#,
            ),
            StatusCode::UNAUTHORIZED,
            "agent_unknown",
        ),
        (
            post(
                "/v1/tasks/task_aaaaaaaaaaaaaaaaaaaaaaaaaa/complete",
                None,
                "",
            ),
            StatusCode::UNAUTHORIZED,
            "token_missing",
        ),
    ];
    for (request, status, code) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let (got, headers, body) = send(&h, request).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        if status == StatusCode::UNAUTHORIZED {
            assert!(headers.contains_key(header::WWW_AUTHENTICATE), "{what}");
        }
    }
}

#[tokio::test]
async fn an_agents_credentials_never_open_the_admin_api() {
    let h = Harness::new().await;
    let agent = h.agent("triage-bot", "alice@example.org").await;
    let grant = h.grant(&agent).await;
    for auth in [
        format!("Bearer {}", grant.token.expose()),
        format!("DPoP {}", grant.token.expose()),
    ] {
        let (status, _, body) = send(&h, get("/v1/agents", Some(&auth))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    let auditor = admin_bearer(&h, model::Role::Auditor).await;
    let (status, _, body) = send(
        &h,
        post(
            "/v1/revocations",
            Some(&auditor),
            r#"{"kind":"agent","target":"triage-bot"}"#,
        ),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("operator_role"))
    );
    let (status, _, body) = send(&h, get("/v1/audit/verify", Some(&auditor))).await;
    assert_eq!((status, &body["ok"]), (StatusCode::OK, &json!(true)));

    // Signed checkpoints: an auditor takes one and holds the log against it later.
    let (status, _, checkpoint) = send(&h, get("/v1/audit/checkpoint", Some(&auditor))).await;
    assert_eq!(status, StatusCode::OK, "{checkpoint}");
    let text = checkpoint["checkpoint"].as_str().unwrap();
    let (status, _, body) = send(
        &h,
        get(
            &format!("/v1/audit/verify?checkpoint={text}"),
            Some(&auditor),
        ),
    )
    .await;
    assert_eq!(
        (status, &body["ok"]),
        (StatusCode::OK, &json!(true)),
        "{body}"
    );
    assert_eq!(body["checkpoint_seq"], checkpoint["seq"]);
    for (query, code) in [
        ("checkpoint=not-a-checkpoint", "invalid_checkpoint"),
        ("checkpint=x", "invalid_query"),
    ] {
        let (status, _, body) = send(
            &h,
            get(&format!("/v1/audit/verify?{query}"), Some(&auditor)),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::BAD_REQUEST, Some(code)),
            "{query}: {body}"
        );
    }
    let approver = admin_bearer(&h, model::Role::Approver).await;
    let (status, _, body) = send(&h, get("/v1/audit/checkpoint", Some(&approver))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::FORBIDDEN, Some("operator_role"))
    );
}

#[tokio::test]
async fn the_grant_path_over_http() {
    let h = Harness::new().await;
    let admin = admin_bearer(&h, model::Role::Admin).await;
    let key = credentials::AgentKeyPair::generate_ed25519().unwrap();
    let body = json!({ "name": "triage-bot", "owner": "alice@example.org", "keys": [key.public().to_jwk()] });
    let (status, _, agent) = send(&h, post("/v1/agents", Some(&admin), body.to_string())).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(agent["spiffe_id"], "spiffe://remit.local/agent/triage-bot");

    let proof = key
        .sign_proof(
            "POST",
            &format!("{BASE}/v1/tasks"),
            None,
            h.now(),
            "grant-1",
        )
        .unwrap();
    let request = Request::post("/v1/tasks")
        .header("dpop", proof)
        .body(Body::from(
            json!({ "agent": "triage-bot", "intent": "triage", "scopes": github_scopes() })
                .to_string(),
        ))
        .unwrap();
    let (status, headers, grant) = send(&h, request).await;
    assert_eq!(status, StatusCode::CREATED, "{grant}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(grant["token_type"], "DPoP");
    assert_eq!(grant["expires_in"], 300);

    // A refusal names the policies and the reasons.
    let proof = key
        .sign_proof(
            "POST",
            &format!("{BASE}/v1/tasks"),
            None,
            h.now(),
            "grant-2",
        )
        .unwrap();
    let request = Request::post("/v1/tasks")
        .header("dpop", proof)
        .body(Body::from(json!({ "agent": "triage-bot", "intent": "x", "scopes": [{ "tool": "iam", "actions": ["*"] }] }).to_string()))
        .unwrap();
    let (status, _, refusal) = send(&h, request).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(refusal["error"], "task_refused");
    assert_eq!(
        refusal["policies"],
        json!(["task.no-wildcards-on-identity"])
    );

    let task_id = grant["task_id"].as_str().unwrap();
    let (status, _, task) = send(&h, get(&format!("/v1/tasks/{task_id}"), Some(&admin))).await;
    assert_eq!(
        (status, &task["status"]),
        (StatusCode::OK, &json!("active"))
    );

    let (status, _, events) =
        send(&h, get("/v1/audit?agent=triage-bot&limit=10", Some(&admin))).await;
    assert_eq!(status, StatusCode::OK);
    let kinds: Vec<_> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["agent.registered", "task.granted", "task.refused"]);
    let (_, _, by_task) = send(&h, get(&format!("/v1/audit?task={task_id}"), Some(&admin))).await;
    assert_eq!(by_task["events"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn published_documents() {
    let h = Harness::new().await;
    let (status, headers, jwks) = send(&h, get("/.well-known/jwks.json", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers.contains_key(header::CACHE_CONTROL));
    let key = &jwks["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["crv"].as_str(),
            key["use"].as_str()
        ),
        (Some("EC"), Some("P-256"), Some("jwt-svid"))
    );
    assert!(key.get("d").is_none());
    assert!(jwks["spiffe_sequence"].is_u64());

    let (status, _, openapi) = send(&h, get("/openapi.json", None)).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/agents",
        "/v1/tasks",
        "/v1/tasks/{id}/complete",
        "/v1/revocations",
        "/v1/audit",
        "/v1/audit/verify",
        "/v1/audit/checkpoint",
        "/.well-known/jwks.json",
        "/livez",
        "/readyz",
        "/healthz",
    ] {
        assert!(
            openapi["paths"].get(path).is_some(),
            "{path} is missing from the OpenAPI document"
        );
    }

    let (status, _, health) = send(&h, get("/healthz", None)).await;
    assert_eq!(
        (status, &health["store"]),
        (StatusCode::OK, &json!("sqlite"))
    );
}

/// DESIGN.md invariant 7: whatever a client sends, the answer is a 4xx with an error body,
/// never a 5xx and never a panic.
#[tokio::test]
async fn garbage_in_is_a_4xx_out() {
    let h = Harness::new().await;
    let admin = admin_bearer(&h, model::Role::Admin).await;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let mut bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"null".to_vec(),
        b"[]".to_vec(),
        b"\"string\"".to_vec(),
        deep.into_bytes(),
        br#"{"name":1e999,"owner":[],"keys":{}}"#.to_vec(),
        br#"{"agent":"triage-bot","intent":"x","scopes":[{"tool":"github","actions":["a"]}],"ttl_seconds":-1}"#.to_vec(),
        br#"{"agent":"triage-bot","intent":"x","scopes":[{"tool":"github","actions":["a"]}],"budget":99999999999}"#.to_vec(),
        br#"{"kind":"task","target":"task_aaaaaaaaaaaaaaaaaaaaaaaaaa"}"#.to_vec(),
        br#"{"kind":"owner","target":""}"#.to_vec(),
        "{\"name\":\"\u{0}\",\"owner\":\"a@b\",\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\"}]}".as_bytes().to_vec(),
    ];
    for _ in 0..40 {
        let len = (next() % 300) as usize;
        bodies.push((0..len).map(|_| next() as u8).collect());
    }
    let routes = [
        ("/v1/agents", Some(admin.as_str())),
        ("/v1/tasks", None),
        ("/v1/revocations", Some(admin.as_str())),
        ("/v1/agents/triage-bot/disable", Some(admin.as_str())),
        (
            "/v1/tasks/task_aaaaaaaaaaaaaaaaaaaaaaaaaa/complete",
            Some("DPoP x.y.z"),
        ),
    ];
    for (path, auth) in routes {
        for body in &bodies {
            let (status, _, answer) = send(&h, post(path, auth, body.clone())).await;
            assert!(
                status.is_client_error(),
                "POST {path} with {} bytes: {status} {answer}",
                body.len()
            );
            assert!(
                answer["error"].is_string() && answer["message"].is_string(),
                "POST {path}: {answer}"
            );
        }
    }
}

#[tokio::test]
async fn a_bad_reason_disables_or_releases_nothing() {
    let h = Harness::new().await;
    let admin = admin_bearer(&h, model::Role::Admin).await;
    h.agent("triage-bot", "alice@example.org").await;
    // 1020 bytes: a valid reason on its own, too long once it becomes the revocation's
    // `agent disabled: …`, which used to fail after the agent was already disabled.
    for reason in ["x".repeat(1020), "bell\u{7}".to_string(), " ".to_string()] {
        for action in ["disable", "release"] {
            let body = json!({ "reason": reason }).to_string();
            let path = format!("/v1/agents/triage-bot/{action}");
            let (status, _, body) = send(&h, post(&path, Some(&admin), body)).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (StatusCode::BAD_REQUEST, Some("invalid_text")),
                "{action} {reason:?}: {body}"
            );
        }
    }
    let (status, _, agent) = send(&h, get("/v1/agents/triage-bot", Some(&admin))).await;
    assert_eq!(
        (status, &agent["status"]),
        (StatusCode::OK, &json!("active"))
    );
    let (_, _, page) = send(&h, get("/v1/audit", Some(&admin))).await;
    let kinds: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|event| event["kind"].as_str())
        .collect();
    assert!(
        !kinds
            .iter()
            .any(|kind| ["agent.disabled", "agent.released", "revocation"].contains(kind)),
        "nothing was written: {kinds:?}"
    );
}
