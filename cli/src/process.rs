//! `waveline process INPUT --out DIR [--presets FILE] [--json]`.
//!
//! Exit codes: 0 success; 2 bad input (the input or the presets file is to blame), with
//! `{"error":{"code","message"}}` on stdout under `--json`; 1 internal failure. A progress
//! bar is drawn on stderr only when stderr is a terminal and `--json` is off.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use waveline_pipeline::{PipelineConfig, PipelineError, Stage};

pub fn run(input: &Path, out: &Path, presets: Option<&Path>, json: bool) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WAVELINE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,symphonia_core=error,symphonia=error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    let started = std::time::Instant::now();
    let result =
        presets.map(PipelineConfig::load).unwrap_or_else(|| Ok(PipelineConfig::default())).and_then(|config| {
            let bar = (!json && std::io::stderr().is_terminal()).then(progress_bar);
            let report = |progress: waveline_pipeline::Progress| {
                if let Some(bar) = &bar {
                    bar.set_message(match progress.stage {
                        Stage::Probing => "probing",
                        Stage::Encoding => "decoding, analysing, encoding",
                        Stage::Finishing => "packaging",
                    });
                    bar.set_position((progress.fraction * 1000.0) as u64);
                }
            };
            let result = waveline_pipeline::process(input, out, &config, &report);
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            result
        });
    match result {
        Ok(manifest) => {
            if json {
                println!("{}", serde_json::to_string(&manifest).unwrap_or_default());
            } else {
                let source = &manifest.source;
                println!(
                    "{}: {} {} Hz {} ch, {:.1} s → {} in {:.1} s",
                    input.display(),
                    source.codec,
                    source.sample_rate,
                    source.channels,
                    source.duration_ms as f64 / 1000.0,
                    out.display(),
                    started.elapsed().as_secs_f64()
                );
                match manifest.loudness.integrated_lufs {
                    Some(lufs) => println!(
                        "loudness: {lufs:.1} LUFS, range {:.1} LU, true peak {} dBTP",
                        manifest.loudness.range_lu,
                        manifest.loudness.true_peak_dbtp.map_or("-inf".to_owned(), |p| format!("{p:.1}"))
                    ),
                    None => println!("loudness: silent"),
                }
                for rendition in &manifest.renditions {
                    println!(
                        "  {:<10} {:<5} {:>4} kb/s  {:>8.1} s  {:>10} bytes  {}",
                        rendition.preset,
                        rendition.codec,
                        rendition.bitrate_kbps,
                        rendition.duration_ms as f64 / 1000.0,
                        rendition.bytes,
                        rendition.path
                    );
                }
                println!("  waveform   {} points, manifest.json", manifest.waveform.length);
            }
            ExitCode::SUCCESS
        }
        Err(err) => report_error(&err, json),
    }
}

fn report_error(err: &PipelineError, json: bool) -> ExitCode {
    if json {
        println!("{}", json!({"error": {"code": err.code(), "message": err.to_string()}}));
    }
    eprintln!("waveline process: {} ({})", err, err.code());
    if err.is_permanent() { ExitCode::from(2) } else { ExitCode::FAILURE }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(1000);
    let style = ProgressStyle::with_template("{spinner} [{elapsed_precise}] [{bar:40}] {percent:>3}% {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
