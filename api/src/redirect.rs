//! Redirect mode (`stream_mode = redirect`): the API decides who may listen, and storage (or a
//! CDN) sends the bytes.
//!
//! In proxy mode (the default) every listening route reads from storage and streams the bytes
//! through the API. In redirect mode the API still answers every request and checks access
//! exactly as in proxy mode (private tracks, suspended owners, signed URLs, `not_ready`), then:
//!
//! | what | answer |
//! |---|---|
//! | progressive stream, waveform, HLS init or media segment (GET or HEAD) | **307** to a presigned storage URL signed for that method, or to the CDN; `Cache-Control: no-store`, so every request is checked again |
//! | HLS master playlist | served by the API as in proxy mode: it names only variant playlists, which the API serves |
//! | HLS variant playlist | served by the API with its init and segment URIs rewritten to presigned (or CDN) URLs; no validators, so a cached copy is never revalidated past its presigns |
//!
//! The client repeats its request at `Location` with the same method and headers: ranges,
//! `If-Range` and `If-None-Match` are answered by storage. No bytes and no storage round trip
//! pass through the API, except for variant playlists (a few KiB, read and rewritten).
//!
//! **A redirect target never outlives the access it was granted for.** A presigned URL is a
//! bearer capability: whoever holds it may read the object until it expires, whatever happens
//! to the track or the session meanwhile. So its lifetime follows the grant:
//!
//! - **A private track by session** (its owner or an admin): `stream_redirect_ttl_s` (default
//!   60 s). A logout, suspension or visibility change takes effect within that. Its variant
//!   playlists are **not** rewritten: players fetch a VOD playlist once and play it for the
//!   track's whole length, longer than such a URL lives, so its segment URIs keep pointing at
//!   the API, which checks the session again and redirects each one to a fresh short URL.
//! - **A signed Waveline URL**: the presigned URL ends when the signed URL does (it is signed
//!   from the start of the current second for the remaining whole seconds, so `X-Amz-Date +
//!   X-Amz-Expires` never passes the signed `expires`). With less than two seconds left the
//!   request is answered 403 `url_expired`. Playlists reached by a signed URL carry presigned
//!   segment URIs with the same end, so playback lasts exactly as long as in proxy mode.
//! - **A public track**: `stream_redirect_public_ttl_s` (default 3600 s, the lifetime shared
//!   caches are already allowed for public streams in proxy mode); making the track private
//!   stops new redirects at once, and the URLs already out within that time. Playlists carry
//!   such URLs, so the setting should exceed the longest track's duration.
//! - **The CDN** (`stream_cdn_base`, an origin that serves the bucket by key): only for public
//!   tracks, which anyone may hear anyway; its URLs carry no expiry, and keys include the
//!   revision, so the CDN may cache them for ever. A private track always gets a presigned
//!   URL, whatever the grant: this module does not sign CDN URLs.
//!
//! The filesystem store cannot presign, so the settings refuse `redirect` with it at start-up
//! (`WAVELINE_STREAM_MODE: expected `proxy` with file storage…`). Should a store still answer
//! that it cannot, the object is proxied.
//!
//! A browser that plays from another origin follows a cross-origin redirect only where the
//! bucket (or the CDN) allows it with CORS: the operator sets that on the bucket.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use url::Url;
use waveline_shared::config::{Settings, StreamMode};
use waveline_shared::storage::{ObjectKey, ReadMethod, Storage};

use crate::error::ApiError;

/// The largest variant playlist read for rewriting (a 6 s segment per ~40 bytes: days of
/// audio); a larger one is proxied unchanged.
pub const MAX_PLAYLIST_BYTES: u64 = 4 << 20;

/// How the listening routes deliver bytes, from the settings.
#[derive(Debug, Clone)]
pub struct StreamDelivery {
    pub mode: StreamMode,
    /// Presigned URL lifetime for a private track by session.
    pub private_ttl: Duration,
    /// Presigned URL lifetime for a public track.
    pub public_ttl: Duration,
    /// Where public tracks are redirected instead of storage, with a trailing slash.
    pub cdn_base: Option<Url>,
}

impl StreamDelivery {
    pub fn from_settings(settings: &Settings) -> StreamDelivery {
        StreamDelivery {
            mode: settings.stream_mode,
            private_ttl: settings.stream_redirect_ttl,
            public_ttl: settings.stream_redirect_public_ttl,
            cdn_base: settings.stream_cdn_base.clone(),
        }
    }

    /// Whether the listening routes redirect.
    pub fn redirects(&self) -> bool {
        self.mode == StreamMode::Redirect
    }
}

impl Default for StreamDelivery {
    /// Proxy mode, with the settings' default lifetimes.
    fn default() -> StreamDelivery {
        StreamDelivery {
            mode: StreamMode::Proxy,
            private_ttl: Duration::from_secs(60),
            public_ttl: Duration::from_secs(3600),
            cdn_base: None,
        }
    }
}

/// What a listener was granted, as far as it bounds where and for how long a redirect may
/// send them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The track is public: anyone may hear it.
    pub public: bool,
    /// The access is a signed URL, valid until this Unix time.
    pub signed_until: Option<i64>,
}

impl Grant {
    /// Whether variant playlists may carry storage URLs: not for a private track by session,
    /// whose short URLs would expire mid-playback (see the module doc).
    pub fn rewrites_playlists(self) -> bool {
        self.public || self.signed_until.is_some()
    }
}

/// Where a redirect sends the client, and which kind of place that is (a metrics label).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub location: String,
    pub kind: &'static str,
}

impl StreamDelivery {
    /// The latest moment a URL handed out now for `grant` may work.
    pub fn until(&self, grant: Grant, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
        match grant.signed_until {
            Some(signed) => {
                let until = DateTime::from_timestamp(signed, 0).unwrap_or(now);
                // Presigned URLs count whole seconds from the current one: two seconds leave
                // one even if the clock ticks before the URL is signed.
                if until.timestamp() - now.timestamp() < 2 {
                    return Err(
                        ApiError::forbidden("the signed URL has expired; ask for a new one").with_code("url_expired")
                    );
                }
                Ok(until)
            }
            None => Ok(now + if grant.public { self.public_ttl } else { self.private_ttl }),
        }
    }

    /// The CDN's URL of `key`, when there is a CDN.
    pub fn cdn_url(&self, key: &ObjectKey) -> Option<String> {
        self.cdn_base.as_ref().map(|base| format!("{}{}", base.as_str(), key.url_path()))
    }

    /// Where `key` can be read with `method` under `grant`, until `until` at the latest: the
    /// CDN for a public track when there is one, else a presigned URL. `None` when storage
    /// cannot presign.
    pub async fn target(
        &self,
        storage: &dyn Storage,
        key: &ObjectKey,
        method: ReadMethod,
        grant: Grant,
        until: DateTime<Utc>,
    ) -> Result<Option<Target>, ApiError> {
        if grant.public
            && let Some(location) = self.cdn_url(key)
        {
            return Ok(Some(Target { location, kind: "cdn" }));
        }
        Ok(storage
            .presign_get(key, method, until)
            .await?
            .map(|presigned| Target { location: presigned.url, kind: "presigned" }))
    }
}

/// The URIs a playlist (RFC 8216) names, each once, in order: every line that is neither
/// blank nor a tag, and the `URI="…"` attribute of tags (`EXT-X-MAP`, `EXT-X-KEY`, …).
pub fn playlist_uris(text: &str) -> Vec<&str> {
    let mut found: Vec<&str> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('#') {
            let mut rest = line;
            while let Some((_, after)) = rest.split_once("URI=\"") {
                let Some((uri, tail)) = after.split_once('"') else { break };
                if !found.contains(&uri) {
                    found.push(uri);
                }
                rest = tail;
            }
        } else if !found.contains(&line) {
            found.push(line);
        }
    }
    found
}

/// `text` with every URI that `replace` maps (as [`playlist_uris`] finds them) replaced, and
/// everything else kept as it was.
pub fn rewrite_playlist(text: &str, replace: &HashMap<&str, String>) -> String {
    let mut out = String::with_capacity(text.len() + replace.values().map(String::len).sum::<usize>());
    for line in text.split_inclusive('\n') {
        let content = line.trim_end_matches(['\r', '\n']);
        let ending = &line[content.len()..];
        let trimmed = content.trim();
        if trimmed.is_empty() {
            out.push_str(line);
        } else if trimmed.starts_with('#') {
            let mut rest = content;
            while let Some((before, after)) = rest.split_once("URI=\"") {
                let Some((uri, tail)) = after.split_once('"') else { break };
                out.push_str(before);
                out.push_str("URI=\"");
                out.push_str(replace.get(uri).map_or(uri, String::as_str));
                out.push('"');
                rest = tail;
            }
            out.push_str(rest);
            out.push_str(ending);
        } else {
            out.push_str(replace.get(trimmed).map_or(content, String::as_str));
            out.push_str(ending);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const VARIANT: &str = "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:6\n#EXT-X-MAP:URI=\"init.mp4\"\n\
                           #EXTINF:6.0,\nseg_00000.m4s\n#EXTINF:3.0,\r\nseg_00001.m4s\r\n\n#EXT-X-ENDLIST\n";

    #[test]
    fn playlists_name_their_uris_once() {
        assert_eq!(playlist_uris(VARIANT), ["init.mp4", "seg_00000.m4s", "seg_00001.m4s"]);
        let tags = "#EXT-X-KEY:METHOD=AES-128,URI=\"k.key\",IV=0x1\n#EXT-X-MAP:URI=\"k.key\"\n a.m4s \na.m4s";
        assert_eq!(playlist_uris(tags), ["k.key", "a.m4s"]);
        assert_eq!(playlist_uris("#EXT-X-MAP:URI=\"unterminated\n"), Vec::<&str>::new());
    }

    #[test]
    fn rewriting_replaces_only_the_mapped_uris() {
        let replace: HashMap<&str, String> = [
            ("init.mp4", "https://s3/b/init.mp4?X-Amz-Signature=1&a=b".to_owned()),
            ("seg_00001.m4s", "https://s3/b/seg_00001.m4s?X-Amz-Signature=2".to_owned()),
        ]
        .into_iter()
        .collect();
        let rewritten = rewrite_playlist(VARIANT, &replace);
        assert_eq!(
            rewritten,
            "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:6\n\
             #EXT-X-MAP:URI=\"https://s3/b/init.mp4?X-Amz-Signature=1&a=b\"\n#EXTINF:6.0,\nseg_00000.m4s\n\
             #EXTINF:3.0,\r\nhttps://s3/b/seg_00001.m4s?X-Amz-Signature=2\r\n\n#EXT-X-ENDLIST\n"
        );
        assert_eq!(rewrite_playlist(VARIANT, &HashMap::new()), VARIANT);
        assert_eq!(rewrite_playlist("seg.m4s", &HashMap::from([("seg.m4s", "x".to_owned())])), "x");
    }

    #[test]
    fn lifetimes_follow_the_grant() {
        let delivery = StreamDelivery { mode: StreamMode::Redirect, ..StreamDelivery::default() };
        let now = DateTime::from_timestamp(1_700_000_000, 500_000_000).expect("time");
        let until = |public, signed_until| delivery.until(Grant { public, signed_until }, now);
        assert_eq!(until(false, None).expect("session").timestamp(), 1_700_000_060);
        assert_eq!(until(true, None).expect("public").timestamp(), 1_700_003_600);
        // A signed URL bounds what it leads to, public track or not.
        for public in [false, true] {
            assert_eq!(until(public, Some(1_700_000_200)).expect("signed").timestamp(), 1_700_000_200);
            assert_eq!(until(public, Some(1_700_000_002)).expect("signed").timestamp(), 1_700_000_002);
            let err = until(public, Some(1_700_000_001)).expect_err("under two seconds left");
            assert_eq!((err.status.as_u16(), err.code), (403, "url_expired"));
        }
        assert!(!Grant { public: false, signed_until: None }.rewrites_playlists());
        assert!(Grant { public: false, signed_until: Some(1) }.rewrites_playlists());
        assert!(Grant { public: true, signed_until: None }.rewrites_playlists());
    }

    #[test]
    fn cdn_urls_append_the_encoded_key() {
        let delivery = StreamDelivery {
            cdn_base: Some(Url::parse("https://cdn.example.com/media/").expect("url")),
            ..StreamDelivery::default()
        };
        let key = ObjectKey::parse("renditions/t/2/mp3_128/a b.mp3").expect("key");
        assert_eq!(
            delivery.cdn_url(&key).as_deref(),
            Some("https://cdn.example.com/media/renditions/t/2/mp3_128/a%20b.mp3")
        );
        assert_eq!(StreamDelivery::default().cdn_url(&key), None);
    }
}
