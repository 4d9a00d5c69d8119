//! `bare-304 ADDR`: the smallest poem service that answers a status poll, for
//! `scripts/bench.sh stream` to put beside `GET /v1/tracks/{id}/status`.
//!
//! One route, `/v1/tracks/:id/status`, on poem's own server with its defaults: an
//! `If-None-Match` that names the ETag gets 304 with the ETag; anything else gets the JSON body.
//! No database, no authentication, no middleware: the ceiling of what a poem handler does on
//! this machine, so the ratio says what Waveline's own work per poll costs.

use poem::http::StatusCode;
use poem::listener::TcpListener;
use poem::{Response, Route, Server, get, handler};

const ETAG: &str = "\"5d41402abc4b2a76b9719d911017c592\"";
const BODY: &str = r#"{"id":"00000000-0000-0000-0000-000000000000","state":"ready","stage":null,"progress":100,"attempts":1,"revision":1,"error":null}"#;

#[handler]
fn status(req: &poem::Request) -> Response {
    if req.header("if-none-match").is_some_and(|tags| tags.split(',').any(|tag| tag.trim() == ETAG)) {
        return Response::builder().status(StatusCode::NOT_MODIFIED).header("etag", ETAG).finish();
    }
    Response::builder()
        .header("etag", ETAG)
        .header("cache-control", "no-cache")
        .content_type("application/json; charset=utf-8")
        .body(BODY)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8099".to_owned());
    Server::new(TcpListener::bind(addr)).run(Route::new().at("/v1/tracks/:id/status", get(status))).await
}
