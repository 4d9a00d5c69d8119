//! One run: decode once, fan the PCM out to every consumer, and write the outputs.
//!
//! ```text
//!                 ┌─▶ loudness (source channels and rate)
//!  decode ─ block ┼─▶ waveform (mono mixdown, inline)
//!                 ├─▶ stereo @ 44.1 kHz ─┬─▶ mp3_128 ─▶ file
//!                 │   (downmix+resample) ├─▶ aac 96/160/256 ─▶ HLS variants
//!                 │                      └─▶ preview (clip) ─▶ file
//!                 └─▶ stereo @ 48 kHz ───────▶ opus_64 ─▶ file
//! ```
//!
//! Every arrow is a bounded channel of shared blocks, so memory is a few blocks per consumer
//! whatever the track's length, and a slow encoder slows the decoder instead of piling up
//! audio. Each encoder runs on its own thread: on N cores a run takes about as long as the
//! slowest encoder, not the sum of all of them.
//!
//! Outputs are written to a staging directory inside the output directory and moved into
//! place only when everything succeeded; `manifest.json` comes last. A failed run removes
//! its staging directory and leaves no manifest.
//!
//! A run has two halves. [`open`] reads nothing but the headers before the guard has passed
//! them (absurd sample rates, channel counts or durations are refused there), then opens the
//! decoder once; [`Opened::process`] runs the pass on that same decoder. Callers that must
//! decide something between the two (a worker's quota, from the declared duration) hold the
//! [`Opened`] in between; [`process`] does both at once. A run can be cancelled between two
//! blocks ([`PipelineError::Cancelled`]).
//!
//! Every thread of a pass is named `pipe-…` (`pipe-loudness`, `pipe-feed-44100`,
//! `pipe-enc-mp3_128`, …) and is spawned by the thread that calls [`Opened::process`], so it
//! starts at that thread's scheduling priority: a caller that lowered its own priority first
//! has lowered the whole pass (the worker does, see `waveline-workers`). The pass computes
//! within a [`ThreadBudget`]: at most its limit of these threads work at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::budget::ThreadBudget;
use crate::channels::{StereoDownmix, mono_mixdown};
use crate::decode::{self, SourceFacts};
use crate::encode::{EncodeSpec, Encoded, Encoder, Target};
use crate::error::PipelineError;
use crate::hls::{self, MasterEntry};
use crate::loudness::{LoudnessMeter, LoudnessReport};
use crate::manifest::{Manifest, ManifestTags, Rendition, RenditionKind, Source, Variant, WaveformFiles};
use crate::presets::{PipelineConfig, Preset};
use crate::sniff::{self, Container};
use crate::tags;
use crate::waveform::{WaveformBits, WaveformBuilder};

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading headers and tags.
    Probing,
    /// The one pass: decoding, analysing and encoding together.
    Encoding,
    /// Packaging: playlists, waveform files, the manifest.
    Finishing,
}

/// A progress report: the stage and the fraction of the run done (0..=1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub stage: Stage,
    pub fraction: f64,
}

/// Frames per block handed to the consumers.
const BLOCK_FRAMES: usize = 8192;
/// Blocks a consumer may have waiting.
const QUEUE_DEPTH: usize = 4;
/// Progress reports at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

type Block = Arc<Vec<f32>>;

/// Processes `input` into `out_dir` with `config`, reporting progress along the way, on as
/// many cores as the process may use.
pub fn process(
    input: &Path,
    out_dir: &Path,
    config: &PipelineConfig,
    on_progress: &(dyn Fn(Progress) + Sync),
) -> Result<Manifest, PipelineError> {
    on_progress(Progress { stage: Stage::Probing, fraction: 0.0 });
    open(input, config)?.process(out_dir, config, &ThreadBudget::all_cores(), on_progress, &AtomicBool::new(false))
}

/// The first half of a run: `input` sniffed, its headers past the guard, its decoder open.
pub struct Opened {
    input: PathBuf,
    reader: Box<dyn decode::PcmReader>,
    facts: SourceFacts,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened").field("input", &self.input).field("facts", &self.facts).finish_non_exhaustive()
    }
}

/// Sniffs `input`, runs the header guard on it (before any decoder sees the bytes), then
/// opens its decoder and checks what the decoder reports against the same limits.
pub fn open(input: &Path, config: &PipelineConfig) -> Result<Opened, PipelineError> {
    let container = sniff::sniff_file(input)?;
    check_header(input, container, config)?;
    let reader = decode::open(input, container)?;
    let facts = reader.facts().clone();
    check_limits(&facts, config)?;
    Ok(Opened { input: input.to_path_buf(), reader, facts })
}

impl Opened {
    /// What the decoder reports about the source.
    pub fn facts(&self) -> &SourceFacts {
        &self.facts
    }

    /// The duration the container declares, in milliseconds, when it declares one.
    pub fn declared_duration_ms(&self) -> Option<u64> {
        let frames = self.facts.declared_frames?;
        (self.facts.sample_rate > 0).then(|| frames.saturating_mul(1000) / u64::from(self.facts.sample_rate))
    }

    /// The second half of a run: the one pass and the packaging, into `out_dir`, computing
    /// on at most `budget`'s limit of threads at once. Setting `cancel` stops the pass at the
    /// next block with [`PipelineError::Cancelled`], leaving no output behind.
    pub fn process(
        self,
        out_dir: &Path,
        config: &PipelineConfig,
        budget: &ThreadBudget,
        on_progress: &(dyn Fn(Progress) + Sync),
        cancel: &AtomicBool,
    ) -> Result<Manifest, PipelineError> {
        let Opened { input, reader, facts } = self;
        process_opened(&input, reader, facts, out_dir, config, budget, on_progress, cancel)
    }
}

#[allow(clippy::too_many_arguments)]
fn process_opened(
    input: &Path,
    reader: Box<dyn decode::PcmReader>,
    facts: SourceFacts,
    out_dir: &Path,
    config: &PipelineConfig,
    budget: &ThreadBudget,
    on_progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<Manifest, PipelineError> {
    let (tags, artwork) = tags::read(input);

    std::fs::create_dir_all(out_dir)
        .map_err(|err| PipelineError::internal(&format!("cannot create {}", out_dir.display()), err))?;
    let manifest_path = out_dir.join("manifest.json");
    match std::fs::remove_file(&manifest_path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err.into()),
        _ => {}
    }
    let staging = out_dir.join(format!(".staging-{}-{}", std::process::id(), nanos()));
    std::fs::create_dir_all(&staging)?;
    let result = run_pass(reader, &facts, &tags, config, budget, &staging, on_progress, cancel).and_then(|pass| {
        if cancel.load(Ordering::Relaxed) {
            return Err(PipelineError::Cancelled);
        }
        on_progress(Progress { stage: Stage::Finishing, fraction: 0.97 });
        let _permit = budget.permit();
        finish(pass, &facts, tags.clone(), artwork, config, &staging)
    });
    let manifest = match result {
        Ok(manifest) => manifest,
        Err(err) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    let published = publish(&staging, out_dir, &manifest);
    let _ = std::fs::remove_dir_all(&staging);
    published?;
    on_progress(Progress { stage: Stage::Finishing, fraction: 1.0 });
    Ok(manifest)
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// Refuses absurd or over-limit headers before a decoder is even built.
fn check_header(input: &Path, container: Container, config: &PipelineConfig) -> Result<(), PipelineError> {
    if let Some(declared) = sniff::declared_format(input, container) {
        if declared.sample_rate == 0 {
            return Err(PipelineError::CorruptAudio("the header declares a sample rate of 0 Hz".into()));
        }
        if declared.channels == 0 {
            return Err(PipelineError::CorruptAudio("the header declares no channels".into()));
        }
        check_rate_and_channels(declared.sample_rate, u64::from(declared.channels), config)?;
        if let Some(frames) = declared.frames {
            if frames == 0 {
                return Err(PipelineError::EmptyAudio);
            }
            check_duration(frames as f64 / declared.sample_rate as f64, config)?;
        }
    }
    if container == Container::Ogg && !sniff::ogg_ends_cleanly(input) {
        return Err(PipelineError::CorruptAudio(
            "the Ogg stream does not end with a complete end-of-stream page (truncated)".into(),
        ));
    }
    Ok(())
}

fn check_rate_and_channels(rate: u64, channels: u64, config: &PipelineConfig) -> Result<(), PipelineError> {
    let limits = &config.limits;
    if rate < u64::from(limits.min_sample_rate) || rate > u64::from(limits.max_sample_rate) {
        return Err(PipelineError::LimitExceeded(format!(
            "a sample rate of {rate} Hz is outside the accepted {}–{} Hz",
            limits.min_sample_rate, limits.max_sample_rate
        )));
    }
    if channels > u64::from(limits.max_channels) {
        return Err(PipelineError::LimitExceeded(format!(
            "{channels} channels is more than the accepted {}",
            limits.max_channels
        )));
    }
    Ok(())
}

fn check_duration(seconds: f64, config: &PipelineConfig) -> Result<(), PipelineError> {
    if seconds > config.limits.max_duration_s as f64 {
        return Err(PipelineError::TooLong { duration_s: seconds, limit_s: config.limits.max_duration_s });
    }
    Ok(())
}

fn check_limits(facts: &SourceFacts, config: &PipelineConfig) -> Result<(), PipelineError> {
    check_rate_and_channels(u64::from(facts.sample_rate), u64::from(facts.channels), config)?;
    if StereoDownmix::new(facts.channels).is_none() {
        return Err(PipelineError::LimitExceeded(format!("{} channels cannot be mixed to stereo", facts.channels)));
    }
    if let Some(frames) = facts.declared_frames {
        check_duration(frames as f64 / f64::from(facts.sample_rate), config)?;
    }
    Ok(())
}

/// One encoder of the run.
struct EncoderPlan {
    preset: String,
    spec: EncodeSpec,
    /// `(first frame, frames)` at the encoder's rate, for clips.
    clip: Option<(u64, u64)>,
    /// HLS variant bitrate, for the manifest.
    variant_kbps: Option<u32>,
}

/// What the pass produced before packaging.
struct PassOutput {
    frames: u64,
    loudness: LoudnessReport,
    waveform: crate::waveform::Waveform,
    encoded: Vec<(EncoderPlan, Encoded)>,
}

fn plan_encoders(
    facts: &SourceFacts,
    tags: &tags::Tags,
    config: &PipelineConfig,
    staging: &Path,
) -> Result<Vec<EncoderPlan>, PipelineError> {
    let mut plans = Vec::new();
    for preset in &config.presets {
        let title = tags.title.clone();
        let artist = tags.artist.clone();
        match preset {
            Preset::Progressive { name, codec, bitrate_kbps, sample_rate, clip_start_s, clip_duration_s } => {
                let clip = match (clip_start_s, clip_duration_s) {
                    (None, None) => None,
                    (start, duration) => {
                        let rate = f64::from(*sample_rate);
                        let mut first = (start.unwrap_or(0.0) * rate).round() as u64;
                        let length = duration.map_or(u64::MAX, |d| (d * rate).round() as u64);
                        // A start past the end would make an empty preview: start at zero.
                        if let Some(total) = facts.declared_frames {
                            let total_at_rate = (total as f64 * rate / f64::from(facts.sample_rate)) as u64;
                            if first >= total_at_rate {
                                first = 0;
                            }
                        }
                        Some((first, length))
                    }
                };
                plans.push(EncoderPlan {
                    preset: name.clone(),
                    spec: EncodeSpec {
                        codec: *codec,
                        bitrate_kbps: *bitrate_kbps,
                        sample_rate: *sample_rate,
                        target: Target::File(staging.join(format!("{name}.{}", extension(*codec)))),
                        title,
                        artist,
                    },
                    clip,
                    variant_kbps: None,
                });
            }
            Preset::Hls { name, codec, sample_rate, variants_kbps, segment_s } => {
                for kbps in variants_kbps {
                    let dir = staging.join(name).join(format!("{kbps}k"));
                    std::fs::create_dir_all(&dir)?;
                    plans.push(EncoderPlan {
                        preset: name.clone(),
                        spec: EncodeSpec {
                            codec: *codec,
                            bitrate_kbps: *kbps,
                            sample_rate: *sample_rate,
                            target: Target::HlsVariant { playlist: dir.join("index.m3u8"), segment_s: *segment_s },
                            title: None,
                            artist: None,
                        },
                        clip: None,
                        variant_kbps: Some(*kbps),
                    });
                }
            }
        }
    }
    Ok(plans)
}

fn extension(codec: crate::presets::Codec) -> &'static str {
    match codec {
        crate::presets::Codec::Mp3 => "mp3",
        crate::presets::Codec::Opus => "opus",
        crate::presets::Codec::Aac => "m4a",
    }
}

#[allow(clippy::too_many_arguments)]
fn run_pass(
    mut reader: Box<dyn decode::PcmReader>,
    facts: &SourceFacts,
    tags: &tags::Tags,
    config: &PipelineConfig,
    budget: &ThreadBudget,
    staging: &Path,
    on_progress: &(dyn Fn(Progress) + Sync),
    cancel: &AtomicBool,
) -> Result<PassOutput, PipelineError> {
    let plans = plan_encoders(facts, tags, config, staging)?;
    let channels = usize::from(facts.channels);
    let max_frames = (config.limits.max_duration_s as f64 * f64::from(facts.sample_rate)).ceil() as u64;
    let bits = if config.waveform.bits == 16 { WaveformBits::Sixteen } else { WaveformBits::Eight };
    let mut waveform = WaveformBuilder::new(facts.sample_rate, config.waveform.samples_per_pixel, bits);
    let mut meter = LoudnessMeter::new(facts.channels, facts.sample_rate)
        .map_err(|err| PipelineError::LimitExceeded(format!("cannot measure loudness: {err}")))?;

    // One feeder per encoder rate: downmix to stereo, resample, fan out to its encoders.
    let mut rates: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (index, plan) in plans.iter().enumerate() {
        rates.entry(plan.spec.sample_rate).or_default().push(index);
    }

    let plans_ref = &plans;
    let (frames, loudness, encoded) = std::thread::scope(|scope| {
        let (loudness_tx, loudness_rx) = bounded::<Block>(QUEUE_DEPTH);
        let loudness =
            spawn(scope, "pipe-loudness".into(), move || -> Result<(LoudnessReport, Duration), PipelineError> {
                for block in loudness_rx {
                    let _permit = budget.permit();
                    meter.add(&block).map_err(|err| PipelineError::internal("loudness", err))?;
                }
                let _permit = budget.permit();
                let report = meter.finish().map_err(|err| PipelineError::internal("loudness", err))?;
                Ok((report, thread_cpu()))
            });

        let mut feeder_txs: Vec<Sender<Block>> = Vec::new();
        let mut feeders = Vec::new();
        let mut encoders = Vec::new();
        for (rate, members) in &rates {
            let mut encoder_txs = Vec::new();
            for &index in members {
                let (tx, rx) = bounded::<Block>(QUEUE_DEPTH);
                encoder_txs.push(tx);
                let plan = &plans_ref[index];
                let name = format!("pipe-enc-{}", plan.preset);
                encoders.push((index, spawn(scope, name, move || run_encoder(plan, rx, budget))));
            }
            let (tx, rx) = bounded::<Block>(QUEUE_DEPTH);
            feeder_txs.push(tx);
            let (from, to) = (facts.sample_rate, *rate);
            let name = format!("pipe-feed-{to}");
            feeders.push(spawn(scope, name, move || run_feeder(rx, encoder_txs, facts.channels, from, to, budget)));
        }

        // The decode loop, on this thread.
        let mut decoded = Vec::with_capacity(BLOCK_FRAMES * channels * 2);
        let mut mono = Vec::with_capacity(BLOCK_FRAMES * 2);
        let mut frames: u64 = 0;
        let mut last_report = Instant::now();
        let decode_cpu_start = thread_cpu();
        let mut waveform_time = Duration::ZERO;
        let mut pass_error = None;
        loop {
            if cancel.load(Ordering::Relaxed) {
                pass_error = Some(PipelineError::Cancelled);
                break;
            }
            decoded.clear();
            let mut more = true;
            let permit = budget.permit();
            while decoded.len() < BLOCK_FRAMES * channels && more {
                match reader.read(&mut decoded) {
                    Ok(true) => {}
                    Ok(false) => more = false,
                    Err(err) => {
                        pass_error = Some(err);
                        more = false;
                    }
                }
            }
            if pass_error.is_some() {
                break;
            }
            let block_frames = decoded.len() / channels;
            let mut ready: Option<Block> = None;
            if block_frames > 0 {
                frames += block_frames as u64;
                if frames > max_frames {
                    pass_error = Some(PipelineError::TooLong {
                        duration_s: frames as f64 / f64::from(facts.sample_rate),
                        limit_s: config.limits.max_duration_s,
                    });
                    break;
                }
                let waveform_started = Instant::now();
                mono.clear();
                mono_mixdown(&decoded, facts.channels, &mut mono);
                waveform.add_mono(&mono);
                waveform_time += waveform_started.elapsed();
                ready = Some(Arc::new(std::mem::take(&mut decoded)));
            }
            // The sends below may wait for a consumer: the permit goes back first.
            drop(permit);
            if let Some(block) = ready {
                let delivered = loudness_tx.send(block.clone()).is_ok()
                    && feeder_txs.iter().all(|tx| tx.send(block.clone()).is_ok());
                if !delivered {
                    // A consumer stopped early: its own error says why.
                    break;
                }
                decoded = Vec::with_capacity(BLOCK_FRAMES * channels * 2);
                if last_report.elapsed() >= PROGRESS_EVERY {
                    last_report = Instant::now();
                    if let Some(total) = facts.declared_frames.filter(|t| *t > 0) {
                        let fraction = 0.02 + 0.95 * (frames as f64 / total as f64).min(1.0);
                        on_progress(Progress { stage: Stage::Encoding, fraction });
                    }
                }
            }
            if !more {
                break;
            }
        }
        drop(loudness_tx);
        drop(feeder_txs);
        let decode_cpu = thread_cpu().saturating_sub(decode_cpu_start).saturating_sub(waveform_time);

        let mut first_error = pass_error;
        let mut keep = |result: Result<(), PipelineError>| {
            if let Err(err) = result
                && first_error.is_none()
            {
                first_error = Some(err);
            }
        };
        let mut resample_cpu = Duration::ZERO;
        for feeder in feeders {
            match feeder.join().unwrap_or_else(|_| Err(PipelineError::Internal("a feeder thread panicked".into()))) {
                Ok(cpu) => resample_cpu += cpu,
                Err(err) => keep(Err(err)),
            }
        }
        let mut encoded = Vec::new();
        let mut encode_cpu = Duration::ZERO;
        for (index, handle) in encoders {
            match handle.join().unwrap_or_else(|_| Err(PipelineError::Internal("an encoder thread panicked".into()))) {
                Ok((result, cpu)) => {
                    encode_cpu += cpu;
                    encoded.push((index, result));
                }
                Err(err) => keep(Err(err)),
            }
        }
        let loudness =
            loudness.join().unwrap_or_else(|_| Err(PipelineError::Internal("the loudness thread panicked".into())));
        if let Some(err) = first_error {
            return Err(err);
        }
        let (loudness, loudness_cpu) = loudness?;
        let total = decode_cpu + waveform_time + loudness_cpu + resample_cpu + encode_cpu;
        tracing::info!(
            target: "waveline_pipeline::cpu",
            decode_s = decode_cpu.as_secs_f64(),
            waveform_s = waveform_time.as_secs_f64(),
            loudness_s = loudness_cpu.as_secs_f64(),
            resample_s = resample_cpu.as_secs_f64(),
            encode_s = encode_cpu.as_secs_f64(),
            analysis_share = (waveform_time + loudness_cpu).as_secs_f64() / total.as_secs_f64().max(1e-9),
            "CPU time by stage"
        );
        if frames == 0 {
            return Err(PipelineError::EmptyAudio);
        }
        if let Some(declared) = facts.declared_frames {
            // Containers round their counts a little; a real cut loses far more.
            let slack = (declared / 1000).max(4096);
            if frames + slack < declared {
                return Err(PipelineError::CorruptAudio(format!(
                    "the file declares {:.1} s of audio but holds {:.1} s (truncated)",
                    declared as f64 / f64::from(facts.sample_rate),
                    frames as f64 / f64::from(facts.sample_rate)
                )));
            }
        }
        Ok((frames, loudness, encoded))
    })?;
    let mut by_index: BTreeMap<usize, Encoded> = encoded.into_iter().collect();
    let encoded = plans
        .into_iter()
        .enumerate()
        .filter_map(|(index, plan)| by_index.remove(&index).map(|result| (plan, result)))
        .collect();
    Ok(PassOutput { frames, loudness, waveform: waveform.finish(), encoded })
}

/// Spawns one named thread of the pass. A thread that cannot be made is a panic, as with
/// `Scope::spawn`: the pass's caller reports it as an internal failure.
fn spawn<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    name: String,
    work: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, work)
        .unwrap_or_else(|err| panic!("cannot start a pipeline thread: {err}"))
}

/// Downmixes and resamples for one encoder rate, fanning blocks out to its encoders.
fn run_feeder(
    rx: Receiver<Block>,
    encoders: Vec<Sender<Block>>,
    channels: u16,
    from: u32,
    to: u32,
    budget: &ThreadBudget,
) -> Result<Duration, PipelineError> {
    let downmix = StereoDownmix::new(channels)
        .ok_or_else(|| PipelineError::LimitExceeded(format!("{channels} channels cannot be mixed to stereo")))?;
    let mut resampler = crate::resample::StreamResampler::new(from, to, 2)?;
    let mut stereo = Vec::new();
    let send = |samples: Vec<f32>| -> bool {
        let block: Block = Arc::new(samples);
        encoders.iter().all(|tx| tx.send(block.clone()).is_ok())
    };
    for block in rx {
        let permit = budget.permit();
        stereo.clear();
        downmix.process(&block, &mut stereo);
        let mut out = Vec::with_capacity(stereo.len() * to as usize / from as usize + 64);
        resampler.push(&stereo, &mut out)?;
        drop(permit);
        if !out.is_empty() && !send(out) {
            return Ok(thread_cpu());
        }
    }
    let mut tail = Vec::new();
    let permit = budget.permit();
    resampler.finish(&mut tail)?;
    drop(permit);
    if !tail.is_empty() {
        send(tail);
    }
    Ok(thread_cpu())
}

/// Runs one encoder over its stream of stereo blocks.
fn run_encoder(
    plan: &EncoderPlan,
    rx: Receiver<Block>,
    budget: &ThreadBudget,
) -> Result<(Encoded, Duration), PipelineError> {
    let mut encoder = {
        let _permit = budget.permit();
        Encoder::open(&plan.spec)?
    };
    let mut position: u64 = 0;
    for block in rx {
        let block_frames = (block.len() / 2) as u64;
        let (start, end) = match plan.clip {
            None => (0, block_frames),
            Some((first, length)) => {
                let clip_end = first.saturating_add(length);
                let start = first.saturating_sub(position).min(block_frames);
                let end = clip_end.saturating_sub(position).min(block_frames);
                (start, end.max(start))
            }
        };
        position += block_frames;
        if end > start {
            let _permit = budget.permit();
            encoder.push(&block[start as usize * 2..end as usize * 2])?;
        }
    }
    let _permit = budget.permit();
    let encoded = encoder.finish()?;
    Ok((encoded, thread_cpu()))
}

/// CPU time used by the calling thread so far (Linux; zero where unknown). For the per-stage
/// accounting logged at the end of a run, which `scripts/bench.sh` reads.
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// Packages the pass: playlists, waveform files, artwork, the manifest (not yet written).
fn finish(
    pass: PassOutput,
    facts: &SourceFacts,
    tags: tags::Tags,
    artwork: Option<tags::Artwork>,
    config: &PipelineConfig,
    staging: &Path,
) -> Result<Manifest, PipelineError> {
    // Streamed straight from the points: a `serde_json::Value` of a three-hour waveform
    // (3.7 million numbers) would cost over 100 MiB.
    let mut json = std::io::BufWriter::new(std::fs::File::create(staging.join("waveform.json"))?);
    serde_json::to_writer(&mut json, &pass.waveform).map_err(|e| PipelineError::internal("waveform", e))?;
    std::io::Write::flush(&mut json)?;
    drop(json);
    std::fs::write(staging.join("waveform.dat"), pass.waveform.to_dat())?;
    let summary = pass.waveform.summary(config.waveform.summary_points);
    std::fs::write(
        staging.join("waveform_summary.json"),
        serde_json::to_vec(&summary).map_err(|e| PipelineError::internal("waveform summary", e))?,
    )?;
    let artwork_path = match artwork {
        Some(art) => {
            let name = format!("artwork.{}", art.extension);
            std::fs::write(staging.join(&name), &art.bytes)?;
            Some(name)
        }
        None => None,
    };

    let mut renditions: Vec<Rendition> = Vec::new();
    let mut hls_variants: BTreeMap<String, Vec<(u32, String, hls::VariantStats, u64)>> = BTreeMap::new();
    for (plan, encoded) in &pass.encoded {
        let duration_ms = (encoded.frames as f64 * 1000.0 / f64::from(plan.spec.sample_rate)).round() as u64;
        match &plan.spec.target {
            Target::File(path) => renditions.push(Rendition {
                preset: plan.preset.clone(),
                kind: RenditionKind::Progressive,
                path: relative(staging, path),
                codec: plan.spec.codec.as_str().to_owned(),
                bitrate_kbps: plan.spec.bitrate_kbps,
                sample_rate: plan.spec.sample_rate,
                channels: 2,
                duration_ms,
                bytes: std::fs::metadata(path)?.len(),
                variants: None,
            }),
            Target::HlsVariant { playlist, .. } => {
                let stats = hls::measure_variant(playlist)?;
                hls_variants.entry(plan.preset.clone()).or_default().push((
                    plan.variant_kbps.unwrap_or(plan.spec.bitrate_kbps),
                    relative(staging, playlist),
                    stats,
                    duration_ms,
                ));
            }
        }
    }
    for preset in &config.presets {
        let Preset::Hls { name, codec, sample_rate, .. } = preset else {
            continue;
        };
        let Some(variants) = hls_variants.remove(name) else {
            continue;
        };
        let master_rel = format!("{name}/master.m3u8");
        let entries: Vec<(String, hls::VariantStats)> = variants
            .iter()
            .map(|(_, path, stats, _)| (path.trim_start_matches(&format!("{name}/")).to_owned(), *stats))
            .collect();
        let master = hls::master_playlist(
            &entries.iter().map(|(uri, stats)| MasterEntry { uri, stats: *stats }).collect::<Vec<_>>(),
        );
        std::fs::write(staging.join(&master_rel), &master)?;
        let total_bytes = variants.iter().map(|(_, _, stats, _)| stats.bytes).sum::<u64>() + master.len() as u64;
        renditions.push(Rendition {
            preset: name.clone(),
            kind: RenditionKind::Hls,
            path: master_rel,
            codec: codec.as_str().to_owned(),
            bitrate_kbps: variants.iter().map(|(kbps, ..)| *kbps).max().unwrap_or_default(),
            sample_rate: *sample_rate,
            channels: 2,
            duration_ms: variants.iter().map(|(.., ms)| *ms).max().unwrap_or_default(),
            bytes: total_bytes,
            variants: Some(
                variants
                    .iter()
                    .map(|(kbps, path, stats, _)| Variant {
                        bitrate_kbps: *kbps,
                        path: path.clone(),
                        bandwidth: stats.peak_bps,
                        segments: stats.segments,
                        bytes: stats.bytes,
                    })
                    .collect(),
            ),
        });
    }
    // Manifest order follows the presets file.
    renditions.sort_by_key(|r| config.presets.iter().position(|p| p.name() == r.preset).unwrap_or(usize::MAX));

    Ok(Manifest {
        source: Source {
            container: facts.container.as_str().to_owned(),
            codec: facts.codec.clone(),
            sample_rate: facts.sample_rate,
            channels: facts.channels,
            bits_per_sample: facts.bits_per_sample,
            duration_ms: (pass.frames as f64 * 1000.0 / f64::from(facts.sample_rate)).round() as u64,
        },
        tags: ManifestTags { tags, artwork: artwork_path },
        loudness: pass.loudness,
        waveform: WaveformFiles {
            json: "waveform.json".into(),
            dat: "waveform.dat".into(),
            summary: "waveform_summary.json".into(),
            samples_per_pixel: config.waveform.samples_per_pixel,
            length: pass.waveform.length(),
        },
        renditions,
    })
}

fn relative(base: &Path, path: &Path) -> String {
    path.strip_prefix(base).unwrap_or(path).to_string_lossy().into_owned()
}

/// Moves the staged outputs into `out_dir`, replacing earlier ones, then writes the manifest.
fn publish(staging: &Path, out_dir: &Path, manifest: &Manifest) -> Result<(), PipelineError> {
    for entry in std::fs::read_dir(staging)? {
        let entry = entry?;
        let target: PathBuf = out_dir.join(entry.file_name());
        if target.is_dir() {
            std::fs::remove_dir_all(&target)?;
        } else if target.exists() {
            std::fs::remove_file(&target)?;
        }
        std::fs::rename(entry.path(), &target)?;
    }
    let text = serde_json::to_vec_pretty(manifest).map_err(|err| PipelineError::internal("manifest", err))?;
    let temp = out_dir.join(".manifest.json.tmp");
    std::fs::write(&temp, text)?;
    std::fs::rename(&temp, out_dir.join("manifest.json"))?;
    Ok(())
}
