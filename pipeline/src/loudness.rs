//! Loudness measurement after ITU-R BS.1770 / EBU R128: integrated loudness, loudness range,
//! true and sample peak of a decoded track, and the ReplayGain 2 track gain derived from them.
//!
//! The measurement is done by the `ebur128` crate (a port of libebur128); this module owns the
//! mapping from our channel layouts to its BS.1770 channel weights and the report the rest of
//! the pipeline stores.

use std::fmt;

use ebur128::{Channel, EbuR128, Mode};
use serde::Serialize;

use crate::channels::{Speaker, default_layout};

/// ReplayGain 2's reference level: a track measuring −18 LUFS needs no gain.
const REPLAYGAIN_REFERENCE_LUFS: f64 = -18.0;

/// The sample rates `ebur128` accepts; checked up front so that a bad rate gets a clear error
/// instead of the crate's catch-all `NoMem`.
const SAMPLE_RATES: std::ops::RangeInclusive<u32> = 16..=2_822_400;

/// Why a loudness measurement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LoudnessError {
    /// The channel count has no layout in [`default_layout`], so no weights to measure with.
    #[error("cannot measure loudness of {0} channels: only 1 to 8 channels have a known layout")]
    UnsupportedChannels(u16),
    /// The sample rate is outside what the meter's filters are defined for.
    #[error("cannot measure loudness at a sample rate of {0} Hz")]
    UnsupportedSampleRate(u32),
    /// A buffer handed to [`LoudnessMeter::add`] did not hold whole frames.
    #[error("{samples} interleaved samples are not whole frames of {channels} channels")]
    PartialFrame {
        /// The number of samples in the buffer.
        samples: usize,
        /// The meter's channel count.
        channels: u16,
    },
    /// The meter itself failed.
    #[error("loudness meter failed while {action}")]
    Meter {
        /// What the meter was doing, e.g. "reading the integrated loudness".
        action: &'static str,
        /// The meter's own error.
        #[source]
        source: ebur128::Error,
    },
}

impl LoudnessError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            LoudnessError::UnsupportedChannels(_) => "unsupported_channels",
            LoudnessError::UnsupportedSampleRate(_) => "unsupported_sample_rate",
            LoudnessError::PartialFrame { .. } => "partial_frame",
            LoudnessError::Meter { .. } => "loudness_meter",
        }
    }

    /// Whether retrying cannot help. Always true: the measurement depends only on the samples
    /// and their format, never on the network or the machine's state.
    pub fn is_permanent(&self) -> bool {
        match self {
            LoudnessError::UnsupportedChannels(_)
            | LoudnessError::UnsupportedSampleRate(_)
            | LoudnessError::PartialFrame { .. }
            | LoudnessError::Meter { .. } => true,
        }
    }
}

/// What a track measured. `None` (`null` in JSON) stands for −∞: digital silence, or a track
/// whose loudness never rises above BS.1770's absolute gate of −70 LUFS. Values are rounded to
/// two decimals, finer than any player or encoder uses them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoudnessReport {
    /// Gated integrated loudness, in LUFS.
    pub integrated_lufs: Option<f64>,
    /// Loudness range (EBU Tech 3342), in LU; 0 when there is too little audio to tell.
    pub range_lu: f64,
    /// The highest true (inter-sample) peak over all channels, in dBTP.
    pub true_peak_dbtp: Option<f64>,
    /// The highest sample over all channels, in dBFS.
    pub sample_peak_dbfs: Option<f64>,
    /// ReplayGain 2 track gain: the gain, in dB, that brings the track to −18 LUFS.
    pub replaygain_track_gain_db: Option<f64>,
}

/// Measures one track, fed as interleaved `f32` PCM in [`default_layout`] channel order.
pub struct LoudnessMeter {
    meter: EbuR128,
    channels: u16,
    /// Frames in one 100 ms block, and frames fed since the last block ended.
    block_frames: usize,
    pending_frames: usize,
    /// The energies of the last thirty 100 ms blocks: one 3 s short-term window.
    window: std::collections::VecDeque<f64>,
    window_sum: f64,
    /// Short-term energies, one every 100 ms once the first 3 s are in (for the range).
    short_term: Vec<f64>,
}

impl fmt::Debug for LoudnessMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `EbuR128` is not `Debug`, and its buffers would be noise anyway.
        f.debug_struct("LoudnessMeter")
            .field("channels", &self.channels)
            .field("sample_rate", &self.meter.rate())
            .finish_non_exhaustive()
    }
}

/// The BS.1770 channel `ebur128` should weight a speaker as.
///
/// Fronts and centre weigh 1.0 and the side and back surrounds 1.41, as in BS.1770 and
/// FFmpeg's `ebur128` filter. A mono file's only channel is the centre, weight 1.0, which is
/// how FFmpeg's filter measures mono unless asked for `dualmono` (weight 2, for mono meant to
/// be played on two speakers); unity keeps the reading comparable with other tools and with
/// the file as decoded. The LFE is excluded, as BS.1770 requires.
///
/// The back centre weighs 1.41 like the other surrounds, because FFmpeg's filter, the
/// reference this meter is held to, counts it among its back channels. BS.1770-4's own table
/// gives a speaker at 180° weight 1.0 (only 60° to 120° off-axis weighs 1.41), which would be
/// `Channel::Mp180`; the two readings differ only for 6.1 material, by at most 1.5 dB when the
/// back centre carries everything.
const fn meter_channel(speaker: Speaker) -> Channel {
    match speaker {
        Speaker::FrontLeft => Channel::Left,
        Speaker::FrontRight => Channel::Right,
        Speaker::FrontCenter => Channel::Center,
        Speaker::Lfe => Channel::Unused,
        Speaker::BackLeft | Speaker::SideLeft | Speaker::BackCenter => Channel::LeftSurround,
        Speaker::BackRight | Speaker::SideRight => Channel::RightSurround,
    }
}

impl LoudnessMeter {
    /// A meter for `channels` channels at `sample_rate` Hz.
    pub fn new(channels: u16, sample_rate: u32) -> Result<LoudnessMeter, LoudnessError> {
        let layout = default_layout(channels).ok_or(LoudnessError::UnsupportedChannels(channels))?;
        if !SAMPLE_RATES.contains(&sample_rate) {
            return Err(LoudnessError::UnsupportedSampleRate(sample_rate));
        }
        // Not HISTOGRAM mode: it would bound memory but quantise block energies, and keeping
        // every 100 ms block costs well under a megabyte even for a three-hour mix.
        // The loudness range is computed here from 100 ms short-term readings (see
        // `loudness_range`), not with the crate's LRA mode, which reads once a second.
        let mode = Mode::I | Mode::TRUE_PEAK | Mode::SAMPLE_PEAK;
        let mut meter = EbuR128::new(u32::from(channels), sample_rate, mode)
            .map_err(|source| LoudnessError::Meter { action: "starting", source })?;
        let map: Vec<Channel> = layout.iter().map(|&speaker| meter_channel(speaker)).collect();
        meter
            .set_channel_map(&map)
            .map_err(|source| LoudnessError::Meter { action: "setting the channel map", source })?;
        let block_frames = (sample_rate as usize / 10).max(1);
        Ok(LoudnessMeter {
            meter,
            channels,
            block_frames,
            pending_frames: 0,
            window: std::collections::VecDeque::with_capacity(SHORT_TERM_BLOCKS),
            window_sum: 0.0,
            short_term: Vec::new(),
        })
    }

    /// Feeds the next interleaved frames; buffers may be of any whole number of frames.
    pub fn add(&mut self, interleaved: &[f32]) -> Result<(), LoudnessError> {
        if !interleaved.len().is_multiple_of(usize::from(self.channels)) {
            return Err(LoudnessError::PartialFrame { samples: interleaved.len(), channels: self.channels });
        }
        // Feed up to each 100 ms boundary, and read that block's energy there.
        let channels = usize::from(self.channels);
        let mut rest = interleaved;
        while !rest.is_empty() {
            let room = self.block_frames - self.pending_frames;
            let take = room.min(rest.len() / channels);
            let (now, later) = rest.split_at(take * channels);
            self.meter
                .add_frames_f32(now)
                .map_err(|source| LoudnessError::Meter { action: "adding frames", source })?;
            self.pending_frames += take;
            rest = later;
            if self.pending_frames == self.block_frames {
                self.pending_frames = 0;
                self.close_block()?;
            }
        }
        Ok(())
    }

    fn close_block(&mut self) -> Result<(), LoudnessError> {
        let loudness = self
            .meter
            .loudness_window(100)
            .map_err(|source| LoudnessError::Meter { action: "reading a 100 ms block", source })?;
        let energy = if loudness.is_finite() { 10f64.powf((loudness + 0.691) / 10.0) } else { 0.0 };
        self.window.push_back(energy);
        self.window_sum += energy;
        if self.window.len() > SHORT_TERM_BLOCKS {
            self.window_sum -= self.window.pop_front().unwrap_or(0.0);
        }
        if self.window.len() == SHORT_TERM_BLOCKS {
            // Re-summing now and then keeps rounding drift out of a six-hour running sum.
            if self.short_term.len().is_multiple_of(1000) {
                self.window_sum = self.window.iter().sum();
            }
            self.short_term.push(self.window_sum / SHORT_TERM_BLOCKS as f64);
        }
        Ok(())
    }

    /// The measurement of everything fed so far. The meter can keep being fed afterwards.
    pub fn finish(&self) -> Result<LoudnessReport, LoudnessError> {
        let integrated = self
            .meter
            .loudness_global()
            .map_err(|source| LoudnessError::Meter { action: "reading the integrated loudness", source })?;
        let range = loudness_range(&self.short_term);

        // Peaks are over every channel, the LFE included: clipping there is clipping too.
        let mut true_peak = 0.0_f64;
        let mut sample_peak = 0.0_f64;
        for channel in 0..u32::from(self.channels) {
            let channel_true_peak = self
                .meter
                .true_peak(channel)
                .map_err(|source| LoudnessError::Meter { action: "reading the true peak", source })?;
            let channel_sample_peak = self
                .meter
                .sample_peak(channel)
                .map_err(|source| LoudnessError::Meter { action: "reading the sample peak", source })?;
            true_peak = true_peak.max(channel_true_peak);
            sample_peak = sample_peak.max(channel_sample_peak);
        }

        let integrated_lufs = finite(integrated);
        Ok(LoudnessReport {
            integrated_lufs: integrated_lufs.map(round2),
            range_lu: finite(range).map_or(0.0, round2),
            true_peak_dbtp: finite(20.0 * true_peak.log10()).map(round2),
            sample_peak_dbfs: finite(20.0 * sample_peak.log10()).map(round2),
            replaygain_track_gain_db: integrated_lufs.map(|lufs| round2(REPLAYGAIN_REFERENCE_LUFS - lufs)),
        })
    }
}

/// Blocks of 100 ms in one 3 s short-term window.
const SHORT_TERM_BLOCKS: usize = 30;

/// EBU Tech 3342 loudness range from short-term energies taken every 100 ms: gate at
/// −70 LUFS, then 20 LU below the power mean of what passed, and take the spread between the
/// 10th and 95th percentiles of the rest. The 2016 revision asks for at least ten readings a
/// second, as FFmpeg's `ebur128` filter takes; reading once a second (the `ebur128` crate's
/// LRA mode) comes out up to half an LU low on material that swells.
fn loudness_range(short_term: &[f64]) -> f64 {
    let absolute_gate = 10f64.powf((-70.0 + 0.691) / 10.0);
    let gated: Vec<f64> = short_term.iter().copied().filter(|e| *e >= absolute_gate).collect();
    if gated.is_empty() {
        return 0.0;
    }
    let mean = gated.iter().sum::<f64>() / gated.len() as f64;
    let relative_gate = mean * 10f64.powf(-20.0 / 10.0);
    let mut kept: Vec<f64> = gated.into_iter().filter(|e| *e >= relative_gate).collect();
    if kept.is_empty() {
        return 0.0;
    }
    kept.sort_by(f64::total_cmp);
    let percentile = |p: f64| kept[((kept.len() - 1) as f64 * p).round() as usize];
    let to_lufs = |energy: f64| 10.0 * energy.log10() - 0.691;
    (to_lufs(percentile(0.95)) - to_lufs(percentile(0.10))).max(0.0)
}

/// `None` for −∞ (silence) and for the NaN that non-finite input samples would produce.
fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

fn round2(value: f64) -> f64 {
    // Adding 0.0 turns −0.0 into 0.0, so a track right at the reference gains "0.0", not "-0.0".
    (value * 100.0).round() / 100.0 + 0.0
}

#[cfg(test)]
mod tests {
    use std::f64::consts::PI;

    use super::*;

    const RATE: u32 = 48_000;

    /// `seconds` of a sine of `frequency` Hz and peak `amplitude`, starting at `phase` radians,
    /// written into the channels of `channels` whose index is in `active` (silence elsewhere).
    fn sine(channels: u16, active: &[usize], frequency: f64, amplitude: f64, phase: f64, seconds: f64) -> Vec<f32> {
        let channels = usize::from(channels);
        let frames = (seconds * f64::from(RATE)) as usize;
        let mut out = vec![0.0_f32; frames * channels];
        for (n, frame) in out.chunks_exact_mut(channels).enumerate() {
            let value = (amplitude * (2.0 * PI * frequency * n as f64 / f64::from(RATE) + phase).sin()) as f32;
            for &channel in active {
                frame[channel] = value;
            }
        }
        out
    }

    fn dbfs(db: f64) -> f64 {
        10f64.powf(db / 20.0)
    }

    fn measure(channels: u16, samples: &[f32]) -> LoudnessReport {
        let mut meter = LoudnessMeter::new(channels, RATE).expect("meter");
        meter.add(samples).expect("add");
        meter.finish().expect("finish")
    }

    fn integrated(report: &LoudnessReport) -> f64 {
        report.integrated_lufs.expect("not silence")
    }

    fn assert_near(actual: f64, expected: f64, tolerance: f64) {
        assert!((actual - expected).abs() <= tolerance, "{actual} is not {expected} ± {tolerance}");
    }

    // EBU Tech 3341 case 1. A sine's mean square is half its peak squared (−3.01 dB), the
    // K-filter adds ≈ +0.69 dB at 1 kHz, which BS.1770's −0.691 dB offset cancels, and two
    // equal channels add +3.01 dB: so a stereo sine peaking at −23 dBFS reads −23 LUFS.
    #[test]
    fn stereo_sine_at_minus_23_dbfs_reads_minus_23_lufs() {
        let report = measure(2, &sine(2, &[0, 1], 1000.0, dbfs(-23.0), 0.0, 20.0));
        assert_near(integrated(&report), -23.0, 0.1);
        assert_near(report.range_lu, 0.0, 0.1);
    }

    // EBU Tech 3341 case 2.
    #[test]
    fn stereo_sine_at_minus_33_dbfs_reads_minus_33_lufs() {
        let report = measure(2, &sine(2, &[0, 1], 1000.0, dbfs(-33.0), 0.0, 20.0));
        assert_near(integrated(&report), -33.0, 0.1);
    }

    #[test]
    fn a_track_at_minus_18_lufs_needs_no_replaygain() {
        let report = measure(2, &sine(2, &[0, 1], 1000.0, dbfs(-18.0), 0.0, 10.0));
        assert_near(integrated(&report), -18.0, 0.1);
        assert_near(report.replaygain_track_gain_db.expect("gain"), 0.0, 0.1);
    }

    #[test]
    fn replaygain_is_the_distance_to_minus_18_lufs() {
        let report = measure(2, &sine(2, &[0, 1], 1000.0, dbfs(-30.0), 0.0, 10.0));
        let gain = report.replaygain_track_gain_db.expect("gain");
        assert_near(gain, 12.0, 0.1);
        assert_near(gain, -18.0 - integrated(&report), 0.011);
    }

    #[test]
    fn silence_has_no_loudness_and_no_peaks() {
        let report = measure(2, &vec![0.0; 2 * 5 * RATE as usize]);
        assert_eq!(
            report,
            LoudnessReport {
                integrated_lufs: None,
                range_lu: 0.0,
                true_peak_dbtp: None,
                sample_peak_dbfs: None,
                replaygain_track_gain_db: None,
            }
        );
    }

    #[test]
    fn nothing_fed_measures_as_silence() {
        let meter = LoudnessMeter::new(2, RATE).expect("meter");
        let report = meter.finish().expect("finish");
        assert_eq!(report.integrated_lufs, None);
        assert_eq!(report.sample_peak_dbfs, None);
    }

    #[test]
    fn audio_below_the_absolute_gate_has_no_integrated_loudness() {
        let report = measure(2, &sine(2, &[0, 1], 1000.0, dbfs(-80.0), 0.0, 5.0));
        assert_eq!(report.integrated_lufs, None);
        assert_eq!(report.replaygain_track_gain_db, None);
        // It is not digital silence, so it still has peaks.
        assert_near(report.sample_peak_dbfs.expect("peak"), -80.0, 0.01);
    }

    #[test]
    fn sample_peak_of_a_half_scale_sine_is_minus_6_02_dbfs() {
        // 1 kHz at 48 kHz has 48 samples a period, so one of them lands on the crest.
        let report = measure(2, &sine(2, &[0, 1], 1000.0, 0.5, 0.0, 2.0));
        assert_near(report.sample_peak_dbfs.expect("peak"), -6.02, 0.01);
        assert!(report.true_peak_dbtp.expect("true peak") >= report.sample_peak_dbfs.expect("peak"));
    }

    #[test]
    fn true_peak_finds_the_crest_between_samples() {
        // A quarter-rate sine shifted by 45° is sampled only at ±0.707 of its crest, so its
        // sample peak is 3 dB below its true peak.
        let report = measure(1, &sine(1, &[0], f64::from(RATE) / 4.0, 0.5, PI / 4.0, 2.0));
        let sample_peak = report.sample_peak_dbfs.expect("peak");
        let true_peak = report.true_peak_dbtp.expect("true peak");
        assert_near(sample_peak, -9.03, 0.01);
        assert!(true_peak >= sample_peak + 2.5, "true peak {true_peak}, sample peak {sample_peak}");
        assert_near(true_peak, -6.02, 0.5);
    }

    #[test]
    fn mono_is_measured_once_not_as_dual_mono() {
        let amplitude = dbfs(-20.0);
        let mono = measure(1, &sine(1, &[0], 1000.0, amplitude, 0.0, 10.0));
        let stereo = measure(2, &sine(2, &[0, 1], 1000.0, amplitude, 0.0, 10.0));
        // One channel at weight 1.0: 3.01 dB below the same sine in both channels of stereo.
        assert_near(integrated(&mono), -23.01, 0.1);
        assert_near(integrated(&stereo) - integrated(&mono), 3.01, 0.05);
    }

    #[test]
    fn lfe_alone_measures_as_silence() {
        let report = measure(6, &sine(6, &[3], 60.0, 0.5, 0.0, 5.0));
        assert_eq!(report.integrated_lufs, None);
        assert_eq!(report.replaygain_track_gain_db, None);
        // Its peaks still count: the LFE can clip like any other channel.
        assert_near(report.sample_peak_dbfs.expect("peak"), -6.02, 0.05);
    }

    #[test]
    fn surrounds_weigh_1_41_and_fronts_1_0() {
        let amplitude = dbfs(-20.0);
        let front_left = integrated(&measure(6, &sine(6, &[0], 1000.0, amplitude, 0.0, 5.0)));
        let centre = integrated(&measure(6, &sine(6, &[2], 1000.0, amplitude, 0.0, 5.0)));
        let surround_weight = 10.0 * 1.41_f64.log10();
        assert_near(centre, front_left, 0.01);
        for (channels, surround) in [(4, 2), (4, 3), (5, 3), (6, 4), (6, 5), (8, 4), (8, 5), (8, 6), (8, 7)] {
            let reading = integrated(&measure(channels, &sine(channels, &[surround], 1000.0, amplitude, 0.0, 5.0)));
            assert_near(reading - front_left, surround_weight, 0.02);
        }
    }

    #[test]
    fn back_centre_weighs_like_a_surround_as_in_ffmpeg() {
        let amplitude = dbfs(-20.0);
        let front_left = integrated(&measure(7, &sine(7, &[0], 1000.0, amplitude, 0.0, 5.0)));
        let side_left = integrated(&measure(7, &sine(7, &[5], 1000.0, amplitude, 0.0, 5.0)));
        let back_centre = integrated(&measure(7, &sine(7, &[4], 1000.0, amplitude, 0.0, 5.0)));
        assert_near(back_centre, side_left, 0.01);
        assert_near(back_centre - front_left, 10.0 * 1.41_f64.log10(), 0.02);
    }

    #[test]
    fn frames_may_arrive_in_any_whole_sizes() {
        let samples = sine(2, &[0, 1], 1000.0, dbfs(-23.0), 0.0, 5.0);
        let whole = measure(2, &samples);
        let mut meter = LoudnessMeter::new(2, RATE).expect("meter");
        for chunk in samples.chunks(2 * 441) {
            meter.add(chunk).expect("add");
        }
        assert_eq!(meter.finish().expect("finish"), whole);
    }

    #[test]
    fn unknown_channel_counts_are_rejected() {
        for channels in [0, 9] {
            let error = LoudnessMeter::new(channels, RATE).expect_err("no layout");
            assert!(matches!(error, LoudnessError::UnsupportedChannels(c) if c == channels));
            assert_eq!(error.code(), "unsupported_channels");
            assert!(error.is_permanent());
        }
    }

    #[test]
    fn impossible_sample_rates_are_rejected() {
        for rate in [0, 15, 3_000_000] {
            let error = LoudnessMeter::new(2, rate).expect_err("bad rate");
            assert!(matches!(error, LoudnessError::UnsupportedSampleRate(r) if r == rate));
        }
        for rate in [8_000, 44_100, 192_000] {
            LoudnessMeter::new(2, rate).expect("rate is supported");
        }
    }

    #[test]
    fn partial_frames_are_rejected() {
        let mut meter = LoudnessMeter::new(6, RATE).expect("meter");
        let error = meter.add(&[0.0; 7]).expect_err("partial frame");
        assert!(matches!(error, LoudnessError::PartialFrame { samples: 7, channels: 6 }));
        assert_eq!(error.to_string(), "7 interleaved samples are not whole frames of 6 channels");
    }

    #[test]
    fn report_values_are_rounded_to_two_decimals() {
        let report = measure(2, &sine(2, &[0, 1], 997.0, 0.1234, 0.3, 5.0));
        let values = [
            report.integrated_lufs,
            Some(report.range_lu),
            report.true_peak_dbtp,
            report.sample_peak_dbfs,
            report.replaygain_track_gain_db,
        ];
        for value in values.into_iter().flatten() {
            assert_near(value, (value * 100.0).round() / 100.0, 1e-9);
        }
    }

    #[test]
    fn round2_never_yields_negative_zero() {
        assert!(round2(-0.001).is_sign_positive());
        assert_eq!(round2(-1.005_1), -1.01);
        assert_eq!(round2(2.344), 2.34);
    }

    #[test]
    fn report_serialises_silence_as_null() {
        let report = LoudnessReport {
            integrated_lufs: None,
            range_lu: 0.0,
            true_peak_dbtp: None,
            sample_peak_dbfs: Some(-6.02),
            replaygain_track_gain_db: None,
        };
        assert_eq!(
            serde_json::to_value(&report).expect("serialise"),
            serde_json::json!({
                "integrated_lufs": null,
                "range_lu": 0.0,
                "true_peak_dbtp": null,
                "sample_peak_dbfs": -6.02,
                "replaygain_track_gain_db": null,
            })
        );
    }
}
