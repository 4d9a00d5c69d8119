//! `waveline-shared`: everything more than one Waveline crate needs.
//!
//! - [`config`]: the one typed [`Settings`](config::Settings), layered from defaults, a TOML
//!   file and `WAVELINE_*` environment variables;
//! - [`domain`]: identifiers and the track's processing states with their allowed transitions;
//! - [`images`]: artwork and avatars: their subjects, sizes, keys and URLs;
//! - [`job`]: the versioned job message that travels through the queue;
//! - [`network`]: addresses and networks (trusted proxies, rate-limit keys);
//! - [`push`]: push notifications: what one carries, device tokens, and enqueueing one;
//! - [`db`]: the PostgreSQL pool, the migrations, the track repository and the accounts;
//! - [`storage`]: the [`Storage`](storage::Storage) seam with its S3 and filesystem backends;
//! - [`queue`]: the [`JobQueue`](queue::JobQueue) seam with its AMQP and in-process backends;
//! - [`documents`]: the [`Documents`](documents::Documents) seam (comments, the activity feed)
//!   with its PostgreSQL and MongoDB backends.
//!
//! Error policy: every module has its own `thiserror` enum whose variants say what went wrong
//! in the module's terms, with a stable snake_case `code()` and `is_permanent()` (whether
//! retrying the same operation can ever succeed). `anyhow` appears only in binaries and tests.

// `Settings::redacted` lists every setting in one `json!`, deeper than the default limit allows.
#![recursion_limit = "256"]

pub mod bus;
pub mod charts;
pub mod config;
pub mod db;
pub mod documents;
pub mod domain;
pub mod foreground;
pub mod images;
pub mod job;
pub mod network;
pub mod push;
pub mod queue;
pub mod storage;
