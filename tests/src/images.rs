//! Image fixtures made at test time (with the `image` crate, and by hand where a file must be
//! wrong or carry an EXIF tag), and the calls the artwork tests make.

use std::io::Cursor;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use image::{ImageFormat, Rgb, RgbImage, RgbaImage};
use serde_json::Value;

use crate::stack::{Stack, User, json, multipart};

/// A `width`×`height` picture painted by `pixel`.
pub fn picture(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 3]) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| Rgb(pixel(x, y)))
}

/// `picture` as a JPEG (quality 95).
pub fn jpeg(picture: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95).encode_image(picture)?;
    Ok(bytes)
}

/// `picture` as a PNG, with an alpha channel of `alpha` everywhere.
pub fn png(picture: &RgbImage, alpha: u8) -> Result<Vec<u8>> {
    let rgba = RgbaImage::from_fn(picture.width(), picture.height(), |x, y| {
        let [r, g, b] = picture.get_pixel(x, y).0;
        image::Rgba([r, g, b, alpha])
    });
    let mut bytes = Vec::new();
    rgba.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)?;
    Ok(bytes)
}

/// `picture` as a lossless WebP.
pub fn webp(picture: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::codecs::webp::WebPEncoder::new_lossless(&mut bytes).encode(
        picture.as_raw(),
        picture.width(),
        picture.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(bytes)
}

/// `jpeg` with an EXIF APP1 segment after its SOI marker holding one tag, the orientation
/// (1–8), in a little-endian TIFF structure.
pub fn with_orientation(jpeg: &[u8], orientation: u16) -> Result<Vec<u8>> {
    ensure!(jpeg.starts_with(&[0xff, 0xd8]), "not a JPEG");
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II*\0");
    tiff.extend_from_slice(&8u32.to_le_bytes()); // the first IFD right after the header
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes()); // one value
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]); // the value field's padding
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut segment = b"Exif\0\0".to_vec();
    segment.extend_from_slice(&tiff);
    let length = u16::try_from(segment.len() + 2)?;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&segment);
    out.extend_from_slice(&jpeg[2..]);
    Ok(out)
}

/// Whether `jpeg` carries an EXIF segment (APP1 with the `Exif\0\0` signature) anywhere.
pub fn has_exif(jpeg: &[u8]) -> bool {
    jpeg.windows(6).any(|window| window == b"Exif\0\0")
}

/// CRC-32 (IEEE), as PNG chunks carry it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Result<Vec<u8>> {
    let mut out = u32::try_from(data.len())?.to_be_bytes().to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
    Ok(out)
}

/// A decompression bomb: a valid PNG of a few hundred bytes whose header declares
/// `side`×`side` RGB pixels (at 100,000 a side, 30 GB decoded). Its one `IDAT` chunk is a
/// real zlib stream of zeros, for what a decoder would read before giving up.
pub fn png_bomb(side: u32) -> Result<Vec<u8>> {
    // The image crate's own PNG of a tiny picture supplies a valid IDAT; only the header lies.
    let small = png(&picture(8, 8, |_, _| [0, 0, 0]), 255)?;
    let mut idat = Vec::new();
    let mut at = 8;
    while at + 8 <= small.len() {
        let length = u32::from_be_bytes(small[at..at + 4].try_into()?) as usize;
        let kind = &small[at + 4..at + 8];
        if kind == b"IDAT" {
            idat.extend_from_slice(&small[at + 8..at + 8 + length]);
        }
        at += 12 + length;
    }
    ensure!(!idat.is_empty(), "no IDAT in the image crate's PNG");
    let mut header = Vec::new();
    header.extend_from_slice(&side.to_be_bytes());
    header.extend_from_slice(&side.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&chunk(b"IHDR", &header)?);
    out.extend_from_slice(&chunk(b"IDAT", &idat)?);
    out.extend_from_slice(&chunk(b"IEND", &[])?);
    Ok(out)
}

/// `PUT path` with a multipart form whose `file` is `bytes` (its declared type is always
/// `audio/mpeg`: the server must go by the content).
pub async fn put_image(stack: &Stack, user: &User, path: &str, bytes: &[u8]) -> Result<(u16, Value)> {
    let (content_type, body) = multipart(&[], Some(("image.bin", bytes)));
    json(
        reqwest::Client::new()
            .put(stack.url(path))
            .bearer_auth(&user.token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await?,
    )
    .await
}

/// Polls `GET path` (as `user`) until `state_field` is `ready` or `failed` (at most 60 s);
/// returns the body.
pub async fn wait_image(stack: &Stack, user: Option<&User>, path: &str, state_field: &str) -> Result<Value> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut request = client.get(stack.url(path));
        if let Some(user) = user {
            request = request.bearer_auth(&user.token);
        }
        let (status, body) = json(request.send().await?).await?;
        ensure!(status == 200, "GET {path}: {status} {body}");
        if body[state_field] == "ready" || body[state_field] == "failed" {
            return Ok(body);
        }
        ensure!(Instant::now() < deadline, "{state_field} not finished after 60 s: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One size's URL from a `large` URL.
pub fn size_url(large: &str, size: &str) -> String {
    large.replace("/large.jpg", &format!("/{size}.jpg"))
}

/// `GET url` without a session: the status, the response's headers and its body.
pub async fn fetch(stack: &Stack, url: &str) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>)> {
    let response = reqwest::Client::new().get(stack.url(url)).send().await?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.context("the body")?.to_vec();
    Ok((status, headers, bytes))
}

/// The picture a served JPEG holds.
pub fn decode(jpeg: &[u8]) -> Result<RgbImage> {
    ensure!(jpeg.starts_with(&[0xff, 0xd8, 0xff]), "not a JPEG: {:?}", &jpeg[..jpeg.len().min(8)]);
    Ok(image::load_from_memory_with_format(jpeg, ImageFormat::Jpeg)?.into_rgb8())
}

/// Whether a pixel is near `want` (JPEG is lossy).
pub fn near(got: [u8; 3], want: [u8; 3]) -> bool {
    got.iter().zip(want).all(|(g, w)| g.abs_diff(w) <= 40)
}
