//! Image variants: from an original (JPEG, PNG or WebP) to the square JPEGs Waveline serves,
//! with no network or database, so the job, the tests and the benchmark call the same code.
//!
//! 1. The format comes from the magic number (never a name or a declared type), and only the
//!    three formats are decoded.
//! 2. Decoding runs under limits: at most [`DecodeLimits::max_side`] pixels a side and
//!    [`DecodeLimits::max_pixels`] in all, read from the header before any pixel is decoded,
//!    and the decoder's allocations bounded by [`DecodeLimits::max_alloc`]. A decompression
//!    bomb (a tiny file declaring a huge image) fails `invalid_image` without allocating it.
//! 3. The EXIF orientation is applied, then the picture is flattened onto white (transparent
//!    PNG and WebP) and cropped to its centre square (exactly: nothing outside the square
//!    bleeds into its edges).
//! 4. The largest size is resized from the original (Lanczos3, `fast_image_resize`'s SIMD
//!    kernels); each smaller one from the 500×500, which is sharper than the original seen
//!    through a 100:1 kernel and many times cheaper.
//! 5. Each size is encoded as a baseline JPEG. Nothing of the original's metadata (EXIF, XMP,
//!    ICC, comments) is copied: the encoder writes pixels and a JFIF header only.

use std::io::Cursor;

use fast_image_resize as fr;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};
use waveline_media::{ImageKind, sniff_image};
use waveline_shared::images::ImageSize;

/// The JPEG quality of every size.
pub const JPEG_QUALITY: u8 = 85;

/// How large an image may be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// The longest side, in pixels.
    pub max_side: u32,
    /// Width × height.
    pub max_pixels: u64,
    /// What the decoder may allocate at once, in bytes.
    pub max_alloc: u64,
}

impl Default for DecodeLimits {
    fn default() -> DecodeLimits {
        DecodeLimits { max_side: 8192, max_pixels: 40_000_000, max_alloc: 256 * 1024 * 1024 }
    }
}

/// Why an image could not be made into its sizes.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a JPEG, PNG or WebP, by its first bytes.
    #[error("the file is not a JPEG, PNG or WebP image")]
    Unsupported,
    /// Damaged, truncated, or past the decoding limits.
    #[error("{0}")]
    Invalid(String),
    /// Ours (resizing or encoding failed): worth another try.
    #[error("{0}")]
    Internal(String),
}

impl ImageError {
    /// Stable code, recorded on the image.
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::Unsupported => "unsupported_image",
            ImageError::Invalid(_) => "invalid_image",
            ImageError::Internal(_) => "internal",
        }
    }

    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, ImageError::Internal(_))
    }
}

/// One served size, encoded.
#[derive(Debug, Clone)]
pub struct Variant {
    pub size: ImageSize,
    /// A JPEG of `size.side()` pixels square.
    pub jpeg: Vec<u8>,
}

fn invalid(err: image::ImageError) -> ImageError {
    match err {
        image::ImageError::Limits(limit) => {
            ImageError::Invalid(format!("the image is larger than Waveline decodes ({limit})"))
        }
        image::ImageError::IoError(_) => ImageError::Invalid("the image is truncated".into()),
        other => ImageError::Invalid(format!("the image cannot be decoded: {other}")),
    }
}

/// Decodes `bytes` within `limits`, applies its EXIF orientation and flattens it to RGB.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<image::RgbImage, ImageError> {
    let format = match sniff_image(bytes).ok_or(ImageError::Unsupported)? {
        ImageKind::Jpeg => ImageFormat::Jpeg,
        ImageKind::Png => ImageFormat::Png,
        ImageKind::WebP => ImageFormat::WebP,
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decode_limits = Limits::default();
    decode_limits.max_image_width = Some(limits.max_side);
    decode_limits.max_image_height = Some(limits.max_side);
    decode_limits.max_alloc = Some(limits.max_alloc);
    reader.limits(decode_limits);
    let mut decoder = reader.into_decoder().map_err(invalid)?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(ImageError::Invalid("the image has no pixels".into()));
    }
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(ImageError::Invalid(format!(
            "the image is {width}×{height} pixels, over the limit of {} megapixels",
            limits.max_pixels / 1_000_000
        )));
    }
    // A missing or unreadable orientation is no reason to refuse the picture.
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut picture = DynamicImage::from_decoder(decoder).map_err(invalid)?;
    picture.apply_orientation(orientation);
    Ok(flatten(picture))
}

/// RGB, with any transparency composited onto white.
fn flatten(picture: DynamicImage) -> image::RgbImage {
    if !picture.color().has_alpha() {
        return picture.into_rgb8();
    }
    let rgba = picture.into_rgba8();
    let (width, height) = rgba.dimensions();
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for pixel in rgba.pixels() {
        let [r, g, b, a] = pixel.0;
        let a = u32::from(a);
        for channel in [r, g, b] {
            // c·a + 255·(1 − a), rounded, in integers.
            rgb.push(((u32::from(channel) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    image::RgbImage::from_raw(width, height, rgb).unwrap_or_else(|| image::RgbImage::new(width, height))
}

/// Resizes the square `source` to `side`×`side`.
fn resize(
    resizer: &mut fr::Resizer,
    source: &fr::images::ImageRef<'_>,
    side: u32,
) -> Result<fr::images::Image<'static>, ImageError> {
    let mut target = fr::images::Image::new(side, side, fr::PixelType::U8x3);
    let options = fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
    resizer.resize(source, &mut target, &options).map_err(|err| ImageError::Internal(format!("resizing: {err}")))?;
    Ok(target)
}

/// The centre square of `picture`: the picture itself when square, else a copy of the square
/// (a crop box would let the resampling kernel read pixels beyond the square's edges).
fn centre_square(picture: &image::RgbImage) -> std::borrow::Cow<'_, [u8]> {
    let (width, height) = picture.dimensions();
    if width == height {
        return std::borrow::Cow::Borrowed(picture.as_raw());
    }
    let side = width.min(height) as usize;
    let (left, top) = ((width as usize - side) / 2, (height as usize - side) / 2);
    let stride = width as usize * 3;
    let mut square = Vec::with_capacity(side * side * 3);
    for row in picture.as_raw().chunks_exact(stride).skip(top).take(side) {
        square.extend_from_slice(&row[left * 3..(left + side) * 3]);
    }
    std::borrow::Cow::Owned(square)
}

fn encode(pixels: &[u8], side: u32) -> Result<Vec<u8>, ImageError> {
    let mut jpeg = Vec::with_capacity(side as usize * side as usize / 4 + 1024);
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, JPEG_QUALITY)
        .encode(pixels, side, side, image::ExtendedColorType::Rgb8)
        .map_err(|err| ImageError::Internal(format!("encoding a JPEG: {err}")))?;
    Ok(jpeg)
}

/// Every size of an already decoded picture: the centre square, resized, as JPEGs.
pub fn variants_of(picture: &image::RgbImage) -> Result<Vec<Variant>, ImageError> {
    let (width, height) = picture.dimensions();
    let square = width.min(height);
    let pixels = centre_square(picture);
    let source = fr::images::ImageRef::new(square, square, &pixels, fr::PixelType::U8x3)
        .map_err(|err| ImageError::Internal(format!("the decoded picture: {err}")))?;
    let mut resizer = fr::Resizer::new();
    let mut variants = Vec::with_capacity(ImageSize::ALL.len());
    let largest = ImageSize::ALL[0];
    let base = resize(&mut resizer, &source, largest.side())?;
    variants.push(Variant { size: largest, jpeg: encode(base.buffer(), largest.side())? });
    let base_ref = fr::images::ImageRef::new(base.width(), base.height(), base.buffer(), fr::PixelType::U8x3)
        .map_err(|err| ImageError::Internal(format!("the largest size: {err}")))?;
    for size in &ImageSize::ALL[1..] {
        let resized = resize(&mut resizer, &base_ref, size.side())?;
        variants.push(Variant { size: *size, jpeg: encode(resized.buffer(), size.side())? });
    }
    Ok(variants)
}

/// Every size of the image in `bytes` (see the module's steps).
pub fn variants(bytes: &[u8], limits: &DecodeLimits) -> Result<Vec<Variant>, ImageError> {
    variants_of(&decode(bytes, limits)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32, pixel: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
        let picture = image::RgbaImage::from_fn(width, height, |x, y| image::Rgba(pixel(x, y)));
        let mut bytes = Vec::new();
        picture.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png).expect("png");
        bytes
    }

    #[test]
    fn every_size_is_a_square_jpeg_of_the_centre() {
        // 300×120: a red band left and right of a green centre square.
        let bytes = png(300, 120, |x, _| if (90..210).contains(&x) { [0, 200, 0, 255] } else { [200, 0, 0, 255] });
        let made = variants(&bytes, &DecodeLimits::default()).expect("variants");
        assert_eq!(made.iter().map(|v| v.size).collect::<Vec<_>>(), ImageSize::ALL);
        for variant in &made {
            assert_eq!(&variant.jpeg[..3], &[0xff, 0xd8, 0xff]);
            let decoded = image::load_from_memory(&variant.jpeg).expect("decodes").into_rgb8();
            assert_eq!(decoded.dimensions(), (variant.size.side(), variant.size.side()));
            // Only the green square is left: every corner is green.
            let last = variant.size.side() - 1;
            for (x, y) in [(0, 0), (last, 0), (0, last), (last, last)] {
                let [r, g, _] = decoded.get_pixel(x, y).0;
                assert!(g > 150 && r < 60, "{:?} at {x},{y}: {r} {g}", variant.size);
            }
        }
    }

    #[test]
    fn transparency_becomes_white() {
        let bytes = png(40, 40, |_, _| [0, 0, 0, 0]);
        let made = variants(&bytes, &DecodeLimits::default()).expect("variants");
        let decoded = image::load_from_memory(&made[4].jpeg).expect("decodes").into_rgb8();
        assert!(decoded.pixels().all(|p| p.0.iter().all(|c| *c > 245)), "{:?}", decoded.get_pixel(0, 0));
    }

    #[test]
    fn refusals_have_codes() {
        let not_an_image = variants(b"ID3\x04\0\0\0\0\0\0 an mp3", &DecodeLimits::default()).expect_err("refused");
        assert_eq!(not_an_image.code(), "unsupported_image");
        let truncated = png(64, 64, |_, _| [1, 2, 3, 255]);
        let err = variants(&truncated[..truncated.len() / 2], &DecodeLimits::default()).expect_err("refused");
        assert_eq!(err.code(), "invalid_image");
        let big = png(200, 100, |_, _| [1, 2, 3, 255]);
        let limits = DecodeLimits { max_side: 150, ..DecodeLimits::default() };
        assert_eq!(variants(&big, &limits).expect_err("refused").code(), "invalid_image");
        let limits = DecodeLimits { max_pixels: 10_000, ..DecodeLimits::default() };
        assert_eq!(variants(&big, &limits).expect_err("refused").code(), "invalid_image");
        assert!(
            ImageError::Invalid(String::new()).is_permanent() && !ImageError::Internal(String::new()).is_permanent()
        );
    }
}
