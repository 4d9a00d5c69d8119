//! The FCM HTTP v1 client the push job sends with: the service account, its access token,
//! and one send per device.
//!
//! - **Credentials.** The service-account key file (`fcm_credentials_file`) is read and
//!   checked once, when the process starts ([`Fcm::load`]): JSON with `project_id`,
//!   `client_email`, `private_key` (an RSA key in PEM, PKCS#8 as Google issues it, or PKCS#1)
//!   and `token_uri`. A file that cannot serve fails the start with the file and the problem
//!   named, rather than every push later.
//! - **Access token.** OAuth 2's JWT bearer grant (RFC 7523): an RS256 assertion
//!   `{iss: client_email, scope: firebase.messaging, aud: token_uri, iat, exp: iat + 1 h}`
//!   posted to `token_uri`. The token is kept until a minute before it expires and shared by
//!   every job of the process; the lock held while one is fetched makes concurrent jobs wait
//!   for that one instead of each asking for its own.
//! - **Sending.** `POST {fcm_base_url}/v1/projects/{project_id}/messages:send`, one device per
//!   request (the v1 API has no multicast). Each answer becomes a [`Delivery`] the job acts on;
//!   a 401 (the token was revoked early) drops the cached token and tries once more with a
//!   fresh one.
//!
//! Why not a crate: `fcm` (0.9) speaks only the legacy API that Google shut down in 2024;
//! `fcm-rs` hard-codes Google's host (no test double can stand in), formats the bearer token
//! with `{:?}`, ignores status codes and `Retry-After`, and brings `yup-oauth2`; `google-fcm1`
//! is a generated client from 2022 with a stack of its own. The protocol is two POSTs, and
//! reqwest and jsonwebtoken are already in the tree.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use url::Url;
use waveline_shared::config::is_secure_or_loopback;
use waveline_shared::push::{DeviceToken, PushMessage};

/// The OAuth scope that sending FCM messages needs.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// The largest answer body read from the token endpoint or FCM.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// How long an assertion is valid: Google accepts at most an hour.
const ASSERTION_LIFETIME: Duration = Duration::from_secs(3600);
/// A token is renewed this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(60);

/// Why the FCM client cannot be set up, or cannot get an access token.
#[derive(Debug, thiserror::Error)]
pub enum FcmError {
    #[error("cannot read the FCM credentials file {}: {source}", path.display())]
    Unreadable { path: PathBuf, source: std::io::Error },
    #[error("FCM credentials file {}: {problem}", path.display())]
    Malformed { path: PathBuf, problem: String },
    #[error("the OAuth token endpoint is unavailable: {0}")]
    TokenUnavailable(String),
    #[error("the OAuth token endpoint refused the service account: {0}")]
    TokenRefused(String),
}

impl FcmError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            FcmError::Unreadable { .. } => "fcm_credentials_unreadable",
            FcmError::Malformed { .. } => "fcm_credentials_malformed",
            FcmError::TokenUnavailable(_) => "fcm_token_unavailable",
            FcmError::TokenRefused(_) => "fcm_token_refused",
        }
    }

    /// Whether trying again cannot help: a refused service account stays refused until an
    /// operator changes the key (the push job still retries, so its pushes wait in the queue
    /// and then the dead letters, ready to replay).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, FcmError::TokenUnavailable(_))
    }
}

/// What became of one push to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// FCM took it.
    Sent,
    /// The token is no longer valid (`UNREGISTERED`, or an `INVALID_ARGUMENT` about the
    /// token): the device is to be forgotten.
    InvalidToken,
    /// FCM refused this message for this device for another reason; trying again would not
    /// help.
    Rejected { status: u16, reason: String },
    /// FCM, the token endpoint or the network failed for now: try again, not before
    /// `retry_after` if FCM said so.
    Unavailable { reason: String, retry_after: Option<Duration> },
}

/// The service account, as read from its key file.
struct ServiceAccount {
    project_id: String,
    client_email: String,
    token_uri: Url,
    key_id: Option<String>,
    key: EncodingKey,
}

/// The key file's fields that matter here.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    project_id: Option<String>,
    client_email: Option<String>,
    private_key: Option<String>,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

struct AccessToken {
    value: String,
    renew_at: Instant,
}

/// The FCM HTTP v1 client of one process.
pub struct Fcm {
    http: reqwest::Client,
    send_url: Url,
    account: ServiceAccount,
    token: tokio::sync::Mutex<Option<AccessToken>>,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("send_url", &self.send_url.as_str())
            .field("client_email", &self.account.client_email)
            .field("token_uri", &self.account.token_uri.as_str())
            .finish_non_exhaustive()
    }
}

impl Fcm {
    /// Reads and checks the key file at `path`, for the FCM API at `base`.
    pub fn load(path: &Path, base: &Url) -> Result<Fcm, FcmError> {
        let account = read_key_file(path)?;
        let mut send_url = base.clone();
        let prefix = base.path().trim_end_matches('/');
        send_url.set_path(&format!("{prefix}/v1/projects/{}/messages:send", account.project_id));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| malformed(path, format!("cannot build the HTTP client: {err}")))?;
        Ok(Fcm { http, send_url, account, token: tokio::sync::Mutex::new(None) })
    }

    /// The project the pushes are sent for.
    pub fn project_id(&self) -> &str {
        &self.account.project_id
    }

    /// An access token: the cached one while it lasts, else a new one from the token endpoint.
    pub async fn access_token(&self) -> Result<String, FcmError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref().filter(|token| Instant::now() < token.renew_at) {
            return Ok(token.value.clone());
        }
        let token = self.fetch_token().await?;
        let value = token.value.clone();
        *cached = Some(token);
        Ok(value)
    }

    /// Forgets `token` if it is still the cached one (FCM no longer accepts it).
    async fn forget_token(&self, token: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|cached| cached.value == token) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<AccessToken, FcmError> {
        let account = &self.account;
        let iat = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_secs());
        let claims = Assertion {
            iss: &account.client_email,
            scope: SCOPE,
            aud: account.token_uri.as_str(),
            iat,
            exp: iat + ASSERTION_LIFETIME.as_secs(),
        };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = account.key_id.clone();
        let assertion = jsonwebtoken::encode(&header, &claims, &account.key)
            .map_err(|err| FcmError::TokenRefused(format!("cannot sign the assertion: {err}")))?;
        let asked = Instant::now();
        let response = self
            .http
            .post(account.token_uri.clone())
            .form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"), ("assertion", &assertion)])
            .send()
            .await
            .map_err(|err| FcmError::TokenUnavailable(err.without_url().to_string()))?;
        let status = response.status();
        let body = read_capped(response).await.map_err(FcmError::TokenUnavailable)?;
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(FcmError::TokenUnavailable(format!("HTTP {status}")));
        }
        if !status.is_success() {
            let error: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let reason = error["error"].as_str().unwrap_or("no error code");
            return Err(FcmError::TokenRefused(format!(
                "HTTP {status}: {}",
                reason.chars().take(200).collect::<String>()
            )));
        }
        let answer: TokenAnswer = serde_json::from_slice(&body)
            .map_err(|err| FcmError::TokenUnavailable(format!("an answer without an access token: {err}")))?;
        let usable = !answer.access_token.is_empty()
            && answer.access_token.len() <= 4096
            && answer.access_token.bytes().all(|b| b.is_ascii_graphic());
        if !usable {
            return Err(FcmError::TokenUnavailable("the access token is not a printable token".into()));
        }
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600).min(86_400));
        let keep = lifetime.saturating_sub(RENEW_BEFORE).max(lifetime / 2);
        Ok(AccessToken { value: answer.access_token, renew_at: asked + keep })
    }

    /// Sends `push` to the device of `token`.
    pub async fn send(&self, token: &DeviceToken, push: &PushMessage) -> Delivery {
        let body = send_body(token, push);
        let mut fresh_token_tried = false;
        loop {
            let access = match self.access_token().await {
                Ok(access) => access,
                Err(err) => return Delivery::Unavailable { reason: err.to_string(), retry_after: None },
            };
            let response = match self.http.post(self.send_url.clone()).bearer_auth(&access).json(&body).send().await {
                Ok(response) => response,
                Err(err) => {
                    return Delivery::Unavailable {
                        reason: format!("FCM unreachable: {}", err.without_url()),
                        retry_after: None,
                    };
                }
            };
            let status = response.status();
            let retry_after = retry_after(&response);
            let answer = read_capped(response).await;
            if status == reqwest::StatusCode::UNAUTHORIZED && !fresh_token_tried {
                self.forget_token(&access).await;
                fresh_token_tried = true;
                continue;
            }
            let answer = match answer {
                Ok(answer) => answer,
                Err(reason) => return Delivery::Unavailable { reason, retry_after },
            };
            return classify(status, retry_after, &answer);
        }
    }
}

/// The send request: a notification, and the data when there is any.
fn send_body(token: &DeviceToken, push: &PushMessage) -> serde_json::Value {
    let mut message = serde_json::json!({
        "token": token.as_str(),
        "notification": {"title": push.title(), "body": push.body()},
    });
    if !push.data().is_empty() {
        message["data"] = serde_json::json!(push.data());
    }
    serde_json::json!({ "message": message })
}

/// What FCM's answer means for the device.
fn classify(status: reqwest::StatusCode, retry_after: Option<Duration>, answer: &[u8]) -> Delivery {
    if status.is_success() {
        return Delivery::Sent;
    }
    let error: serde_json::Value = serde_json::from_slice(answer).unwrap_or_default();
    let error = &error["error"];
    let details = error["details"].as_array().map(Vec::as_slice).unwrap_or_default();
    let fcm_code =
        details.iter().find(|d| d["@type"].as_str().is_some_and(|t| t.ends_with("FcmError"))).map(|d| &d["errorCode"]);
    let status_name = error["status"].as_str().unwrap_or_default();
    let message: String = error["message"].as_str().unwrap_or_default().chars().take(200).collect();
    if status == reqwest::StatusCode::NOT_FOUND && fcm_code.is_some_and(|code| code == "UNREGISTERED") {
        return Delivery::InvalidToken;
    }
    if status == reqwest::StatusCode::BAD_REQUEST && status_name == "INVALID_ARGUMENT" {
        // The same status covers a bad payload; only one that names the token means the device.
        let token_field = details.iter().any(|detail| {
            detail["fieldViolations"]
                .as_array()
                .is_some_and(|violations| violations.iter().any(|v| v["field"] == "message.token"))
        });
        if token_field || message.contains("registration token") {
            return Delivery::InvalidToken;
        }
    }
    if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Delivery::Unavailable { reason: format!("FCM answered {status} {status_name}"), retry_after };
    }
    let code = fcm_code.and_then(serde_json::Value::as_str).unwrap_or(status_name);
    Delivery::Rejected { status: status.as_u16(), reason: format!("{code}: {message}") }
}

/// `Retry-After` in seconds or as an HTTP date, if there is one.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.to_utc() - chrono::Utc::now()).to_std().ok()
}

/// The answer's body, refusing one past [`MAX_ANSWER_BYTES`].
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|err| format!("the answer broke off: {err}"))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("an answer larger than {MAX_ANSWER_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn malformed(path: &Path, problem: impl Into<String>) -> FcmError {
    FcmError::Malformed { path: path.to_path_buf(), problem: problem.into() }
}

fn read_key_file(path: &Path) -> Result<ServiceAccount, FcmError> {
    let unreadable = |source| FcmError::Unreadable { path: path.to_path_buf(), source };
    let size = std::fs::metadata(path).map_err(unreadable)?.len();
    if size > MAX_KEY_FILE_BYTES {
        return Err(malformed(path, format!("{size} bytes; a service-account key file is a few kilobytes")));
    }
    let text = std::fs::read(path).map_err(unreadable)?;
    let file: KeyFile = serde_json::from_slice(&text)
        .map_err(|err| malformed(path, format!("not a service-account key file (JSON): {err}")))?;
    if file.kind.as_deref().is_some_and(|kind| kind != "service_account") {
        return Err(malformed(path, "`type` is not \"service_account\""));
    }
    let field = |value: Option<String>, name: &str| {
        value.filter(|v| !v.trim().is_empty()).ok_or_else(|| malformed(path, format!("`{name}` is missing")))
    };
    let project_id = field(file.project_id, "project_id")?;
    let valid_project = project_id.len() <= 100
        && project_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
    if !valid_project {
        return Err(malformed(path, "`project_id` is not a Google Cloud project id"));
    }
    let client_email = field(file.client_email, "client_email")?;
    if client_email.len() > 320 || !client_email.contains('@') || client_email.chars().any(char::is_whitespace) {
        return Err(malformed(path, "`client_email` is not an address"));
    }
    let token_uri = field(file.token_uri, "token_uri")?;
    let token_uri = Url::parse(&token_uri)
        .ok()
        .filter(is_secure_or_loopback)
        .ok_or_else(|| malformed(path, "`token_uri` is not an https:// URL (http:// only to a loopback address)"))?;
    let pem = field(file.private_key, "private_key")?;
    let der = rsa_private_key_der(&pem).map_err(|problem| malformed(path, format!("`private_key`: {problem}")))?;
    let key = EncodingKey::from_rsa_der(&der);
    // A key that cannot sign is found now, not at the first push.
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &serde_json::json!({}), &key)
        .map_err(|_| malformed(path, "`private_key` is not a usable RSA private key"))?;
    let key_id =
        file.private_key_id.filter(|id| !id.is_empty() && id.len() <= 200 && id.bytes().all(|b| b.is_ascii_graphic()));
    Ok(ServiceAccount { project_id, client_email, token_uri, key_id, key })
}

/// The PKCS#1 DER of an RSA private key in PEM, PKCS#8 (`BEGIN PRIVATE KEY`, as Google
/// issues them) or PKCS#1 (`BEGIN RSA PRIVATE KEY`).
fn rsa_private_key_der(pem: &str) -> Result<Vec<u8>, &'static str> {
    let (label, der) = pem_block(pem).ok_or("not a PEM private key")?;
    match label {
        "RSA PRIVATE KEY" => Ok(der),
        "PRIVATE KEY" => pkcs8_rsa_key(&der).map(<[u8]>::to_vec).ok_or("a PKCS#8 key that is not an RSA key"),
        _ => Err("not an RSA private key (expected BEGIN PRIVATE KEY)"),
    }
}

/// The first PEM block's label and its decoded bytes.
fn pem_block(pem: &str) -> Option<(&str, Vec<u8>)> {
    let start = pem.find("-----BEGIN ")?;
    let rest = &pem[start + "-----BEGIN ".len()..];
    let (label, rest) = rest.split_once("-----")?;
    let end = rest.find(&format!("-----END {label}-----"))?;
    let text: String = rest[..end].chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    Some((label, der))
}

/// One DER element: its tag, its contents and what follows it.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes.iter().fold(0usize, |length, byte| (length << 8) | usize::from(*byte))
    };
    (rest.len() >= length).then(|| (tag, &rest[..length], &rest[length..]))
}

/// The `RSAPrivateKey` inside a PKCS#8 `PrivateKeyInfo`, if it holds an RSA key.
fn pkcs8_rsa_key(der: &[u8]) -> Option<&[u8]> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let (0x30, info, _) = der_element(der)? else { return None };
    let (0x02, _version, rest) = der_element(info)? else { return None };
    let (0x30, algorithm, rest) = der_element(rest)? else { return None };
    let (0x06, oid, _) = der_element(algorithm)? else { return None };
    if oid != RSA_ENCRYPTION {
        return None;
    }
    let (0x04, key, _) = der_element(rest)? else { return None };
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: serde_json::Value) -> Delivery {
        let status = reqwest::StatusCode::from_u16(status).expect("status");
        classify(status, Some(Duration::from_secs(1)), body.to_string().as_bytes())
    }

    #[test]
    fn fcm_answers_are_told_apart() {
        assert_eq!(answer(200, serde_json::json!({"name": "projects/p/messages/1"})), Delivery::Sent);
        let unregistered = serde_json::json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "Requested entity was not found.",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}]}});
        assert_eq!(answer(404, unregistered), Delivery::InvalidToken);
        // A 404 that is not about the token (a wrong project) forgets no device.
        let project = serde_json::json!({"error": {"code": 404, "status": "NOT_FOUND", "message": "no such project"}});
        assert!(matches!(answer(404, project), Delivery::Rejected { status: 404, .. }));
        let bad_token = serde_json::json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "The registration token is not a valid FCM registration token",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}]}});
        assert_eq!(answer(400, bad_token), Delivery::InvalidToken);
        let token_field = serde_json::json!({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "Invalid value",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.token"}]}]}});
        assert_eq!(answer(400, token_field), Delivery::InvalidToken);
        // A bad payload is not the device's fault.
        let bad_data = serde_json::json!({"error": {"code": 400, "status": "INVALID_ARGUMENT",
            "message": "Invalid value at 'message.data[0].value' (TYPE_STRING), 12",
            "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message.data[0].value"}]}]}});
        assert!(matches!(answer(400, bad_data), Delivery::Rejected { status: 400, .. }));
        let mismatch = serde_json::json!({"error": {"code": 403, "status": "PERMISSION_DENIED", "message": "SenderId mismatch",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "SENDER_ID_MISMATCH"}]}});
        assert_eq!(
            answer(403, mismatch),
            Delivery::Rejected { status: 403, reason: "SENDER_ID_MISMATCH: SenderId mismatch".into() }
        );
        for status in [429, 500, 503] {
            assert!(
                matches!(answer(status, serde_json::json!("<html>")), Delivery::Unavailable { retry_after: Some(wait), .. } if wait == Duration::from_secs(1)),
                "{status}"
            );
        }
    }

    #[test]
    fn the_send_body_is_fcm_v1s_message() {
        let token = DeviceToken::parse("device-1").expect("token");
        let data = std::collections::BTreeMap::from([("k".to_owned(), "v".to_owned())]);
        let push = PushMessage::new("Title", "Body", data).expect("push");
        assert_eq!(
            send_body(&token, &push),
            serde_json::json!({"message": {"token": "device-1", "notification": {"title": "Title", "body": "Body"}, "data": {"k": "v"}}})
        );
        let bare = PushMessage::new("Title", "", Default::default()).expect("push");
        assert!(send_body(&token, &bare)["message"].get("data").is_none());
    }

    #[test]
    fn pkcs8_is_unwrapped_to_the_rsa_key_and_nothing_else_is() {
        // PrivateKeyInfo { version 0, rsaEncryption NULL, OCTET STRING { 01 02 03 } }.
        let info = [
            0x30, 0x17, 0x02, 0x01, 0x00, 0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
            0x05, 0x00, 0x04, 0x03, 0x01, 0x02, 0x03,
        ];
        assert_eq!(pkcs8_rsa_key(&info), Some(&[1u8, 2, 3][..]));
        let mut ec = info;
        ec[17] = 0x02;
        assert_eq!(pkcs8_rsa_key(&ec), None, "another algorithm");
        for cut in 0..info.len() {
            assert_eq!(pkcs8_rsa_key(&info[..cut]), None, "cut at {cut}");
        }
        assert_eq!(der_element(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None, "a length past the input");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(info)
        );
        assert_eq!(rsa_private_key_der(&pem), Ok(vec![1, 2, 3]));
        assert!(rsa_private_key_der("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----").is_err());
        assert!(rsa_private_key_der("not pem").is_err());
    }

    #[test]
    fn key_files_are_checked_field_by_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.json");
        let base = Url::parse("https://fcm.googleapis.com").expect("url");
        let problem = |content: serde_json::Value| {
            std::fs::write(&path, content.to_string()).expect("write");
            match Fcm::load(&path, &base) {
                Ok(_) => panic!("accepted {content}"),
                Err(err) => {
                    assert_eq!(err.code(), "fcm_credentials_malformed", "{err}");
                    err.to_string()
                }
            }
        };
        let full = serde_json::json!({"type": "service_account", "project_id": "p-1", "client_email": "a@p-1.iam.gserviceaccount.com",
            "private_key": "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n", "token_uri": "https://oauth2.googleapis.com/token"});
        for (field, expected) in [
            ("project_id", "`project_id` is missing"),
            ("client_email", "`client_email` is missing"),
            ("token_uri", "`token_uri` is missing"),
            ("private_key", "`private_key` is missing"),
        ] {
            let mut content = full.clone();
            content.as_object_mut().expect("object").remove(field);
            assert!(problem(content).ends_with(expected), "{field}");
        }
        let with = |field: &str, value: &str| {
            let mut content = full.clone();
            content[field] = value.into();
            problem(content)
        };
        assert!(with("type", "authorized_user").contains("`type`"));
        assert!(with("project_id", "p/../x").contains("`project_id` is not"));
        assert!(with("token_uri", "http://oauth2.example.com/token").contains("`token_uri` is not an https://"));
        assert!(
            with("private_key", "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----")
                .contains("not an RSA key")
        );
        std::fs::write(&path, "{not json").expect("write");
        assert!(Fcm::load(&path, &base).expect_err("not JSON").to_string().contains("not a service-account key file"));
        let missing = Fcm::load(&dir.path().join("missing.json"), &base).expect_err("missing");
        assert_eq!(missing.code(), "fcm_credentials_unreadable");
        assert!(missing.to_string().contains("missing.json"), "{missing}");
    }
}
