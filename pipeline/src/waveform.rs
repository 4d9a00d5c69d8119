//! The waveform of a track: per-pixel minimum and maximum of its mono mixdown, in BBC
//! audiowaveform's JSON and binary `.dat` formats (version 2, one channel), which waveform
//! players such as peaks.js read directly, plus a small fixed-width amplitude summary for
//! list views.
//!
//! Values are computed the way audiowaveform computes them, so our files match what it would
//! produce from the same PCM: each sample is first quantised to 16 bits, and 8-bit output is
//! the 16-bit value divided by 256 with C++ integer division (truncating toward zero).

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

/// The resolution of a waveform's points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveformBits {
    /// −128..=127: half the size, and plenty for drawing.
    Eight,
    /// −32768..=32767.
    Sixteen,
}

impl WaveformBits {
    fn bits(self) -> u8 {
        match self {
            WaveformBits::Eight => 8,
            WaveformBits::Sixteen => 16,
        }
    }

    /// The magnitude of the most negative value, the scale the summary normalises by.
    fn full_scale(self) -> f32 {
        match self {
            WaveformBits::Eight => 128.0,
            WaveformBits::Sixteen => 32768.0,
        }
    }
}

/// Builds a [`Waveform`] from mono samples that arrive in chunks of any size.
#[derive(Debug, Clone)]
pub struct WaveformBuilder {
    sample_rate: u32,
    samples_per_pixel: u32,
    bits: WaveformBits,
    /// Finished points as 16-bit min, max pairs.
    data: Vec<i16>,
    /// Samples already in the pixel being filled; it carries over between calls to `add_mono`.
    pending: u32,
    pending_min: i16,
    pending_max: i16,
}

impl WaveformBuilder {
    /// A builder for audio at `sample_rate` Hz, one point per `samples_per_pixel` samples.
    ///
    /// A `samples_per_pixel` of 0 is taken as 1, as no pixel can cover no samples. (audiowaveform
    /// itself refuses to read files with fewer than 2.)
    pub fn new(sample_rate: u32, samples_per_pixel: u32, bits: WaveformBits) -> WaveformBuilder {
        WaveformBuilder {
            sample_rate,
            samples_per_pixel: samples_per_pixel.max(1),
            bits,
            data: Vec::new(),
            pending: 0,
            pending_min: i16::MAX,
            pending_max: i16::MIN,
        }
    }

    /// Adds the next mono samples, nominally in −1.0..=1.0.
    pub fn add_mono(&mut self, mono: &[f32]) {
        let mut rest = mono;
        while !rest.is_empty() {
            let room = self.samples_per_pixel - self.pending;
            let take = rest.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let (pixel, after) = rest.split_at(take);
            for &sample in pixel {
                let value = quantise(sample);
                self.pending_min = self.pending_min.min(value);
                self.pending_max = self.pending_max.max(value);
            }
            // `take` is at most `room`, a u32.
            self.pending += u32::try_from(take).unwrap_or(room);
            if self.pending == self.samples_per_pixel {
                self.flush();
            }
            rest = after;
        }
    }

    /// The finished waveform, including the last, partial pixel if there is one, so it has
    /// `ceil(samples / samples_per_pixel)` points.
    pub fn finish(mut self) -> Waveform {
        if self.pending > 0 {
            self.flush();
        }
        let mut data = self.data;
        if self.bits == WaveformBits::Eight {
            // Rust's integer division truncates toward zero like C++'s, which audiowaveform
            // uses; an arithmetic shift would round −1..−255 down to −1 instead of 0.
            data.iter_mut().for_each(|value| *value /= 256);
        }
        Waveform { sample_rate: self.sample_rate, samples_per_pixel: self.samples_per_pixel, bits: self.bits, data }
    }

    fn flush(&mut self) {
        self.data.extend_from_slice(&[self.pending_min, self.pending_max]);
        self.pending = 0;
        self.pending_min = i16::MAX;
        self.pending_max = i16::MIN;
    }
}

/// A sample as the 16-bit integer audiowaveform would have read (libsndfile scales floats by
/// 32767). The float-to-int cast saturates beyond ±full scale and maps NaN to 0.
fn quantise(sample: f32) -> i16 {
    (sample * 32767.0).round() as i16
}

/// A finished waveform: one min, max pair per pixel, at its bit depth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waveform {
    /// The sample rate of the audio it was drawn from, in Hz.
    pub sample_rate: u32,
    /// How many samples each point covers.
    pub samples_per_pixel: u32,
    /// The range of `data`'s values.
    pub bits: WaveformBits,
    /// Interleaved min, max pairs, −128..=127 for 8 bits, −32768..=32767 for 16.
    pub data: Vec<i16>,
}

impl Waveform {
    /// The number of points (min, max pairs).
    pub fn length(&self) -> usize {
        self.data.len() / 2
    }

    /// The waveform as audiowaveform's version 2 JSON, which serialises with its keys sorted;
    /// serialise the `Waveform` itself for audiowaveform's exact key order.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "version": 2,
            "channels": 1,
            "sample_rate": self.sample_rate,
            "samples_per_pixel": self.samples_per_pixel,
            "bits": self.bits.bits(),
            "length": self.length(),
            "data": self.data,
        })
    }

    /// The waveform as audiowaveform's binary `.dat`, version 2, little-endian.
    ///
    /// The header is 24 bytes: version, flags (bit 0 set for 8-bit data), sample rate, samples
    /// per pixel, length and channel count, each 32 bits; then the min, max pairs as `i8` or
    /// `i16`. audiowaveform declares the rate and samples per pixel as signed, which reads the
    /// same for any value below 2³¹.
    pub fn to_dat(&self) -> Vec<u8> {
        const VERSION: i32 = 2;
        const CHANNELS: i32 = 1;
        const FLAG_8_BIT: u32 = 1;

        let (flags, value_bytes) = match self.bits {
            WaveformBits::Eight => (FLAG_8_BIT, 1),
            WaveformBits::Sixteen => (0, 2),
        };
        // A length beyond u32 would be a 4-billion-point waveform: not one this builder makes.
        let length = u32::try_from(self.length()).unwrap_or(u32::MAX);

        let mut dat = Vec::with_capacity(24 + self.data.len() * value_bytes);
        dat.extend_from_slice(&VERSION.to_le_bytes());
        dat.extend_from_slice(&flags.to_le_bytes());
        dat.extend_from_slice(&self.sample_rate.to_le_bytes());
        dat.extend_from_slice(&self.samples_per_pixel.to_le_bytes());
        dat.extend_from_slice(&length.to_le_bytes());
        dat.extend_from_slice(&CHANNELS.to_le_bytes());
        match self.bits {
            WaveformBits::Eight => {
                // The clamp only matters for a hand-built `Waveform` with out-of-range data.
                dat.extend(self.data.iter().map(|&value| value.clamp(-128, 127) as i8 as u8));
            }
            WaveformBits::Sixteen => {
                for value in &self.data {
                    dat.extend_from_slice(&value.to_le_bytes());
                }
            }
        }
        dat
    }

    /// `points` amplitudes in 0.0..=1.0, rounded to 3 decimals, for drawing a small waveform
    /// of a fixed width whatever the track's length.
    ///
    /// Each is the largest magnitude among the waveform points it covers, relative to the bit
    /// depth's full scale (128 or 32768). When the waveform has fewer points than asked for,
    /// each output takes the waveform point it falls in, so the result always has exactly
    /// `points` values; all 0.0 for an empty waveform.
    pub fn summary(&self, points: usize) -> Vec<f32> {
        let length = self.length();
        if length == 0 {
            return vec![0.0; points];
        }
        let full_scale = self.bits.full_scale();
        (0..points)
            .map(|index| {
                let start = share(index, length, points);
                let end = share(index + 1, length, points).max(start + 1);
                let peak = self.data[2 * start..2 * end]
                    .iter()
                    .map(|&value| i32::from(value).unsigned_abs())
                    .fold(0, u32::max);
                // Peaks are at most 32768, exact in f32.
                let amplitude = (peak as f32 / full_scale).min(1.0);
                (amplitude * 1000.0).round() / 1000.0
            })
            .collect()
    }
}

/// `floor(index · length / points)`, the first waveform point of summary point `index`,
/// computed wide so that no product can overflow.
fn share(index: usize, length: usize, points: usize) -> usize {
    let scaled = index as u128 * length as u128 / points as u128;
    // At most `length` since `index <= points`.
    usize::try_from(scaled).unwrap_or(length)
}

/// Serialises as audiowaveform's version 2 JSON, keys in the order audiowaveform writes them.
impl Serialize for Waveform {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut json = serializer.serialize_struct("Waveform", 7)?;
        json.serialize_field("version", &2)?;
        json.serialize_field("channels", &1)?;
        json.serialize_field("sample_rate", &self.sample_rate)?;
        json.serialize_field("samples_per_pixel", &self.samples_per_pixel)?;
        json.serialize_field("bits", &self.bits.bits())?;
        json.serialize_field("length", &self.length())?;
        json.serialize_field("data", &self.data)?;
        json.end()
    }
}

#[cfg(test)]
mod tests {
    use std::f64::consts::PI;

    use super::*;

    fn build(samples: &[f32], samples_per_pixel: u32, bits: WaveformBits, chunk: usize) -> Waveform {
        let mut builder = WaveformBuilder::new(44_100, samples_per_pixel, bits);
        for piece in samples.chunks(chunk) {
            builder.add_mono(piece);
        }
        builder.finish()
    }

    fn ramp(frames: usize) -> Vec<f32> {
        (0..frames).map(|n| ((n % 200) as f32 / 100.0) - 1.0).collect()
    }

    fn sine(frames: usize, amplitude: f64) -> Vec<f32> {
        (0..frames).map(|n| (amplitude * (2.0 * PI * 440.0 * n as f64 / 44_100.0).sin()) as f32).collect()
    }

    fn waveform(bits: WaveformBits, data: Vec<i16>) -> Waveform {
        Waveform { sample_rate: 48_000, samples_per_pixel: 512, bits, data }
    }

    #[test]
    fn length_is_the_ceiling_of_frames_over_samples_per_pixel() {
        for (frames, samples_per_pixel, expected) in [
            (0, 256, 0),
            (1, 256, 1),
            (255, 256, 1),
            (256, 256, 1),
            (257, 256, 2),
            (1000, 256, 4),
            (1024, 256, 4),
            (10, 1, 10),
        ] {
            let waveform = build(&ramp(frames), samples_per_pixel, WaveformBits::Sixteen, 100);
            assert_eq!(waveform.length(), expected, "{frames} frames at {samples_per_pixel}");
            assert_eq!(waveform.data.len(), 2 * expected);
        }
    }

    #[test]
    fn the_pixel_carries_across_chunks() {
        let samples = ramp(1000);
        let whole = build(&samples, 256, WaveformBits::Sixteen, samples.len());
        assert_eq!(whole.length(), 4);
        for chunk in [1, 7, 255, 256, 257, 999] {
            assert_eq!(build(&samples, 256, WaveformBits::Sixteen, chunk), whole, "chunks of {chunk}");
            assert_eq!(
                build(&samples, 256, WaveformBits::Eight, chunk),
                build(&samples, 256, WaveformBits::Eight, 1000)
            );
        }
        // Empty chunks change nothing.
        let mut builder = WaveformBuilder::new(44_100, 256, WaveformBits::Sixteen);
        builder.add_mono(&[]);
        builder.add_mono(&samples);
        builder.add_mono(&[]);
        assert_eq!(builder.finish(), whole);
    }

    #[test]
    fn each_point_is_the_min_and_max_of_its_samples() {
        let waveform = build(&[0.5, -0.25, 0.0, 1.0, -1.0, 0.0, 0.1], 3, WaveformBits::Sixteen, 2);
        assert_eq!(waveform.data, vec![-8192, 16384, -32767, 32767, 3277, 3277]);
    }

    #[test]
    fn samples_are_quantised_like_audiowaveform() {
        let cases =
            [(1.0, 32767), (-1.0, -32767), (0.5, 16384), (2.0, 32767), (-2.0, -32768), (f32::NAN, 0), (-0.00002, -1)];
        for (sample, expected) in cases {
            assert_eq!(quantise(sample), expected, "{sample}");
        }
    }

    #[test]
    fn eight_bit_values_are_the_16_bit_ones_divided_by_256() {
        let points = |samples: &[f32]| build(samples, 1, WaveformBits::Eight, 1).data;
        // 32767 / 256 = 127.996 and 16384 / 256 = 64 exactly.
        assert_eq!(points(&[1.0]), vec![127, 127]);
        assert_eq!(points(&[0.5]), vec![64, 64]);
        // −1.0 is −32767, which truncates to −127; only beyond full scale does −128 appear.
        assert_eq!(points(&[-1.0]), vec![-127, -127]);
        assert_eq!(points(&[-1.5]), vec![-128, -128]);
        // Truncation toward zero, as C++'s `/` in audiowaveform: −100 / 256 is 0, not −1.
        assert_eq!(points(&[-100.0 / 32767.0]), vec![0, 0]);
        assert_eq!(points(&[-300.0 / 32767.0]), vec![-1, -1]);
        let all = build(&ramp(5000), 7, WaveformBits::Eight, 33);
        assert!(all.data.iter().all(|value| (-128..=127).contains(value)));
    }

    #[test]
    fn a_zero_samples_per_pixel_is_taken_as_one() {
        let waveform = build(&[0.5, -0.5], 0, WaveformBits::Sixteen, 2);
        assert_eq!(waveform.samples_per_pixel, 1);
        assert_eq!(waveform.data, vec![16384, 16384, -16384, -16384]);
    }

    #[test]
    fn json_has_audiowaveforms_fields_and_data_in_point_order() {
        let waveform = build(&[0.5, -0.25, 1.0, -1.0, 0.25], 2, WaveformBits::Eight, 5);
        let json = waveform.to_json();
        assert_eq!(
            json,
            serde_json::json!({
                "version": 2,
                "channels": 1,
                "sample_rate": 44_100,
                "samples_per_pixel": 2,
                "bits": 8,
                "length": 3,
                "data": [-32, 64, -127, 127, 32, 32],
            })
        );
        let keys: Vec<&str> = json.as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 7);

        let sixteen = build(&[0.5, -0.25], 2, WaveformBits::Sixteen, 1).to_json();
        assert_eq!(sixteen["bits"], 16);
        assert_eq!(sixteen["data"], serde_json::json!([-8192, 16384]));
    }

    #[test]
    fn serialising_the_waveform_writes_audiowaveforms_key_order() {
        let waveform = waveform(WaveformBits::Sixteen, vec![-3, 5, -100, 200]);
        let text = serde_json::to_string(&waveform).expect("serialise");
        assert_eq!(
            text,
            r#"{"version":2,"channels":1,"sample_rate":48000,"samples_per_pixel":512,"bits":16,"length":2,"data":[-3,5,-100,200]}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("parse");
        assert_eq!(parsed, waveform.to_json());
    }

    #[test]
    fn dat_16_bit_is_a_24_byte_header_then_little_endian_pairs() {
        let dat = waveform(WaveformBits::Sixteen, vec![-2, 3, -32768, 32767]).to_dat();
        assert_eq!(dat.len(), 24 + 2 * 2 * 2);
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            2, 0, 0, 0,          // version
            0, 0, 0, 0,          // flags: 16-bit
            0x80, 0xbb, 0, 0,    // 48000 Hz
            0, 2, 0, 0,          // 512 samples per pixel
            2, 0, 0, 0,          // 2 points
            1, 0, 0, 0,          // 1 channel
            0xfe, 0xff, 3, 0,
            0x00, 0x80, 0xff, 0x7f,
        ];
        assert_eq!(dat, expected);
    }

    #[test]
    fn dat_8_bit_sets_the_flag_and_writes_one_byte_per_value() {
        let dat = waveform(WaveformBits::Eight, vec![-128, 127, -1, 0, 5, 6]).to_dat();
        assert_eq!(dat.len(), 24 + 3 * 2);
        assert_eq!(&dat[0..4], &2i32.to_le_bytes());
        assert_eq!(&dat[4..8], &1u32.to_le_bytes());
        assert_eq!(&dat[16..20], &3u32.to_le_bytes());
        assert_eq!(&dat[20..24], &1i32.to_le_bytes());
        assert_eq!(&dat[24..], &[0x80, 0x7f, 0xff, 0, 5, 6]);
    }

    #[test]
    fn an_empty_waveform_is_a_bare_header() {
        let waveform = build(&[], 256, WaveformBits::Eight, 1);
        assert_eq!(waveform.length(), 0);
        let dat = waveform.to_dat();
        assert_eq!(dat.len(), 24);
        assert_eq!(&dat[16..20], &0u32.to_le_bytes());
        assert_eq!(waveform.to_json()["data"], serde_json::json!([]));
        assert_eq!(waveform.summary(4), vec![0.0; 4]);
    }

    #[test]
    fn summary_has_exactly_the_points_asked_for() {
        let waveform = build(&sine(44_100, 0.8), 256, WaveformBits::Sixteen, 1000);
        for points in [0, 1, 7, 100, waveform.length(), waveform.length() + 1, 1800] {
            let summary = waveform.summary(points);
            assert_eq!(summary.len(), points);
            assert!(summary.iter().all(|value| (0.0..=1.0).contains(value)), "{summary:?}");
        }
    }

    #[test]
    fn summary_takes_the_largest_magnitude_of_each_share() {
        let waveform = waveform(WaveformBits::Eight, vec![-10, 20, -64, 0, 0, 32, -128, 127]);
        assert_eq!(waveform.summary(2), vec![0.5, 1.0]);
        assert_eq!(waveform.summary(1), vec![1.0]);
        assert_eq!(waveform.summary(4), vec![0.156, 0.5, 0.25, 1.0]);

        let sixteen = Waveform { bits: WaveformBits::Sixteen, ..waveform };
        assert_eq!(sixteen.summary(2), vec![0.002, 0.004]);
        let full = Waveform { data: vec![-32768, 32767], ..sixteen };
        assert_eq!(full.summary(1), vec![1.0]);
    }

    #[test]
    fn a_short_waveform_is_stretched_point_by_point() {
        let waveform = waveform(WaveformBits::Eight, vec![-64, 0, 0, 32]);
        assert_eq!(waveform.summary(4), vec![0.5, 0.5, 0.25, 0.25]);
        assert_eq!(waveform.summary(3), vec![0.5, 0.5, 0.25]);
    }

    #[test]
    fn summary_of_a_sine_is_its_amplitude() {
        for bits in [WaveformBits::Eight, WaveformBits::Sixteen] {
            let waveform = build(&sine(10 * 44_100, 0.5), 512, bits, 4096);
            for value in waveform.summary(100) {
                assert!((value - 0.5).abs() <= 0.01, "{value}");
            }
        }
    }
}
