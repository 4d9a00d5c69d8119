//! `PipelineError`: the one error type of the pipeline, with stable codes.
//!
//! Codes are part of the product contract (the CLI prints them, workers store them on failed
//! tracks). Permanent errors are facts about the input: processing it again cannot help.

use std::path::PathBuf;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The input path cannot be opened or read.
    #[error("cannot read {path}: {source}")]
    InputUnreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The bytes are not audio in a format Waveline reads.
    #[error("unsupported format: {0}")]
    UnsupportedFormat(String),
    /// A known format whose data cannot be decoded, or holds less audio than it declares.
    #[error("corrupt audio: {0}")]
    CorruptAudio(String),
    /// A valid file that holds no audio frames.
    #[error("the input holds no audio")]
    EmptyAudio,
    /// Longer than the configured maximum.
    #[error("the audio lasts {duration_s:.0} s, longer than the limit of {limit_s} s")]
    TooLong { duration_s: f64, limit_s: u64 },
    /// Channels or sample rate outside the configured limits.
    #[error("{0}")]
    LimitExceeded(String),
    /// The presets file is unreadable or invalid.
    #[error("invalid presets: {0}")]
    InvalidPresets(String),
    /// Our failure, not the input's (an encoder refused its settings, a disk filled up).
    #[error("internal error: {0}")]
    Internal(String),
    /// The caller cancelled the run (a time limit ran out).
    #[error("the run was cancelled")]
    Cancelled,
}

impl PipelineError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            PipelineError::InputUnreadable { .. } => "input_unreadable",
            PipelineError::UnsupportedFormat(_) => "unsupported_format",
            PipelineError::CorruptAudio(_) => "corrupt_audio",
            PipelineError::EmptyAudio => "empty_audio",
            PipelineError::TooLong { .. } => "too_long",
            PipelineError::LimitExceeded(_) => "limit_exceeded",
            PipelineError::InvalidPresets(_) => "invalid_presets",
            PipelineError::Internal(_) => "internal",
            PipelineError::Cancelled => "cancelled",
        }
    }

    /// The message to show someone outside the machine that ran it (a track's stored error):
    /// the same as the `Display` text for facts about the input, but never a path, an OS
    /// error or a library's internal text.
    pub fn public_message(&self) -> String {
        match self {
            PipelineError::InputUnreadable { .. } => "the original could not be read from disk".to_owned(),
            PipelineError::InvalidPresets(_) => "the rendition presets are invalid".to_owned(),
            PipelineError::Internal(_) => "an internal error stopped the processing".to_owned(),
            other => other.to_string(),
        }
    }

    /// Whether running again on the same input cannot succeed: true for everything the input
    /// or its configuration is to blame for.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, PipelineError::Internal(_) | PipelineError::Cancelled)
    }

    pub(crate) fn internal(context: &str, err: impl std::fmt::Display) -> PipelineError {
        PipelineError::Internal(format!("{context}: {err}"))
    }
}

impl From<std::io::Error> for PipelineError {
    fn from(err: std::io::Error) -> PipelineError {
        PipelineError::Internal(format!("I/O: {err}"))
    }
}
