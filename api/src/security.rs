//! What every response carries for the browser's sake: security headers and CORS.
//!
//! **Headers** (the helmet set), on every response, errors and 404s included:
//! - `Content-Security-Policy`: the API's answers are data, never documents, so they get
//!   `default-src 'none'` with `sandbox` and `frame-ancestors 'none'`. Swagger UI at `/docs`
//!   runs only the scripts it was built with: their SHA-256 hashes are computed from the page
//!   at start-up, so nothing injected can run, and no `'unsafe-inline'` is needed for scripts.
//! - `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`, `Referrer-Policy: no-referrer`.
//! - `Cross-Origin-Resource-Policy`: `cross-origin` on the listening routes (players and
//!   embeds on other sites load audio, playlists and waveforms) and `same-origin` elsewhere.
//! - `Strict-Transport-Security` when `hsts_max_age_s` is set (only behind TLS).
//!
//! **CORS** is ours rather than poem's `Cors`: poem's allows every origin (with credentials,
//! if asked) when none is configured, and refuses any request carrying an `Origin` it does not
//! know, same-origin form posts included. Here:
//! - an origin in `cors_origins` gets `Access-Control-Allow-Origin: <origin>` and
//!   `Access-Control-Allow-Credentials: true`, and its preflights are answered;
//! - any other origin gets no CORS headers (the browser keeps the answer from the page), except
//!   on the listening routes, which any page may read without credentials
//!   (`Access-Control-Allow-Origin: *`): a signed URL is their only key there;
//! - `Vary: Origin` on every answer, so shared caches keep the CORS variants apart.

use base64::Engine;
use poem::http::{HeaderValue, Method, StatusCode, header};
use poem::{Request, Response};
use sha2::{Digest, Sha256};

/// The API's policy: its answers are never rendered as pages.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'; sandbox";

/// The headers a browser may read from a cross-origin answer.
const EXPOSED: &str = "x-request-id, etag, last-modified, content-range, content-length, accept-ranges, retry-after";
/// The request headers a configured origin may send.
const ALLOWED_HEADERS: &str = "authorization, content-type, if-none-match, if-range, range, x-csrf-token, x-request-id";
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

/// The response policy, built once from the settings.
#[derive(Debug, Clone)]
pub struct Policy {
    cors_origins: Vec<String>,
    hsts: Option<HeaderValue>,
    docs_csp: HeaderValue,
}

impl Policy {
    /// `docs_html` is the Swagger UI page, whose inline scripts the `/docs` policy allows.
    pub fn new(cors_origins: Vec<String>, hsts_max_age: Option<u64>, docs_html: &str) -> Policy {
        let hsts = hsts_max_age
            .map(|age| HeaderValue::from_str(&format!("max-age={age}; includeSubDomains")).expect("a number is ASCII"));
        let docs_csp = HeaderValue::from_str(&docs_policy(docs_html)).expect("hashes are ASCII");
        Policy { cors_origins, hsts, docs_csp }
    }

    fn allowed(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|allowed| allowed == origin)
    }

    /// What the policy needs to know of `req`, read before the request is handed on.
    pub fn see(&self, req: &Request) -> Seen {
        let origin = req.headers().get(header::ORIGIN).cloned();
        let path = req.uri().path();
        let preflight = req.method() == Method::OPTIONS && req.headers().contains_key("access-control-request-method");
        let trusted =
            origin.as_ref().and_then(|origin| origin.to_str().ok()).is_some_and(|origin| self.allowed(origin));
        Seen {
            origin,
            listening: is_listening_route(path),
            docs: path == "/docs" || path.starts_with("/docs/"),
            preflight,
            trusted,
        }
    }

    /// The answer to a CORS preflight this policy allows, before anything else sees it.
    pub fn preflight(&self, seen: &Seen) -> Option<Response> {
        (seen.preflight && (seen.trusted || seen.listening))
            .then(|| Response::builder().status(StatusCode::NO_CONTENT).finish())
    }

    /// Dresses an answer: the security headers, `Vary: Origin`, and CORS where it applies.
    pub fn dress(&self, seen: &Seen, response: &mut Response) {
        let headers = response.headers_mut();
        let csp = if seen.docs { self.docs_csp.clone() } else { HeaderValue::from_static(API_CSP) };
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
        headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        let corp = if seen.listening { "cross-origin" } else { "same-origin" };
        headers.insert("cross-origin-resource-policy", HeaderValue::from_static(corp));
        if let Some(hsts) = &self.hsts {
            headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }

        // Every answer varies by `Origin`, whether or not this request sent one: a shared cache
        // (a CDN in front of the listening routes) must not hand an answer made without CORS
        // headers to a page on another origin, or one made for a trusted origin to anyone else.
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = &seen.origin {
            if seen.trusted {
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
            } else if seen.listening {
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
            }
            if seen.trusted || seen.listening {
                headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
                if seen.preflight {
                    let methods = if seen.trusted { ALLOWED_METHODS } else { "GET, HEAD" };
                    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(methods));
                    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOWED_HEADERS));
                    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
                }
            }
        }
    }
}

/// What [`Policy::see`] read of a request.
#[derive(Debug, Clone)]
pub struct Seen {
    origin: Option<HeaderValue>,
    listening: bool,
    docs: bool,
    preflight: bool,
    trusted: bool,
}

/// The progressive streams, HLS, waveforms and images: read by players and pages on any site.
pub fn is_listening_route(path: &str) -> bool {
    if path.starts_with("/v1/images/") {
        return true;
    }
    // A signed URL is `/v1/signed/{expires}/{signature}/tracks/…`.
    let unsigned = path.strip_prefix("/v1/signed/").and_then(|rest| {
        let mut parts = rest.splitn(3, '/');
        let (_expires, _signature) = (parts.next()?, parts.next()?);
        parts.next()
    });
    let Some(rest) = unsigned.map_or(path.strip_prefix("/v1/tracks/"), |rest| rest.strip_prefix("tracks/")) else {
        return false;
    };
    let mut parts = rest.splitn(3, '/');
    let (_id, route) = (parts.next(), parts.next());
    matches!(route, Some("stream" | "hls" | "waveform"))
}

/// Swagger UI's policy: its own inline scripts by hash, styles inline (it sets them from
/// script), images from itself or `data:` (its icons), requests to this origin only.
fn docs_policy(html: &str) -> String {
    let scripts: Vec<String> = inline_blocks(html, "script")
        .map(|body| format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body))))
        .collect();
    format!(
        "default-src 'none'; script-src {}; style-src 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; \
         frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        if scripts.is_empty() { "'none'".to_owned() } else { scripts.join(" ") }
    )
}

/// The bodies of every `<tag …>…</tag>` element of a page.
fn inline_blocks<'a>(html: &'a str, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)?;
        let after_open = &rest[start..];
        let body_start = after_open.find('>')? + 1;
        let body = &after_open[body_start..];
        let end = body.find(&close)?;
        rest = &body[end + close.len()..];
        Some(&body[..end])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_routes_are_recognised() {
        for yes in [
            "/v1/tracks/abc/stream/mp3_128",
            "/v1/tracks/abc/hls/master.m3u8",
            "/v1/tracks/abc/waveform",
            "/v1/signed/1700000000/c2ln/tracks/abc/stream/mp3_128",
            "/v1/signed/1700000000/c2ln/tracks/abc/hls/160k/seg_1.m4s",
            "/v1/images/tracks/abc/0123/t500x500.jpg",
        ] {
            assert!(is_listening_route(yes), "{yes}");
        }
        for no in [
            "/v1/tracks",
            "/v1/tracks/abc",
            "/v1/tracks/abc/status",
            "/v1/me",
            "/docs",
            "/v1/tracks/abc/streams",
            "/v1/signed/1/s/users/abc/stream/x",
            "/v1/signed/tracks/abc/stream/x",
            "/v1/tracks/abc/artwork",
        ] {
            assert!(!is_listening_route(no), "{no}");
        }
    }

    #[test]
    fn the_docs_policy_allows_exactly_the_inline_scripts() {
        let html = "<html><script charset=\"UTF-8\">alert(1)</script><p>x</p><script>go()</script></html>";
        let blocks: Vec<_> = inline_blocks(html, "script").collect();
        assert_eq!(blocks, ["alert(1)", "go()"]);
        let policy = docs_policy(html);
        // echo -n 'alert(1)' | openssl dgst -sha256 -binary | base64
        assert!(policy.contains("'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='"), "{policy}");
        assert!(!policy.contains("unsafe-eval") && !policy.contains("script-src 'unsafe-inline'"), "{policy}");
    }
}
