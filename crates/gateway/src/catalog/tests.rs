//! Unit tests of the tool catalog: parsing `[[tools]]`, the checks that refuse a bad
//! declaration, and classification.

use super::*;

fn raw(text: &str) -> Vec<RawTool> {
    #[derive(Deserialize)]
    struct File {
        tools: Vec<RawTool>,
    }
    toml::from_str::<File>(text).unwrap().tools
}

fn env(name: &str) -> Option<String> {
    (name == "GITHUB_TOKEN").then(|| "ghp_secret".to_string())
}

fn catalog(text: &str) -> Result<Catalog, CatalogError> {
    Catalog::from_raw_with(&raw(text), &env)
}

const GITHUB: &str = r#"
[[tools]]
name = "github"
kind = "http"
upstream = "http://127.0.0.1:9/api"
auth = { bearer = "env:GITHUB_TOKEN" }
sensitivity = ["source"]
routes = [
  { method = "GET", path = "/repos/{owner}/{repo}/issues", action = "list_issues", class = "read", resource = "{owner}/{repo}" },
  { method = "DELETE", path = "/repos/{owner}/{repo}", action = "delete_repo", class = "admin", resource = "{owner}/{repo}" },
  { method = "*", path = "/files/{*path}", action = "file", class = "write", sensitivity = ["pii"] },
]

[[tools]]
name = "files"
kind = "mcp"
upstream = "http://127.0.0.1:9/mcp"
mcp_tools = { read_file = { class = "read", resource = "path" }, write_file = "write" }
"#;

#[test]
fn routes_classify_requests() {
    let catalog = catalog(GITHUB).unwrap();
    let github = catalog.get("github").unwrap();
    let check = |method: &str, path: &str| {
        github.classify_http(&Method::from_bytes(method.as_bytes()).unwrap(), path)
    };

    let listed = check("GET", "/repos/acme/api/issues");
    assert_eq!(
        (
            listed.action.as_str(),
            listed.class,
            listed.resource.as_str()
        ),
        ("list_issues", ActionClass::Read, "acme/api")
    );
    assert_eq!(listed.sensitivity, ["source"]);
    assert_eq!(check("DELETE", "/repos/acme/api").action, "delete_repo");
    let file = check("PUT", "/files/a/b/c.txt");
    assert_eq!(
        (file.class, file.resource.as_str()),
        (ActionClass::Write, "files/a/b/c.txt")
    );
    assert_eq!(file.sensitivity, ["source", "pii"]);

    // Anything not declared is admin.
    let unknown = check("POST", "/repos/acme/api/issues");
    assert_eq!(
        (unknown.action.as_str(), unknown.class),
        ("POST /repos/acme/api/issues", ActionClass::Admin)
    );
    assert_eq!(
        check("GET", "/repos/acme/api/issues/extra").class,
        ActionClass::Admin
    );
    assert_eq!(check("GET", "/repos//api/issues").class, ActionClass::Admin);
}

#[test]
fn mcp_tools_classify_calls() {
    let catalog = catalog(GITHUB).unwrap();
    let files = catalog.get("files").unwrap();
    let args = serde_json::json!({ "path": "/srv/notes.txt" });
    let read = files.classify_mcp_tool("read_file", Some(&args));
    assert_eq!(
        (read.class, read.resource.as_str()),
        (ActionClass::Read, "/srv/notes.txt")
    );
    assert_eq!(
        files.classify_mcp_tool("write_file", None).class,
        ActionClass::Write
    );
    assert_eq!(
        files.classify_mcp_tool("rm_rf", None).class,
        ActionClass::Admin
    );
}

#[test]
fn credentials_come_from_the_environment_or_files() {
    let github = catalog(GITHUB).unwrap();
    let (name, value) = github.get("github").unwrap().auth.header().unwrap();
    assert_eq!(
        (name.as_str(), value.to_str().unwrap()),
        ("authorization", "Bearer ghp_secret")
    );
    assert!(value.is_sensitive());
    assert_eq!(github.secrets(), ["Bearer ghp_secret"]);
    assert!(
        !format!("{github:?}").contains("ghp_secret"),
        "Debug must not print secrets"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "k-123\n").unwrap();
    let text = format!(
        "[[tools]]\nname = \"x\"\nkind = \"http\"\nupstream = \"https://x.example\"\nauth = {{ header = \"X-Api-Key\", value = \"file:{}\" }}\n",
        file.display()
    );
    let from_file = catalog(&text).unwrap();
    assert_eq!(
        from_file
            .get("x")
            .unwrap()
            .auth
            .header()
            .unwrap()
            .1
            .to_str()
            .unwrap(),
        "k-123"
    );
}

#[test]
fn bad_declarations_name_the_tool_and_the_problem() {
    let check = |body: &str, needle: &str| {
        let text = format!("[[tools]]\nname = \"t\"\n{body}\n");
        let error = catalog(&text).unwrap_err().to_string();
        assert!(
            error.starts_with("tool `t`: ") && error.contains(needle),
            "{error}"
        );
    };
    check(
        "kind = \"ftp\"\nupstream = \"http://x\"",
        "unknown kind `ftp`",
    );
    check("kind = \"http\"\nupstream = \"not a url\"", "`upstream`");
    check(
        "kind = \"http\"\nupstream = \"ftp://x/\"",
        "http:// or https://",
    );
    check(
        "kind = \"http\"\nupstream = \"http://x\"\nauth = { bearer = \"ghp_inline\" }",
        "never inline",
    );
    check(
        "kind = \"http\"\nupstream = \"http://x\"\nauth = { bearer = \"env:MISSING\" }",
        "`MISSING`",
    );
    check(
        "kind = \"http\"\nupstream = \"http://x\"\nauth = { bearer = \"file:/nonexistent/key\" }",
        "/nonexistent/key",
    );
    check(
        "kind = \"http\"\nupstream = \"http://x\"\nroutes = [{ method = \"GET\", path = \"x\", action = \"a\", class = \"read\" }]",
        "starts with `/`",
    );
    check(
        "kind = \"http\"\nupstream = \"http://x\"\nroutes = [{ method = \"GET\", path = \"/x\", action = \"a\", class = \"reed\" }]",
        "`reed`",
    );
    check(
        "kind = \"http\"\nupstream = \"http://x\"\nroutes = [{ method = \"GET\", path = \"/{*a}/b\", action = \"a\", class = \"read\" }]",
        "last segment",
    );
    check(
        "kind = \"mcp\"\nupstream = \"http://x\"\nroutes = [{ method = \"GET\", path = \"/x\", action = \"a\", class = \"read\" }]",
        "`routes` are for `http`",
    );
    check(
        "kind = \"http\"\nupstream = \"http://x\"\nmax_body_bytes = 100",
        "`max_body_bytes` must be between 1024 and 16777216, not 100",
    );
    check(
        "kind = \"mcp\"\nupstream = \"http://x\"\nmax_body_bytes = 16777217",
        "`max_body_bytes` must be between 1024 and 16777216",
    );
    let twice = "[[tools]]\nname = \"t\"\nkind = \"mcp\"\nupstream = \"http://x\"\n[[tools]]\nname = \"t\"\nkind = \"mcp\"\nupstream = \"http://x\"\n";
    assert!(
        catalog(twice)
            .unwrap_err()
            .to_string()
            .contains("declared twice")
    );
}

#[test]
fn resource_templates_fill_in_one_pass() {
    let params = [
        ("owner", Cow::Borrowed("{repo}")),
        ("repo", Cow::Borrowed("api")),
        ("path", Cow::Owned("a/b".to_string())),
    ];
    // A value that reads like a placeholder is not filled in again.
    assert_eq!(fill("{owner}/{repo}", &params), "{repo}/api");
    assert_eq!(fill("files/{*path}", &params), "files/a/b");
    assert_eq!(fill("{unknown}:{repo}", &params), "{unknown}:api");
    assert_eq!(fill("open {repo", &params), "open {repo");
    assert_eq!(fill("é{repo}é", &params), "éapié");
    assert_eq!(fill("", &params), "");
}

/// Declarations that would start and then misclassify calls are refused, each with one line
/// naming the tool and the route, and a hint.
#[test]
fn routes_that_would_misclassify_are_refused() {
    let check = |routes: &str, expected: &str| {
        let text = format!(
            "[[tools]]\nname = \"t\"\nkind = \"http\"\nupstream = \"http://x\"\nroutes = [\n{routes}\n]\n"
        );
        let error = catalog(&text).unwrap_err().to_string();
        assert_eq!(error, expected);
    };
    check(
        r#"{ method = "GET", path = "/repos/{owner}/{repo}", action = "a", class = "read", resource = "{owner}/{nope}" }"#,
        "tool `t`: route `GET /repos/{owner}/{repo}`: `resource` names `{nope}`, which is not a parameter of the path; hint: the path's parameters are `{owner}`, `{repo}`",
    );
    check(
        r#"{ method = "GET", path = "/health", action = "a", class = "read", resource = "{nope}" }"#,
        "tool `t`: route `GET /health`: `resource` names `{nope}`, which is not a parameter of the path; hint: the path has no parameters: name them in the path as `{name}`, or give a fixed resource",
    );
    check(
        r#"{ method = "GET", path = "/a/{x}", action = "a", class = "read", resource = "{x" }"#,
        "tool `t`: route `GET /a/{x}`: `resource` `{x` has a `{` without its `}`; hint: write parameters as `{name}`",
    );
    check(
        r#"{ method = "GET", path = "/a/{x}", action = "a", class = "read" },
           { method = "get", path = "/a/{y}", action = "b", class = "write" }"#,
        "tool `t`: route `get /a/{y}` is declared twice: `GET /a/{x}` before it already takes every such request; hint: remove one of them",
    );
    check(
        r#"{ method = "*", path = "/a/{*rest}", action = "a", class = "read" },
           { method = "DELETE", path = "/a/{*rest}", action = "b", class = "admin" }"#,
        "tool `t`: route `DELETE /a/{*rest}` is declared twice: `* /a/{*rest}` before it already takes every such request; hint: remove one of them",
    );
    check(
        r#"{ method = "FETCH", path = "/a", action = "a", class = "read" }"#,
        "tool `t`: route `FETCH /a`: unknown method `FETCH`; hint: use GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, or `*` for any",
    );

    // What is still accepted: a parameter in any position, `{*rest}` named as `{rest}` or
    // `{*rest}`, one path under several methods, a `*` route after specific ones.
    let fine = catalog(
        r#"
[[tools]]
name = "t"
kind = "http"
upstream = "http://x"
routes = [
  { method = "get", path = "/a/{x}/b/{*rest}", action = "a", class = "read", resource = "x={x}; {*rest}" },
  { method = "POST", path = "/a/{x}/b/{*rest}", action = "b", class = "write", resource = "{rest}" },
  { method = "*", path = "/a/{x}/b/{*rest}", action = "c", class = "admin" },
]
"#,
    )
    .unwrap();
    let t = fine.get("t").unwrap();
    assert_eq!(
        t.classify_http(&Method::GET, "/a/1/b/c/d").resource,
        "x=1; c/d"
    );
    assert_eq!(t.classify_http(&Method::PUT, "/a/1/b/c").action, "c");
}

#[test]
fn credentials_in_an_upstream_url_are_refused_without_echoing_them() {
    let text = "[[tools]]\nname = \"t\"\nkind = \"mcp\"\nupstream = \"https://bot:hunter2@mcp.example.org/mcp\"\n";
    let error = catalog(text).unwrap_err().to_string();
    assert_eq!(
        error,
        "tool `t`: `upstream` carries credentials (`[redacted]@mcp.example.org`); hint: remove them from the URL and give them as `auth = { bearer = \"env:VAR\" }` or `{ header = …, value = \"file:PATH\" }`"
    );
    assert!(!error.contains("hunter2") && !error.contains("bot"));
    let user_only = "[[tools]]\nname = \"t\"\nkind = \"http\"\nupstream = \"http://ghp_token@x\"\n";
    let error = catalog(user_only).unwrap_err().to_string();
    assert!(
        error.contains("`upstream` carries credentials (`[redacted]@x`)")
            && !error.contains("ghp_"),
        "{error}"
    );
}
