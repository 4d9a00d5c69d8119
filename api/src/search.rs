//! `GET /v1/search`: tracks, accounts or playlists by the words of a query, best first, in
//! the same views as their own lists (a track as `GET /v1/tracks` shows it, an account as its
//! profile, a playlist as `GET /v1/users/{username}/playlists` shows it).
//!
//! What matches, how it ranks and who sees what is the repository's
//! ([`waveline_shared::db::search`]). Here: the query's bounds (1–200 characters, not only
//! spaces: 400 `invalid_field` naming `q`), and the cursor. A cursor holds the last result's
//! rank and id and how the listing matched (by words or by similar text), signed with the
//! server's URL key for this kind and these words: a cursor that was altered, or that belongs
//! to another search, is 400 `invalid_field` naming `cursor`.

use std::collections::HashMap;

use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{Enum, Object, OpenApi, Tags};
use uuid::Uuid;
use waveline_shared::db::search::{Matching, PgSearch, SearchKind, SearchPosition, words};
use waveline_shared::domain::{PlaylistId, TrackId, UserId};

use crate::AppState;
use crate::auth::{MaybeAuth, Session, Tokens};
use crate::error::ApiError;
use crate::playlists::PlaylistView;
use crate::social::{ProfileView, page_limit, viewer};
use crate::tracks::TrackView;

#[derive(Tags)]
enum Tag {
    /// Search.
    Search,
}

/// The search route.
#[derive(Debug)]
pub struct Search {
    pub state: AppState,
    pub search: PgSearch,
}

/// What to search.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum SearchType {
    Tracks,
    Users,
    Playlists,
}

impl SearchType {
    fn kind(self) -> SearchKind {
        match self {
            SearchType::Tracks => SearchKind::Tracks,
            SearchType::Users => SearchKind::Users,
            SearchType::Playlists => SearchKind::Playlists,
        }
    }
}

/// A page of results, best first: `tracks`, `users` or `playlists`, as asked.
#[derive(Debug, Object)]
#[oai(skip_serializing_if_is_none)]
struct SearchResults {
    tracks: Option<Vec<TrackView>>,
    users: Option<Vec<ProfileView>>,
    playlists: Option<Vec<PlaylistView>>,
    /// Pass as `cursor`, with the same `q` and `type`, for the next page; absent on the last.
    next_cursor: Option<String>,
}

/// What a cursor's signature covers: the kind, the words, and the position.
fn signed_scope(kind: SearchType, words: &[String], body: &str) -> String {
    format!("search\n{kind:?}\n{}\n{body}", words.join(" "))
}

/// A cursor: `w` or `s` (by words, by similar text), the rank's bits and the id in hex, `.`,
/// and the signature.
fn encode_cursor(tokens: &Tokens, kind: SearchType, words: &[String], at: SearchPosition) -> String {
    let matching = match at.matching {
        Matching::Words => 'w',
        Matching::Similar => 's',
    };
    let body = format!("{matching}{:08x}{}", at.score.to_bits(), at.id.simple());
    // Signed URLs sign `{track id}/{scope}`; this scope cannot be one of those.
    let signature = tokens.sign_url(&signed_scope(kind, words, &body), 0);
    format!("{body}.{signature}")
}

fn decode_cursor(
    tokens: &Tokens,
    kind: SearchType,
    words: &[String],
    text: Option<&str>,
) -> Result<Option<SearchPosition>, ApiError> {
    let Some(text) = text else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("invalid_field", "cursor: not one this API returned for this search");
    let (body, signature) = text.split_once('.').ok_or_else(bad)?;
    if body.len() != 41 || !body.is_ascii() || !body[1..].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    if !tokens.url_signature_holds(&signed_scope(kind, words, body), 0, signature) {
        return Err(bad());
    }
    let matching = match &body[..1] {
        "w" => Matching::Words,
        "s" => Matching::Similar,
        _ => return Err(bad()),
    };
    let score = f32::from_bits(u32::from_str_radix(&body[1..9], 16).map_err(|_| bad())?);
    let id = Uuid::try_parse(&body[9..]).map_err(|_| bad())?;
    if !score.is_finite() {
        return Err(bad());
    }
    Ok(Some(SearchPosition { matching, score, id }))
}

/// `ids` reordered as `order`, those missing dropped.
fn in_order<T>(order: &[Uuid], items: Vec<T>, id: impl Fn(&T) -> Uuid) -> Vec<T> {
    let mut found: HashMap<Uuid, T> = items.into_iter().map(|item| (id(&item), item)).collect();
    order.iter().filter_map(|key| found.remove(key)).collect()
}

impl Search {
    async fn results(
        &self,
        kind: SearchType,
        ids: &[Uuid],
        session: Option<&Session>,
    ) -> Result<SearchResults, ApiError> {
        let state = &self.state;
        let mut results = SearchResults { tracks: None, users: None, playlists: None, next_cursor: None };
        match kind {
            SearchType::Tracks => {
                let ids: Vec<TrackId> = ids.iter().map(|&id| TrackId(id)).collect();
                let tracks = state.tracks.details_many(&ids).await?;
                results.tracks = Some(crate::social::track_views(state, tracks, session).await?);
            }
            SearchType::Users => {
                let ids: Vec<UserId> = ids.iter().map(|&id| UserId(id)).collect();
                let profiles = state.social.profiles(&ids).await?;
                results.users = Some(crate::social::profile_views(state, profiles).await?);
            }
            SearchType::Playlists => {
                let keys: Vec<PlaylistId> = ids.iter().map(|&id| PlaylistId(id)).collect();
                let rows = state.social.visible_playlists(&keys, viewer(session)).await?;
                let rows = in_order(ids, rows, |row| row.id.0);
                results.playlists = Some(crate::playlists::views(state, rows, session).await?);
            }
        }
        Ok(results)
    }
}

#[OpenApi(tag = "Tag::Search")]
impl Search {
    /// Tracks, accounts or playlists matching the words of `q`, best first. Every word must
    /// match, the last one as the beginning of a word ("daft pun" finds "Daft Punk"); accents
    /// and case do not matter; when the words match nothing, results with similar text come
    /// instead (a typo: "beyonse"). You see what you may see elsewhere: your own tracks and
    /// playlists, others' public ones (tracks once ready), nothing of suspended accounts or of
    /// accounts you block or that block you.
    #[oai(path = "/v1/search", method = "get")]
    async fn search(
        &self,
        /// What to look for: 1–200 characters, not only spaces. Letters and digits make the
        /// words; anything else only separates them.
        #[oai(validator(max_length = 200))]
        q: Query<String>,
        /// `tracks` (the default), `users` or `playlists`.
        #[oai(name = "type")]
        kind: Query<Option<SearchType>>,
        /// From `next_cursor` of the previous page (with the same `q` and `type`).
        #[oai(validator(max_length = 128))]
        cursor: Query<Option<String>>,
        /// 1–100, default 20.
        #[oai(validator(minimum(value = "1"), maximum(value = "100")))]
        limit: Query<Option<i64>>,
        auth: MaybeAuth,
    ) -> Result<Json<SearchResults>, ApiError> {
        if q.0.trim().is_empty() {
            return Err(ApiError::bad_request("invalid_field", "q: expected 1 to 200 characters, not only spaces"));
        }
        let kind = kind.0.unwrap_or(SearchType::Tracks);
        let words = words(&q.0);
        let after = decode_cursor(&self.state.tokens, kind, &words, cursor.0.as_deref())?;
        let session = auth.session();
        let page =
            self.search.search(kind.kind(), &words, session.map(|s| s.user.id), after, page_limit(limit.0)?).await?;
        let mut results = self.results(kind, &page.ids, session).await?;
        results.next_cursor = page.next.map(|at| encode_cursor(&self.state.tokens, kind, &words, at));
        Ok(Json(results))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_forgeries_and_other_searches() {
        let tokens = Tokens::new(&"cursor-test-secret".to_owned().into(), &[], std::time::Duration::from_secs(60));
        let love = words("love");
        let at = SearchPosition { matching: Matching::Similar, score: 0.607_927_1, id: Uuid::now_v7() };
        let cursor = encode_cursor(&tokens, SearchType::Tracks, &love, at);
        assert_eq!(decode_cursor(&tokens, SearchType::Tracks, &love, Some(&cursor)).expect("valid"), Some(at));
        assert_eq!(decode_cursor(&tokens, SearchType::Tracks, &love, None).expect("none"), None);
        // The same position in another search, or another kind.
        assert!(decode_cursor(&tokens, SearchType::Tracks, &words("lov"), Some(&cursor)).is_err());
        assert!(decode_cursor(&tokens, SearchType::Users, &love, Some(&cursor)).is_err());
        // Under another key.
        let other = Tokens::new(&"another-secret".to_owned().into(), &[], std::time::Duration::from_secs(60));
        assert!(decode_cursor(&other, SearchType::Tracks, &love, Some(&cursor)).is_err());
        let (body, signature) = cursor.split_once('.').expect("two parts");
        let raised = format!("w{}{}", "3f800000", &body[9..]);
        for bad in [
            String::new(),
            "garbage".to_owned(),
            body.to_owned(),
            format!("{raised}.{signature}"),
            format!("{}.{signature}", body.replacen('s', "w", 1)),
            format!("{body}.{}", &signature[1..]),
            format!("{body}x.{signature}"),
            format!("s+{}.{signature}", &body[2..]),
        ] {
            let refused = decode_cursor(&tokens, SearchType::Tracks, &love, Some(&bad)).expect_err(&bad);
            assert_eq!(refused.code, "invalid_field", "{bad}");
        }
    }

    #[test]
    fn in_order_keeps_the_ranking_and_drops_the_missing() {
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(in_order(&[c, a, b], vec![a, c], |id| *id), vec![c, a]);
    }
}
