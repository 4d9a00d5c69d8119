//! What a listener may play of a track, by tier (SoundCloud's `access`).
//!
//! A track marked `premium_only` plays in full to premium listeners, to its owner and to
//! admins; to everyone else its full streams and HLS answer 403 `premium_required` and its
//! 30 s `preview` stream plays (`access: preview`), or nothing does when it has no preview
//! (`access: blocked`). Independently of that, the HLS variants of 256 kb/s and above are
//! premium: the master playlist lists them only to listeners with premium access, and their
//! files answer 403 `premium_required` to the others. "Premium access" is one rule everywhere
//! ([`premium_access`]), also what a signed URL records when it is signed (see
//! [`crate::media`]), so a URL signed for a premium listener keeps that access for its lifetime
//! and a free listener's URL cannot be turned into one.

use poem::http::StatusCode;
use waveline_shared::db::Tier;
use waveline_shared::domain::UserId;

use crate::auth::Session;
use crate::error::ApiError;

/// How a viewer may listen to a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "lowercase")]
pub enum TrackAccess {
    /// In full.
    Playable,
    /// Only its 30 s `preview` stream: the track is premium-only.
    Preview,
    /// Not at all: premium-only, and without a preview.
    Blocked,
}

/// Whether `session` has premium access to a track of `owner`: a premium account, an admin,
/// or the owner.
pub fn premium_access(session: Option<&Session>, owner: UserId) -> bool {
    session.is_some_and(|session| session.user.tier == Tier::Premium || session.is_admin() || session.user.id == owner)
}

/// The access of a viewer with (or without) premium access to a track.
pub fn track_access(premium_only: bool, has_preview: bool, premium: bool) -> TrackAccess {
    match (premium_only && !premium, has_preview) {
        (false, _) => TrackAccess::Playable,
        (true, true) => TrackAccess::Preview,
        (true, false) => TrackAccess::Blocked,
    }
}

/// The answer to a listener without premium access asking for what needs it.
pub fn premium_required(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "premium_required",
        format!("{what} plays only with a premium subscription; the `preview` stream plays for everyone"),
    )
}

/// A form field's `true` or `false`.
pub fn parse_flag(text: &str) -> Result<bool, ApiError> {
    match text.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ApiError::bad_request("invalid_field", "premium_only: expected `true` or `false`")),
    }
}

/// The lowest bitrate of a premium HLS variant, kb/s.
pub const PREMIUM_VARIANT_KBPS: u32 = 256;

/// Whether an HLS variant directory (`96k`, `160k`, `256k`) is premium.
pub fn is_premium_variant(variant: &str) -> bool {
    variant
        .strip_suffix('k')
        .filter(|digits| !digits.is_empty() && digits.len() <= 6 && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse::<u32>().ok())
        .is_some_and(|kbps| kbps >= PREMIUM_VARIANT_KBPS)
}

/// A master playlist without its premium variants: each `#EXT-X-STREAM-INF` whose URI names a
/// premium variant directory goes, with its URI line. Everything else stays as it was.
pub fn without_premium_variants(master: &str) -> String {
    let mut out = String::with_capacity(master.len());
    let mut pending: Option<&str> = None;
    for line in master.split_inclusive('\n') {
        let trimmed = line.trim();
        if let Some(info) = pending.take() {
            if trimmed.is_empty() || trimmed.starts_with('#') {
                // Not the URI yet (a blank line or another tag): keep waiting.
                pending = Some(info);
                out.push_str(line);
                continue;
            }
            let variant = trimmed.split('/').next().unwrap_or_default();
            if !is_premium_variant(variant) {
                out.push_str(info);
                out.push_str(line);
            }
            continue;
        }
        if trimmed.starts_with("#EXT-X-STREAM-INF") {
            pending = Some(line);
        } else {
            out.push_str(line);
        }
    }
    if let Some(info) = pending {
        out.push_str(info);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTER: &str = "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-INDEPENDENT-SEGMENTS\n\
        #EXT-X-STREAM-INF:BANDWIDTH=105000,CODECS=\"mp4a.40.2\"\n96k/index.m3u8\n\
        #EXT-X-STREAM-INF:BANDWIDTH=170000,CODECS=\"mp4a.40.2\"\n160k/index.m3u8\n\
        #EXT-X-STREAM-INF:BANDWIDTH=270000,CODECS=\"mp4a.40.2\"\n256k/index.m3u8\n";

    #[test]
    fn the_free_master_lists_only_the_variants_below_256k() {
        let free = without_premium_variants(MASTER);
        assert!(free.contains("96k/index.m3u8") && free.contains("160k/index.m3u8"), "{free}");
        assert!(!free.contains("256k") && !free.contains("BANDWIDTH=270000"), "{free}");
        assert_eq!(free.matches("#EXT-X-STREAM-INF").count(), 2);
        assert!(free.starts_with("#EXTM3U\n#EXT-X-VERSION:7\n"));
        let no_premium = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1\n96k/index.m3u8\n";
        assert_eq!(without_premium_variants(no_premium), no_premium, "nothing to take out");
    }

    #[test]
    fn premium_variants_are_256k_and_above() {
        for (variant, premium) in [
            ("96k", false),
            ("160k", false),
            ("256k", true),
            ("320k", true),
            ("k", false),
            ("256", false),
            ("x56k", false),
        ] {
            assert_eq!(is_premium_variant(variant), premium, "{variant}");
        }
    }

    #[test]
    fn premium_only_tracks_preview_without_premium_access() {
        assert_eq!(track_access(false, true, false), TrackAccess::Playable);
        assert_eq!(track_access(true, true, true), TrackAccess::Playable);
        assert_eq!(track_access(true, true, false), TrackAccess::Preview);
        assert_eq!(track_access(true, false, false), TrackAccess::Blocked);
        assert!(parse_flag(" true ").expect("flag") && !parse_flag("false").expect("flag"));
        assert_eq!(parse_flag("yes").expect_err("not a flag").code, "invalid_field");
    }
}
