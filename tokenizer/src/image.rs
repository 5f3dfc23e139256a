//! The prompt tokens of image inputs, by the rules OpenAI publishes for its
//! vision models ("Images and vision", calculating costs): most models cover
//! the image, scaled, with 512-pixel tiles (a base cost plus a cost per tile);
//! the small ones of the newer families count 32-pixel patches. The size of an
//! image sent inline (a `data:` URL) is read from its header; an image by URL or
//! by file id, whose size the proxy cannot know without fetching it, counts as
//! the least it can cost at its detail.

use base64::Engine;
use serde_json::Value;

/// How closely the model looks: `low` costs the base alone; `high` and `auto`
/// (which the service may take as either) cost by size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    Low,
    High,
}

/// A model family's rule.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Rule {
    Tiles { base: u64, tile: u64 },
    Patches { multiplier: f64 },
}

fn rule(model: &str) -> Rule {
    let m = model.to_ascii_lowercase();
    let patches = |multiplier| Rule::Patches { multiplier };
    match () {
        _ if m.starts_with("gpt-4.1-mini") || m.starts_with("gpt-5-mini") => patches(1.62),
        _ if m.starts_with("gpt-4.1-nano") || m.starts_with("gpt-5-nano") => patches(2.46),
        _ if m.starts_with("o4-mini") => patches(1.72),
        _ if m.starts_with("gpt-4o-mini") => Rule::Tiles { base: 2833, tile: 5667 },
        _ if m.starts_with("o1") || (m.starts_with("o3") && !m.starts_with("o3-mini")) => {
            Rule::Tiles { base: 75, tile: 150 }
        }
        _ if m.starts_with("gpt-5") => Rule::Tiles { base: 70, tile: 140 },
        _ => Rule::Tiles { base: 85, tile: 170 },
    }
}

/// The most patches an image is covered with; a larger one is scaled down.
const MAX_PATCHES: f64 = 1536.0;

/// The tokens of one image of `size` (width, height in pixels; `None` when
/// unknown) at `detail`.
pub fn image_tokens(model: &str, size: Option<(u32, u32)>, detail: Detail) -> u64 {
    match (rule(model), detail, size) {
        (Rule::Tiles { base, .. }, Detail::Low, _) => base,
        (Rule::Tiles { base, tile }, Detail::High, None) => base + tile,
        (Rule::Tiles { base, tile }, Detail::High, Some((w, h))) => base + tile * tiles(w, h),
        (Rule::Patches { multiplier }, _, size) => {
            let (w, h) = size.unwrap_or((1, 1));
            (patches(w, h) as f64 * multiplier).ceil() as u64
        }
    }
}

/// 512-pixel tiles covering the image once scaled to fit a 2048-pixel square,
/// then down to 768 pixels on its shorter side.
fn tiles(width: u32, height: u32) -> u64 {
    let (mut w, mut h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let longest = w.max(h);
    if longest > 2048.0 {
        (w, h) = (w * 2048.0 / longest, h * 2048.0 / longest);
    }
    let shortest = w.min(h);
    if shortest > 768.0 {
        (w, h) = (w * 768.0 / shortest, h * 768.0 / shortest);
    }
    (w / 512.0).ceil() as u64 * (h / 512.0).ceil() as u64
}

/// 32-pixel patches covering the image, scaled down (keeping its aspect and
/// whole patches) when more than 1536 would be needed.
fn patches(width: u32, height: u32) -> u64 {
    let (w, h) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let cover = |w: f64, h: f64| (w / 32.0).ceil() * (h / 32.0).ceil();
    if cover(w, h) <= MAX_PATCHES {
        return cover(w, h) as u64;
    }
    let shrink = (32.0 * 32.0 * MAX_PATCHES / (w * h)).sqrt();
    let whole = |side: f64| (side * shrink / 32.0).floor() / (side * shrink / 32.0);
    let scale = shrink * whole(w).min(whole(h));
    // An image of an extreme aspect can round to no whole patch at all.
    cover(w * scale, h * scale).clamp(1.0, MAX_PATCHES) as u64
}

/// The tokens of a message's content part if it is an image: chat's
/// `{"type": "image_url", "image_url": {"url", "detail"}}` or the Responses
/// API's `{"type": "input_image", "image_url", "detail"}`.
pub fn part_tokens(model: &str, part: &Value) -> Option<u64> {
    let kind = part.get("type").and_then(Value::as_str)?;
    if kind != "image_url" && kind != "input_image" {
        return None;
    }
    let image = part.get("image_url");
    let url = image.and_then(|i| i.as_str().or_else(|| i.get("url")?.as_str()));
    let detail = image.and_then(|i| i.get("detail")).or_else(|| part.get("detail")).and_then(Value::as_str);
    let detail = if detail == Some("low") { Detail::Low } else { Detail::High };
    Some(image_tokens(model, url.and_then(data_url_size), detail))
}

/// The size of an image sent inline, as `data:image/...;base64,...`.
pub fn data_url_size(url: &str) -> Option<(u32, u32)> {
    let (header, data) = url.strip_prefix("data:")?.split_once(',')?;
    if !header.ends_with(";base64") {
        return None;
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(data.trim()).ok()?;
    image_size(&bytes)
}

/// An image's width and height from its header: PNG, GIF, JPEG or WebP.
pub fn image_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let be16 = |at: usize| Some(u32::from(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?)));
    let le16 = |at: usize| Some(u32::from(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?)));
    let be32 = |at: usize| Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") {
        return Some((be32(16)?, be32(20)?));
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return Some((le16(6)?, le16(8)?));
    }
    if bytes.starts_with(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        return webp_size(bytes);
    }
    if bytes.starts_with(&[0xff, 0xd8]) {
        return jpeg_size(bytes, be16);
    }
    None
}

/// A JPEG's size, from its first start-of-frame segment.
fn jpeg_size(bytes: &[u8], be16: impl Fn(usize) -> Option<u32>) -> Option<(u32, u32)> {
    let mut at = 2;
    loop {
        // Markers may be padded with any number of 0xff bytes.
        while bytes.get(at) == Some(&0xff) && bytes.get(at + 1) == Some(&0xff) {
            at += 1;
        }
        if *bytes.get(at)? != 0xff {
            return None;
        }
        let marker = *bytes.get(at + 1)?;
        if (0xd0..=0xd9).contains(&marker) || marker == 0x01 {
            at += 2;
            continue;
        }
        let start_of_frame = (0xc0..=0xcf).contains(&marker) && ![0xc4, 0xc8, 0xcc].contains(&marker);
        if start_of_frame {
            return Some((be16(at + 7)?, be16(at + 5)?));
        }
        at += 2 + be16(at + 2)? as usize;
    }
}

/// A WebP's size, from its first chunk: lossy (`VP8 `), lossless (`VP8L`) or
/// extended (`VP8X`).
fn webp_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let byte = |at: usize| bytes.get(at).copied().map(u32::from);
    let le16 = |at: usize| Some(byte(at)? | byte(at + 1)? << 8);
    match bytes.get(12..16)? {
        // The frame tag (3 bytes) and start code (3) come first.
        b"VP8 " => Some((le16(26)? & 0x3fff, le16(28)? & 0x3fff)),
        b"VP8L" => {
            let (b0, b1, b2, b3) = (byte(21)?, byte(22)?, byte(23)?, byte(24)?);
            Some((1 + (b0 | (b1 & 0x3f) << 8), 1 + (b1 >> 6 | b2 << 2 | (b3 & 0x0f) << 10)))
        }
        b"VP8X" => {
            let u24 = |at: usize| Some(byte(at)? | byte(at + 1)? << 8 | byte(at + 2)? << 16);
            Some((1 + u24(24)?, 1 + u24(27)?))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tiles_follow_the_published_examples() {
        let check = |model: &str, size, detail, expected: u64| {
            assert_eq!(image_tokens(model, size, detail), expected, "{model} {size:?} {detail:?}");
        };
        // OpenAI's worked examples for gpt-4o.
        check("gpt-4o", Some((1024, 1024)), Detail::High, 765);
        check("gpt-4o", Some((2048, 4096)), Detail::High, 1105);
        check("gpt-4o", Some((4096, 8192)), Detail::Low, 85);
        check("gpt-4o", Some((500, 500)), Detail::High, 255);
        check("gpt-4o", Some((513, 500)), Detail::High, 425);
        check("gpt-4", Some((513, 513)), Detail::High, 765);
        check("gpt-4o-mini", Some((1024, 1024)), Detail::High, 2833 + 4 * 5667);
        check("gpt-4o-mini", None, Detail::Low, 2833);
        check("o1", Some((1024, 1024)), Detail::High, 75 + 4 * 150);
        // An image whose size is unknown costs the least it can: one tile.
        check("gpt-4o", None, Detail::High, 255);
        // Patches: the published 1024 x 1024 and 1800 x 2400 examples (1,024 and
        // 1,452 patches), times the model's multiplier.
        check("gpt-4.1-mini", Some((1024, 1024)), Detail::High, 1659);
        check("gpt-4.1-nano", Some((1800, 2400)), Detail::High, (1452.0f64 * 2.46).ceil() as u64);
        check("o4-mini", Some((1800, 2400)), Detail::Low, (1452.0f64 * 1.72).ceil() as u64);
    }

    #[test]
    fn patches_never_exceed_the_cap() {
        for (w, h) in [(1, 1), (32, 32), (33, 33), (2048, 768), (2049, 768), (10000, 10000), (1, 100_000), (1800, 2400)]
        {
            let n = patches(w, h);
            assert!((1..=1536).contains(&n), "{w} x {h}: {n}");
        }
        assert_eq!(patches(1800, 2400), 1452);
        assert_eq!(patches(2048, 768), 1536);
    }

    /// Minimal headers of each format, for a 300 x 200 image.
    fn headers() -> Vec<(&'static str, Vec<u8>)> {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend(300u32.to_be_bytes());
        png.extend(200u32.to_be_bytes());
        let mut gif = b"GIF89a".to_vec();
        gif.extend(300u16.to_le_bytes());
        gif.extend(200u16.to_le_bytes());
        // SOI, an APP0 segment of 16 bytes, fill bytes, then SOF2 (progressive).
        let mut jpeg = vec![0xff, 0xd8, 0xff, 0xe0, 0, 16];
        jpeg.extend([0u8; 14]);
        jpeg.extend([0xff, 0xff, 0xc2, 0, 17, 8]);
        jpeg.extend(200u16.to_be_bytes());
        jpeg.extend(300u16.to_be_bytes());
        let webp = |chunk: &[u8], payload: &[u8]| {
            let mut b = b"RIFF\0\0\0\0WEBP".to_vec();
            b.extend(chunk);
            b.extend(payload);
            b
        };
        let mut lossy = vec![0u8; 10];
        lossy.extend(300u16.to_le_bytes());
        lossy.extend(200u16.to_le_bytes());
        // Lossless: 14 bits of width - 1, then 14 bits of height - 1, after the signature byte.
        let bits: u32 = 299 | 199 << 14;
        let mut lossless = vec![0u8; 4];
        lossless.push(0x2f);
        lossless.extend(bits.to_le_bytes());
        let mut extended = vec![0u8; 8];
        extended.extend(&299u32.to_le_bytes()[..3]);
        extended.extend(&199u32.to_le_bytes()[..3]);
        vec![
            ("png", png),
            ("gif", gif),
            ("jpeg", jpeg),
            ("webp lossy", webp(b"VP8 ", &lossy)),
            ("webp lossless", webp(b"VP8L", &lossless)),
            ("webp extended", webp(b"VP8X", &extended)),
        ]
    }

    #[test]
    fn sizes_are_read_from_each_formats_header() {
        for (format, bytes) in headers() {
            assert_eq!(image_size(&bytes), Some((300, 200)), "{format}");
            let url = format!("data:image/x;base64,{}", base64::engine::general_purpose::STANDARD.encode(&bytes));
            assert_eq!(data_url_size(&url), Some((300, 200)), "{format}");
            // Cut short anywhere, a header gives no size, and nothing panics.
            for cut in 0..bytes.len() - 1 {
                let _ = image_size(&bytes[..cut]);
            }
        }
        assert_eq!(image_size(b"plain text"), None);
        assert_eq!(data_url_size("https://example.com/cat.png"), None);
        assert_eq!(data_url_size("data:image/png;base64,not base64!"), None);
        assert_eq!(data_url_size("data:text/plain,hello"), None);
    }

    #[test]
    fn image_parts_of_either_api_are_counted() {
        let png = &headers()[0].1;
        let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(png));
        let check = |part: Value, expected: Option<u64>| assert_eq!(part_tokens("gpt-4o", &part), expected, "{part}");
        // 300 x 200 is one tile.
        check(json!({"type": "image_url", "image_url": {"url": url}}), Some(255));
        check(json!({"type": "image_url", "image_url": {"url": url, "detail": "low"}}), Some(85));
        check(json!({"type": "input_image", "image_url": url, "detail": "high"}), Some(255));
        check(json!({"type": "input_image", "file_id": "file-1", "detail": "low"}), Some(85));
        check(json!({"type": "text", "text": "hi"}), None);
    }

    proptest::proptest! {
        /// Whatever follows a format's signature, reading its size ends, and
        /// every image costs at least its base and at most the most its rule allows.
        #[test]
        fn any_header_is_read_without_panicking(format in 0..4usize, rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let signature: &[u8] = [&b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR"[..], b"GIF89a", b"RIFF\0\0\0\0WEBPVP8X", &[0xff, 0xd8]][format];
            let bytes = [signature, &rest].concat();
            let size = image_size(&bytes);
            for model in ["gpt-4o", "gpt-4o-mini", "gpt-4.1-nano"] {
                let tokens = image_tokens(model, size, Detail::High);
                let most = match rule(model) {
                    Rule::Tiles { base, tile } => base + 8 * tile,
                    Rule::Patches { multiplier } => (1536.0 * multiplier).ceil() as u64,
                };
                proptest::prop_assert!((1..=most).contains(&tokens), "{model} {size:?}: {tokens}");
            }
        }
    }
}
