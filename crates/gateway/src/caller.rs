//! What the caller presented: its task token (`Authorization: DPoP …` or, where a tool allows
//! it, `Bearer …`) and its proof (`DPoP` header). These are stripped before forwarding.

use axum::http::{HeaderMap, StatusCode, header};

use crate::error::Refusal;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Dpop,
    Bearer,
}

#[derive(Debug)]
pub struct Presented<'a> {
    pub token: &'a str,
    pub proof: Option<&'a str>,
    pub scheme: Scheme,
}

/// Reads the caller's credentials; a request without them gets a 401 that points at the
/// protected-resource metadata (RFC 9728), as MCP clients expect.
#[expect(
    clippy::result_large_err,
    reason = "a refusal is built only for a rejected request, which then ends; boxing it would cost every caller"
)]
pub fn presented<'a>(
    headers: &'a HeaderMap,
    resource_metadata: &str,
) -> Result<Presented<'a>, Refusal> {
    let missing = || {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            "token_missing",
            "a task token is required: `Authorization: DPoP <token>` with a `DPoP` proof",
            resource_metadata,
        )
    };
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next().ok_or_else(missing)?;
    if values.next().is_some() {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "token_malformed",
            "send exactly one `Authorization` header",
            resource_metadata,
        ));
    }
    let value = value.to_str().map_err(|_| missing())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    let scheme = if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else {
        return Err(missing());
    };
    let mut proofs = headers.get_all("dpop").iter();
    let proof = match (proofs.next(), proofs.next()) {
        (None, _) => None,
        (Some(proof), None) => Some(proof.to_str().map_err(|_| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                "proof_malformed",
                "the `DPoP` header is not valid text",
                resource_metadata,
            )
        })?),
        (Some(_), Some(_)) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "proof_malformed",
                "send exactly one `DPoP` header",
                resource_metadata,
            ));
        }
    };
    Ok(Presented {
        token: token.trim(),
        proof,
        scheme,
    })
}
