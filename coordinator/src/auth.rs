//! Researcher and officer authentication on the Flight SQL endpoint.
//!
//! - **Credentials** are Argon2id password hashes (PHC strings) in the ledger's `users`
//!   table, seeded from `coordinator.toml` at first start and managed by privacy officers
//!   afterwards (`fedq user add|disable`). A password is never stored or logged.
//! - **Login** is the Flight `Handshake` with `authorization: Basic base64(user:password)`
//!   (what ADBC's `username`/`password` options and arrow-flight's `handshake` send). It
//!   answers with `authorization: Bearer <token>` in the response headers (and the token as
//!   the handshake payload). Tokens are 32 random bytes from OpenSSL (through OpenDP), live
//!   `token_ttl_secs`, and are kept only as SHA3-256 digests, compared in constant time.
//! - **Every other call** carries the bearer token; [`AuthInterceptor`] checks it and attaches
//!   [`Researcher`] or [`Officer`]. Disabling a user drops their tokens at once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine as _;
use sha3::{Digest, Sha3_256};
use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::error::CoordinatorError;

/// Default lifetime of a bearer token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A user's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs queries within their budget.
    Researcher,
    /// Manages budgets, users and reads the policy; runs no queries.
    Officer,
}

impl Role {
    /// `researcher` or `officer`, as stored in the ledger.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Researcher => "researcher",
            Role::Officer => "officer",
        }
    }

    /// Parse the stored form.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "researcher" => Some(Role::Researcher),
            "officer" => Some(Role::Officer),
            _ => None,
        }
    }
}

/// The authenticated researcher, attached to each request by [`AuthInterceptor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Researcher(pub String);

/// An authenticated privacy officer, attached instead of [`Researcher`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Officer(pub String);

/// `Basic` credentials, attached for the handshake to check (no other call accepts them).
#[derive(Clone)]
pub struct BasicCredentials {
    /// User name.
    pub user: String,
    /// Password, as sent.
    pub password: String,
}

/// Argon2id hash (PHC string) of a password with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, CoordinatorError> {
    let mut salt = [0u8; 16];
    opendp::traits::samplers::fill_bytes(&mut salt)
        .map_err(|e| CoordinatorError::internal("-", format!("no randomness for a salt: {e}")))?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| CoordinatorError::internal("-", format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CoordinatorError::internal("-", format!("hashing a password: {e}")))
}

/// Check that `phc` is an Argon2 PHC string fedq can verify against.
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    let h = PasswordHash::new(phc).map_err(|e| {
        format!("not a PHC password hash ({e}); create one with `fedq user hash-password`")
    })?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err(format!(
            "hash algorithm {} is not Argon2; use `fedq user hash-password`",
            h.algorithm
        ));
    }
    Ok(())
}

/// Whether `password` matches the Argon2 PHC hash `phc` (`false` for a malformed hash).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// A hash no password matches, verified for unknown users so that a login takes as long
/// whether or not the user exists.
pub(crate) fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password("fedq-no-such-user").unwrap_or_else(|_| {
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                .to_string()
        })
    })
}

struct Issued {
    digest: [u8; 32],
    user: String,
    role: Role,
    expires: Instant,
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRejection {
    /// Never issued, or its user was disabled.
    Unknown,
    /// Issued, but past its lifetime.
    Expired,
}

/// Live bearer tokens (digests only).
pub struct Sessions {
    ttl: Duration,
    tokens: Mutex<Vec<Issued>>,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").field("ttl", &self.ttl).finish()
    }
}

/// Tokens expired longer ago than this are forgotten (until then they answer "expired").
const EXPIRED_GRACE: Duration = Duration::from_secs(3600);

impl Sessions {
    /// Sessions whose tokens live `ttl`.
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            tokens: Mutex::new(Vec::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Issued>> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issue a token for an authenticated user.
    pub fn issue(&self, user: &str, role: Role) -> Result<String, CoordinatorError> {
        let mut raw = [0u8; 32];
        opendp::traits::samplers::fill_bytes(&mut raw).map_err(|e| {
            CoordinatorError::internal("-", format!("no randomness for a token: {e}"))
        })?;
        let token = hex::encode(raw);
        let now = Instant::now();
        let mut tokens = self.lock();
        tokens.retain(|t| t.expires + EXPIRED_GRACE > now);
        tokens.push(Issued {
            digest: Sha3_256::digest(token.as_bytes()).into(),
            user: user.to_string(),
            role,
            expires: now + self.ttl,
        });
        Ok(token)
    }

    /// The user and role of a token. Every live digest is compared in constant time.
    pub fn check(&self, token: &str) -> Result<(String, Role), TokenRejection> {
        let digest: [u8; 32] = Sha3_256::digest(token.as_bytes()).into();
        let now = Instant::now();
        let tokens = self.lock();
        let mut found: Option<&Issued> = None;
        for t in tokens.iter() {
            if bool::from(t.digest.ct_eq(&digest)) {
                found = Some(t);
            }
        }
        match found {
            None => Err(TokenRejection::Unknown),
            Some(t) if t.expires <= now => Err(TokenRejection::Expired),
            Some(t) => Ok((t.user.clone(), t.role)),
        }
    }

    /// Drop every token of `user` (on disable).
    pub fn revoke_user(&self, user: &str) {
        self.lock().retain(|t| t.user != user);
    }

    /// Token lifetime.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

const LOGIN_HINT: &str = "log in with your user name and password (fedq: --user and --password-file; ADBC: the username and password options), which returns a bearer token";

/// Checks every call's credentials: a bearer token (attaches [`Researcher`] or
/// [`Officer`]), or Basic credentials, which only the handshake accepts.
#[derive(Clone)]
pub struct AuthInterceptor {
    sessions: Arc<Sessions>,
}

impl AuthInterceptor {
    /// Interceptor over these sessions.
    pub fn new(sessions: Arc<Sessions>) -> Self {
        AuthInterceptor { sessions }
    }
}

fn parse_basic(b64: &str) -> Option<BasicCredentials> {
    // Some clients (ADBC's Go core) send the value without base64 padding.
    const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = LENIENT.decode(b64.trim()).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (user, password) = text.split_once(':')?;
    Some(BasicCredentials {
        user: user.to_string(),
        password: password.to_string(),
    })
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let Some(header) = header else {
            return Err(Status::unauthenticated(format!(
                "missing credentials: {LOGIN_HINT}"
            )));
        };
        let (scheme, value) = header.split_once(' ').unwrap_or((header.as_str(), ""));
        if scheme.eq_ignore_ascii_case("basic") {
            let creds = parse_basic(value).ok_or_else(|| {
                Status::unauthenticated("malformed Basic credentials: send base64(user:password)")
            })?;
            req.extensions_mut().insert(creds);
            return Ok(req);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Status::unauthenticated(format!(
                "authorization must be `Bearer <token>` or `Basic <credentials>`: {LOGIN_HINT}"
            )));
        }
        match self.sessions.check(value.trim()) {
            Ok((name, Role::Researcher)) => {
                req.extensions_mut().insert(Researcher(name));
                Ok(req)
            }
            Ok((name, Role::Officer)) => {
                req.extensions_mut().insert(Officer(name));
                Ok(req)
            }
            Err(TokenRejection::Expired) => Err(Status::unauthenticated(format!(
                "your token has expired (tokens live {} s); {LOGIN_HINT}",
                self.sessions.ttl().as_secs()
            ))),
            Err(TokenRejection::Unknown) => Err(Status::unauthenticated(format!(
                "unknown or revoked token; {LOGIN_HINT}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        check_password_hash(&h).unwrap();
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(check_password_hash("abc").is_err());
        // A fresh salt each time.
        assert_ne!(h, hash_password("correct horse").unwrap());
    }

    #[test]
    fn tokens_expire_and_are_revoked() {
        let s = Sessions::new(Duration::from_millis(50));
        let t = s.issue("alice", Role::Researcher).unwrap();
        let o = s.issue("olivia", Role::Officer).unwrap();
        assert_eq!(s.check(&t).unwrap(), ("alice".into(), Role::Researcher));
        assert_eq!(s.check(&o).unwrap(), ("olivia".into(), Role::Officer));
        assert_eq!(s.check("nope"), Err(TokenRejection::Unknown));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(s.check(&t), Err(TokenRejection::Expired));
        let s = Sessions::new(Duration::from_secs(60));
        let t = s.issue("alice", Role::Researcher).unwrap();
        s.revoke_user("alice");
        assert_eq!(s.check(&t), Err(TokenRejection::Unknown));
    }

    #[test]
    fn basic_credentials_parse() {
        let b = base64::engine::general_purpose::STANDARD.encode("bob:pa:ss");
        let c = parse_basic(&b).unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("bob", "pa:ss"));
        assert!(parse_basic("%%%").is_none());
        let unpadded = base64::engine::general_purpose::STANDARD_NO_PAD.encode("al:x");
        assert_eq!(parse_basic(&unpadded).unwrap().user, "al");
    }
}
