//! Encoders and muxers: interleaved stereo `f32` in, one finished file (or one HLS variant)
//! out, through FFmpeg's libraries (libmp3lame, libopus, FFmpeg's AAC encoder).
//!
//! Each [`Encoder`] lives on one thread and is fed blocks of any size; it cuts them into the
//! codec's frame size itself. Timestamps count samples from zero, so the muxers record the
//! encoder delay and padding (the LAME/Xing header, Opus pre-skip, the MP4 edit list) and
//! players and ffprobe see the source's exact duration.

use std::path::{Path, PathBuf};

use ffmpeg_next::format::{Sample, sample::Type as SampleType};
use ffmpeg_next::{ChannelLayout, Dictionary, Rational, codec, encoder, format, frame};

use crate::decode::ffmpeg_init;
use crate::error::PipelineError;
use crate::presets::Codec;

/// Where an encoder's packets go.
#[derive(Debug, Clone)]
pub enum Target {
    /// One progressive file; the muxer follows from the codec.
    File(PathBuf),
    /// One HLS variant: a VOD playlist with fMP4 segments of about `segment_s` seconds.
    HlsVariant { playlist: PathBuf, segment_s: u32 },
}

/// What to encode.
#[derive(Debug, Clone)]
pub struct EncodeSpec {
    pub codec: Codec,
    pub bitrate_kbps: u32,
    pub sample_rate: u32,
    pub target: Target,
    /// Title and artist for the file's own tags (ID3 for MP3, Vorbis comments for Opus).
    pub title: Option<String>,
    pub artist: Option<String>,
}

/// What an encoder wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Encoded {
    /// Frames (per channel) of audio encoded, excluding the codec's delay and padding.
    pub frames: u64,
}

const CHANNELS: usize = 2;

/// One running encoder and its muxer.
pub struct Encoder {
    output: format::context::Output,
    encoder: encoder::Audio,
    format: Sample,
    frame_size: usize,
    fifo: Vec<f32>,
    pts: i64,
    encoder_tb: Rational,
    stream_tb: Rational,
    frames: u64,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder").field("format", &self.format).field("frames", &self.frames).finish_non_exhaustive()
    }
}

fn failed(what: &str) -> impl Fn(ffmpeg_next::Error) -> PipelineError + '_ {
    move |err| PipelineError::internal(what, err)
}

impl Encoder {
    pub fn open(spec: &EncodeSpec) -> Result<Encoder, PipelineError> {
        ffmpeg_init()?;
        let (encoder_name, muxer) = match (spec.codec, &spec.target) {
            (Codec::Mp3, Target::File(_)) => ("libmp3lame", "mp3"),
            (Codec::Opus, Target::File(_)) => ("libopus", "opus"),
            (Codec::Aac, Target::File(_)) => ("aac", "ipod"),
            (Codec::Aac, Target::HlsVariant { .. }) => ("aac", "hls"),
            (codec, Target::HlsVariant { .. }) => {
                return Err(PipelineError::InvalidPresets(format!(
                    "HLS variants are fMP4 AAC; {} is not supported there",
                    codec.as_str()
                )));
            }
        };
        let path = match &spec.target {
            Target::File(path) | Target::HlsVariant { playlist: path, .. } => path.clone(),
        };
        let codec = encoder::find_by_name(encoder_name)
            .ok_or_else(|| PipelineError::Internal(format!("this FFmpeg has no {encoder_name} encoder")))?;
        let audio_codec = codec.audio().map_err(failed("encoder capabilities"))?;
        let format = pick_format(audio_codec.formats().map(|formats| formats.collect::<Vec<_>>()).unwrap_or_default())
            .ok_or_else(|| PipelineError::Internal(format!("{encoder_name} takes no sample format we produce")))?;

        let mut output = format::output_as(&path, muxer).map_err(failed("opening the output"))?;
        let global_header = output.format().flags().contains(format::flag::Flags::GLOBAL_HEADER);
        let mut metadata = Dictionary::new();
        if let Some(title) = &spec.title {
            metadata.set("title", title);
        }
        if let Some(artist) = &spec.artist {
            metadata.set("artist", artist);
        }
        output.set_metadata(metadata);

        let mut context =
            codec::context::Context::new_with_codec(codec).encoder().audio().map_err(failed("encoder"))?;
        let encoder_tb = Rational::new(1, spec.sample_rate as i32);
        context.set_rate(spec.sample_rate as i32);
        context.set_channel_layout(ChannelLayout::STEREO);
        context.set_channels(CHANNELS as i32);
        context.set_format(format);
        context.set_bit_rate(spec.bitrate_kbps as usize * 1000);
        context.set_time_base(encoder_tb);
        // Each encoder already has a thread of the pass; codec threads would escape the budget.
        context.set_threading(crate::budget::codec_threads());
        if global_header {
            context.set_flags(codec::flag::Flags::GLOBAL_HEADER);
        }
        let mut options = Dictionary::new();
        if spec.codec == Codec::Mp3 {
            // Constant bitrate, as the ladder promises byte-range seeking by time.
            options.set("abr", "0");
        }
        let encoder = context.open_as_with(codec, options).map_err(failed("opening the encoder"))?;
        let frame_size = match encoder.frame_size() as usize {
            0 => 1024,
            n => n,
        };
        {
            let mut stream = output.add_stream(codec).map_err(failed("adding the stream"))?;
            stream.set_time_base(encoder_tb);
            stream.set_parameters(&encoder);
        }
        let mut header_options = Dictionary::new();
        if let Target::HlsVariant { playlist, segment_s } = &spec.target {
            let dir = playlist.parent().unwrap_or(Path::new("."));
            header_options.set("hls_time", &segment_s.to_string());
            header_options.set("hls_playlist_type", "vod");
            header_options.set("hls_segment_type", "fmp4");
            header_options.set("hls_fmp4_init_filename", "init.mp4");
            header_options.set("hls_segment_filename", &dir.join("seg_%05d.m4s").to_string_lossy());
            header_options.set("hls_flags", "independent_segments");
        }
        output.write_header_with(header_options).map_err(failed("writing the header"))?;
        let stream_tb = output.stream(0).map(|s| s.time_base()).unwrap_or(encoder_tb);
        Ok(Encoder {
            output,
            encoder,
            format,
            frame_size,
            fifo: Vec::with_capacity(frame_size * CHANNELS * 4),
            pts: 0,
            encoder_tb,
            stream_tb,
            frames: 0,
        })
    }

    /// Encodes interleaved stereo samples.
    pub fn push(&mut self, samples: &[f32]) -> Result<(), PipelineError> {
        self.fifo.extend_from_slice(samples);
        let block = self.frame_size * CHANNELS;
        let mut offset = 0;
        while self.fifo.len() - offset >= block {
            self.send(offset, self.frame_size)?;
            offset += block;
        }
        self.fifo.drain(..offset);
        Ok(())
    }

    /// Encodes what is left, flushes the encoder and finishes the file.
    pub fn finish(mut self) -> Result<Encoded, PipelineError> {
        let left = self.fifo.len() / CHANNELS;
        if left > 0 {
            self.send(0, left)?;
        }
        self.encoder.send_eof().map_err(failed("flushing the encoder"))?;
        self.drain_packets()?;
        self.output.write_trailer().map_err(failed("finishing the file"))?;
        Ok(Encoded { frames: self.frames })
    }

    fn send(&mut self, offset: usize, frames: usize) -> Result<(), PipelineError> {
        let mut audio = frame::Audio::new(self.format, frames, ChannelLayout::STEREO);
        audio.set_rate(self.encoder.rate());
        let samples = &self.fifo[offset..offset + frames * CHANNELS];
        match self.format {
            Sample::F32(SampleType::Planar) => {
                for channel in 0..CHANNELS {
                    let plane = audio.data_mut(channel);
                    for (i, bytes) in plane.chunks_exact_mut(4).take(frames).enumerate() {
                        bytes.copy_from_slice(&samples[i * CHANNELS + channel].to_ne_bytes());
                    }
                }
            }
            Sample::F32(SampleType::Packed) => {
                let plane = audio.data_mut(0);
                for (bytes, sample) in plane.chunks_exact_mut(4).zip(samples) {
                    bytes.copy_from_slice(&sample.to_ne_bytes());
                }
            }
            Sample::I16(SampleType::Packed) => {
                let plane = audio.data_mut(0);
                for (bytes, sample) in plane.chunks_exact_mut(2).zip(samples) {
                    bytes.copy_from_slice(&to_i16(*sample).to_ne_bytes());
                }
            }
            _ => {
                return Err(PipelineError::Internal(format!("unhandled encoder sample format {:?}", self.format)));
            }
        }
        audio.set_pts(Some(self.pts));
        self.pts += frames as i64;
        self.frames += frames as u64;
        self.encoder.send_frame(&audio).map_err(failed("encoding"))?;
        self.drain_packets()
    }

    fn drain_packets(&mut self) -> Result<(), PipelineError> {
        let mut packet = ffmpeg_next::Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            packet.rescale_ts(self.encoder_tb, self.stream_tb);
            packet.write_interleaved(&mut self.output).map_err(failed("writing a packet"))?;
        }
        Ok(())
    }
}

fn to_i16(sample: f32) -> i16 {
    (sample.clamp(-1.0, 1.0) * 32767.0).round() as i16
}

/// The encoder's preferred format among those we can write.
fn pick_format(supported: Vec<Sample>) -> Option<Sample> {
    [Sample::F32(SampleType::Planar), Sample::F32(SampleType::Packed), Sample::I16(SampleType::Packed)]
        .into_iter()
        .find(|candidate| supported.contains(candidate))
}
