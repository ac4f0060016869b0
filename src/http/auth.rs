//! Who is asking: bearer tokens (`Authorization: Bearer TOKEN`, or the
//! console's login cookie holding the same token) checked against the
//! SHA-256 of `[[http.users]]`, and the roles (viewers read, operators also
//! act). A wrong token is an `http_auth_failed` audit event (rate-limited);
//! no token ever reaches a log or the audit log.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use super::Shared;
use super::api::ApiError;
use crate::config::{HttpRole, HttpUser};
use crate::db::{NewEvent, event};

/// The login cookie's name.
pub const COOKIE: &str = "her2map_token";

/// The configured users, with their token digests decoded.
pub struct Users(Vec<(String, HttpRole, [u8; 32])>);

impl Users {
    pub fn new(users: &[HttpUser]) -> Self {
        Users(
            users
                .iter()
                .filter_map(|u| {
                    let mut d = [0u8; 32];
                    hex::decode_to_slice(u.token_sha256.trim(), &mut d).ok()?;
                    Some((u.name.clone(), u.role, d))
                })
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The user whose token this is. Every digest is compared in full
    /// (constant time per user), so timing tells nothing about a near miss.
    pub fn find(&self, token: &str) -> Option<(String, HttpRole)> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (name, role, d) in &self.0 {
            let diff = d.iter().zip(&digest).fold(0u8, |a, (x, y)| a | (x ^ y));
            if diff == 0 {
                found = Some((name.clone(), *role));
            }
        }
        found
    }
}

/// A new random token (256 bits, hex) and its SHA-256 for the config.
pub fn new_token() -> (String, String) {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    (token, digest)
}

/// The caller, once authenticated.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub role: HttpRole,
    /// Signed in with a token (not the anonymous loopback reader of a
    /// node without users): only they may see patient names and IDs.
    pub signed_in: bool,
}

impl Identity {
    pub fn may_act(&self) -> bool {
        self.role == HttpRole::Operator
    }
}

/// The token a request carries, from the Authorization header or the cookie.
pub fn token_of(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_string());
    }
    for v in parts.headers.get_all(axum::http::header::COOKIE) {
        for c in v.to_str().ok()?.split(';') {
            if let Some((k, val)) = c.trim().split_once('=')
                && k == COOKIE
            {
                return Some(val.to_string());
            }
        }
    }
    None
}

/// Why a request is not let in.
pub enum Denied {
    /// No token (and users are configured).
    Missing,
    /// A token that belongs to nobody.
    Wrong,
    /// A `stow` user's token outside STOW-RS.
    StowOnly,
}

/// Authenticate a request: the user of its token; with no users
/// configured, the anonymous loopback reader.
pub async fn authenticate(state: &Shared, parts: &Parts) -> Result<Identity, Denied> {
    let token = token_of(parts);
    if state.users.is_empty() && token.is_none() {
        return Ok(Identity {
            name: "local".into(),
            role: HttpRole::Viewer,
            signed_in: false,
        });
    }
    let Some(token) = token else {
        return Err(Denied::Missing);
    };
    match state.users.find(&token) {
        // A STOW-RS account reads nothing (no page, no API view: PHI).
        Some((_, HttpRole::Stow)) if !parts.uri.path().starts_with("/dicom-web/") => {
            Err(Denied::StowOnly)
        }
        Some((name, role)) => Ok(Identity {
            name,
            role,
            signed_in: true,
        }),
        None => {
            let peer = parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.to_string())
                .unwrap_or_default();
            failed_login(state, &peer, parts.uri.path()).await;
            Err(Denied::Wrong)
        }
    }
}

/// Audit a wrong token: at most 20 events a minute, then one summary line
/// per minute is left to the metric (a flood must not fill the audit log).
pub async fn failed_login(state: &Shared, peer: &str, path: &str) {
    crate::metrics::METRICS.http_auth_failures.inc(&[]);
    let now = state.clock.now();
    let minute = now.unix_timestamp() / 60;
    let audit = {
        let mut g = state.auth_audit.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 != minute {
            *g = (minute, 0);
        }
        g.1 += 1;
        g.1 <= 20
    };
    tracing::warn!(%peer, path, "HTTP request with an unknown token refused");
    if audit {
        let _ = state
            .db
            .record(
                NewEvent {
                    event: event::HTTP_AUTH_FAILED,
                    detail: Some(serde_json::json!({ "peer": peer, "path": path })),
                    ..Default::default()
                },
                now,
            )
            .await;
    }
}

/// Extractor: any authenticated user (API: 401 JSON when not).
pub struct Viewer(pub Identity);
/// Extractor: an operator (403 for a viewer).
pub struct Operator(pub Identity);

impl FromRequestParts<Shared> for Viewer {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        authenticate(state, parts)
            .await
            .map(Viewer)
            .map_err(unauthorized)
    }
}

impl FromRequestParts<Shared> for Operator {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let Viewer(id) = Viewer::from_request_parts(parts, state).await?;
        if !id.may_act() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this action needs the operator role",
            ));
        }
        Ok(Operator(id))
    }
}

pub fn unauthorized(d: Denied) -> ApiError {
    let message = match d {
        Denied::Missing => "send Authorization: Bearer TOKEN",
        Denied::Wrong => "unknown token",
        Denied::StowOnly => {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "this user may only store instances (STOW-RS)",
            );
        }
    };
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Extractor: a signed-in user who may store instances by STOW-RS (401
/// without a token, 403 for a viewer).
pub struct Stower(pub Identity);

impl FromRequestParts<Shared> for Stower {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let id = authenticate(state, parts).await.map_err(unauthorized)?;
        if !id.signed_in {
            // A node without users serves loopback read-only: no STOW-RS.
            return Err(unauthorized(Denied::Missing));
        }
        if !id.role.may_stow() {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "storing instances needs the stow or operator role",
            ));
        }
        Ok(Stower(id))
    }
}

/// For handlers that take the state by extractor.
pub type St = State<Shared>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_their_digest_only() {
        let (token, digest) = new_token();
        assert_eq!(token.len(), 64);
        let users = Users::new(&[HttpUser {
            name: "alice".into(),
            role: HttpRole::Operator,
            token_sha256: digest,
        }]);
        assert_eq!(users.find(&token).unwrap().0, "alice");
        assert!(users.find("wrong").is_none());
    }
}
