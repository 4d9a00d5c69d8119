//! Accounts: register, verify the email, log in and out, reset a forgotten password, who am
//! I; and how every other route learns who is calling.
//!
//! - `POST /v1/auth/register` answers 202 with the same body whether or not the email already
//!   has an account, so it does not tell which emails are registered; the mail tells the
//!   address's owner what happened (a verification link, or "someone tried to register with
//!   your address"). Usernames are public: a taken one still answers 409 `username_taken`.
//! - An account proves its address with the single-use token of the verification mail, posted
//!   while signed in to that account (`POST /v1/auth/email/verify`; `POST /v1/auth/email/resend`
//!   mails a new one). Unverified accounts log in and use the platform; only a verified address
//!   links to an OAuth identity.
//! - `POST /v1/auth/password/forgot` answers 202 whatever the address, before looking it up (the
//!   mail job does that, see [`crate::mail`]); `POST /v1/auth/password/reset` takes the mailed
//!   token and a new password, verifies the address, and ends every session of the account.
//!
//! - Passwords are hashed with argon2id at OWASP's parameters (19 MiB, 2 passes, 1 lane) on
//!   the blocking pool, and stored as PHC strings. A login for an unknown email still
//!   verifies against a fixed hash, so its timing does not tell which emails have accounts.
//! - A login starts a **session** and returns a short-lived HS256 access JWT (`iss`, `aud`,
//!   `exp`, `nbf`, `jti`, and `sid`, the session) plus a refresh token. The algorithm is
//!   pinned on validation, and the header's `kid` names the key: the current one signs, earlier
//!   ones (`jwt_previous_secrets`) still validate, so keys rotate without logging anyone out.
//! - Either the `waveline_session` cookie (`HttpOnly; Secure; SameSite=Lax`) or
//!   `Authorization: Bearer` authenticates. Every authenticated request checks that the session
//!   is live and the account exists and is not suspended: from the process's
//!   [`crate::session_cache`], which database triggers keep current by notification (a
//!   revocation reaches every replica within the time a notification takes), else in one query.
//! - `POST /v1/auth/refresh` trades the refresh token (body, or the `waveline_refresh` cookie:
//!   `HttpOnly; Secure; SameSite=Strict; Path=/v1/auth`) for a new pair. Each refresh token
//!   works once; presenting a used one ends the session, whoever holds the newer token.
//! - CSRF: a state-changing request authenticated by the cookie must send `X-CSRF-Token`, an
//!   HMAC of its session id that the login returns (and sets in the readable `waveline_csrf`
//!   cookie). A page on another site can neither read it nor compute it. Bearer requests need
//!   none: browsers never add that header by themselves. The refresh cookie, which is not an
//!   access token, relies on `SameSite=Strict` plus an `Origin` check instead.
//! - Failed logins are counted per email: after `login_delay_after` each attempt must wait
//!   (1 s, doubling), after `login_lockout_after` the account is locked for `login_lockout_s`;
//!   both answer 429 with `Retry-After`, whatever the password. A suspended account answers
//!   403 `account_suspended` whatever the password, and every attempt counts as a failure, so
//!   neither the answer nor the throttling tells whether the password was right.
//! - A session (refresh-token family) lives at most `refresh_family_max_age_s` (90 days) from
//!   its login, however often it is refreshed; then the refresh answers 401 `session_expired`.
//! - Logging out ends the session: its access and refresh tokens stop working at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use chrono::{DateTime, Utc};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use poem::Request;
use poem::http::{Method, StatusCode};
use poem::web::cookie::{Cookie, CookieJar, SameSite};
use poem_openapi::auth::{ApiKey, Bearer};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, SecurityScheme, Tags};
use secrecy::{ExposeSecret, SecretString};
pub use waveline_shared::db::LoginPolicy;
use waveline_shared::db::{DbError, LoginBlock, NewUser, Registration, Role, Rotation, UserRow};
use waveline_shared::domain::UserId;

use crate::AppState;
use crate::error::ApiError;
use crate::mail::MailJob;
use crate::text::Text;
use crate::throttle::too_many;

/// The session cookie's name (it carries the access token).
pub const SESSION_COOKIE: &str = "waveline_session";
/// The refresh cookie's name.
pub const REFRESH_COOKIE: &str = "waveline_refresh";
/// The readable cookie with the CSRF token, for pages to copy into `X-CSRF-Token`.
pub const CSRF_COOKIE: &str = "waveline_csrf";
/// The header a cookie-authenticated state-changing request must carry.
pub const CSRF_HEADER: &str = "x-csrf-token";
const ISSUER: &str = "waveline";
const AUDIENCE: &str = "waveline-api";

#[derive(Tags)]
enum Tag {
    /// Accounts and sessions.
    Accounts,
}

type HmacSha256 = Hmac<Sha256>;

/// One signing key: its id and what is derived from it.
#[derive(Clone)]
struct Key {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// For CSRF tokens and signed URLs: separate keys derived from the secret, so a value
    /// made for one purpose is never valid for another.
    csrf: Vec<u8>,
    urls: Vec<u8>,
    /// For the listener hashes of play counting.
    listeners: Vec<u8>,
}

fn derive(secret: &[u8], purpose: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

impl Key {
    fn new(secret: &SecretString) -> Key {
        let bytes = secret.expose_secret().as_bytes();
        let kid = hex(&derive(bytes, "waveline key id")[..8]);
        Key {
            kid,
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            csrf: derive(bytes, "waveline csrf"),
            urls: derive(bytes, "waveline signed urls"),
            listeners: derive(bytes, "waveline play listeners"),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An HMAC over length-prefixed parts (so `("ab", "c")` and `("a", "bc")` differ).
fn mac_of(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac
}

fn mac(key: &[u8], parts: &[&[u8]]) -> String {
    URL_SAFE_NO_PAD.encode(mac_of(key, parts).finalize().into_bytes())
}

/// Whether `given` (base64url) is the HMAC of `parts` under `key`, in constant time.
fn mac_holds(key: &[u8], parts: &[&[u8]], given: &str) -> bool {
    URL_SAFE_NO_PAD.decode(given.trim()).is_ok_and(|given| mac_of(key, parts).verify_slice(&given).is_ok())
}

/// Signs and checks access tokens, CSRF tokens and signed URLs.
#[derive(Clone)]
pub struct Tokens {
    /// The current key first; the others only validate.
    keys: Vec<Key>,
    validation: Validation,
    ttl: Duration,
    /// Tokens verified lately, by their exact text (see [`Tokens::verify`]).
    verified: Arc<Mutex<HashMap<Box<str>, Arc<Claims>>>>,
}

/// How many verified tokens [`Tokens`] remembers; when full, it starts again empty.
const VERIFIED_MAX: usize = 10_000;

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|key| key.kid.as_str()).collect();
        f.debug_struct("Tokens").field("kids", &kids).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// What an access token says.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    pub sub: uuid::Uuid,
    pub jti: uuid::Uuid,
    /// The session (refresh-token family) the token belongs to.
    pub sid: uuid::Uuid,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

impl Tokens {
    /// Tokens signed with `secret` (and still accepted when signed with one of `previous`),
    /// valid for `ttl`.
    pub fn new(secret: &SecretString, previous: &[SecretString], ttl: Duration) -> Tokens {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        let keys = std::iter::once(secret).chain(previous).map(Key::new).collect();
        Tokens { keys, validation, ttl, verified: Arc::default() }
    }

    /// A random key for a process that was given none.
    pub fn random_secret() -> SecretString {
        let bytes: [u8; 32] = rand::random();
        SecretString::from(hex(&bytes))
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn current(&self) -> &Key {
        &self.keys[0]
    }

    /// A new access token for `user` in `session`.
    pub fn issue(&self, user: UserId, session: uuid::Uuid) -> Result<(String, Claims), ApiError> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: user.0,
            jti: uuid::Uuid::new_v4(),
            sid: session,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + self.ttl.as_secs() as i64,
        };
        let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(self.current().kid.clone());
        let token =
            jsonwebtoken::encode(&header, &claims, &self.current().encoding).map_err(|err| ApiError::internal(&err))?;
        Ok((token, claims))
    }

    /// The claims of a valid token: its `kid` names a configured key, and the signature,
    /// algorithm, issuer, audience and times check out.
    ///
    /// A client sends the same access token with every request, and checking it in full (two
    /// base64 decodes, two JSON parses and an HMAC) was the largest single cost of a status
    /// poll. So tokens that checked out are remembered by their exact text (at most
    /// [`VERIFIED_MAX`]; nothing unverified is ever kept): the same bytes carry the same
    /// signature, so only the expiry needs checking again. The keys never change in a
    /// process's life, so nothing else can turn a verified token invalid.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, ApiError> {
        self.verify_at(token, Utc::now().timestamp())
    }

    fn verify_at(&self, token: &str, now: i64) -> Result<Arc<Claims>, ApiError> {
        let expired = || ApiError::unauthorized("the session has expired; refresh it or log in again");
        let remembered = self.verified_lock().get(token).cloned();
        if let Some(claims) = remembered {
            if claims.exp + (self.validation.leeway as i64) < now {
                self.verified_lock().remove(token);
                return Err(expired());
            }
            return Ok(claims);
        }
        let invalid = || ApiError::unauthorized("the token is not valid");
        let header = jsonwebtoken::decode_header(token).map_err(|_| invalid())?;
        let key =
            header.kid.as_deref().and_then(|kid| self.keys.iter().find(|key| key.kid == kid)).ok_or_else(invalid)?;
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation)
            .map(|data| Arc::new(data.claims))
            .map_err(|err| match err.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => expired(),
                _ => invalid(),
            })?;
        let mut verified = self.verified_lock();
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(token.into(), claims.clone());
        Ok(claims)
    }

    fn verified_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<Claims>>> {
        self.verified.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The CSRF token of a session.
    pub fn csrf_token(&self, session: uuid::Uuid) -> String {
        mac(&self.current().csrf, &[session.as_bytes()])
    }

    /// Whether `token` is the CSRF token of `session` under any configured key.
    fn csrf_holds(&self, session: uuid::Uuid, token: &str) -> bool {
        self.keys.iter().any(|key| mac_holds(&key.csrf, &[session.as_bytes()], token))
    }

    /// A keyed hash naming a listener for play counting (the same on every replica that
    /// shares the key, and not reversible into an address without it).
    pub fn listener_hash(&self, parts: &[&[u8]]) -> [u8; 16] {
        let digest = mac_of(&self.keys[0].listeners, parts).finalize().into_bytes();
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&digest[..16]);
        hash
    }

    /// The signature of `path` until `expires` (Unix seconds), with the current key.
    pub fn sign_url(&self, path: &str, expires: i64) -> String {
        mac(&self.current().urls, &[path.as_bytes(), &expires.to_be_bytes()])
    }

    /// Whether `signature` signs `path` until `expires` under any configured key (the
    /// comparison takes constant time).
    pub fn url_signature_holds(&self, path: &str, expires: i64, signature: &str) -> bool {
        self.keys.iter().any(|key| mac_holds(&key.urls, &[path.as_bytes(), &expires.to_be_bytes()], signature))
    }
}

/// A new secret token (a refresh token, or one sent by mail: 256 random bits, base64url) and
/// the hash under which it is stored.
pub(crate) fn new_secret_token() -> (String, Vec<u8>) {
    let bytes: [u8; 32] = rand::random();
    let token = URL_SAFE_NO_PAD.encode(bytes);
    let hash = secret_hash(&token);
    (token, hash)
}

/// The stored form of a secret token: its SHA-256.
pub(crate) fn secret_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.trim().as_bytes()).to_vec()
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
pub(crate) async fn verify_password(password: String, phc: Option<String>) -> Result<bool, ApiError> {
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
    /// The session (refresh-token family) of the access token.
    pub id: uuid::Uuid,
    pub expires_at: DateTime<Utc>,
}

impl Session {
    pub fn is_admin(&self) -> bool {
        self.user.role == Role::Admin
    }
}

fn state_of(req: &Request) -> Result<&AppState, ApiError> {
    req.data::<AppState>().ok_or_else(|| ApiError::internal(&"the application state is not attached"))
}

async fn authenticate(req: &Request, token: &str) -> poem::Result<Session> {
    let state = state_of(req)?;
    let claims = state.tokens.verify(token)?;
    // From the process's session cache (see `session_cache`): no database round trip while
    // the session is known and the notifications are heard.
    let user = state
        .status_feed
        .sessions()
        .account(&state.users, claims.sid, UserId(claims.sub))
        .await
        .map_err(|err| match *err {
            DbError::Unavailable(_) => ApiError::unavailable("database", &err),
            _ => ApiError::internal(&err),
        })?
        .ok_or_else(|| ApiError::unauthorized("the session has ended; log in again"))?;
    let expires_at = DateTime::from_timestamp(claims.exp, 0).unwrap_or_else(Utc::now);
    Ok(Session { user, id: claims.sid, expires_at })
}

async fn check_bearer(req: &Request, bearer: Bearer) -> poem::Result<Session> {
    authenticate(req, &bearer.token).await
}

/// Safe methods change nothing, so a forged one gains nothing.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

async fn check_cookie(req: &Request, cookie: ApiKey) -> poem::Result<Session> {
    let session = authenticate(req, &cookie.key).await?;
    if !is_safe(req.method()) {
        let state = state_of(req)?;
        let holds = req.header(CSRF_HEADER).is_some_and(|token| state.tokens.csrf_holds(session.id, token));
        if !holds {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "csrf_failed",
                format!("a cookie-authenticated {} needs the session's {CSRF_HEADER} header", req.method()),
            )
            .into());
        }
    }
    Ok(session)
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
    /// An address such as `name@example.com`: 3–254 characters, one `@`, at most 64
    /// characters before it, a dot in the domain (not at either end), no spaces or control
    /// characters.
    #[oai(validator(
        min_length = 3,
        max_length = 254,
        pattern = "^[^@\\s\\x00-\\x1f\\x7f-\\x9f]{1,64}@[^@\\s\\x00-\\x1f\\x7f-\\x9f.][^@\\s\\x00-\\x1f\\x7f-\\x9f]*\\.[^@\\s\\x00-\\x1f\\x7f-\\x9f]*[^@\\s\\x00-\\x1f\\x7f-\\x9f.]$"
    ))]
    email: Text,
    /// 3–30 characters of `a-z`, `0-9`, `_` and `-`.
    #[oai(validator(min_length = 3, max_length = 30, pattern = "^[a-z0-9_-]{3,30}$"))]
    username: Text,
    /// At least 10 characters (at most 1024).
    #[oai(validator(min_length = 10, max_length = 1024))]
    password: Text,
}

/// An account, as its owner sees it.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
pub struct UserView {
    id: String,
    email: String,
    username: String,
    /// `user` or `admin`.
    role: String,
    created_at: DateTime<Utc>,
    /// Set while an admin has the account suspended.
    suspended_at: Option<DateTime<Utc>>,
    /// Whether the account proved it receives mail at `email`.
    email_verified: bool,
    /// `free` or `premium`.
    tier: String,
    /// The account's Stripe subscription, once it has one (shown to its owner).
    subscription: Option<crate::billing::SubscriptionView>,
    /// The avatar's `large` (100×100) JPEG (see the profile's `avatar_url`).
    avatar_url: Option<String>,
    /// The latest avatar's processing: `pending`, `processing`, `ready` or `failed`.
    avatar_state: Option<String>,
}

impl UserView {
    /// The view with the account's subscription.
    pub(crate) async fn with_subscription(mut self, state: &AppState, user: UserId) -> Result<UserView, ApiError> {
        self.subscription = crate::billing::subscription_view(state, user).await?;
        Ok(self)
    }

    /// The view with the account's avatar.
    pub(crate) fn with_avatar(mut self, avatar: crate::artwork::ImageFields) -> UserView {
        self.avatar_url = avatar.url;
        self.avatar_state = avatar.state;
        self
    }
}

impl From<&UserRow> for UserView {
    fn from(user: &UserRow) -> UserView {
        UserView {
            id: user.id.to_string(),
            email: user.email.clone(),
            username: user.username.clone(),
            role: user.role.as_str().to_owned(),
            created_at: user.created_at,
            suspended_at: user.suspended_at,
            email_verified: user.email_verified,
            tier: user.tier.as_str().to_owned(),
            subscription: None,
            avatar_url: None,
            avatar_state: None,
        }
    }
}

#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct Login {
    /// The account's email, as at registration.
    #[oai(validator(
        min_length = 3,
        max_length = 254,
        pattern = "^[^@\\s\\x00-\\x1f\\x7f-\\x9f]{1,64}@[^@\\s\\x00-\\x1f\\x7f-\\x9f.][^@\\s\\x00-\\x1f\\x7f-\\x9f]*\\.[^@\\s\\x00-\\x1f\\x7f-\\x9f]*[^@\\s\\x00-\\x1f\\x7f-\\x9f.]$"
    ))]
    email: Text,
    password: Text,
}

#[derive(Debug, Object)]
pub(crate) struct TokenView {
    access_token: String,
    /// Always `Bearer`.
    token_type: String,
    /// Seconds until the access token expires.
    expires_in: u64,
    /// Trade it for a new pair at `POST /v1/auth/refresh`; it works once.
    refresh_token: String,
    /// Seconds until the refresh token expires.
    refresh_expires_in: u64,
    /// Send it as `X-CSRF-Token` with state-changing requests authenticated by the cookie.
    csrf_token: String,
}

/// A refresh token; leave it out (`{}`) to use the `waveline_refresh` cookie.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct Refresh {
    #[oai(validator(max_length = 128))]
    refresh_token: Option<Text>,
}

/// The answer to a registration or a reset request: the same whether or not the email has
/// an account.
#[derive(Debug, Object)]
struct Accepted {
    message: String,
}

#[derive(ApiResponse)]
enum RegisterResponse {
    /// Accepted. If the email was free, the account exists now (log in with the password) and
    /// a verification mail is on its way; if the email already had an account, its owner gets
    /// a mail saying so. The answer is the same in both cases.
    #[oai(status = 202)]
    Accepted(Json<Accepted>),
}

/// A token from an account mail.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct MailedToken {
    /// The `token` of the mail's link (its `code`).
    #[oai(validator(max_length = 128))]
    token: Text,
}

/// Where to mail a password-reset link.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct Forgot {
    /// The account's email, as at registration.
    #[oai(validator(
        min_length = 3,
        max_length = 254,
        pattern = "^[^@\\s\\x00-\\x1f\\x7f-\\x9f]{1,64}@[^@\\s\\x00-\\x1f\\x7f-\\x9f.][^@\\s\\x00-\\x1f\\x7f-\\x9f]*\\.[^@\\s\\x00-\\x1f\\x7f-\\x9f]*[^@\\s\\x00-\\x1f\\x7f-\\x9f.]$"
    ))]
    email: Text,
}

/// A password-reset token and the new password.
#[derive(Debug, Object)]
#[oai(deny_unknown_fields)]
struct Reset {
    /// The `token` of the reset mail's link (its `code`).
    #[oai(validator(max_length = 128))]
    token: Text,
    /// At least 10 characters (at most 1024).
    #[oai(validator(min_length = 10, max_length = 1024))]
    password: Text,
}

#[derive(ApiResponse)]
enum AcceptedResponse {
    /// Accepted; any mail is on its way.
    #[oai(status = 202)]
    Accepted(Json<Accepted>),
}

#[derive(ApiResponse)]
enum DoneResponse {
    /// Done.
    #[oai(status = 204)]
    Done,
}

#[derive(ApiResponse)]
enum LoginResponse {
    /// The tokens. The access token is also set as the `waveline_session` cookie, the refresh
    /// token as `waveline_refresh` and the CSRF token as `waveline_csrf`.
    #[oai(status = 200)]
    Ok(Json<TokenView>, #[oai(header = "Cache-Control")] String),
}

#[derive(ApiResponse)]
enum LogoutResponse {
    /// The session has ended and the cookies are cleared.
    #[oai(status = 204)]
    Done,
}

/// The account routes.
#[derive(Debug)]
pub struct Accounts {
    pub state: AppState,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_field", message)
}

fn check_password(password: &str) -> Result<(), ApiError> {
    let length = password.chars().count();
    if length < 10 {
        return Err(invalid("password: expected at least 10 characters"));
    }
    if length > 1024 {
        return Err(invalid("password: expected at most 1024 characters"));
    }
    Ok(())
}

/// A mailed token that is unknown, used, expired, for something else, or for an address the
/// account no longer has: one answer for all.
fn token_refused() -> ApiError {
    // 404: a mailed token names a one-time grant, and this one names none (any more).
    ApiError::new(
        StatusCode::NOT_FOUND,
        "token_invalid",
        "this link is unknown, already used or expired; ask for a new one",
    )
}

pub(crate) fn valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    // In characters, as the schema's validators (and the database's check) count them.
    (3..=254).contains(&email.chars().count())
        && !local.is_empty()
        && local.chars().count() <= 64
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.matches('@').count() == 1
}

pub(crate) fn valid_username(username: &str) -> bool {
    (3..=30).contains(&username.len())
        && username.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

fn cookie(name: &str, value: &str, path: &str, max_age: Duration, http_only: bool, same_site: SameSite) -> Cookie {
    let mut cookie = Cookie::new_with_str(name, value);
    cookie.set_path(path);
    cookie.set_max_age(max_age);
    cookie.set_http_only(http_only);
    cookie.set_secure(true);
    cookie.set_same_site(same_site);
    cookie
}

/// Sets (or, with `None`, clears) the three session cookies.
fn set_cookies(jar: &CookieJar, tokens: Option<(&TokenView, Duration, Duration)>) {
    let (access, refresh, csrf, access_ttl, refresh_ttl) = match tokens {
        Some((view, access_ttl, refresh_ttl)) => {
            (view.access_token.as_str(), view.refresh_token.as_str(), view.csrf_token.as_str(), access_ttl, refresh_ttl)
        }
        None => ("", "", "", Duration::ZERO, Duration::ZERO),
    };
    jar.add(cookie(SESSION_COOKIE, access, "/", access_ttl, true, SameSite::Lax));
    jar.add(cookie(REFRESH_COOKIE, refresh, "/v1/auth", refresh_ttl, true, SameSite::Strict));
    jar.add(cookie(CSRF_COOKIE, csrf, "/", refresh_ttl, false, SameSite::Strict));
}

/// The login and refresh answer for a session whose refresh token lives `refresh_ttl`.
fn session_tokens(
    state: &AppState,
    user: &UserRow,
    session: uuid::Uuid,
    refresh: String,
    refresh_ttl: Duration,
) -> Result<TokenView, ApiError> {
    let (access_token, _) = state.tokens.issue(user.id, session)?;
    Ok(TokenView {
        access_token,
        token_type: "Bearer".into(),
        expires_in: state.tokens.ttl().as_secs(),
        refresh_token: refresh,
        refresh_expires_in: refresh_ttl.as_secs(),
        csrf_token: state.tokens.csrf_token(session),
    })
}

/// Starts a session for `user`: its tokens, also set as cookies.
pub(crate) async fn begin_session(state: &AppState, user: &UserRow, jar: &CookieJar) -> Result<TokenView, ApiError> {
    let session = uuid::Uuid::new_v4();
    let (refresh, hash) = new_secret_token();
    // The first token cannot outlive the family.
    let ttl = state.security.refresh_token_ttl.min(state.security.refresh_family_max_age);
    state.users.start_session(user.id, session, &hash, Utc::now() + ttl, state.security.refresh_token_ttl).await?;
    let view = session_tokens(state, user, session, refresh, ttl)?;
    set_cookies(jar, Some((&view, state.tokens.ttl(), ttl)));
    tracing::info!(user = %user.id, %session, "logged in");
    Ok(view)
}

fn refresh_expiry(state: &AppState) -> DateTime<Utc> {
    Utc::now() + state.security.refresh_token_ttl
}

fn login_blocked(block: LoginBlock) -> ApiError {
    let wait = (block.until - Utc::now()).to_std().unwrap_or_default();
    if block.locked {
        too_many(wait, "account_locked", "too many failed logins: this account is locked for a while")
    } else {
        too_many(wait, "login_throttled", "too many failed logins: wait before trying again")
    }
}

/// Whether a request's `Origin`, when it has one, is this API's own or a configured one.
fn origin_allowed(req: &Request, state: &AppState) -> bool {
    let Some(origin) = req.header("origin") else {
        return true;
    };
    let own = req.header("host").is_some_and(|host| {
        origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://")).is_some_and(|rest| rest == host)
    });
    own || state.security.cors_origins.iter().any(|allowed| allowed == origin)
}

#[OpenApi(tag = "Tag::Accounts")]
impl Accounts {
    /// Registers an account. The answer is 202 with the same body whether or not the email
    /// already has an account: if it was free, the account exists now (log in with the
    /// password; a verification mail is on its way); if not, nothing was created and the
    /// address's owner is told by mail. A taken username answers 409 `username_taken`.
    #[oai(path = "/v1/auth/register", method = "post")]
    async fn register(&self, body: Json<Register>) -> Result<RegisterResponse, ApiError> {
        let state = &self.state;
        let Register { email, username, password } = body.0;
        let (email, username, password) = (email.0, username.0, password.0);
        let email = email.trim().to_owned();
        if !valid_email(&email) {
            return Err(invalid("email: expected an address such as name@example.com, at most 254 characters"));
        }
        if !valid_username(&username) {
            return Err(invalid("username: expected 3 to 30 characters of a-z, 0-9, _ and -"));
        }
        check_password(&password)?;
        let username_taken = || ApiError::conflict("username_taken", "this username is taken; choose another");
        // Usernames are public, so saying this one is taken tells nothing about emails; checked
        // first, it answers the same whether or not the email is taken too.
        if state.users.by_username(&username).await?.is_some() {
            return Err(username_taken());
        }
        let password_hash = hash_password(password).await?;
        match state
            .users
            .register(&NewUser { email: &email, username: &username, password_hash: &password_hash })
            .await?
        {
            Registration::Created(user) => {
                tracing::info!(user = %user.id, username = %user.username, "account created");
                state.mailer.post(MailJob::Verify { user: user.id });
            }
            Registration::EmailTaken => {
                tracing::info!("a registration for an address that has an account: its owner is told");
                state.mailer.post(MailJob::AlreadyRegistered { email });
            }
            Registration::UsernameTaken => return Err(username_taken()),
        }
        Ok(RegisterResponse::Accepted(Json(Accepted {
            message: "Check your inbox: a mail tells you what comes next. If the account is new, you can log in now."
                .into(),
        })))
    }

    /// Verifies the signed-in account's email with the token of its verification mail (the
    /// link's `token`). Works once, until the token expires. It takes the session as well as
    /// the mailbox: someone who registered another person's address cannot read the mail, and
    /// the address's owner, who can, is not signed in to that account, so neither can verify
    /// it alone.
    #[oai(path = "/v1/auth/email/verify", method = "post")]
    async fn verify_email(&self, auth: Auth, body: Json<MailedToken>) -> Result<DoneResponse, ApiError> {
        let account = auth.session().user.id;
        let user =
            self.state.users.verify_email(account, &secret_hash(&body.0.token.0)).await?.ok_or_else(token_refused)?;
        self.state.status_feed.sessions().forget_user(user.id);
        tracing::info!(user = %user.id, "email verified");
        Ok(DoneResponse::Done)
    }

    /// Mails a new verification link to the signed-in account's address (at most five an
    /// hour). 409 `email_already_verified` when there is nothing to verify.
    #[oai(path = "/v1/auth/email/resend", method = "post")]
    async fn resend_verification(&self, auth: Auth) -> Result<AcceptedResponse, ApiError> {
        let user = &auth.session().user;
        if user.email_verified {
            return Err(ApiError::conflict("email_already_verified", "this account's email is verified already"));
        }
        self.state.mailer.post(MailJob::Verify { user: user.id });
        Ok(AcceptedResponse::Accepted(Json(Accepted { message: "A new verification mail is on its way.".into() })))
    }

    /// Mails a password-reset link to the account with this email, if there is one. Always 202
    /// with the same body, answered before the address is even looked up.
    #[oai(path = "/v1/auth/password/forgot", method = "post")]
    async fn forgot_password(&self, body: Json<Forgot>) -> Result<AcceptedResponse, ApiError> {
        let email = body.0.email.0.trim().to_owned();
        if !valid_email(&email) {
            return Err(invalid("email: expected an address such as name@example.com, at most 254 characters"));
        }
        self.state.mailer.post(MailJob::Reset { email });
        Ok(AcceptedResponse::Accepted(Json(Accepted {
            message: "If an account has this address, a mail with a reset link is on its way.".into(),
        })))
    }

    /// Sets a new password with the token of the reset mail. The token works once, until it
    /// expires; the reset verifies the account's email and ends every session of the account.
    #[oai(path = "/v1/auth/password/reset", method = "post")]
    async fn reset_password(&self, body: Json<Reset>) -> Result<DoneResponse, ApiError> {
        let Reset { token, password } = body.0;
        let (token, password) = (token.0, password.0);
        check_password(&password)?;
        let password_hash = hash_password(password).await?;
        let user =
            self.state.users.reset_password(&secret_hash(&token), &password_hash).await?.ok_or_else(token_refused)?;
        // This process forgets them at once; the others when the notification reaches them.
        self.state.status_feed.sessions().forget_user(user.id);
        tracing::info!(user = %user.id, "password reset: every session of the account has ended");
        Ok(DoneResponse::Done)
    }

    /// Logs in: starts a session, returns its tokens and sets them as cookies.
    ///
    /// Repeated failures for one email make further attempts wait, then lock the account for a
    /// while (429 `login_throttled` / `account_locked` with `Retry-After`).
    #[oai(path = "/v1/auth/login", method = "post")]
    async fn login(&self, body: Json<Login>, jar: &CookieJar) -> Result<LoginResponse, ApiError> {
        let state = &self.state;
        let Login { email, password } = body.0;
        let (email, password) = (email.0, password.0);
        if email.len() > 254 || password.len() > 4096 {
            return Err(invalid("email or password: too long"));
        }
        let email = email.trim().to_lowercase();
        if let Some(block) = state.users.login_block(&email).await? {
            return Err(login_blocked(block));
        }
        let user = state.users.by_email(&email).await?.filter(|user| user.role != Role::System);
        let phc = user.as_ref().and_then(|user| user.password_hash.clone());
        let matches = verify_password(password, phc).await?;
        let user = match user {
            // The same answer whether or not the password matched, and the attempt counts as a
            // failure either way: neither the answer nor the throttling confirms a password.
            Some(user) if user.suspended_at.is_some() => {
                state.users.login_failed(&email, &state.security.login).await?;
                tracing::info!(user = %user.id, "login to a suspended account");
                return Err(ApiError::new(StatusCode::FORBIDDEN, "account_suspended", "this account is suspended"));
            }
            Some(user) if matches => user,
            _ => {
                let block = state.users.login_failed(&email, &state.security.login).await?;
                tracing::info!(locked = block.is_some_and(|block| block.locked), "failed login");
                return Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credentials", "wrong email or password"));
            }
        };
        state.users.login_succeeded(&email).await?;
        let view = begin_session(state, &user, jar).await?;
        Ok(LoginResponse::Ok(Json(view), "no-store".into()))
    }

    /// Trades a refresh token (`{"refresh_token": …}`, or `{}` with the `waveline_refresh`
    /// cookie) for a new access token and refresh token. Each refresh token works once: presenting one that was already
    /// used ends its session (401 `refresh_reused`). A session lasts at most
    /// `refresh_family_max_age_s` from its login (then 401 `session_expired`).
    #[oai(path = "/v1/auth/refresh", method = "post")]
    async fn refresh(&self, body: Json<Refresh>, req: &Request, jar: &CookieJar) -> Result<LoginResponse, ApiError> {
        let state = &self.state;
        let from_body = body.0.refresh_token.map(Text::into_string);
        let token = match from_body {
            Some(token) => token,
            None => {
                let cookie = jar.get(REFRESH_COOKIE).map(|cookie| cookie.value_str().to_owned());
                let cookie = cookie.filter(|value| !value.is_empty()).ok_or_else(|| {
                    ApiError::unauthorized("no refresh token: send it in the body or the waveline_refresh cookie")
                })?;
                if !origin_allowed(req, state) {
                    return Err(ApiError::new(StatusCode::FORBIDDEN, "origin_refused", "this origin may not refresh"));
                }
                cookie
            }
        };
        let (next, next_hash) = new_secret_token();
        let rotation = state
            .users
            .rotate_refresh(
                &secret_hash(&token),
                &next_hash,
                refresh_expiry(state),
                state.security.refresh_family_max_age,
            )
            .await?;
        let refused = |code: &'static str, message: &str| {
            set_cookies(jar, None);
            ApiError::new(StatusCode::UNAUTHORIZED, code, message)
                .with_header("www-authenticate", "Bearer realm=\"waveline\"".to_owned())
        };
        match rotation {
            Rotation::Rotated { session, user, expires_at } => {
                let ttl = (expires_at - Utc::now()).to_std().unwrap_or_default();
                let view = session_tokens(state, &user, session, next, ttl)?;
                set_cookies(jar, Some((&view, state.tokens.ttl(), ttl)));
                Ok(LoginResponse::Ok(Json(view), "no-store".into()))
            }
            Rotation::Reused { session, user } => {
                state.status_feed.sessions().forget_session(session);
                tracing::warn!(%session, %user, "a used refresh token was presented again: the session is ended");
                Err(refused("refresh_reused", "this refresh token was already used; the session has ended"))
            }
            Rotation::Expired => Err(refused("refresh_expired", "the refresh token has expired; log in again")),
            Rotation::TooOld { session } => {
                state.status_feed.sessions().forget_session(session);
                Err(refused("session_expired", "the session has reached its maximum age; log in again"))
            }
            Rotation::Ended => Err(refused("session_ended", "the session has ended; log in again")),
            Rotation::Unknown => Err(refused("unauthorized", "the refresh token is not valid")),
        }
    }

    /// Logs out: ends the session (its access and refresh tokens stop working) and clears the
    /// cookies.
    #[oai(path = "/v1/auth/logout", method = "post")]
    async fn logout(&self, auth: Auth, jar: &CookieJar) -> Result<LogoutResponse, ApiError> {
        let state = &self.state;
        let session = auth.session();
        state.users.end_session(session.id, "logout").await?;
        // This process forgets it at once; the others when the notification reaches them.
        state.status_feed.sessions().forget_session(session.id);
        set_cookies(jar, None);
        Ok(LogoutResponse::Done)
    }

    /// The account behind the session, with its tier and subscription.
    #[oai(path = "/v1/me", method = "get")]
    async fn me(&self, auth: Auth) -> Result<Json<UserView>, ApiError> {
        let user = &auth.session().user;
        let subject = waveline_shared::images::ImageSubject::User;
        let avatar =
            crate::artwork::fields_of(&self.state, subject, &[user.id.0]).await?.remove(&user.id.0).unwrap_or_default();
        Ok(Json(UserView::from(user).with_avatar(avatar).with_subscription(&self.state, user.id).await?))
    }

    /// Changes the signed-in account's display name and bio; answers its public profile.
    #[oai(path = "/v1/me", method = "patch")]
    async fn edit_me(
        &self,
        body: Json<crate::social::ProfileEdit>,
        auth: Auth,
    ) -> Result<Json<crate::social::ProfileView>, ApiError> {
        Ok(Json(crate::social::edit_me(&self.state, body.0, &auth).await?))
    }

    /// Deletes the signed-in account and everything of it: its tracks and their files,
    /// playlists, follows, blocks, likes, reposts, comments and activities. Needs the
    /// account's password (403 `wrong_password`); an account that signs in only through a
    /// provider sets one first, through the password reset (409 `password_not_set`). Its
    /// Stripe customer is deleted first, which cancels its subscriptions: 503
    /// `billing_unavailable` when Stripe fails, and 503 `billing_disabled` when the account
    /// has a Stripe customer but billing is not configured on this server, so its
    /// subscription cannot be cancelled. Either way nothing was deleted; try again.
    #[oai(path = "/v1/me", method = "delete")]
    async fn delete_me(
        &self,
        body: Json<crate::social::AccountDeletion>,
        auth: Auth,
    ) -> Result<crate::social::Done, ApiError> {
        crate::social::delete_me(&self.state, body.0, &auth).await?;
        Ok(crate::social::Done::Done)
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

    fn tokens(secret: &str, previous: &[&str], ttl: u64) -> Tokens {
        let previous: Vec<SecretString> = previous.iter().map(|p| SecretString::from(p.to_string())).collect();
        Tokens::new(&SecretString::from(secret.to_owned()), &previous, Duration::from_secs(ttl))
    }

    #[test]
    fn tokens_are_pinned_to_their_key_algorithm_and_audience() {
        let tokens = tokens(&"k".repeat(32), &[], 60);
        let session = uuid::Uuid::new_v4();
        let (token, claims) = tokens.issue(UserId::new(), session).expect("issue");
        let verified = tokens.verify(&token).expect("verify");
        assert_eq!((verified.jti, verified.sid), (claims.jti, session));
        let other = self::tokens(&"x".repeat(32), &[], 60);
        assert_eq!(other.verify(&token).expect_err("other key").code, "unauthorized");
        // alg: none, with the same claims.
        let body = token.split('.').nth(1).expect("payload");
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{body}.");
        assert!(tokens.verify(&none).is_err());
        // Expired long ago, signed with the right key and kid.
        let mut old = claims.clone();
        old.exp -= 3600;
        let header = Header { kid: Some(tokens.current().kid.clone()), ..Header::default() };
        let old =
            jsonwebtoken::encode(&header, &old, &EncodingKey::from_secret("k".repeat(32).as_bytes())).expect("encode");
        assert_eq!(
            tokens.verify(&old).expect_err("expired").message,
            "the session has expired; refresh it or log in again"
        );
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let tokens = tokens(&"k".repeat(32), &[], 60);
        let (token, claims) = tokens.issue(UserId::new(), uuid::Uuid::new_v4()).expect("issue");
        let now = Utc::now().timestamp();
        assert_eq!(tokens.verify_at(&token, now).expect("valid").jti, claims.jti);
        assert!(tokens.verified_lock().contains_key(token.as_str()), "remembered once verified");
        // Within the leeway it still holds; past it, the remembered token is refused and forgotten.
        tokens.verify_at(&token, claims.exp + 5).expect("within the leeway");
        let err = tokens.verify_at(&token, claims.exp + 6).expect_err("expired");
        assert_eq!(err.message, "the session has expired; refresh it or log in again");
        assert!(!tokens.verified_lock().contains_key(token.as_str()));
        // A token that does not verify is never remembered.
        let at = token.len() - 10;
        let swapped = if &token[at..=at] == "A" { "B" } else { "A" };
        let forged = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
        assert!(tokens.verify(&forged).is_err());
        assert!(!tokens.verified_lock().contains_key(forged.as_str()));
    }

    #[test]
    fn keys_rotate_by_kid() {
        let (old_secret, new_secret) = ("o".repeat(32), "n".repeat(32));
        let before = tokens(&old_secret, &[], 60);
        let (token, _) = before.issue(UserId::new(), uuid::Uuid::new_v4()).expect("issue");
        // After rotation, tokens signed with the previous key still verify…
        let after = tokens(&new_secret, &[&old_secret], 60);
        after.verify(&token).expect("a previous key validates");
        // …new ones name the new key…
        let (fresh, _) = after.issue(UserId::new(), uuid::Uuid::new_v4()).expect("issue");
        let kid = jsonwebtoken::decode_header(&fresh).expect("header").kid.expect("kid");
        assert_eq!(kid, after.current().kid);
        assert_ne!(kid, before.current().kid);
        // …and once the old key is dropped, its tokens are refused.
        let dropped = tokens(&new_secret, &[], 60);
        assert!(dropped.verify(&token).is_err());
        assert!(before.verify(&fresh).is_err(), "an unknown kid is refused");
    }

    #[test]
    fn csrf_tokens_and_url_signatures_are_bound_to_what_they_sign() {
        let tokens = tokens(&"k".repeat(32), &[], 60);
        let (one, two) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let csrf = tokens.csrf_token(one);
        assert!(tokens.csrf_holds(one, &csrf));
        assert!(!tokens.csrf_holds(two, &csrf));
        assert!(!tokens.csrf_holds(one, "not base64!"));
        let signature = tokens.sign_url("/v1/tracks/a/stream/mp3_128", 100);
        assert!(tokens.url_signature_holds("/v1/tracks/a/stream/mp3_128", 100, &signature));
        assert!(!tokens.url_signature_holds("/v1/tracks/a/stream/mp3_128", 101, &signature));
        assert!(!tokens.url_signature_holds("/v1/tracks/b/stream/mp3_128", 100, &signature));
        // A CSRF token is not a URL signature, even over the same bytes.
        assert!(!tokens.url_signature_holds(std::str::from_utf8(one.as_bytes()).unwrap_or(""), 0, &csrf));
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
