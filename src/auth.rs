//! Authentication at the HTTP upgrade, with JWTs (jsonwebtoken), before any WebSocket state
//! exists.
//!
//! The token comes from `?token=`, from `Authorization: Bearer …`, or — for browsers, which cannot
//! set headers on a WebSocket — from `Sec-WebSocket-Protocol` as an entry `bearer.<token>`. Only
//! the configured algorithms verify (so no `alg: none`, and no HS token checked against an RSA
//! key); `exp` is required; `iss`/`aud` are checked when configured.
//!
//! With no key configured the gateway runs in dev mode: a random secret, and `GET /dev/token`
//! hands out tokens so the test page works at once.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::base::identity::Identity;
use crate::base::time::now_secs;
use crate::config::Config;

/// The claims wsgate reads. Either `sub` or `userId` names the user.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(rename = "userId", skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// A string or an array of strings (RFC 7519); checked by jsonwebtoken against `jwt_audience`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

/// Why a token was refused. The wording goes to the client; the token itself never does, nor
/// into logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
    BadSignature,
    /// The header lists `crit` extensions: none is understood, so the token must be refused
    /// (RFC 7515 §4.1.11).
    CriticalHeader,
    /// Signed with an algorithm that is not configured (including `none`).
    WrongAlgorithm,
    WrongIssuer,
    WrongAudience,
    /// No `sub`/`userId`, or claims of the wrong type.
    BadClaims,
}

impl AuthError {
    /// A short stable name, for counters and the `reason` field of the 401 body.
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::CriticalHeader => "unsupported_critical_header",
            AuthError::WrongAlgorithm => "algorithm_not_allowed",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::BadClaims => "bad_claims",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            AuthError::Missing => {
                "missing token: send ?token=, Authorization: Bearer, or a bearer.<token> subprotocol"
            }
            AuthError::Malformed => "malformed token",
            AuthError::Expired => "token expired",
            AuthError::NotYetValid => "token not valid yet (nbf is in the future)",
            AuthError::BadSignature => "invalid token signature",
            AuthError::CriticalHeader => "token header lists critical extensions (crit)",
            AuthError::WrongAlgorithm => "token algorithm not allowed",
            AuthError::WrongIssuer => "wrong token issuer",
            AuthError::WrongAudience => "wrong token audience",
            AuthError::BadClaims => "token claims invalid: need exp and sub (or userId)",
        }
    }

    pub const ALL: [AuthError; 10] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::BadSignature,
        AuthError::CriticalHeader,
        AuthError::WrongAlgorithm,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::BadClaims,
    ];
}

pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    /// What the gateway can sign with: the shared secret (configured or dev-mode random).
    signer: Option<(EncodingKey, Algorithm)>,
    dev_mode: bool,
    allow_anonymous: bool,
    /// Identities keep their token's claims (for the proxies to the backend).
    keep_claims: bool,
}

impl Authenticator {
    /// Builds the verifier the configuration asks for; the error names the key at fault.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        let (key, family_algorithms, signer, dev_mode) =
            match (&config.jwt_secret, &config.jwt_public_key_file) {
                (Some(_), Some(_)) => {
                    return Err("jwt_secret and jwt_public_key_file: set only one".into());
                }
                (Some(secret), None) => {
                    let secret = secret.expose();
                    if secret.len() < 16 {
                        return Err("jwt_secret: must be at least 16 bytes".into());
                    }
                    let algs = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
                    let signer = (
                        EncodingKey::from_secret(secret.as_bytes()),
                        Algorithm::HS256,
                    );
                    (
                        DecodingKey::from_secret(secret.as_bytes()),
                        algs,
                        Some(signer),
                        false,
                    )
                }
                (None, Some(path)) => {
                    let (key, algs) = public_key(path)?;
                    (key, algs, None, false)
                }
                (None, None) => {
                    let mut secret = [0u8; 32];
                    getrandom::fill(&mut secret).map_err(|e| format!("random dev key: {e}"))?;
                    let signer = (EncodingKey::from_secret(&secret), Algorithm::HS256);
                    let algs = vec![Algorithm::HS256];
                    (DecodingKey::from_secret(&secret), algs, Some(signer), true)
                }
            };
        let algorithms = if config.jwt_algorithms.is_empty() {
            family_algorithms
        } else {
            let mut chosen = Vec::new();
            for name in &config.jwt_algorithms {
                let alg: Algorithm = name
                    .parse()
                    .map_err(|_| format!("jwt_algorithms: unknown algorithm {name}"))?;
                if !family_algorithms.contains(&alg) {
                    return Err(format!(
                        "jwt_algorithms: {name} does not fit the configured key"
                    ));
                }
                chosen.push(alg);
            }
            chosen
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = config.jwt_leeway.as_secs();
        validation.validate_nbf = true;
        validation.validate_aud = config.jwt_audience.is_some();
        // A configured issuer or audience is required, not just checked when present.
        let mut required = vec!["exp"];
        if let Some(aud) = &config.jwt_audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Authenticator {
            key,
            validation,
            signer,
            dev_mode,
            allow_anonymous: config.allow_anonymous,
            keep_claims: config.proxies().next().is_some(),
        })
    }

    /// True when no key is configured: tokens are signed with a random key, `/dev/token` serves them.
    pub fn dev_mode(&self) -> bool {
        self.dev_mode
    }

    /// The identity for an upgrade request's token (or anonymous, when allowed and none is given).
    pub fn authenticate(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        match token {
            Some(token) => self.verify(token),
            None if self.allow_anonymous => Ok(Identity::anonymous()),
            None => Err(AuthError::Missing),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        match jsonwebtoken::decode_header(token) {
            Ok(header) if header.crit.is_some() => return Err(AuthError::CriticalHeader),
            Ok(_) => {}
            // A readable header naming an algorithm jsonwebtoken does not know (`none`, say) is
            // a refused algorithm; anything else is garbage.
            Err(_) => {
                return Err(match header_alg(token) {
                    Some(_) => AuthError::WrongAlgorithm,
                    None => AuthError::Malformed,
                });
            }
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::MissingAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::UnsupportedAlgorithm => AuthError::WrongAlgorithm,
                ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
                ErrorKind::InvalidAudience => AuthError::WrongAudience,
                ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => AuthError::BadClaims,
                _ => AuthError::Malformed,
            },
        )?;
        let claims = data.claims;
        let user_id = claims
            .sub
            .or(claims.user_id)
            .filter(|id| !id.is_empty())
            .ok_or(AuthError::BadClaims)?;
        let user_id: Arc<str> = Arc::from(user_id);
        let username = claims.username.map_or_else(|| user_id.clone(), Arc::from);
        Ok(Identity {
            username,
            user_id,
            roles: claims.roles.into_iter().map(Into::into).collect(),
            rooms: claims
                .rooms
                .map(|r| r.into_iter().map(Into::into).collect()),
            expires_at: Some(claims.exp),
            claims: self.keep_claims.then(|| payload(token)).flatten(),
        })
    }

    /// Signs a token with the gateway's own key (configured secret, or the dev-mode key).
    pub fn mint(&self, claims: &Claims) -> Option<String> {
        let (key, alg) = self.signer.as_ref()?;
        jsonwebtoken::encode(&Header::new(*alg), claims, key).ok()
    }
}

/// The `alg` a token's header names, if the header is readable JSON.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let header = token.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let header: serde_json::Value = serde_json::from_slice(&json).ok()?;
    header.get("alg")?.as_str().map(str::to_owned)
}

/// The claims of a verified token, as JSON.
fn payload(token: &str) -> Option<Box<RawValue>> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<&RawValue>(&json)
        .ok()
        .map(RawValue::to_owned)
}

/// Reads a PEM public key, and the algorithms its kind may verify.
fn public_key(path: &Path) -> Result<(DecodingKey, Vec<Algorithm>), String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("jwt_public_key_file: cannot read {}: {e}", path.display()))?;
    if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
        return Ok((
            key,
            vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
        ));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
        return Ok((key, vec![Algorithm::ES256, Algorithm::ES384]));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(&pem) {
        return Ok((key, vec![Algorithm::EdDSA]));
    }
    Err(format!(
        "jwt_public_key_file: {} is not an RSA, EC or Ed25519 public key in PEM",
        path.display()
    ))
}

/// Claims for a token for `user`, valid for `ttl`.
pub fn claims_for(user: &str, username: Option<&str>, ttl: Duration) -> Claims {
    Claims {
        sub: Some(user.to_owned()),
        user_id: None,
        username: username.map(str::to_owned),
        roles: Vec::new(),
        rooms: None,
        exp: now_secs() + ttl.as_secs(),
        iss: None,
        aud: None,
    }
}
