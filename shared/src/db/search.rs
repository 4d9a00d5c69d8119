//! Search (migration `…_search.sql`): tracks, accounts and playlists found by the words of a
//! query, ranked, and paged with a keyset on the rank.
//!
//! - **Words.** A query is its runs of letters and digits ([`words`]); everything else
//!   separates words and never reaches the SQL as text (so `&`, `|`, `!`, `:`, `*`, quotes,
//!   backslashes and parentheses are no syntax). Every word must match a word of the
//!   document, the last one as its beginning (search as you type). Words are folded the same
//!   way on both sides: lower case, accents off (`unaccent`, through `waveline_unaccent`).
//! - **Rank.** `ts_rank` over the weighted document: a track's title (A) above its tags,
//!   genre and file artist (B), above its description and file album (C); ties newest first.
//! - **Bounded work.** A query ranks at most [`CANDIDATES`] matches: its newest ones. A
//!   rare query has fewer, so all of them are ranked; a query as broad as a common word
//!   (`love` in 70,000 of 100,000 tracks) ranks the newest 1,000, not all 70,000 (which
//!   took 200 ms). The newest are read the cheaper of two ways, by the planner's estimate of
//!   the matches (`PgSearch::reading`), and each search is planned for its own words.
//! - **Similar words.** When the words match nothing at all, and the query has at least
//!   three letters or digits, the results are those whose title (an account's username and
//!   display name) holds a stretch of text similar to the query by trigrams (`pg_trgm`'s
//!   `%>`: word similarity at least `pg_trgm.word_similarity_threshold`, 0.6 by default),
//!   ranked by that similarity. A cursor carries which of the two a listing is.
//! - **Who sees what.** Tracks: the viewer's own in any state; others' public and ready.
//!   Playlists: the viewer's own, and others' public ones. Accounts: all but the system
//!   account. Never anything of a suspended account, nor, for a signed-in viewer, of an
//!   account that blocks them or that they block.

use uuid::Uuid;

use super::DbError;
use crate::domain::UserId;

/// The most matches one query ranks (its newest).
pub const CANDIDATES: i64 = 1_000;
/// The most words of a query that count.
pub const MAX_WORDS: usize = 32;
/// What reading a match through the index costs, in rows read in order: the index's matches
/// are scattered over the table's pages. Measured on 100,000 tracks: 7,926 matches in 32 ms
/// through the index, 12,571 rows in order in 11 ms.
const INDEX_READ_COST: f64 = 4.0;
/// The fewest letters and digits a query needs for the similarity fallback (a trigram).
const SIMILAR_MIN_CHARS: usize = 3;

/// What a search looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchKind {
    Tracks,
    Users,
    Playlists,
}

/// How a listing matched: by its words, or (none matching) by similar text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    Words,
    Similar,
}

/// Where a listing stands: the last result's rank and id, and how it matched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchPosition {
    pub matching: Matching,
    pub score: f32,
    pub id: Uuid,
}

/// A page of results, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    /// Ids of tracks, accounts or playlists (as asked), in rank order.
    pub ids: Vec<Uuid>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<SearchPosition>,
}

/// The words of a query: its runs of letters and digits, lower-cased, at most [`MAX_WORDS`].
pub fn words(query: &str) -> Vec<String> {
    query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|word| !word.is_empty())
        .take(MAX_WORDS)
        .map(str::to_lowercase)
        .collect()
}

/// The SQL of one kind: its table (as `t`), who owns a row, what the viewer (`$3`) may see.
struct Shape {
    table: &'static str,
    /// What ranking reads of a row.
    columns: &'static str,
    owner: &'static str,
    visible: &'static str,
    similar_text: &'static str,
}

impl SearchKind {
    fn shape(self) -> Shape {
        match self {
            SearchKind::Tracks => Shape {
                table: "tracks",
                columns: "t.id, t.search_document, t.title",
                owner: "t.owner_id",
                visible: "(t.owner_id = $3 OR (t.visibility = 'public' AND t.ready_revision IS NOT NULL))",
                similar_text: "waveline_unaccent(t.title)",
            },
            SearchKind::Users => Shape {
                table: "users",
                columns: "t.id, t.search_document, t.username, t.display_name",
                owner: "t.id",
                visible: "t.role <> 'system'",
                similar_text: "waveline_unaccent(t.username || ' ' || t.display_name)",
            },
            SearchKind::Playlists => Shape {
                table: "playlists",
                columns: "t.id, t.search_document, t.title",
                owner: "t.owner_id",
                visible: "(t.owner_id = $3 OR t.visibility = 'public')",
                similar_text: "waveline_unaccent(t.title)",
            },
        }
    }
}

/// How the candidates are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Every match, then the newest [`CANDIDATES`] of them: for a query with few matches
    /// (read through the GIN index).
    Every,
    /// The newest rows one by one until [`CANDIDATES`] match: for a query matching a large
    /// share of the rows (the planner's choice, the query left open to it).
    Newest,
}

/// The candidates of one kind matching `condition`, ranked by `score`, after the position
/// (`$2`, `$4`), `$5` of them. `$1`: the words, `$3`: the viewer, `$6`: the words as text.
fn ranked_sql(kind: SearchKind, condition: &str, score: &str, reading: Reading) -> String {
    let Shape { table, columns, owner, visible, .. } = kind.shape();
    let materialized = match reading {
        Reading::Every => "MATERIALIZED",
        Reading::Newest => "NOT MATERIALIZED",
    };
    format!(
        "WITH matched AS {materialized} (
             SELECT {columns} FROM {table} t
             WHERE {condition} AND {visible}
               AND NOT EXISTS (SELECT 1 FROM users s WHERE s.id = {owner} AND s.suspended_at IS NOT NULL)
               AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.blocker_id = $3 AND b.blocked_id = {owner})
               AND NOT EXISTS (SELECT 1 FROM blocks b WHERE b.blocker_id = {owner} AND b.blocked_id = $3)
         )
         SELECT r.id, r.score FROM (
             SELECT c.id, {score} AS score FROM (
                 SELECT m.* FROM matched m ORDER BY m.id DESC LIMIT {CANDIDATES}
             ) c
         ) r
         WHERE $2::real IS NULL OR (r.score, r.id) < ($2, $4)
         ORDER BY r.score DESC, r.id DESC
         LIMIT $5"
    )
}

/// Search over PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgSearch {
    pool: sqlx::PgPool,
}

impl PgSearch {
    pub fn new(pool: sqlx::PgPool) -> PgSearch {
        PgSearch { pool }
    }

    /// A page of what `viewer` may see of `kind` matching `words` (from [`words`]), after
    /// `after`. The first page matches by words, and by similar text when the words match
    /// nothing; later pages go on as the first went.
    pub async fn search(
        &self,
        kind: SearchKind,
        words: &[String],
        viewer: Option<UserId>,
        after: Option<SearchPosition>,
        limit: i64,
    ) -> Result<SearchPage, DbError> {
        let limit = limit.clamp(1, 100);
        if words.is_empty() {
            return Ok(SearchPage { ids: Vec::new(), next: None });
        }
        let matching = after.map_or(Matching::Words, |after| after.matching);
        let mut page = self.page(kind, matching, words, viewer, after, limit).await?;
        let chars: usize = words.iter().map(|word| word.chars().count()).sum();
        if after.is_none() && page.ids.is_empty() && chars >= SIMILAR_MIN_CHARS {
            page = self.page(kind, Matching::Similar, words, viewer, None, limit).await?;
        }
        Ok(page)
    }

    /// How to read the candidates of `words`: the newest rows one by one when the planner
    /// expects so many matches that [`CANDIDATES`] of them come sooner that way than by reading
    /// every match through the index (`matches² × INDEX_READ_COST ≥ CANDIDATES × rows`: with
    /// 100,000 tracks, from 5,000 matches). The planner alone misjudges the middle: it walked
    /// 40,000 tracks for the 2.6 % that match "crystal", where reading the 2,800 matches
    /// costs a third as much.
    async fn reading(&self, kind: SearchKind, words: &[String]) -> Result<Reading, DbError> {
        let table = kind.shape().table;
        let plan: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "EXPLAIN (FORMAT JSON)
             SELECT 1 FROM {table} t WHERE t.search_document @@ waveline_search_query($1, true)
             UNION ALL SELECT 1 FROM {table} t"
        )))
        .persistent(false)
        .bind(words)
        .fetch_one(&self.pool)
        .await?;
        let estimate = |n: usize| plan[0]["Plan"]["Plans"][n]["Plan Rows"].as_f64().unwrap_or(0.0);
        let (matches, rows) = (estimate(0), estimate(1));
        let reading = if matches * matches * INDEX_READ_COST >= CANDIDATES as f64 * rows {
            Reading::Newest
        } else {
            Reading::Every
        };
        tracing::debug!(table, matches, rows, ?reading, "search candidates");
        Ok(reading)
    }

    async fn page(
        &self,
        kind: SearchKind,
        matching: Matching,
        words: &[String],
        viewer: Option<UserId>,
        after: Option<SearchPosition>,
        limit: i64,
    ) -> Result<SearchPage, DbError> {
        let sql = match matching {
            Matching::Words => ranked_sql(
                kind,
                "t.search_document @@ waveline_search_query($1, true)",
                "ts_rank(c.search_document, waveline_search_query($1, true))",
                self.reading(kind, words).await?,
            ),
            Matching::Similar => {
                let text = kind.shape().similar_text;
                ranked_sql(
                    kind,
                    &format!("{text} %> waveline_unaccent($6)"),
                    &format!("word_similarity(waveline_unaccent($6), {})", text.replace("t.", "c.")),
                    Reading::Every,
                )
            }
        };
        // Not a prepared statement kept for reuse: each search is planned for its own words,
        // so a common word walks the newest rows and a rare one reads the index (a generic
        // plan cannot tell them apart).
        let rows: Vec<(Uuid, f32)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .persistent(false)
            .bind(words)
            .bind(after.map(|after| after.score))
            .bind(viewer)
            .bind(after.map(|after| after.id))
            .bind(limit + 1)
            .bind(words.join(" "))
            .fetch_all(&self.pool)
            .await?;
        let more = rows.len() as i64 > limit;
        let rows = &rows[..rows.len().min(limit as usize)];
        let next = if more { rows.last().map(|&(id, score)| SearchPosition { matching, score, id }) } else { None };
        Ok(SearchPage { ids: rows.iter().map(|(id, _)| *id).collect(), next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_runs_of_letters_and_digits() {
        assert_eq!(words("Daft  Pun"), ["daft", "pun"]);
        assert_eq!(words("BEYONCÉ"), ["beyoncé"]);
        assert_eq!(words("ac/dc & 'r&b' | !x:* \\(y)"), ["ac", "dc", "r", "b", "x", "y"]);
        assert_eq!(words("deadmau5"), ["deadmau5"]);
        assert!(words("  &|!:*'\"\\()  ").is_empty());
        assert_eq!(words(&"a ".repeat(100)).len(), MAX_WORDS);
    }
}
