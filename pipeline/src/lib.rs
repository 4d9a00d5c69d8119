//! `waveline-pipeline`: one uploaded audio file in, everything listeners and players need
//! out: the rendition ladder, the waveform, loudness, source facts and tags.
//!
//! Pure audio work: local files and PCM in, files and reports out; no SQL, HTTP or AMQP.
//! The entry point is [`process`]; [`run`] explains how one pass feeds every consumer.
//!
//! | stage | module |
//! |---|---|
//! | what the bytes are (magic numbers, declared headers) | [`sniff`] |
//! | decoding (Symphonia, FFmpeg as fallback) | [`decode`] |
//! | tags and artwork (lofty) | [`tags`] |
//! | channel layouts and downmixing | [`channels`] |
//! | sample-rate conversion (rubato) | [`resample`] |
//! | loudness (EBU R128) | [`loudness`] |
//! | waveform (audiowaveform formats) | [`waveform`] |
//! | encoders and muxers (FFmpeg) | [`encode`], [`hls`] |
//! | the ladder and limits, as data | [`presets`] |
//! | how many of its threads compute at once | [`budget`] |
//! | the manifest | [`manifest`] |

pub mod budget;
pub mod channels;
pub mod decode;
pub mod encode;
pub mod error;
pub mod hls;
pub mod loudness;
pub mod manifest;
pub mod presets;
pub mod resample;
pub mod run;
pub mod sniff;
pub mod tags;
pub mod waveform;

pub use budget::ThreadBudget;
pub use error::PipelineError;
pub use manifest::Manifest;
pub use presets::PipelineConfig;
pub use run::{Opened, Progress, Stage, open, process};
