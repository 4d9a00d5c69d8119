//! The thread budget on a real pass: a pass given one thread computes on one core at a time
//! (the budget's own count and the process's CPU time against the wall clock both say so),
//! and still produces the whole ladder; given room, its stages overlap.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use waveline_pipeline::{PipelineConfig, ThreadBudget, open};

/// A 16-bit stereo 44.1 kHz WAV of `seconds` of two tones, written byte by byte.
fn write_wav(path: &Path, seconds: u32) {
    let frames = 44_100 * seconds;
    let data = frames * 4;
    let mut bytes = Vec::with_capacity(44 + data as usize);
    bytes.extend_from_slice(b"RIFF");
    bytes.extend_from_slice(&(36 + data).to_le_bytes());
    bytes.extend_from_slice(b"WAVEfmt ");
    bytes.extend_from_slice(&16u32.to_le_bytes());
    bytes.extend_from_slice(&1u16.to_le_bytes());
    bytes.extend_from_slice(&2u16.to_le_bytes());
    bytes.extend_from_slice(&44_100u32.to_le_bytes());
    bytes.extend_from_slice(&(44_100u32 * 4).to_le_bytes());
    bytes.extend_from_slice(&4u16.to_le_bytes());
    bytes.extend_from_slice(&16u16.to_le_bytes());
    bytes.extend_from_slice(b"data");
    bytes.extend_from_slice(&data.to_le_bytes());
    for frame in 0..frames {
        let t = f64::from(frame) / 44_100.0;
        for frequency in [440.0, 550.0] {
            let sample = (0.5 * (2.0 * std::f64::consts::PI * frequency * t).sin() * 32767.0) as i16;
            bytes.extend_from_slice(&sample.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).expect("write the fixture");
}

/// CPU seconds this process has used, threads that ended included (`utime + stime` of
/// `/proc/self/stat`, in Linux's fixed 1/100 s ticks).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("procfs");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat format") + 2..].split(' ').collect();
    let ticks = |number: usize| fields[number - 3].parse::<f64>().expect("a tick count");
    (ticks(14) + ticks(15)) / 100.0
}

/// Runs the whole pass on `input` within `budget`; returns (wall s, CPU s, renditions).
fn run(input: &Path, out: &Path, budget: &ThreadBudget) -> (f64, f64, usize) {
    let config = PipelineConfig::default();
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let manifest = open(input, &config)
        .and_then(|opened| opened.process(out, &config, budget, &|_| {}, &AtomicBool::new(false)))
        .expect("the pass succeeds");
    (started.elapsed().as_secs_f64(), cpu_seconds() - cpu, manifest.renditions.len())
}

#[test]
fn a_pass_computes_on_no_more_threads_than_its_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("input.wav");
    write_wav(&input, 30);

    let one = ThreadBudget::new(1);
    let (wall, cpu, renditions) = run(&input, &dir.path().join("one"), &one);
    assert_eq!(renditions, 4, "the whole ladder: mp3_128, aac_hls, opus_64, preview");
    assert_eq!(one.peak(), 1, "two of the pass's threads computed at once");
    // One core at most: the CPU time cannot pass the wall time (a little slack for the work
    // outside the permits: channel hand-offs, opening and tags).
    assert!(cpu <= wall * 1.1 + 0.1, "{cpu:.2} CPU s in {wall:.2} s: more than one core");

    // The control: with room for all ten threads the stages do overlap, so the count above
    // would have seen more than one.
    let wide = ThreadBudget::new(16);
    let (_, _, renditions) = run(&input, &dir.path().join("wide"), &wide);
    assert_eq!(renditions, 4);
    assert!(wide.peak() > 1, "the stages never overlapped");
}
