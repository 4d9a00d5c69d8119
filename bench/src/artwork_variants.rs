//! `artwork-variants INPUT OUTDIR`: the worker's image code on one file, for
//! `scripts/bench.sh artwork` to time beside ImageMagick making the same five sizes.
//!
//! Reads INPUT, calls [`waveline_workers::images::variants`] (decode within the limits, EXIF
//! orientation, centre square, the five sizes, JPEG) exactly as the `process_image` job does,
//! and writes `OUTDIR/{size}.jpg`. Prints the sizes' byte counts as JSON.

use anyhow::{Context, Result};
use waveline_workers::images::{DecodeLimits, variants};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(input), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: artwork-variants INPUT OUTDIR");
    };
    let bytes = std::fs::read(&input).with_context(|| format!("reading {input}"))?;
    let made = variants(&bytes, &DecodeLimits::default()).map_err(|err| anyhow::anyhow!("{}: {err}", err.code()))?;
    std::fs::create_dir_all(&out)?;
    let mut sizes = serde_json::Map::new();
    for variant in made {
        std::fs::write(format!("{out}/{}", variant.size.file_name()), &variant.jpeg)?;
        sizes.insert(variant.size.as_str().to_owned(), variant.jpeg.len().into());
    }
    println!("{}", serde_json::Value::Object(sizes));
    Ok(())
}
