//! Login with OAuth 2.0 (GitHub) and OpenID Connect providers: the authorization-code flow
//! with `state` and PKCE (S256).
//!
//! 1. `GET /v1/auth/oauth/{provider}/start?redirect_to=/path` stores the state's hash with a
//!    fresh PKCE verifier (10 minutes, single use), sets the state in the `HttpOnly`
//!    `__Host-waveline_oauth_state` cookie (the prefix makes browsers insist on `Secure`,
//!    `Path=/` and no `Domain`, so no sibling subdomain can plant or overwrite it), and
//!    redirects to the provider with the verifier's challenge.
//! 2. The provider sends the browser back to `GET /v1/auth/oauth/{provider}/callback` with a
//!    code. The `state` must equal the cookie's (so nobody can finish a login they started in
//!    someone else's browser) and name a stored, unused state of this provider; the row is
//!    consumed, and the code is redeemed with the verifier, so a replayed or intercepted code
//!    is worthless.
//! 3. The identity comes from the provider's userinfo endpoint (GitHub: the profile and its
//!    verified emails). A known identity logs its account in. Otherwise the provider must have
//!    verified the email: an account of ours with that email is linked only if it verified the
//!    address too; one that did not is refused (409 `account_email_unverified`), because
//!    whoever registered it may not own the mailbox and must never gain this identity (a reset
//!    of its password by mail proves ownership and verifies it). With no account, a new one is
//!    created (no password; a username from the provider's, made unique; email verified). An
//!    email the provider has not verified neither links nor creates.
//! 4. The system account and suspended accounts are refused *before* anything is linked. The
//!    session starts as after a password login (cookies set), and the browser goes to
//!    `redirect_to`: a path on this site, never another origin.
//!
//! The ID token of OIDC is not needed: the identity is read from the userinfo endpoint with
//! the access token the token endpoint just gave us over TLS.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use poem::http::StatusCode;
use poem::web::cookie::{Cookie, CookieJar, SameSite};
use poem_openapi::param::{Path, Query};
use poem_openapi::{ApiResponse, OpenApi, Tags};
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use waveline_shared::config::{OAuthProvider, ProviderKind};
use waveline_shared::db::{DbError, Role, UserRow};

use crate::AppState;
use crate::auth::begin_session;
use crate::error::ApiError;

/// The cookie that binds a login in flight to the browser that started it. The `__Host-`
/// prefix requires `Secure`, `Path=/` and no `Domain`.
const STATE_COOKIE: &str = "__Host-waveline_oauth_state";
/// Where the routes live.
const OAUTH_PATH: &str = "/v1/auth/oauth";
/// How long a login in flight may take.
const STATE_TTL: Duration = Duration::from_secs(600);

#[derive(Tags)]
enum Tag {
    /// Logging in through OAuth 2.0 and OpenID Connect providers.
    Accounts,
}

/// The OAuth routes.
#[derive(Debug)]
pub struct OAuth {
    pub state: AppState,
    pub http: reqwest::Client,
}

/// An HTTP client for talking to providers: short timeouts, no redirects followed.
pub fn provider_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("waveline/", env!("CARGO_PKG_VERSION")))
        .build()
        .unwrap_or_default()
}

#[derive(ApiResponse)]
enum Redirect {
    /// Go there (the provider's consent page, or back to the site, logged in).
    #[oai(status = 303)]
    SeeOther(#[oai(header = "Location")] String, #[oai(header = "Cache-Control")] String),
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn state_cookie(value: &str, max_age: Duration) -> Cookie {
    let mut cookie = Cookie::new_with_str(STATE_COOKIE, value);
    cookie.set_path("/");
    cookie.set_max_age(max_age);
    cookie.set_http_only(true);
    cookie.set_secure(true);
    // Lax: the provider's redirect back is a top-level cross-site GET, which must carry it.
    cookie.set_same_site(SameSite::Lax);
    cookie
}

/// A path on this site: `/…`, not `//host` or `/\host` (which browsers read as another origin).
fn local_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.starts_with("//")
        && !path.starts_with("/\\")
        && path.chars().count() <= 512
        && !path.chars().any(|c| c.is_control() || c == '\\')
}

/// Who the provider says the user is.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    subject: String,
    /// Only an email the provider has verified.
    email: Option<String>,
    username: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GithubUser {
    id: u64,
    login: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GithubEmail {
    email: String,
    #[serde(default)]
    primary: bool,
    #[serde(default)]
    verified: bool,
}

#[derive(Debug, Deserialize)]
struct OidcClaims {
    sub: String,
    email: Option<String>,
    #[serde(default)]
    email_verified: bool,
    preferred_username: Option<String>,
}

/// A username of ours from a provider's: lower-case, `[a-z0-9_-]`, 3 to 30 characters.
fn username_from(text: &str) -> String {
    let mut name: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' { c } else { '-' })
        .take(30)
        .collect();
    while name.len() < 3 {
        name.push('_');
    }
    name
}

impl OAuth {
    fn provider(&self, name: &str) -> Result<&OAuthProvider, ApiError> {
        self.state.security.oauth.iter().find(|provider| provider.name == name).ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_provider", format!("no login provider {name:?}"))
        })
    }

    fn redirect_uri(&self, provider: &OAuthProvider) -> String {
        let base = self.state.security.public_url.as_str().trim_end_matches('/');
        format!("{base}{OAUTH_PATH}/{}/callback", provider.name)
    }

    async fn redeem(&self, provider: &OAuthProvider, code: &str, verifier: &str) -> Result<String, ApiError> {
        let unavailable = |err: &dyn std::fmt::Display| {
            tracing::warn!(provider = %provider.name, error = %err, "the login provider failed");
            ApiError::new(StatusCode::BAD_GATEWAY, "oauth_provider_unavailable", "the login provider did not answer")
        };
        let response = self
            .http
            .post(provider.token_url.clone())
            .header("accept", "application/json")
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", &self.redirect_uri(provider)),
                ("client_id", &provider.client_id),
                ("client_secret", provider.client_secret.expose_secret()),
                ("code_verifier", verifier),
            ])
            .send()
            .await
            .map_err(|err| unavailable(&err))?;
        let status = response.status();
        let answer: TokenAnswer = response.json().await.map_err(|err| unavailable(&err))?;
        match answer.access_token {
            Some(token) if status.is_success() => Ok(token),
            _ => {
                let why = answer.error_description.or(answer.error).unwrap_or_else(|| status.to_string());
                tracing::info!(provider = %provider.name, reason = %why, "the provider refused the code");
                Err(bad("oauth_code_rejected", "the login provider refused the code; start again"))
            }
        }
    }

    async fn identity(&self, provider: &OAuthProvider, token: &str) -> Result<Identity, ApiError> {
        let unavailable = |err: &dyn std::fmt::Display| {
            tracing::warn!(provider = %provider.name, error = %err, "cannot read the identity");
            ApiError::new(StatusCode::BAD_GATEWAY, "oauth_provider_unavailable", "the login provider did not answer")
        };
        let get = |url: url::Url| self.http.get(url).bearer_auth(token).header("accept", "application/json").send();
        let response = get(provider.userinfo_url.clone()).await.map_err(|err| unavailable(&err))?;
        if !response.status().is_success() {
            return Err(unavailable(&response.status()));
        }
        match provider.kind {
            ProviderKind::Oidc => {
                let claims: OidcClaims = response.json().await.map_err(|err| unavailable(&err))?;
                Ok(Identity {
                    subject: claims.sub,
                    email: claims.email.filter(|_| claims.email_verified),
                    username: claims.preferred_username,
                })
            }
            ProviderKind::Github => {
                let user: GithubUser = response.json().await.map_err(|err| unavailable(&err))?;
                let email = match &provider.emails_url {
                    Some(url) => {
                        let response = get(url.clone()).await.map_err(|err| unavailable(&err))?;
                        let emails: Vec<GithubEmail> = response.json().await.map_err(|err| unavailable(&err))?;
                        // The primary address if verified, else any verified one.
                        let mut verified: Vec<GithubEmail> = emails.into_iter().filter(|e| e.verified).collect();
                        verified.sort_by_key(|e| !e.primary);
                        verified.into_iter().next().map(|e| e.email)
                    }
                    None => None,
                };
                Ok(Identity { subject: user.id.to_string(), email, username: user.login })
            }
        }
    }

    /// The account for an identity: linked before (`false`), or to link now (`true`): ours
    /// with the same email (the caller checks that it verified it), or new.
    async fn account(&self, provider: &OAuthProvider, identity: &Identity) -> Result<(UserRow, bool), ApiError> {
        let users = &self.state.users;
        if let Some(user) = users.by_identity(&provider.name, &identity.subject).await? {
            return Ok((user, false));
        }
        let Some(email) = identity.email.as_deref().filter(|email| crate::auth::valid_email(email)) else {
            return Err(ApiError::forbidden("the login provider has no verified email for this account")
                .with_code("oauth_email_unverified"));
        };
        let existing = match users.by_email(email).await? {
            Some(user) => user,
            None => {
                let base = username_from(
                    identity.username.as_deref().unwrap_or_else(|| email.split('@').next().unwrap_or("listener")),
                );
                match users.create_without_password(email, &base).await {
                    Ok(user) => {
                        tracing::info!(user = %user.id, provider = %provider.name, "account created by OAuth");
                        return Ok((user, true));
                    }
                    // Created meanwhile (by a concurrent login, or a registration): judge it
                    // as any existing account.
                    Err(DbError::Conflict(_)) => {
                        users.by_email(email).await?.ok_or_else(|| ApiError::not_found("user"))?
                    }
                    Err(err) => return Err(err.into()),
                }
            }
        };
        Ok((existing, true))
    }
}

#[OpenApi(tag = "Tag::Accounts")]
impl OAuth {
    /// Starts a login with a provider: redirects (303) to its consent page. `redirect_to` is
    /// where to come back to, a path on this site (default `/`).
    #[oai(path = "/v1/auth/oauth/:provider/start", method = "get")]
    async fn start(
        &self,
        provider: Path<String>,
        #[oai(validator(
            max_length = 512,
            pattern = "^/([^/\\\\\\x00-\\x1f\\x7f-\\x9f][^\\\\\\x00-\\x1f\\x7f-\\x9f]*)?$"
        ))]
        redirect_to: Query<Option<String>>,
        jar: &CookieJar,
    ) -> Result<Redirect, ApiError> {
        let provider = self.provider(&provider.0)?;
        let redirect_to = redirect_to.0.unwrap_or_else(|| "/".to_owned());
        if !local_path(&redirect_to) {
            return Err(bad("invalid_field", "redirect_to: expected a path on this site, such as /home"));
        }
        let (state, verifier) = (random_token(), random_token());
        let challenge = URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()));
        self.state
            .users
            .save_oauth_state(&Sha256::digest(state.as_bytes()), &provider.name, &verifier, &redirect_to, STATE_TTL)
            .await?;
        let mut url = provider.authorize_url.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", &provider.client_id)
            .append_pair("redirect_uri", &self.redirect_uri(provider))
            .append_pair("scope", &provider.scopes)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256");
        jar.add(state_cookie(&state, STATE_TTL));
        Ok(Redirect::SeeOther(url.to_string(), "no-store".into()))
    }

    /// Where the provider sends the browser back: checks the state, redeems the code with the
    /// PKCE verifier, logs in (or creates, or links) the account, sets the session cookies and
    /// redirects (303) to where the login started.
    #[oai(path = "/v1/auth/oauth/:provider/callback", method = "get")]
    async fn callback(
        &self,
        provider: Path<String>,
        #[oai(validator(max_length = 2048))] code: Query<Option<String>>,
        #[oai(validator(max_length = 256))] state: Query<Option<String>>,
        #[oai(validator(max_length = 256))] error: Query<Option<String>>,
        jar: &CookieJar,
    ) -> Result<Redirect, ApiError> {
        let provider = self.provider(&provider.0)?;
        let cookie = jar.get(STATE_COOKIE).map(|cookie| cookie.value_str().to_owned());
        jar.add(state_cookie("", Duration::ZERO));
        if let Some(error) = error.0 {
            let error: String = error.chars().filter(|c| c.is_ascii_graphic()).take(64).collect();
            return Err(bad("oauth_denied", format!("the login provider answered {error:?}")));
        }
        let (Some(code), Some(state)) = (code.0, state.0) else {
            return Err(bad("oauth_invalid", "the callback needs `code` and `state`"));
        };
        let bound = cookie.is_some_and(|cookie| bool::from(cookie.as_bytes().ct_eq(state.as_bytes())));
        if !bound {
            return Err(bad("oauth_state_mismatch", "this login was not started in this browser; start again"));
        }
        let Some((verifier, redirect_to)) =
            self.state.users.take_oauth_state(&Sha256::digest(state.as_bytes()), &provider.name).await?
        else {
            return Err(bad("oauth_state_invalid", "this login is unknown, finished or expired; start again"));
        };
        let token = self.redeem(provider, &code, &verifier).await?;
        let identity = self.identity(provider, &token).await?;
        let (user, link) = self.account(provider, &identity).await?;
        // Refused accounts gain no identity: these checks come before the link.
        if user.role == Role::System {
            return Err(ApiError::forbidden("this account cannot log in"));
        }
        if user.suspended_at.is_some() {
            return Err(ApiError::forbidden("this account is suspended").with_code("account_suspended"));
        }
        if link && !user.email_verified {
            // Whoever registered this address may not own the mailbox: they must never gain
            // the identity of the one who does.
            tracing::warn!(
                user = %user.id,
                provider = %provider.name,
                "an OAuth login for the email of an unverified account: refused, nothing linked"
            );
            return Err(ApiError::conflict(
                "account_email_unverified",
                "an account with this email exists but has not verified it, so this login cannot be \
                 linked to it; if the account is yours, reset its password (POST /v1/auth/password/forgot), \
                 which verifies the address, then sign in again",
            ));
        }
        if link {
            self.state.users.link_identity(&provider.name, &identity.subject, user.id).await?;
            tracing::info!(user = %user.id, provider = %provider.name, "identity linked");
        }
        begin_session(&self.state, &user, jar).await?;
        Ok(Redirect::SeeOther(redirect_to, "no-store".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_redirect_targets() {
        for good in ["/", "/home", "/tracks/1?x=2"] {
            assert!(local_path(good), "{good}");
        }
        for bad in ["https://evil.example", "//evil.example", "/\\evil.example", "home", "", "/a\nb"] {
            assert!(!local_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn provider_usernames_become_ours() {
        assert_eq!(username_from("Octo.Cat"), "octo-cat");
        assert_eq!(username_from("é"), "-__");
        assert_eq!(username_from(&"x".repeat(40)).len(), 30);
    }
}
