//! Decoding: one pass from the input file to interleaved `f32` PCM at the source's rate and
//! channel count, in bounded blocks.
//!
//! Symphonia (pure Rust) decodes whatever it can; FFmpeg's libraries take over where it
//! cannot (Opus, exotic codecs, files Symphonia's demuxers reject). Both sit behind
//! [`PcmReader`], so nothing downstream knows which one ran.
//!
//! Truncation is an error, not a shorter track: a read that ends inside a packet, or a
//! container that declares more frames than it delivers, is `corrupt_audio`. An upload cut
//! short should be re-sent, not published half.

use std::fs::File;
use std::path::Path;

use symphonia::core::codecs::audio::{AudioDecoder, AudioDecoderOptions, well_known as codec_ids};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::probe::Hint;
use symphonia::core::formats::{FormatOptions, FormatReader, TrackType};
use symphonia::core::io::{MediaSourceStream, MediaSourceStreamOptions};
use symphonia::core::meta::MetadataOptions;

use crate::error::PipelineError;
use crate::sniff::Container;

/// What the source is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFacts {
    pub container: Container,
    /// FFmpeg-style codec name: `pcm_s16le`, `flac`, `mp3`, `aac`, `alac`, `vorbis`, `opus`…
    pub codec: String,
    pub sample_rate: u32,
    pub channels: u16,
    /// For PCM and lossless codecs; `None` where the notion does not apply.
    pub bits_per_sample: Option<u32>,
    /// Frames the container says it holds, when it says.
    pub declared_frames: Option<u64>,
}

/// A source of decoded audio.
pub trait PcmReader: Send {
    fn facts(&self) -> &SourceFacts;

    /// Appends the next block of interleaved samples to `out`; `Ok(false)` at the end.
    fn read(&mut self, out: &mut Vec<f32>) -> Result<bool, PipelineError>;
}

/// Opens `path` with Symphonia, or with FFmpeg when Symphonia cannot.
///
/// AAC goes to FFmpeg even when Symphonia can read it: Symphonia's MP4 reader does not apply
/// the edit list, so AAC would keep its encoder priming and padding and read some 30 ms long.
pub fn open(path: &Path, container: Container) -> Result<Box<dyn PcmReader>, PipelineError> {
    match SymphoniaReader::open(path, container) {
        Ok(reader) if reader.facts.codec == "aac" => match FfmpegReader::open(path, container) {
            Ok(ffmpeg) => Ok(Box::new(ffmpeg)),
            Err(_) => Ok(Box::new(reader)),
        },
        Ok(reader) => Ok(Box::new(reader)),
        Err(symphonia_err) => match FfmpegReader::open(path, container) {
            Ok(reader) => {
                tracing::debug!(reason = %symphonia_err, "Symphonia cannot read this input; decoding with FFmpeg");
                Ok(Box::new(reader))
            }
            Err(ffmpeg_err) => Err(classify_open_failure(&symphonia_err, ffmpeg_err)),
        },
    }
}

/// The bit depth in an ALAC magic cookie (ALACSpecificConfig: frame length u32, version u8,
/// bit depth u8, …), with or without the `alac` atom header in front.
fn alac_bit_depth(cookie: &[u8]) -> Option<u32> {
    let config = match cookie.get(4..8) {
        Some(b"alac") => cookie.get(12..)?,
        _ => cookie,
    };
    config.get(5).map(|bits| u32::from(*bits)).filter(|bits| (8..=32).contains(bits))
}

/// The bit depth a PCM codec name implies (`pcm_f32le` → 32).
fn pcm_bits(codec: &str) -> Option<u32> {
    let digits: String = codec.strip_prefix("pcm_")?.chars().skip(1).take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn classify_open_failure(symphonia_err: &SymphoniaError, ffmpeg_err: PipelineError) -> PipelineError {
    match ffmpeg_err {
        PipelineError::UnsupportedFormat(message) => PipelineError::UnsupportedFormat(message),
        PipelineError::EmptyAudio => PipelineError::EmptyAudio,
        PipelineError::InputUnreadable { path, source } => PipelineError::InputUnreadable { path, source },
        other => PipelineError::CorruptAudio(format!("no decoder can read it ({symphonia_err}; {other})")),
    }
}

struct SymphoniaReader {
    facts: SourceFacts,
    format: Box<dyn FormatReader>,
    decoder: Box<dyn AudioDecoder>,
    track_id: u32,
    channels: usize,
}

impl SymphoniaReader {
    fn open(path: &Path, container: Container) -> Result<SymphoniaReader, SymphoniaError> {
        let file = File::open(path)?;
        let source = MediaSourceStream::new(Box::new(file), MediaSourceStreamOptions::default());
        let mut hint = Hint::new();
        hint.with_extension(container.extension());
        let format = symphonia::default::get_probe().probe(
            &hint,
            source,
            FormatOptions::default(),
            MetadataOptions::default(),
        )?;
        let track = format.default_track(TrackType::Audio).ok_or(SymphoniaError::Unsupported("no audio track"))?;
        let params = track
            .codec_params
            .as_ref()
            .and_then(|params| params.audio())
            .ok_or(SymphoniaError::Unsupported("no audio codec parameters"))?
            .clone();
        let decoder = symphonia::default::get_codecs().make_audio_decoder(&params, &AudioDecoderOptions::default())?;
        let sample_rate = params.sample_rate.ok_or(SymphoniaError::DecodeError("no sample rate"))?;
        let channels =
            params.channels.as_ref().map(|c| c.count()).ok_or(SymphoniaError::DecodeError("no channel count"))?;
        if sample_rate == 0 || channels == 0 {
            return Err(SymphoniaError::DecodeError("zero sample rate or channels"));
        }
        let codec =
            codec_name(params.codec).map(str::to_owned).unwrap_or_else(|| decoder.codec_info().short_name.to_owned());
        let lossless = codec.starts_with("pcm_") || matches!(codec.as_str(), "flac" | "alac");
        let bits_per_sample = params
            .bits_per_sample
            .or_else(|| pcm_bits(&codec))
            .or_else(|| (codec == "alac").then(|| params.extra_data.as_deref().and_then(alac_bit_depth)).flatten())
            .filter(|_| lossless);
        let facts = SourceFacts {
            container,
            codec,
            sample_rate,
            channels: u16::try_from(channels).unwrap_or(u16::MAX),
            bits_per_sample,
            declared_frames: track.num_frames,
        };
        let track_id = track.id;
        Ok(SymphoniaReader { facts, format, decoder, track_id, channels })
    }
}

impl PcmReader for SymphoniaReader {
    fn facts(&self) -> &SourceFacts {
        &self.facts
    }

    fn read(&mut self, out: &mut Vec<f32>) -> Result<bool, PipelineError> {
        loop {
            let packet = match self.format.next_packet() {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(false),
                Err(SymphoniaError::IoError(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return Err(PipelineError::CorruptAudio(
                        "the file ends in the middle of a packet (truncated)".into(),
                    ));
                }
                Err(SymphoniaError::ResetRequired) => {
                    return Err(PipelineError::UnsupportedFormat("the stream changes its format midway".into()));
                }
                Err(err) => {
                    return Err(PipelineError::CorruptAudio(format!("cannot read the next packet: {err}")));
                }
            };
            if packet.track_id != self.track_id {
                continue;
            }
            let decoded = self
                .decoder
                .decode(&packet)
                .map_err(|err| PipelineError::CorruptAudio(format!("cannot decode a packet: {err}")))?;
            if decoded.spec().channels().count() != self.channels {
                return Err(PipelineError::UnsupportedFormat("the channel count changes midway".into()));
            }
            let start = out.len();
            out.resize(start + decoded.samples_interleaved(), 0.0);
            decoded.copy_to_slice_interleaved(&mut out[start..]);
            if decoded.frames() > 0 {
                return Ok(true);
            }
        }
    }
}

/// FFmpeg-style names for the codecs Symphonia reports.
fn codec_name(codec: symphonia::core::codecs::audio::AudioCodecId) -> Option<&'static str> {
    use codec_ids::*;
    Some(match codec {
        CODEC_ID_PCM_S16LE | CODEC_ID_PCM_S16LE_PLANAR => "pcm_s16le",
        CODEC_ID_PCM_S16BE | CODEC_ID_PCM_S16BE_PLANAR => "pcm_s16be",
        CODEC_ID_PCM_S24LE | CODEC_ID_PCM_S24LE_PLANAR => "pcm_s24le",
        CODEC_ID_PCM_S24BE | CODEC_ID_PCM_S24BE_PLANAR => "pcm_s24be",
        CODEC_ID_PCM_S32LE | CODEC_ID_PCM_S32LE_PLANAR => "pcm_s32le",
        CODEC_ID_PCM_S32BE | CODEC_ID_PCM_S32BE_PLANAR => "pcm_s32be",
        CODEC_ID_PCM_F32LE | CODEC_ID_PCM_F32LE_PLANAR => "pcm_f32le",
        CODEC_ID_PCM_F32BE | CODEC_ID_PCM_F32BE_PLANAR => "pcm_f32be",
        CODEC_ID_PCM_F64LE | CODEC_ID_PCM_F64LE_PLANAR => "pcm_f64le",
        CODEC_ID_PCM_F64BE | CODEC_ID_PCM_F64BE_PLANAR => "pcm_f64be",
        CODEC_ID_PCM_U8 | CODEC_ID_PCM_U8_PLANAR => "pcm_u8",
        CODEC_ID_PCM_S8 | CODEC_ID_PCM_S8_PLANAR => "pcm_s8",
        CODEC_ID_PCM_ALAW => "pcm_alaw",
        CODEC_ID_PCM_MULAW => "pcm_mulaw",
        CODEC_ID_FLAC => "flac",
        CODEC_ID_ALAC => "alac",
        CODEC_ID_MP3 => "mp3",
        CODEC_ID_MP2 => "mp2",
        CODEC_ID_MP1 => "mp1",
        CODEC_ID_AAC => "aac",
        CODEC_ID_VORBIS => "vorbis",
        CODEC_ID_OPUS => "opus",
        _ => return None,
    })
}

/// FFmpeg's libraries as the fallback decoder.
struct FfmpegReader {
    facts: SourceFacts,
    input: ffmpeg_next::format::context::Input,
    decoder: ffmpeg_next::decoder::Audio,
    resampler: Option<ffmpeg_next::software::resampling::Context>,
    layout: ffmpeg_next::ChannelLayout,
    stream_index: usize,
    decoded: ffmpeg_next::frame::Audio,
    converted: ffmpeg_next::frame::Audio,
    draining: bool,
    finished: bool,
}

/// Initialises FFmpeg once per process and keeps its logging quiet (errors surface as ours).
pub(crate) fn ffmpeg_init() -> Result<(), PipelineError> {
    static INIT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        ffmpeg_next::init().map_err(|err| err.to_string())?;
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);
        Ok(())
    })
    .clone()
    .map_err(|err| PipelineError::internal("FFmpeg initialisation", err))
}

impl FfmpegReader {
    fn open(path: &Path, container: Container) -> Result<FfmpegReader, PipelineError> {
        use ffmpeg_next::{codec, media};
        ffmpeg_init()?;
        let input = ffmpeg_next::format::input(&path)
            .map_err(|err| PipelineError::CorruptAudio(format!("FFmpeg cannot open it: {err}")))?;
        let stream = input
            .streams()
            .best(media::Type::Audio)
            .ok_or_else(|| PipelineError::UnsupportedFormat("the file has no audio stream".into()))?;
        let stream_index = stream.index();
        let mut context = codec::context::Context::from_parameters(stream.parameters())
            .map_err(|err| PipelineError::CorruptAudio(format!("bad codec parameters: {err}")))?;
        // Decoding happens on the pass's decode thread, inside its budget: no codec threads.
        context.set_threading(crate::budget::codec_threads());
        let codec_name = context.id().name().to_owned();
        let decoder = context.decoder().audio().map_err(|err| match err {
            ffmpeg_next::Error::DecoderNotFound => {
                PipelineError::UnsupportedFormat(format!("no decoder for codec {codec_name}"))
            }
            other => PipelineError::CorruptAudio(format!("cannot open the {codec_name} decoder: {other}")),
        })?;
        let channels = decoder.channels();
        let sample_rate = decoder.rate();
        if channels == 0 || sample_rate == 0 {
            return Err(PipelineError::CorruptAudio("the stream declares zero channels or a zero sample rate".into()));
        }
        let frames = stream.frames();
        let declared_frames = if frames > 0 {
            Some(frames as u64)
        } else if stream.duration() > 0 {
            let tb = stream.time_base();
            let seconds = stream.duration() as f64 * f64::from(tb.numerator()) / f64::from(tb.denominator().max(1));
            Some((seconds * f64::from(sample_rate)).round() as u64)
        } else {
            None
        };
        let bits = pcm_bits(&codec_name).unwrap_or(decoder.format().bytes() as u32 * 8);
        let lossless = codec_name.starts_with("pcm_") || matches!(codec_name.as_str(), "flac" | "alac");
        let layout = match decoder.channel_layout() {
            layout if layout.channels() == i32::from(channels) && !layout.is_empty() => layout,
            // Mono WAV and some others carry no layout: FFmpeg 5.1 needs one to convert.
            _ => ffmpeg_next::ChannelLayout::default(i32::from(channels)),
        };
        let facts = SourceFacts {
            container,
            codec: codec_name,
            sample_rate,
            channels,
            bits_per_sample: lossless.then_some(bits),
            declared_frames,
        };
        Ok(FfmpegReader {
            facts,
            input,
            decoder,
            resampler: None,
            layout,
            stream_index,
            decoded: ffmpeg_next::frame::Audio::empty(),
            converted: ffmpeg_next::frame::Audio::empty(),
            draining: false,
            finished: false,
        })
    }

    /// Converts the frame in `self.decoded` to interleaved f32 and appends it.
    fn append_decoded(&mut self, out: &mut Vec<f32>) -> Result<(), PipelineError> {
        use ffmpeg_next::format::{Sample, sample::Type};
        self.decoded.set_channel_layout(self.layout);
        let resampler = match &mut self.resampler {
            Some(resampler) => resampler,
            None => self.resampler.insert(
                ffmpeg_next::software::resampling::Context::get(
                    self.decoded.format(),
                    self.layout,
                    self.facts.sample_rate,
                    Sample::F32(Type::Packed),
                    self.layout,
                    self.facts.sample_rate,
                )
                .map_err(|err| PipelineError::internal("sample conversion", err))?,
            ),
        };
        self.converted = ffmpeg_next::frame::Audio::empty();
        resampler
            .run(&self.decoded, &mut self.converted)
            .map_err(|err| PipelineError::CorruptAudio(format!("cannot convert decoded samples: {err}")))?;
        let samples = self.converted.samples() * usize::from(self.facts.channels);
        let bytes = self.converted.data(0);
        let wanted = samples * 4;
        if bytes.len() < wanted {
            return Err(PipelineError::internal("sample conversion", "short output plane"));
        }
        out.extend(bytes[..wanted].chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])));
        Ok(())
    }
}

impl PcmReader for FfmpegReader {
    fn facts(&self) -> &SourceFacts {
        &self.facts
    }

    fn read(&mut self, out: &mut Vec<f32>) -> Result<bool, PipelineError> {
        let start = out.len();
        while !self.finished {
            if self.decoder.receive_frame(&mut self.decoded).is_ok() {
                self.append_decoded(out)?;
                if out.len() > start {
                    return Ok(true);
                }
                continue;
            }
            if self.draining {
                self.finished = true;
                break;
            }
            let mut packet = ffmpeg_next::Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) => {
                    if packet.stream() != self.stream_index {
                        continue;
                    }
                    self.decoder
                        .send_packet(&packet)
                        .map_err(|err| PipelineError::CorruptAudio(format!("cannot decode a packet: {err}")))?;
                }
                Err(ffmpeg_next::Error::Eof) => {
                    self.decoder.send_eof().map_err(|err| PipelineError::internal("decoder flush", err))?;
                    self.draining = true;
                }
                Err(err) => {
                    return Err(PipelineError::CorruptAudio(format!("cannot read the next packet: {err}")));
                }
            }
        }
        Ok(out.len() > start)
    }
}
