//! A fake Firebase Cloud Messaging on loopback, for the push tests: the OAuth token endpoint
//! of a service account and FCM's HTTP v1 `messages:send`, strict where the real ones are.
//!
//! - The token endpoint takes only the JWT bearer grant, and only an assertion signed (RS256)
//!   with the service account's key; it hands out a new access token each time.
//! - `messages:send` takes only a bearer token it issued, for the project of the key file.
//! - What a send answers is scripted per device token ([`FakeFcm::script`]); unscripted, 200.
//!
//! The test service account ([`FakeFcm::service_account`]) gets a fresh 2048-bit RSA key from
//! `openssl` (on every development machine and in CI: `setup.sh` installs it), so no key is
//! kept in the repository.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use poem::http::StatusCode;
use poem::web::{Data, Form, Json};
use poem::{EndpointExt, IntoResponse, Response, Route, handler, post};
use serde::Deserialize;
use serde_json::{Value, json};

/// The project the test service account belongs to.
pub const PROJECT_ID: &str = "waveline-test";
/// The test service account's address.
pub const CLIENT_EMAIL: &str = "push@waveline-test.iam.gserviceaccount.com";
/// The key id of the test service account.
pub const KEY_ID: &str = "test-key-1";

/// What a send to one device answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// 200 with a message name.
    Sent,
    /// 503 `UNAVAILABLE` with `Retry-After: seconds`.
    Unavailable { retry_after_s: u64 },
    /// 404 `UNREGISTERED`.
    Unregistered,
    /// 400 `INVALID_ARGUMENT` about the token.
    InvalidToken,
    /// 403 `SENDER_ID_MISMATCH`.
    SenderMismatch,
}

/// One request to the token endpoint.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub grant_type: String,
    pub assertion: String,
    /// Whether the assertion's signature held (the endpoint refused it otherwise).
    pub signature_valid: bool,
}

/// One request to `messages:send`.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub path: String,
    pub authorization: String,
    pub body: Value,
    /// The device token of the message.
    pub device: String,
    pub answer: Answer,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct State {
    pub token_requests: Vec<TokenRequest>,
    /// The access tokens handed out, in order.
    pub issued: Vec<String>,
    pub sends: Vec<SendRequest>,
    scripts: HashMap<String, VecDeque<Answer>>,
}

impl State {
    /// The sends to `device`, in order.
    pub fn sends_to(&self, device: &str) -> Vec<&SendRequest> {
        self.sends.iter().filter(|send| send.device == device).collect()
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The public key (PKCS#1 DER) the token endpoint verifies assertions with.
#[derive(Debug, Clone, Default)]
struct Trusted(Arc<Mutex<Vec<u8>>>);

/// A service account for the fake, with a fresh key.
#[derive(Debug)]
pub struct ServiceAccount {
    /// The key file, as Firebase hands it out.
    pub key_file: PathBuf,
    /// The public key, PKCS#1 DER.
    pub public_key_der: Vec<u8>,
}

impl ServiceAccount {
    /// Generates a 2048-bit RSA key with `openssl` in `dir` and writes the key file, its
    /// `token_uri` pointing at `token_uri`.
    pub fn generate(dir: &Path, token_uri: &str) -> Result<ServiceAccount> {
        let pem_path = dir.join("key.pem");
        let der_path = dir.join("public.der");
        let run = |args: &[&str]| -> Result<()> {
            let output = std::process::Command::new("openssl")
                .args(args)
                .output()
                .context("openssl is not installed; run scripts/setup.sh")?;
            ensure!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
            Ok(())
        };
        let pem = pem_path.to_str().context("path")?;
        run(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", pem])?;
        run(&["rsa", "-in", pem, "-RSAPublicKey_out", "-outform", "DER", "-out", der_path.to_str().context("path")?])?;
        let private_key = std::fs::read_to_string(&pem_path)?;
        ensure!(private_key.starts_with("-----BEGIN PRIVATE KEY-----"), "openssl wrote no PKCS#8 key");
        let key_file = dir.join("service-account.json");
        std::fs::write(
            &key_file,
            serde_json::to_vec_pretty(&json!({
                "type": "service_account",
                "project_id": PROJECT_ID,
                "private_key_id": KEY_ID,
                "private_key": private_key,
                "client_email": CLIENT_EMAIL,
                "client_id": "100000000000000000001",
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": token_uri,
            }))?,
        )?;
        Ok(ServiceAccount { key_file, public_key_der: std::fs::read(&der_path)? })
    }
}

/// The running fake.
#[derive(Debug)]
pub struct FakeFcm {
    /// `http://127.0.0.1:PORT`: `fcm_base_url`, and the token endpoint's base.
    pub base: String,
    state: Shared,
    trusted: Trusted,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeFcm {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Deserialize)]
struct TokenForm {
    grant_type: String,
    assertion: String,
}

fn oauth_error(description: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": "invalid_grant", "error_description": description}))).into_response()
}

#[handler]
fn token_endpoint(Form(form): Form<TokenForm>, Data(state): Data<&Shared>, Data(trusted): Data<&Trusted>) -> Response {
    let key = trusted.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let signature_valid = !key.is_empty()
        && jsonwebtoken::decode::<Value>(&form.assertion, &jsonwebtoken::DecodingKey::from_rsa_der(&key), &validation)
            .is_ok();
    let mut state = lock(state);
    state.token_requests.push(TokenRequest {
        grant_type: form.grant_type.clone(),
        assertion: form.assertion.clone(),
        signature_valid,
    });
    if form.grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "unsupported_grant_type"}))).into_response();
    }
    if !signature_valid {
        return oauth_error("Invalid JWT Signature.");
    }
    let token = format!("ya29.fake-{}-{}", state.issued.len() + 1, crate::unique());
    state.issued.push(token.clone());
    Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"})).into_response()
}

fn fcm_error(status: StatusCode, name: &str, message: &str, details: Value) -> Response {
    Json(json!({"error": {"code": status.as_u16(), "message": message, "status": name, "details": details}}))
        .with_status(status)
        .into_response()
}

#[handler]
fn send_endpoint(req: &poem::Request, Json(body): Json<Value>, Data(state): Data<&Shared>) -> Response {
    let path = req.uri().path().to_owned();
    if path != format!("/v1/projects/{PROJECT_ID}/messages:send") {
        return fcm_error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such project", json!([]));
    }
    let authorization = req.header("authorization").unwrap_or_default().to_owned();
    let mut state = lock(state);
    let known = authorization.strip_prefix("Bearer ").is_some_and(|token| state.issued.iter().any(|t| t == token));
    if !known {
        return fcm_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
            json!([]),
        );
    }
    let device = body["message"]["token"].as_str().unwrap_or_default().to_owned();
    let answer = state.scripts.get_mut(&device).and_then(VecDeque::pop_front).unwrap_or(Answer::Sent);
    state.sends.push(SendRequest { path, authorization, body, device, answer: answer.clone(), at: Instant::now() });
    let fcm_code =
        |code: &str| json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}]);
    match answer {
        Answer::Sent => {
            let name = format!("projects/{PROJECT_ID}/messages/{}", state.sends.len());
            Json(json!({"name": name})).into_response()
        }
        Answer::Unavailable { retry_after_s } => {
            let mut response = fcm_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "The service is currently unavailable.",
                fcm_code("UNAVAILABLE"),
            );
            if let Ok(value) = retry_after_s.to_string().parse() {
                response.headers_mut().insert("retry-after", value);
            }
            response
        }
        Answer::Unregistered => {
            fcm_error(StatusCode::NOT_FOUND, "NOT_FOUND", "Requested entity was not found.", fcm_code("UNREGISTERED"))
        }
        Answer::InvalidToken => fcm_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "The registration token is not a valid FCM registration token",
            fcm_code("INVALID_ARGUMENT"),
        ),
        Answer::SenderMismatch => {
            fcm_error(StatusCode::FORBIDDEN, "PERMISSION_DENIED", "SenderId mismatch", fcm_code("SENDER_ID_MISMATCH"))
        }
    }
}

impl FakeFcm {
    /// Starts the fake on a free loopback port. Its token endpoint trusts no key until
    /// [`FakeFcm::service_account`] makes one.
    pub async fn start() -> Result<FakeFcm> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let state: Shared = Arc::default();
        let trusted = Trusted::default();
        let app = Route::new()
            .at("/token", post(token_endpoint))
            .at("/v1/projects/*rest", post(send_endpoint))
            .data(state.clone())
            .data(trusted.clone());
        let server = poem::Server::new(poem::listener::TcpListener::bind(format!("127.0.0.1:{port}")));
        let task = tokio::spawn(async move {
            let _ = server.run(app).await;
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            ensure!(Instant::now() < deadline, "the fake FCM did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(FakeFcm { base: format!("http://127.0.0.1:{port}"), state, trusted, task })
    }

    /// The token endpoint's URL.
    pub fn token_uri(&self) -> String {
        format!("{}/token", self.base)
    }

    /// A service account (key file in `dir`) whose assertions the token endpoint accepts.
    pub fn service_account(&self, dir: &Path) -> Result<ServiceAccount> {
        let account = ServiceAccount::generate(dir, &self.token_uri())?;
        *self.trusted.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = account.public_key_der.clone();
        Ok(account)
    }

    /// The next sends to `device` answer `answers`, in order (then 200).
    pub fn script(&self, device: &str, answers: &[Answer]) {
        lock(&self.state).scripts.entry(device.to_owned()).or_default().extend(answers.iter().cloned());
    }

    /// What the fake has seen so far.
    pub fn seen<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&lock(&self.state))
    }

    /// Waits (at most 30 s) until `ready` finds what it waits for in what the fake has seen.
    pub async fn wait_for<T>(&self, what: &str, ready: impl Fn(&State) -> Option<T>) -> Result<T> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) = ready(&lock(&self.state)) {
                return Ok(found);
            }
            let state = lock(&self.state);
            ensure!(
                Instant::now() < deadline,
                "{what}: not within 30 s; token requests {}, sends {:?}",
                state.token_requests.len(),
                state.sends.iter().map(|s| (&s.device, &s.answer)).collect::<Vec<_>>()
            );
            drop(state);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
