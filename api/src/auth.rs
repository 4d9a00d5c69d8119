//! Accounts: register, log in and out, who am I; and how every other route learns who is
//! calling.
//!
//! - Passwords are hashed with argon2id at OWASP's parameters (19 MiB, 2 passes, 1 lane) on
//!   the blocking pool, and stored as PHC strings. A login for an unknown email still
//!   verifies against a fixed hash, so its timing does not tell which emails have accounts.
//! - A login returns a short-lived HS256 JWT (`iss`, `aud`, `exp`, `nbf`, `jti`; the
//!   algorithm is pinned on validation) in the body and in an `httpOnly; Secure;
//!   SameSite=Lax` cookie. Either the cookie or `Authorization: Bearer` authenticates.
//! - Logging out records the token's `jti` as revoked until it would have expired; every
//!   authenticated request checks that (and that the account still exists) in one query.

use std::sync::OnceLock;
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chrono::{DateTime, Utc};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use poem::Request;
use poem::http::StatusCode;
use poem_openapi::auth::{ApiKey, Bearer};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, SecurityScheme, Tags};
use secrecy::{ExposeSecret, SecretString};
use waveline_shared::db::{NewUser, Role, UserRow};
use waveline_shared::domain::UserId;

use crate::AppState;
use crate::error::ApiError;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "waveline_session";
const ISSUER: &str = "waveline";
const AUDIENCE: &str = "waveline-api";

#[derive(Tags)]
enum Tag {
    /// Accounts and sessions.
    Accounts,
}

/// Signs and checks session tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// What a session token says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    pub sub: uuid::Uuid,
    pub jti: uuid::Uuid,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

impl Tokens {
    /// Tokens signed with `secret`, valid for `ttl`.
    pub fn new(secret: &SecretString, ttl: Duration) -> Tokens {
        let key = secret.expose_secret().as_bytes();
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        Tokens { encoding: EncodingKey::from_secret(key), decoding: DecodingKey::from_secret(key), validation, ttl }
    }

    /// A random key for a process that was given none.
    pub fn random_secret() -> SecretString {
        let bytes: [u8; 32] = rand::random();
        SecretString::from(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A new token for `user`.
    pub fn issue(&self, user: UserId) -> Result<(String, Claims), ApiError> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user.0,
            jti: uuid::Uuid::new_v4(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + self.ttl.as_secs() as i64,
        };
        let token = jsonwebtoken::encode(&Header::new(jsonwebtoken::Algorithm::HS256), &claims, &self.encoding)
            .map_err(|err| ApiError::internal(&err))?;
        Ok((token, claims))
    }

    /// The claims of a valid token (signature, algorithm, issuer, audience, times).
    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|data| data.claims).map_err(|err| {
            match err.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                    ApiError::unauthorized("the session has expired; log in again")
                }
                _ => ApiError::unauthorized("the token is not valid"),
            }
        })
    }
}

/// OWASP's argon2id parameters: m = 19 MiB, t = 2, p = 1.
fn hasher() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string, off the async threads.
pub async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
        hasher().hash_password(password.as_bytes(), &salt).map(|hash| hash.to_string())
    })
    .await
    .map_err(|err| ApiError::internal(&err))?
    .map_err(|err| ApiError::internal(&err))
}

/// Whether `password` matches `phc`; with `None`, checks against a fixed hash so the time
/// taken is the same as for a real account, and answers `false`.
async fn verify_password(password: String, phc: Option<String>) -> Result<bool, ApiError> {
    static DECOY: OnceLock<String> = OnceLock::new();
    tokio::task::spawn_blocking(move || {
        let (phc, real) = match phc {
            Some(phc) => (phc, true),
            None => {
                let decoy = DECOY.get_or_init(|| {
                    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
                    hasher().hash_password(b"decoy password", &salt).map(|h| h.to_string()).unwrap_or_default()
                });
                (decoy.clone(), false)
            }
        };
        let Ok(parsed) = PasswordHash::new(&phc) else {
            return false;
        };
        // Verify with the parameters stored in the hash, so raising them later keeps old
        // hashes valid.
        Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok() && real
    })
    .await
    .map_err(|err| ApiError::internal(&err))
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: UserRow,
    pub jti: uuid::Uuid,
    pub expires_at: DateTime<Utc>,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}

async fn authenticate(req: &Request, token: &str) -> poem::Result<Session> {
    let state = req.data::<AppState>().ok_or_else(|| ApiError::internal(&"the application state is not attached"))?;
    let claims = state.tokens.verify(token)?;
    let user = state
        .users
        .session_user(claims.jti, UserId(claims.sub))
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::unauthorized("the session has ended; log in again"))?;
    let expires_at = DateTime::from_timestamp(claims.exp, 0).unwrap_or_else(Utc::now);
    Ok(Session { user, jti: claims.jti, expires_at })
}

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Session> {
    authenticate(req, &bearer.token).await
}

async fn check_cookie(req: &Request, cookie: ApiKey) -> poem::Result<Session> {
    authenticate(req, &cookie.key).await
}

/// `Authorization: Bearer <access_token>`.
#[derive(Debug, SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT", checker = "check_bearer")]
pub struct BearerToken(pub Session);

/// The session cookie set by `POST /v1/auth/login`.
#[derive(Debug, SecurityScheme)]
#[oai(ty = "api_key", key_in = "cookie", key_name = "waveline_session", checker = "check_cookie")]
pub struct SessionCookie(pub Session);

/// A route that needs an account.
#[derive(Debug, SecurityScheme)]
pub enum Auth {
    Bearer(BearerToken),
    Cookie(SessionCookie),
}

impl Auth {
    pub fn session(&self) -> &Session {
        match self {
            Auth::Bearer(BearerToken(session)) | Auth::Cookie(SessionCookie(session)) => session,
        }
    }
}

/// A route open to everyone that shows more to an account (its own private tracks).
#[derive(Debug, SecurityScheme)]
pub enum MaybeAuth {
    Bearer(BearerToken),
    Cookie(SessionCookie),
    #[oai(fallback)]
    Anonymous,
}

impl MaybeAuth {
    pub fn session(&self) -> Option<&Session> {
        match self {
            MaybeAuth::Bearer(BearerToken(session)) | MaybeAuth::Cookie(SessionCookie(session)) => Some(session),
            MaybeAuth::Anonymous => None,
        }
    }
}

/// A new account.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct Register {
    /// At most 254 characters.
    email: String,
    /// 3–30 characters of `a-z`, `0-9`, `_` and `-`.
    username: String,
    /// At least 10 characters (at most 1024).
    password: String,
}

/// An account, as its owner sees it.
#[derive(Debug, Object)]
pub struct UserView {
    id: String,
    email: String,
    username: String,
    /// `user` or `admin`.
    role: String,
    created_at: DateTime<Utc>,
}

impl From<&UserRow> for UserView {
    fn from(user: &UserRow) -> UserView {
        UserView {
            id: user.id.to_string(),
            email: user.email.clone(),
            username: user.username.clone(),
            role: user.role.as_str().to_owned(),
            created_at: user.created_at,
        }
    }
}

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct Login {
    email: String,
    password: String,
}

#[derive(Debug, Object)]
struct TokenView {
    access_token: String,
    /// Always `Bearer`.
    token_type: String,
    /// Seconds until the token expires.
    expires_in: u64,
}

#[derive(ApiResponse)]
enum RegisterResponse {
    /// The account was created; log in next.
    #[oai(status = 201)]
    Created(Json<UserView>),
}

#[derive(ApiResponse)]
enum LoginResponse {
    /// The token, also set as the session cookie.
    #[oai(status = 200)]
    Ok(Json<TokenView>, #[oai(header = "Set-Cookie")] String, #[oai(header = "Cache-Control")] String),
}

#[derive(ApiResponse)]
enum LogoutResponse {
    /// The token is revoked and the cookie cleared.
    #[oai(status = 204)]
    Done(#[oai(header = "Set-Cookie")] String),
}

/// The account routes.
#[derive(Debug)]
pub struct Accounts {
    pub state: AppState,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_field", message)
}

fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    (3..=254).contains(&email.len())
        && !local.is_empty()
        && local.len() <= 64
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.matches('@').count() == 1
}

fn valid_username(username: &str) -> bool {
    (3..=30).contains(&username.len())
        && username.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn session_cookie(token: &str, max_age: u64) -> String {
    format!("{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; Secure; SameSite=Lax")
}

#[OpenApi(tag = "Tag::Accounts")]
impl Accounts {
    /// Creates an account.
    #[oai(path = "/v1/auth/register", method = "post")]
    async fn register(&self, body: Json<Register>) -> Result<RegisterResponse, ApiError> {
        let state = &self.state;
        let Register { email, username, password } = body.0;
        let email = email.trim().to_owned();
        if !valid_email(&email) {
            return Err(invalid("email: expected an address such as name@example.com, at most 254 characters"));
        }
        if !valid_username(&username) {
            return Err(invalid("username: expected 3 to 30 characters of a-z, 0-9, _ and -"));
        }
        let length = password.chars().count();
        if length < 10 {
            return Err(invalid("password: expected at least 10 characters"));
        }
        if length > 1024 {
            return Err(invalid("password: expected at most 1024 characters"));
        }
        let password_hash = hash_password(password).await?;
        let user = state
            .users
            .create(&NewUser { email: &email, username: &username, password_hash: &password_hash })
            .await
            .map_err(|err| match err {
                waveline_shared::db::DbError::Conflict(message) => ApiError::conflict("account_exists", message),
                other => other.into(),
            })?;
        tracing::info!(user = %user.id, username = %user.username, "account created");
        Ok(RegisterResponse::Created(Json(UserView::from(&user))))
    }

    /// Logs in: returns an access token and sets it as the session cookie.
    #[oai(path = "/v1/auth/login", method = "post")]
    async fn login(&self, body: Json<Login>) -> Result<LoginResponse, ApiError> {
        let state = &self.state;
        let Login { email, password } = body.0;
        if email.len() > 254 || password.len() > 4096 {
            return Err(invalid("email or password: too long"));
        }
        let user = state.users.by_email(email.trim()).await?;
        let phc = user.as_ref().and_then(|user| user.password_hash.clone());
        let matches = verify_password(password, phc).await?;
        let Some(user) = user.filter(|user| matches && user.role != Role::System) else {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "wrong email or password"));
        };
        let (token, _) = state.tokens.issue(user.id)?;
        let ttl = state.tokens.ttl().as_secs();
        tracing::info!(user = %user.id, "logged in");
        Ok(LoginResponse::Ok(
            Json(TokenView { access_token: token.clone(), token_type: "Bearer".into(), expires_in: ttl }),
            session_cookie(&token, ttl),
            "no-store".into(),
        ))
    }

    /// Logs out: revokes the token and clears the cookie.
    #[oai(path = "/v1/auth/logout", method = "post")]
    async fn logout(&self, auth: Auth) -> Result<LogoutResponse, ApiError> {
        let state = &self.state;
        let session = auth.session();
        state.users.revoke_token(session.jti, session.user.id, session.expires_at).await?;
        Ok(LogoutResponse::Done(session_cookie("", 0)))
    }

    /// The account behind the session.
    #[oai(path = "/v1/me", method = "get")]
    async fn me(&self, auth: Auth) -> Json<UserView> {
        Json(UserView::from(&auth.session().user))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_usernames_are_checked() {
        for good in ["a@b.co", "first.last+tag@example.org"] {
            assert!(valid_email(good), "{good}");
        }
        for bad in ["", "no-at", "@example.com", "a@b", "a@.com", "a@b.", "a b@c.de", "a@b@c.de"] {
            assert!(!valid_email(bad), "{bad}");
        }
        for good in ["abc", "dj_set-01", &"a".repeat(30)] {
            assert!(valid_username(good), "{good}");
        }
        for bad in ["ab", "ABC", "has space", "émile", &"a".repeat(31), "x;drop"] {
            assert!(!valid_username(bad), "{bad}");
        }
    }

    #[test]
    fn tokens_are_pinned_to_their_key_algorithm_and_audience() {
        let tokens = Tokens::new(&SecretString::from("k".repeat(32)), Duration::from_secs(60));
        let (token, claims) = tokens.issue(UserId::new()).expect("issue");
        assert_eq!(tokens.verify(&token).expect("verify").jti, claims.jti);
        let other = Tokens::new(&SecretString::from("x".repeat(32)), Duration::from_secs(60));
        assert_eq!(other.verify(&token).expect_err("other key").code, "unauthorized");
        // alg: none, with the same claims.
        let body = token.split('.').nth(1).expect("payload");
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        assert!(tokens.verify(&none).is_err());
        // Expired long ago.
        let expired = Tokens::new(&SecretString::from("k".repeat(32)), Duration::from_secs(0));
        let mut old = expired.issue(UserId::new()).expect("issue").1;
        old.exp -= 3600;
        let old = jsonwebtoken::encode(&Header::default(), &old, &EncodingKey::from_secret("k".repeat(32).as_bytes()))
            .expect("encode");
        assert_eq!(tokens.verify(&old).expect_err("expired").message, "the session has expired; log in again");
    }

    #[tokio::test]
    async fn passwords_hash_as_argon2id_and_verify() {
        let phc = hash_password("correct horse battery".into()).await.expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(verify_password("correct horse battery".into(), Some(phc.clone())).await.expect("verify"));
        assert!(!verify_password("wrong horse battery".into(), Some(phc)).await.expect("verify"));
        assert!(!verify_password("anything".into(), None).await.expect("decoy"));
    }
}
