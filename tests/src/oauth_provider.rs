//! A small OAuth 2.0 / OpenID Connect provider on loopback, for the login tests. It speaks
//! both dialects Waveline knows (GitHub's and OIDC's), consents at once as whichever
//! [`Profile`] the test set, and is strict where a real provider is: codes work once, for the
//! redirect URI they were issued to, and only with the PKCE verifier of their challenge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use poem::http::StatusCode;
use poem::web::{Data, Form, Json, Query};
use poem::{EndpointExt, IntoResponse, Response, Route, get, handler, post};
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;

use crate::stack::{Stack, header, set_cookie, set_cookies};

/// Who the next consent logs in as.
#[derive(Debug, Clone)]
pub struct Profile {
    pub subject: String,
    pub username: String,
    pub email: String,
    pub email_verified: bool,
}

pub const CLIENT_ID: &str = "waveline-test-client";
pub const CLIENT_SECRET: &str = "waveline-test-client-secret";

#[derive(Debug, Clone)]
struct Grant {
    challenge: String,
    redirect_uri: String,
    profile: Profile,
    used: bool,
}

#[derive(Debug, Default)]
struct State {
    profile: Option<Profile>,
    grants: HashMap<String, Grant>,
    tokens: HashMap<String, Profile>,
}

/// The running provider.
#[derive(Debug)]
pub struct FakeProvider {
    pub base: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (status, Json(json!({"error": error, "error_description": description}))).into_response()
}

#[derive(Debug, Deserialize)]
struct AuthorizeParams {
    response_type: String,
    client_id: String,
    redirect_uri: String,
    state: String,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
}

#[handler]
fn authorize_endpoint(Query(params): Query<AuthorizeParams>, Data(state): Data<&Shared>) -> Response {
    if params.response_type != "code" || params.client_id != CLIENT_ID {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "unknown client or response type");
    }
    let (Some(challenge), Some("S256")) = (params.code_challenge, params.code_challenge_method.as_deref()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "PKCE (S256) is required");
    };
    let mut state_guard = lock(state);
    let Some(profile) = state_guard.profile.clone() else {
        return oauth_error(StatusCode::BAD_REQUEST, "access_denied", "nobody is logged in at the provider");
    };
    let code = URL_SAFE_NO_PAD.encode(rand_bytes());
    state_guard
        .grants
        .insert(code.clone(), Grant { challenge, redirect_uri: params.redirect_uri.clone(), profile, used: false });
    let mut to = url::Url::parse(&params.redirect_uri).expect("a redirect URI");
    to.query_pairs_mut().append_pair("code", &code).append_pair("state", &params.state);
    Response::builder().status(StatusCode::FOUND).header("location", to.as_str()).finish()
}

fn rand_bytes() -> [u8; 24] {
    let mut bytes = [0u8; 24];
    for (i, byte) in uuid::Uuid::new_v4().as_bytes().iter().chain(uuid::Uuid::new_v4().as_bytes()).take(24).enumerate()
    {
        bytes[i] = *byte;
    }
    bytes
}

#[derive(Debug, Deserialize)]
struct TokenParams {
    grant_type: String,
    code: String,
    redirect_uri: String,
    client_id: String,
    client_secret: String,
    code_verifier: Option<String>,
}

#[handler]
fn token_endpoint(Form(params): Form<TokenParams>, Data(state): Data<&Shared>) -> Response {
    if params.grant_type != "authorization_code" {
        return oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", "authorization_code only");
    }
    if params.client_id != CLIENT_ID || params.client_secret != CLIENT_SECRET {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", "wrong client credentials");
    }
    let mut guard = lock(state);
    let Some(grant) = guard.grants.get_mut(&params.code) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "unknown code");
    };
    if grant.used {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "the code was already used");
    }
    grant.used = true;
    if grant.redirect_uri != params.redirect_uri {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "redirect_uri differs");
    }
    let Some(verifier) = params.code_verifier else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "code_verifier is required");
    };
    if URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes())) != grant.challenge {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", "the PKCE verifier does not match");
    }
    let profile = grant.profile.clone();
    let access = URL_SAFE_NO_PAD.encode(rand_bytes());
    guard.tokens.insert(access.clone(), profile);
    Json(json!({"access_token": access, "token_type": "bearer"})).into_response()
}

fn bearer_profile(req: &poem::Request, state: &Shared) -> Option<Profile> {
    let token = req.header("authorization")?.strip_prefix("Bearer ")?;
    lock(state).tokens.get(token).cloned()
}

#[handler]
fn userinfo_endpoint(req: &poem::Request, Data(state): Data<&Shared>) -> Response {
    match bearer_profile(req, state) {
        Some(p) => Json(json!({
            "sub": p.subject, "email": p.email, "email_verified": p.email_verified, "preferred_username": p.username,
        }))
        .into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

#[handler]
fn github_user_endpoint(req: &poem::Request, Data(state): Data<&Shared>) -> Response {
    match bearer_profile(req, state) {
        Some(p) => Json(json!({"id": p.subject.parse::<u64>().unwrap_or(1), "login": p.username})).into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

#[handler]
fn github_emails_endpoint(req: &poem::Request, Data(state): Data<&Shared>) -> Response {
    match bearer_profile(req, state) {
        Some(p) => Json(json!([
            {"email": "old@example.net", "primary": false, "verified": false},
            {"email": p.email, "primary": true, "verified": p.email_verified},
        ]))
        .into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

impl FakeProvider {
    /// Starts the provider on a free loopback port.
    pub async fn start() -> anyhow::Result<FakeProvider> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let state: Shared = Arc::default();
        let app = Route::new()
            .at("/authorize", get(authorize_endpoint))
            .at("/token", post(token_endpoint))
            .at("/userinfo", get(userinfo_endpoint))
            .at("/user", get(github_user_endpoint))
            .at("/user/emails", get(github_emails_endpoint))
            .data(state.clone());
        let server = poem::Server::new(poem::listener::TcpListener::bind(format!("127.0.0.1:{port}")));
        let task = tokio::spawn(async move {
            let _ = server.run(app).await;
        });
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(FakeProvider { base, state, task })
    }

    /// The next consents log in as `profile`.
    pub fn log_in_as(&self, profile: Profile) {
        lock(&self.state).profile = Some(profile);
    }

    /// The environment that configures Waveline with this provider, as `github` (GitHub's
    /// dialect) and `corp` (OpenID Connect).
    pub fn env(&self) -> Vec<(String, String)> {
        let base = &self.base;
        let mut env = Vec::new();
        for (name, kind, userinfo) in [("GITHUB", "github", "/user"), ("CORP", "oidc", "/userinfo")] {
            let var = |field: &str| format!("WAVELINE_OAUTH_{name}_{field}");
            env.push((var("KIND"), kind.to_owned()));
            env.push((var("CLIENT_ID"), CLIENT_ID.to_owned()));
            env.push((var("CLIENT_SECRET"), CLIENT_SECRET.to_owned()));
            env.push((var("AUTHORIZE_URL"), format!("{base}/authorize")));
            env.push((var("TOKEN_URL"), format!("{base}/token")));
            env.push((var("USERINFO_URL"), format!("{base}{userinfo}")));
            if kind == "github" {
                env.push((var("EMAILS_URL"), format!("{base}/user/emails")));
            }
        }
        env
    }
}

/// A profile at the provider.
pub fn profile(subject: &str, username: &str, email: &str, verified: bool) -> Profile {
    Profile { subject: subject.into(), username: username.into(), email: email.into(), email_verified: verified }
}

/// The name of Waveline's OAuth state cookie.
pub const STATE_COOKIE: &str = "__Host-waveline_oauth_state";

/// A browser's part of an OAuth login, by hand: no redirect is followed on its own.
#[derive(Debug)]
pub struct Browser {
    pub http: reqwest::Client,
}

/// What a callback answered.
#[derive(Debug)]
pub struct Landing {
    pub status: u16,
    pub location: String,
    pub body: serde_json::Value,
    /// The session cookie's access token, when the login succeeded.
    pub access_token: Option<String>,
}

impl Default for Browser {
    fn default() -> Browser {
        Browser::new()
    }
}

impl Browser {
    pub fn new() -> Browser {
        Browser {
            http: reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client"),
        }
    }

    /// `start`: the provider's authorize URL and the state cookie (`name=value`), after
    /// checking the cookie's name and attributes: the `__Host-` prefix, which browsers honour
    /// only with `Secure`, `Path=/` and no `Domain`.
    pub async fn start(&self, stack: &Stack, provider: &str, redirect_to: &str) -> anyhow::Result<(String, String)> {
        let response = self
            .http
            .get(stack.url(&format!("/v1/auth/oauth/{provider}/start?redirect_to={redirect_to}")))
            .send()
            .await?;
        anyhow::ensure!(response.status() == 303, "start: {}", response.status());
        let cookie = set_cookie(&set_cookies(&response), STATE_COOKIE)?;
        let attributes: Vec<String> = cookie.split(';').skip(1).map(|a| a.trim().to_ascii_lowercase()).collect();
        for flag in ["httponly", "secure", "samesite=lax", "path=/"] {
            anyhow::ensure!(attributes.iter().any(|a| a == flag), "the state cookie lacks {flag}: {cookie}");
        }
        anyhow::ensure!(!attributes.iter().any(|a| a.starts_with("domain")), "the state cookie has a Domain: {cookie}");
        let cookie = cookie.split(';').next().unwrap_or_default().to_owned();
        Ok((header(&response, "location"), cookie))
    }

    /// The provider's consent: the callback URL it sends the browser to.
    pub async fn consent(&self, authorize: &str) -> anyhow::Result<String> {
        let response = self.http.get(authorize).send().await?;
        anyhow::ensure!(response.status() == 302, "authorize: {} {}", response.status(), response.text().await?);
        Ok(header(&response, "location"))
    }

    /// The browser back at the callback, with the state cookie (or none).
    pub async fn land(&self, callback: &str, cookie: Option<&str>) -> anyhow::Result<Landing> {
        let mut request = self.http.get(callback);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let location = header(&response, "location");
        let cookies = set_cookies(&response);
        let access_token = set_cookie(&cookies, "waveline_session")
            .ok()
            .and_then(|c| c.split(';').next().map(|v| v.trim_start_matches("waveline_session=").to_owned()))
            .filter(|v| !v.is_empty());
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Ok(Landing { status, location, body, access_token })
    }

    /// A whole login that comes back to `/welcome`; returns the landing.
    pub async fn login(&self, stack: &Stack, provider: &str) -> anyhow::Result<Landing> {
        let (authorize, cookie) = self.start(stack, provider, "/welcome").await?;
        let callback = self.consent(&authorize).await?;
        self.land(&callback, Some(&cookie)).await
    }
}
