//! Sample-rate conversion for encoders that need another rate than the source's, with
//! rubato's synchronous FFT resampler (fixed ratio, high quality, fast on long inputs).
//!
//! Streams in and out in blocks of any size. The resampler's own delay is cut from the start
//! and its tail flushed at the end, so the output holds exactly `round(frames · out / in)`
//! frames, aligned with the input: renditions keep the source's duration to the sample.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Indexing, Resampler};

use crate::error::PipelineError;

/// Input frames per FFT block.
const CHUNK: usize = 1024;

/// A streaming resampler over interleaved `f32` frames; a pass-through when the rates match.
pub struct StreamResampler {
    inner: Option<Fft<f32>>,
    channels: usize,
    ratio: f64,
    pending: Vec<f32>,
    scratch: Vec<f32>,
    /// Output frames still to drop: the resampler's delay.
    skip: usize,
    frames_in: u64,
    frames_out: u64,
}

impl std::fmt::Debug for StreamResampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamResampler").field("ratio", &self.ratio).field("channels", &self.channels).finish()
    }
}

impl StreamResampler {
    pub fn new(in_rate: u32, out_rate: u32, channels: usize) -> Result<StreamResampler, PipelineError> {
        let inner = if in_rate == out_rate {
            None
        } else {
            Some(
                Fft::<f32>::new(in_rate as usize, out_rate as usize, CHUNK, channels, FixedSync::Input)
                    .map_err(|err| PipelineError::internal("resampler", err))?,
            )
        };
        let skip = inner.as_ref().map_or(0, |r| r.output_delay());
        let scratch = vec![0.0; inner.as_ref().map_or(0, |r| r.output_frames_max()) * channels];
        Ok(StreamResampler {
            inner,
            channels,
            ratio: f64::from(out_rate) / f64::from(in_rate),
            pending: Vec::new(),
            scratch,
            skip,
            frames_in: 0,
            frames_out: 0,
        })
    }

    /// Resamples `input` (interleaved), appending what is ready to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) -> Result<(), PipelineError> {
        self.frames_in += (input.len() / self.channels) as u64;
        if self.inner.is_none() {
            out.extend_from_slice(input);
            self.frames_out += (input.len() / self.channels) as u64;
            return Ok(());
        }
        self.pending.extend_from_slice(input);
        let mut consumed = 0;
        loop {
            let needed = self.inner.as_ref().map_or(usize::MAX, |r| r.input_frames_next());
            let available = (self.pending.len() - consumed) / self.channels;
            if available < needed {
                break;
            }
            let start = consumed;
            let used = self.run(start, needed, None, out)?;
            consumed += used * self.channels;
        }
        self.pending.drain(..consumed);
        Ok(())
    }

    /// Flushes the tail, so the output holds exactly the expected number of frames.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<(), PipelineError> {
        if self.inner.is_none() {
            return Ok(());
        }
        let expected = (self.frames_in as f64 * self.ratio).round() as u64;
        let mut remaining = self.pending.len() / self.channels;
        let mut rounds = 0;
        while self.frames_out < expected {
            // Feed what is left, then silence, until the delay line has given everything up.
            self.run(0, remaining, Some(remaining), out)?;
            self.pending.clear();
            remaining = 0;
            rounds += 1;
            if rounds > 64 {
                return Err(PipelineError::internal("resampler", "the flush did not converge"));
            }
        }
        let excess = (self.frames_out - expected) as usize;
        out.truncate(out.len() - excess * self.channels);
        self.frames_out = expected;
        Ok(())
    }

    /// One resampler call on `frames` frames of `pending` from sample `start`.
    fn run(
        &mut self,
        start: usize,
        frames: usize,
        partial: Option<usize>,
        out: &mut Vec<f32>,
    ) -> Result<usize, PipelineError> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(0);
        };
        let needed = inner.input_frames_next();
        let channels = self.channels;
        // A partial block is read from a zero-padded copy so the slice is long enough.
        let padded;
        let input: &[f32] = if partial.is_some() {
            let mut block = vec![0.0; needed * channels];
            let have = (frames * channels).min(self.pending.len().saturating_sub(start));
            block[..have].copy_from_slice(&self.pending[start..start + have]);
            padded = block;
            &padded
        } else {
            &self.pending[start..start + needed * channels]
        };
        let buffer_in = InterleavedSlice::new(input, channels, needed)
            .map_err(|e| PipelineError::internal("resampler input", e))?;
        let out_frames = self.scratch.len() / channels;
        let mut buffer_out = InterleavedSlice::new_mut(&mut self.scratch, channels, out_frames)
            .map_err(|e| PipelineError::internal("resampler output", e))?;
        let indexing = Indexing { partial_len: partial, ..Indexing::default() };
        let (used, produced) = inner
            .process_into_buffer(&buffer_in, &mut buffer_out, Some(&indexing))
            .map_err(|e| PipelineError::internal("resampling", e))?;
        let dropped = produced.min(self.skip);
        self.skip -= dropped;
        out.extend_from_slice(&self.scratch[dropped * channels..produced * channels]);
        self.frames_out += (produced - dropped) as u64;
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate: u32, freq: f32, frames: usize) -> Vec<f32> {
        (0..frames)
            .flat_map(|i| {
                let v = (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin() * 0.5;
                [v, v]
            })
            .collect()
    }

    #[test]
    fn output_length_is_exact_whatever_the_block_sizes() {
        for (from, to, frames) in
            [(44100, 48000, 44100 * 3 + 17), (48000, 44100, 1000), (96000, 44100, 96000), (8000, 48000, 5)]
        {
            let input = sine(from, 440.0, frames);
            let mut resampler = StreamResampler::new(from, to, 2).expect("resampler");
            let mut out = Vec::new();
            for block in input.chunks(2 * 777) {
                resampler.push(block, &mut out).expect("push");
            }
            resampler.finish(&mut out).expect("finish");
            let expected = (frames as f64 * f64::from(to) / f64::from(from)).round() as usize;
            assert_eq!(out.len(), expected * 2, "{from} → {to}, {frames} frames");
        }
    }

    #[test]
    fn the_signal_survives_and_stays_aligned() {
        let input = sine(44100, 1000.0, 44100);
        let mut resampler = StreamResampler::new(44100, 48000, 2).expect("resampler");
        let mut out = Vec::new();
        resampler.push(&input, &mut out).expect("push");
        resampler.finish(&mut out).expect("finish");
        // Compare with the ideal 1 kHz sine at 48 kHz, away from the edges.
        let mut worst = 0.0f32;
        for i in 4800..43200 {
            let ideal = (2.0 * std::f32::consts::PI * 1000.0 * i as f32 / 48000.0).sin() * 0.5;
            worst = worst.max((out[2 * i] - ideal).abs());
        }
        assert!(worst < 0.01, "largest deviation {worst}");
    }

    #[test]
    fn equal_rates_pass_through() {
        let input = sine(44100, 440.0, 1000);
        let mut resampler = StreamResampler::new(44100, 44100, 2).expect("resampler");
        let mut out = Vec::new();
        resampler.push(&input, &mut out).expect("push");
        resampler.finish(&mut out).expect("finish");
        assert_eq!(out, input);
    }
}
