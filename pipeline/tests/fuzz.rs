//! Property test over hostile input: random bytes, and valid files of every format with bytes
//! flipped, cut or spliced. Whatever the input, `process` must return (no panic, no hang),
//! fail with an input error code rather than `internal`, and leave no manifest when it fails.
//! Seeds are made at test time with the `ffmpeg` CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use waveline_pipeline::{PipelineConfig, process};

const INPUT_CODES: &[&str] = &["unsupported_format", "corrupt_audio", "empty_audio", "too_long", "limit_exceeded"];

fn seeds() -> &'static Vec<Vec<u8>> {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let formats: [(&str, &[&str]); 7] = [
            ("wav", &[]),
            ("aiff", &[]),
            ("flac", &[]),
            ("mp3", &["-c:a", "libmp3lame"]),
            ("ogg", &["-c:a", "libvorbis"]),
            ("opus", &["-c:a", "libopus"]),
            ("m4a", &["-c:a", "aac"]),
        ];
        formats
            .iter()
            .map(|(extension, codec)| {
                let path = dir.path().join(format!("seed.{extension}"));
                let status = Command::new("ffmpeg")
                    .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i"])
                    .arg("sine=frequency=440:sample_rate=44100:duration=0.4")
                    .args(["-ac", "2"])
                    .args(*codec)
                    .arg(&path)
                    .status()
                    .expect("ffmpeg runs (scripts/setup.sh installs it)");
                assert!(status.success(), "ffmpeg could not make the {extension} seed");
                std::fs::read(&path).expect("seed")
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, xor: u8 },
    Cut { at: usize },
    Splice { at: usize, bytes: Vec<u8> },
}

fn mutate(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        if data.is_empty() {
            break;
        }
        match mutation {
            Mutation::Flip { at, xor } => {
                let at = at % data.len();
                data[at] ^= xor.max(&1);
            }
            Mutation::Cut { at } => data.truncate(at % data.len()),
            Mutation::Splice { at, bytes } => {
                let at = at % data.len();
                data.splice(at..at, bytes.iter().copied());
            }
        }
    }
    data
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        1 => any::<usize>().prop_map(|at| Mutation::Cut { at }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..64)).prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
    ]
}

fn check(data: &[u8], dir: &Path) -> Result<(), TestCaseError> {
    let input: PathBuf = dir.join("input.bin");
    std::fs::write(&input, data).expect("write input");
    let out = dir.join("out");
    let result = process(&input, &out, &PipelineConfig::default(), &|_| {});
    match result {
        Ok(manifest) => {
            prop_assert!(out.join("manifest.json").is_file());
            prop_assert!(!manifest.renditions.is_empty());
        }
        Err(err) => {
            prop_assert!(INPUT_CODES.contains(&err.code()), "{} ({})", err, err.code());
            prop_assert!(!out.join("manifest.json").exists(), "a failed run left a manifest");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_are_refused_cleanly(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let dir = tempfile::tempdir().expect("tempdir");
        check(&data, dir.path())?;
    }

    #[test]
    fn damaged_files_never_crash_the_pipeline(
        seed in 0usize..7,
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = mutate(seeds()[seed].clone(), &mutations);
        check(&data, dir.path())?;
    }
}
