//! Channel layouts and the fold-downs built on them: which speaker each channel of an
//! unlabelled multichannel stream feeds, the stereo downmix the renditions are encoded from,
//! and the mono mixdown the waveform is drawn from.
//!
//! Everything here works on interleaved `f32` PCM and appends to a caller-owned buffer, so a
//! decode loop can reuse one output allocation for a whole track.

use std::f32::consts::FRAC_1_SQRT_2;

/// A loudspeaker position, named as in FFmpeg's and WAVE's channel masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// Front left (ITU M+030).
    FrontLeft,
    /// Front right (ITU M−030).
    FrontRight,
    /// Front centre (ITU M+000); also the single channel of a mono file.
    FrontCenter,
    /// Low-frequency effects.
    Lfe,
    /// Back left, behind the listener (ITU M+135).
    BackLeft,
    /// Back right.
    BackRight,
    /// Back centre (ITU M+180).
    BackCenter,
    /// Side left, the surround of 5.1(side) and 7.1 (ITU M+090 to M+110).
    SideLeft,
    /// Side (surround) right.
    SideRight,
}

use Speaker::{BackCenter, BackLeft, BackRight, FrontCenter, FrontLeft, FrontRight, Lfe, SideLeft, SideRight};

const MONO: [Speaker; 1] = [FrontCenter];
const STEREO: [Speaker; 2] = [FrontLeft, FrontRight];
const SURROUND_3_0: [Speaker; 3] = [FrontLeft, FrontRight, FrontCenter];
const QUAD: [Speaker; 4] = [FrontLeft, FrontRight, BackLeft, BackRight];
const SURROUND_5_0: [Speaker; 5] = [FrontLeft, FrontRight, FrontCenter, SideLeft, SideRight];
const SURROUND_5_1: [Speaker; 6] = [FrontLeft, FrontRight, FrontCenter, Lfe, SideLeft, SideRight];
const SURROUND_6_1: [Speaker; 7] = [FrontLeft, FrontRight, FrontCenter, Lfe, BackCenter, SideLeft, SideRight];
const SURROUND_7_1: [Speaker; 8] = [FrontLeft, FrontRight, FrontCenter, Lfe, BackLeft, BackRight, SideLeft, SideRight];

/// The layout assumed for a stream that says how many channels it has but not which.
///
/// Channels are in WAVE channel-mask order (which is also FFmpeg's), picking for each count the
/// layout that such files carry in practice: mono, stereo, 3.0, quad, 5.0(side), 5.1(side),
/// 6.1 and 7.1. FFmpeg's own `av_channel_layout_default` guesses differently for 3 to 6
/// channels (2.1, 4.0, 5.0(back), 5.1(back)); the 5.x back and side variants fold down and
/// measure identically here, so only 3 and 4 channels would actually be treated differently.
/// `None` for 0 channels and for more than 8, which no consumer-audio layout defines.
pub fn default_layout(channels: u16) -> Option<&'static [Speaker]> {
    match channels {
        1 => Some(&MONO),
        2 => Some(&STEREO),
        3 => Some(&SURROUND_3_0),
        4 => Some(&QUAD),
        5 => Some(&SURROUND_5_0),
        6 => Some(&SURROUND_5_1),
        7 => Some(&SURROUND_6_1),
        8 => Some(&SURROUND_7_1),
        _ => None,
    }
}

/// Gains `[to_left, to_right]` with which one speaker folds into stereo, after ITU-R BS.775.
///
/// Front left and right pass through at unity and the centre and the surrounds (side or back)
/// go to their side at −3 dB, so a phantom-centred source keeps its power. The back centre is
/// treated as a pair of virtual back speakers fed at −3 dB each (again power-preserving), which
/// then fold down like any surround: 1/√2 · 1/√2 = 0.5 (−6 dB) into each side. The LFE is
/// dropped, as BS.775 does: what it carries is meant to be redundant with the main channels,
/// and small stereo speakers cannot reproduce it anyway.
const fn stereo_gains(speaker: Speaker) -> [f32; 2] {
    match speaker {
        FrontLeft => [1.0, 0.0],
        FrontRight => [0.0, 1.0],
        FrontCenter => [FRAC_1_SQRT_2, FRAC_1_SQRT_2],
        Lfe => [0.0, 0.0],
        BackLeft | SideLeft => [FRAC_1_SQRT_2, 0.0],
        BackRight | SideRight => [0.0, FRAC_1_SQRT_2],
        BackCenter => [0.5, 0.5],
    }
}

#[derive(Debug, Clone)]
enum Mix {
    /// One channel to both sides at unity, so a mono upload plays at the level it was made at.
    Mono,
    /// Already stereo: copied untouched.
    Stereo,
    /// One `[to_left, to_right]` row per input channel, in channel order.
    Matrix(Box<[[f32; 2]]>),
}

/// Folds interleaved multichannel PCM into interleaved stereo.
///
/// Mixed frames are clamped to [−1, 1] rather than normalised. Normalising would have to scale
/// every multichannel track down by its worst-case sum (up to +7.7 dB for 7.1), making its
/// renditions quieter than the stereo release of the same music; real mixes rarely put
/// full-scale, in-phase content in the front, centre and surround of one side at once, so the
/// clamp almost never engages. Mono and stereo input is never altered, so never clamped.
#[derive(Debug, Clone)]
pub struct StereoDownmix {
    channels: usize,
    mix: Mix,
}

impl StereoDownmix {
    /// A downmix for `channels` channels in [`default_layout`] order; `None` where there is no
    /// such layout.
    pub fn new(channels: u16) -> Option<StereoDownmix> {
        let layout = default_layout(channels)?;
        let mix = match channels {
            1 => Mix::Mono,
            2 => Mix::Stereo,
            _ => Mix::Matrix(layout.iter().map(|&speaker| stereo_gains(speaker)).collect()),
        };
        Some(StereoDownmix { channels: layout.len(), mix })
    }

    /// Appends the stereo frames of `interleaved` to `out`.
    ///
    /// A trailing incomplete frame is ignored: it cannot be placed in the layout, and decoders
    /// only ever hand over whole frames.
    pub fn process(&self, interleaved: &[f32], out: &mut Vec<f32>) {
        let frames = interleaved.len() / self.channels;
        let whole = &interleaved[..frames * self.channels];
        out.reserve(frames * 2);
        match &self.mix {
            Mix::Mono => {
                for &sample in whole {
                    out.extend_from_slice(&[sample, sample]);
                }
            }
            Mix::Stereo => out.extend_from_slice(whole),
            Mix::Matrix(rows) => {
                for frame in whole.chunks_exact(self.channels) {
                    let mut left = 0.0_f32;
                    let mut right = 0.0_f32;
                    for (&sample, &[to_left, to_right]) in frame.iter().zip(rows.iter()) {
                        left += sample * to_left;
                        right += sample * to_right;
                    }
                    out.extend_from_slice(&[left.clamp(-1.0, 1.0), right.clamp(-1.0, 1.0)]);
                }
            }
        }
    }
}

/// Appends the average of each frame's channels to `out`, the mono signal BBC audiowaveform
/// draws its single-channel waveform from.
///
/// Averaging (rather than summing) keeps the result within [−1, 1] without clamping, so a
/// waveform never shows clipping the audio does not have. A trailing incomplete frame is
/// ignored, and so is everything when `channels` is 0.
pub fn mono_mixdown(interleaved: &[f32], channels: u16, out: &mut Vec<f32>) {
    match channels {
        0 => {}
        1 => out.extend_from_slice(interleaved),
        _ => {
            let scale = 1.0 / f32::from(channels);
            let channels = usize::from(channels);
            out.reserve(interleaved.len() / channels);
            out.extend(interleaved.chunks_exact(channels).map(|frame| frame.iter().sum::<f32>() * scale));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: f32 = FRAC_1_SQRT_2;

    fn assert_close(actual: &[f32], expected: &[f32]) {
        assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
        for (a, e) in actual.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{actual:?} vs {expected:?}");
        }
    }

    /// One frame of `channels` channels with `value` at `index` and silence elsewhere.
    fn impulse(channels: u16, index: usize, value: f32) -> Vec<f32> {
        let mut frame = vec![0.0; usize::from(channels)];
        frame[index] = value;
        frame
    }

    fn downmix(channels: u16, input: &[f32]) -> Vec<f32> {
        let mut out = Vec::new();
        StereoDownmix::new(channels).expect("layout exists").process(input, &mut out);
        out
    }

    #[test]
    fn layouts_exist_for_one_to_eight_channels_only() {
        assert_eq!(default_layout(0), None);
        assert_eq!(default_layout(9), None);
        assert_eq!(default_layout(u16::MAX), None);
        for channels in 1..=8 {
            let layout = default_layout(channels).expect("layout exists");
            assert_eq!(layout.len(), usize::from(channels));
        }
    }

    #[test]
    fn layouts_follow_wave_channel_mask_order() {
        assert_eq!(default_layout(1), Some(&[FrontCenter][..]));
        assert_eq!(default_layout(2), Some(&[FrontLeft, FrontRight][..]));
        assert_eq!(default_layout(3), Some(&[FrontLeft, FrontRight, FrontCenter][..]));
        assert_eq!(default_layout(4), Some(&[FrontLeft, FrontRight, BackLeft, BackRight][..]));
        assert_eq!(default_layout(5), Some(&[FrontLeft, FrontRight, FrontCenter, SideLeft, SideRight][..]));
        assert_eq!(default_layout(6), Some(&[FrontLeft, FrontRight, FrontCenter, Lfe, SideLeft, SideRight][..]));
        assert_eq!(
            default_layout(7),
            Some(&[FrontLeft, FrontRight, FrontCenter, Lfe, BackCenter, SideLeft, SideRight][..])
        );
        assert_eq!(
            default_layout(8),
            Some(&[FrontLeft, FrontRight, FrontCenter, Lfe, BackLeft, BackRight, SideLeft, SideRight][..])
        );
    }

    #[test]
    fn downmix_rejects_unknown_layouts() {
        assert!(StereoDownmix::new(0).is_none());
        assert!(StereoDownmix::new(9).is_none());
    }

    #[test]
    fn mono_goes_to_both_sides_at_unity() {
        assert_eq!(downmix(1, &[0.25, -1.0, 0.0]), vec![0.25, 0.25, -1.0, -1.0, 0.0, 0.0]);
    }

    #[test]
    fn stereo_is_copied_bit_for_bit() {
        // Out-of-range samples too: stereo is never mixed, so never clamped.
        let input = [0.1, -0.2, 1.5, -1.5, f32::MIN_POSITIVE, 0.0];
        assert_eq!(downmix(2, &input), input.to_vec());
    }

    #[test]
    fn front_channels_pass_through_at_unity() {
        for channels in 3..=8 {
            assert_close(&downmix(channels, &impulse(channels, 0, 0.5)), &[0.5, 0.0]);
            assert_close(&downmix(channels, &impulse(channels, 1, 0.5)), &[0.0, 0.5]);
        }
    }

    #[test]
    fn centre_goes_to_both_sides_at_minus_3_db() {
        for channels in [3, 5, 6, 7, 8] {
            assert_close(&downmix(channels, &impulse(channels, 2, 0.5)), &[0.5 * H, 0.5 * H]);
        }
    }

    #[test]
    fn lfe_is_dropped() {
        for channels in [6, 7, 8] {
            assert_close(&downmix(channels, &impulse(channels, 3, 1.0)), &[0.0, 0.0]);
        }
    }

    #[test]
    fn surrounds_go_to_their_side_at_minus_3_db() {
        // quad: back left and right.
        assert_close(&downmix(4, &impulse(4, 2, 0.5)), &[0.5 * H, 0.0]);
        assert_close(&downmix(4, &impulse(4, 3, 0.5)), &[0.0, 0.5 * H]);
        // 5.0 and 5.1: side left and right.
        assert_close(&downmix(5, &impulse(5, 3, 0.5)), &[0.5 * H, 0.0]);
        assert_close(&downmix(5, &impulse(5, 4, 0.5)), &[0.0, 0.5 * H]);
        assert_close(&downmix(6, &impulse(6, 4, 0.5)), &[0.5 * H, 0.0]);
        assert_close(&downmix(6, &impulse(6, 5, 0.5)), &[0.0, 0.5 * H]);
        // 7.1: back and side both fold into their side.
        for (index, expected) in [(4, [0.5 * H, 0.0]), (5, [0.0, 0.5 * H]), (6, [0.5 * H, 0.0]), (7, [0.0, 0.5 * H])] {
            assert_close(&downmix(8, &impulse(8, index, 0.5)), &expected);
        }
    }

    #[test]
    fn back_centre_goes_to_both_sides_at_minus_6_db() {
        assert_close(&downmix(7, &impulse(7, 4, 0.5)), &[0.25, 0.25]);
    }

    #[test]
    fn mixed_frames_are_clamped_not_normalised() {
        // Left, centre and left surround all at full scale: 1 + 2·(1/√2) ≈ 2.41 on the left.
        let frame = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        assert_close(&downmix(6, &frame), &[1.0, H]);
        let negative: Vec<f32> = frame.iter().map(|sample| -sample).collect();
        assert_close(&downmix(6, &negative), &[-1.0, -H]);
        // A quiet frame is not scaled by the worst case.
        let quiet = [0.1, 0.0, 0.0, 0.0, 0.0, 0.0];
        assert_close(&downmix(6, &quiet), &[0.1, 0.0]);
    }

    #[test]
    fn process_appends_every_whole_frame_and_ignores_a_partial_one() {
        let downmix = StereoDownmix::new(3).expect("layout exists");
        let mut out = vec![9.0, 9.0];
        downmix.process(&[0.5, 0.0, 0.0, 0.0, 0.5, 0.0, 0.3], &mut out);
        assert_close(&out, &[9.0, 9.0, 0.5, 0.0, 0.0, 0.5]);

        let mut out = Vec::new();
        StereoDownmix::new(1).expect("layout exists").process(&[], &mut out);
        StereoDownmix::new(2).expect("layout exists").process(&[0.5], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn mono_mixdown_averages_the_channels() {
        let mut out = vec![9.0];
        mono_mixdown(&[1.0, 0.0, 0.5, -0.5, -1.0, -1.0], 2, &mut out);
        assert_close(&out, &[9.0, 0.5, 0.0, -1.0]);

        let mut out = Vec::new();
        let frame = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        mono_mixdown(&frame, 8, &mut out);
        assert_close(&out, &[1.0]);
    }

    #[test]
    fn mono_mixdown_of_mono_is_a_copy_and_of_nothing_is_nothing() {
        let mut out = Vec::new();
        mono_mixdown(&[0.25, -0.75], 1, &mut out);
        assert_eq!(out, vec![0.25, -0.75]);

        let mut out = Vec::new();
        mono_mixdown(&[0.25, -0.75], 0, &mut out);
        mono_mixdown(&[0.25, -0.75, 0.5], 6, &mut out);
        assert!(out.is_empty());
    }
}
