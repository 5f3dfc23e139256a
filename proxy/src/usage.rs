//! Reading token usage from what a backend sent: `usage` in a JSON body, or, in
//! an SSE stream, the final usage chunk, else the streamed text counted.

use axum::http::{header, HeaderMap};
use gateway_core::Usage;
use serde_json::Value;
use std::io::{Read, Write};

/// A body's content coding (its `Content-Encoding`), as far as reading its
/// usage goes. The proxy asks backends for `identity`; a backend that
/// compresses anyway (behind a CDN or another gateway) is read through gzip
/// and deflate, the codings HTTP servers use. Any other coding, or several
/// applied in turn, cannot be read: its usage is unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    /// RFC 9110's `deflate`: the zlib format.
    Deflate,
    Unreadable,
}

impl Coding {
    pub fn of(headers: &HeaderMap) -> Coding {
        let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
        let Some(value) = values.next() else { return Coding::Identity };
        if values.next().is_some() {
            return Coding::Unreadable;
        }
        let name = value.to_str().unwrap_or("?").trim();
        let is = |coding: &str| name.eq_ignore_ascii_case(coding);
        match () {
            () if name.is_empty() || is("identity") => Coding::Identity,
            () if is("gzip") || is("x-gzip") => Coding::Gzip,
            () if is("deflate") => Coding::Deflate,
            () => Coding::Unreadable,
        }
    }
}

/// A body whose usage cannot be read: its coding is not one the proxy
/// decodes, it does not decode, or it decodes to more than the proxy reads.
#[derive(Debug, PartialEq, Eq)]
pub struct Unreadable;

/// Why a body could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// A coding the proxy does not decode.
    Coding,
    /// The bytes are not what the coding says.
    Corrupt,
    /// It decodes to more than the limit.
    TooLarge,
}

/// `body` decoded from `coding`, if it decodes to at most `limit` bytes.
pub fn decode(coding: Coding, body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut decoded = Vec::new();
    let take = limit as u64 + 1;
    let read = match coding {
        Coding::Identity if body.len() <= limit => return Ok(body.to_vec()),
        Coding::Identity => return Err(DecodeError::TooLarge),
        Coding::Gzip => flate2::read::MultiGzDecoder::new(body).take(take).read_to_end(&mut decoded),
        Coding::Deflate => flate2::read::ZlibDecoder::new(body).take(take).read_to_end(&mut decoded),
        Coding::Unreadable => return Err(DecodeError::Coding),
    };
    match read {
        Ok(n) if n <= limit => Ok(decoded),
        Ok(_) => Err(DecodeError::TooLarge),
        Err(_) => Err(DecodeError::Corrupt),
    }
}

/// `usage` of a buffered body sent in `coding` (`None` when it has none),
/// reading at most `limit` decoded bytes.
pub fn from_body(coding: Coding, body: &[u8], limit: usize) -> Result<Option<Usage>, Unreadable> {
    if coding == Coding::Identity {
        return Ok(from_json(body));
    }
    decode(coding, body, limit).map(|decoded| from_json(&decoded)).map_err(|_| Unreadable)
}

/// A stream's decoder, fed the coded bytes; what it decodes waits in its `Vec`.
enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    fn new(coding: Coding) -> Option<Decoder> {
        match coding {
            Coding::Gzip => Some(Decoder::Gzip(flate2::write::MultiGzDecoder::new(Vec::new()))),
            Coding::Deflate => Some(Decoder::Deflate(flate2::write::ZlibDecoder::new(Vec::new()))),
            Coding::Identity | Coding::Unreadable => None,
        }
    }

    /// Decodes `chunk`; the bytes decoded so far are taken from `decoded`.
    fn decode(&mut self, chunk: &[u8], decoded: &mut Vec<u8>) -> std::io::Result<()> {
        // Flushed after each chunk: the decoders hold what they decode until
        // the next write otherwise, and a stream's `[DONE]` must be seen when
        // it arrives.
        let output = match self {
            Decoder::Gzip(d) => {
                d.write_all(chunk)?;
                d.flush()?;
                d.get_mut()
            }
            Decoder::Deflate(d) => {
                d.write_all(chunk)?;
                d.flush()?;
                d.get_mut()
            }
        };
        decoded.clear();
        std::mem::swap(output, decoded);
        Ok(())
    }
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Decoder::Gzip(_) => "Decoder::Gzip",
            Decoder::Deflate(_) => "Decoder::Deflate",
        })
    }
}

/// `usage` of a JSON response body, if it has one; the rest of the body is
/// skipped, not built.
pub fn from_json(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Body {
        usage: Option<Counts>,
    }
    #[derive(serde::Deserialize)]
    struct Counts {
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    let usage = serde_json::from_slice::<Body>(body).ok()?.usage?;
    Some(Usage { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens })
}

fn usage_of(value: &Value) -> Option<Usage> {
    usage_of_counts(value.get("usage")?)
}

/// Follows an SSE stream chunk by chunk, without holding its events: keeps the
/// partial last line, the usage chunk when one comes, and the streamed text
/// (the content alone, a fraction of the stream's bytes). The text
/// is counted only if the stream ends without a usage chunk: most streams end
/// with one, and the tokenizer is the dearest part of following a stream.
#[derive(Debug)]
pub struct StreamTracker {
    model: String,
    partial: Vec<u8>,
    usage: Option<Usage>,
    /// The streamed pieces of text, one after the other; `ends` marks where each
    /// ends. Each piece is counted on its own, as the stream delivered it.
    text: String,
    ends: Vec<usize>,
    /// Whether the stream's `data: [DONE]` has come: the client has had all
    /// it asked for.
    done: bool,
    /// The stream's decoder, when its backend compressed it.
    decoder: Option<Decoder>,
    decoded: Vec<u8>,
    /// Whether the stream's coding is one the proxy cannot read, or its bytes
    /// did not decode: nothing more of it is read.
    unreadable: bool,
}

impl StreamTracker {
    pub fn new(model: &str) -> StreamTracker {
        StreamTracker::with_coding(model, Coding::Identity)
    }

    /// A tracker of a stream sent in `coding`.
    pub fn with_coding(model: &str, coding: Coding) -> StreamTracker {
        StreamTracker {
            model: model.to_owned(),
            partial: Vec::new(),
            usage: None,
            text: String::new(),
            ends: Vec::new(),
            done: false,
            decoder: Decoder::new(coding),
            decoded: Vec::new(),
            unreadable: coding == Coding::Unreadable,
        }
    }

    /// Whether the stream could not be read (see [`Coding`]): its usage is
    /// then the prompt alone.
    pub fn unreadable(&self) -> bool {
        self.unreadable
    }

    /// Marks the body unreadable (a buffered body that did not decode): its
    /// usage is the prompt alone.
    pub fn give_up(&mut self) {
        self.unreadable = true;
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        if self.unreadable {
            return;
        }
        let Some(decoder) = self.decoder.as_mut() else { return self.feed_plain(chunk) };
        let mut decoded = std::mem::take(&mut self.decoded);
        match decoder.decode(chunk, &mut decoded) {
            Ok(()) => self.feed_plain(&decoded),
            Err(_) => self.unreadable = true,
        }
        self.decoded = decoded;
    }

    fn feed_plain(&mut self, chunk: &[u8]) {
        let mut rest = chunk;
        if !self.partial.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                self.partial.extend_from_slice(rest);
                return;
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&rest[..=end]);
            self.line(&line);
            line.clear();
            self.partial = line;
            rest = &rest[end + 1..];
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            self.line(&rest[..=end]);
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
    }

    fn line(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else { return };
        let data = data.trim_ascii();
        self.done |= data == b"[DONE]";
        if data.is_empty() || self.done {
            return;
        }
        // The fields read, parsed in place; an event of another shape is read
        // as a generic value, so that nothing it holds is missed.
        match serde_json::from_slice::<Event<'_>>(data) {
            Ok(event) => self.event(event),
            Err(_) => self.value(data),
        }
    }

    fn event(&mut self, event: Event<'_>) {
        if let Some(usage) = event.usage.as_ref().and_then(usage_of_counts) {
            self.usage = Some(usage);
        }
        for choice in event.choices {
            // A `delta.content` that is there, even null, is the choice's text.
            let text = match choice.delta.and_then(|d| d.content) {
                Some(content) => content,
                None => choice.text,
            };
            self.push_text(text.as_deref());
        }
    }

    fn value(&mut self, data: &[u8]) {
        let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
        if let Some(usage) = usage_of(&value) {
            self.usage = Some(usage);
        }
        for choice in value.get("choices").and_then(Value::as_array).into_iter().flatten() {
            let text = choice.pointer("/delta/content").or_else(|| choice.get("text")).and_then(Value::as_str);
            self.push_text(text);
        }
    }

    fn push_text(&mut self, text: Option<&str>) {
        let Some(text) = text.filter(|t| !t.is_empty()) else { return };
        self.text.push_str(text);
        self.ends.push(self.text.len());
    }

    /// Whether the stream's last event, `data: [DONE]`, has been fed.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The usage to charge: the stream's own usage chunk, else the prompt as
    /// counted before forwarding plus the completion tokens streamed so far.
    pub fn usage(&self, prompt_tokens: u64) -> Usage {
        if let Some(usage) = self.usage {
            return usage;
        }
        let mut completion_tokens = 0u64;
        let mut start = 0;
        for &end in &self.ends {
            completion_tokens = completion_tokens.saturating_add(tokenizer::count(&self.model, &self.text[start..end]));
            start = end;
        }
        Usage { prompt_tokens, completion_tokens }
    }
}

/// The fields of a stream event that the tracker reads.
#[derive(serde::Deserialize)]
struct Event<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Value>,
}

#[derive(serde::Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default, borrow)]
    text: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct Delta<'a> {
    /// `Some(None)`: the field is there and null.
    #[serde(default, borrow, deserialize_with = "present")]
    content: Option<Option<std::borrow::Cow<'a, str>>>,
}

fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

fn usage_of_counts(usage: &Value) -> Option<Usage> {
    let prompt = usage.get("prompt_tokens")?.as_u64()?;
    let completion = usage.get("completion_tokens").and_then(Value::as_u64).unwrap_or(0);
    Some(Usage { prompt_tokens: prompt, completion_tokens: completion })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compressed(coding: Coding, body: &[u8]) -> Vec<u8> {
        let level = flate2::Compression::default();
        match coding {
            Coding::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), level);
                encoder.write_all(body).unwrap();
                encoder.finish().unwrap()
            }
            Coding::Deflate => {
                let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), level);
                encoder.write_all(body).unwrap();
                encoder.finish().unwrap()
            }
            Coding::Identity | Coding::Unreadable => body.to_vec(),
        }
    }

    fn headers(codings: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for coding in codings {
            headers.append(header::CONTENT_ENCODING, coding.parse().unwrap());
        }
        headers
    }

    #[test]
    fn codings_are_read_from_content_encoding() {
        let check =
            |codings: &[&str], expected: Coding| assert_eq!(Coding::of(&headers(codings)), expected, "{codings:?}");
        check(&[], Coding::Identity);
        check(&["identity"], Coding::Identity);
        check(&["gzip"], Coding::Gzip);
        check(&["GZip "], Coding::Gzip);
        check(&["x-gzip"], Coding::Gzip);
        check(&["deflate"], Coding::Deflate);
        check(&["br"], Coding::Unreadable);
        check(&["zstd"], Coding::Unreadable);
        // Two codings applied in turn, in one field or two: not read.
        check(&["gzip, br"], Coding::Unreadable);
        check(&["gzip", "gzip"], Coding::Unreadable);
    }

    #[test]
    fn buffered_bodies_are_read_through_their_coding_within_a_limit() {
        let body = br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#;
        let usage = Some(Usage { prompt_tokens: 5, completion_tokens: 2 });
        for coding in [Coding::Identity, Coding::Gzip, Coding::Deflate] {
            assert_eq!(from_body(coding, &compressed(coding, body), 1 << 20), Ok(usage), "{coding:?}");
            // Decoded past the limit (a decompression bomb, say): not read.
            let limit = if coding == Coding::Identity { 1 << 20 } else { body.len() - 1 };
            let want = if coding == Coding::Identity { Ok(usage) } else { Err(Unreadable) };
            assert_eq!(from_body(coding, &compressed(coding, body), limit), want, "{coding:?}");
        }
        assert_eq!(from_body(Coding::Gzip, &compressed(Coding::Gzip, b"{}"), 100), Ok(None));
        assert_eq!(from_body(Coding::Gzip, body, 1 << 20), Err(Unreadable), "not gzip at all");
        assert_eq!(from_body(Coding::Deflate, &compressed(Coding::Gzip, body), 1 << 20), Err(Unreadable));
        assert_eq!(from_body(Coding::Unreadable, body, 1 << 20), Err(Unreadable));
        // A compressed stream that breaks off is given up, and so is one in a
        // coding not read; the prompt alone is charged.
        let mut t = StreamTracker::with_coding("gpt-4o", Coding::Gzip);
        t.feed(b"data: not gzip at all\n\n");
        assert!(t.unreadable());
        assert_eq!(t.usage(7), Usage { prompt_tokens: 7, completion_tokens: 0 });
        let mut t = StreamTracker::with_coding("gpt-4o", Coding::Unreadable);
        t.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\n\n");
        assert!(t.unreadable());
        assert_eq!(t.usage(7), Usage { prompt_tokens: 7, completion_tokens: 0 });
    }

    #[test]
    fn usage_chunks_win_and_text_is_counted_otherwise() {
        let mut t = StreamTracker::new("gpt-4o");
        t.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"The\"}}]}\n\nda");
        t.feed(b"ta: {\"choices\":[{\"delta\":{\"content\":\" quick brown\"}}]}\n\n");
        assert_eq!(t.usage(7), Usage { prompt_tokens: 7, completion_tokens: 3 });
        t.feed(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}\n\ndata: [DO");
        assert!(!t.done(), "`[DONE]` is not complete yet");
        t.feed(b"NE]\n\n");
        assert!(t.done(), "the stream's last event has come");
        assert_eq!(t.usage(7), Usage { prompt_tokens: 9, completion_tokens: 4 });
        assert_eq!(
            from_json(br#"{"usage":{"prompt_tokens":5,"completion_tokens":2}}"#),
            Some(Usage { prompt_tokens: 5, completion_tokens: 2 })
        );
        assert_eq!(from_json(b"not json"), None);
    }

    /// The tracker as first written: every event parsed as a generic value and
    /// its text counted at once. The tracker must charge what it charged.
    fn reference(model: &str, stream: &[u8], prompt: u64) -> Usage {
        let (mut usage, mut completion) = (None, 0u64);
        for line in stream.split(|b| *b == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            let data = std::str::from_utf8(data).unwrap_or("").trim();
            let Ok(value) = serde_json::from_str::<Value>(data) else { continue };
            usage = usage_of(&value).or(usage);
            for choice in value.get("choices").and_then(Value::as_array).into_iter().flatten() {
                let text = choice.pointer("/delta/content").or_else(|| choice.get("text")).and_then(Value::as_str);
                if let Some(text) = text.filter(|t| !t.is_empty()) {
                    completion += tokenizer::count(model, text);
                }
            }
        }
        usage.unwrap_or(Usage { prompt_tokens: prompt, completion_tokens: completion })
    }

    /// Feeds `events` as one SSE stream split at every byte, and in one piece,
    /// and checks the charge against the reference and the expected figures.
    fn check(events: &[&str], expected: (u64, u64)) {
        let stream: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        let stream = stream.as_bytes();
        let want = Usage { prompt_tokens: expected.0, completion_tokens: expected.1 };
        assert_eq!(reference("gpt-4o", stream, 7), want, "reference on {events:?}");
        for split in 0..=stream.len() {
            let mut t = StreamTracker::new("gpt-4o");
            t.feed(&stream[..split]);
            t.feed(&stream[split..]);
            assert_eq!(t.usage(7), want, "{events:?} split at {split}");
        }
        // The same stream compressed by a backend that was not asked to.
        for coding in [Coding::Gzip, Coding::Deflate] {
            let coded = compressed(coding, stream);
            for split in 0..=coded.len() {
                let mut t = StreamTracker::with_coding("gpt-4o", coding);
                t.feed(&coded[..split]);
                t.feed(&coded[split..]);
                assert_eq!(t.usage(7), want, "{coding:?} {events:?} split at {split}");
                assert!(!t.unreadable());
            }
        }
    }

    #[test]
    fn the_tracker_charges_what_a_generic_reading_charges() {
        check(
            &[r#"{"choices":[{"delta":{"content":"The"}}]}"#, r#"{"choices":[{"delta":{"content":" quick brown"}}]}"#],
            (7, 3),
        );
        // A null content is no text, even beside a `text` field.
        check(&[r#"{"choices":[{"delta":{"content":null},"text":"ignored words"}]}"#], (7, 0));
        // Legacy completions stream `text`; a null delta falls back to it.
        check(&[r#"{"choices":[{"text":"Hello there"}]}"#, r#"{"choices":[{"delta":null,"text":" you"}]}"#], (7, 3));
        // Events of an odd shape are read generically, not dropped.
        check(&[r#"{"choices":{"not":"a list"},"usage":{"prompt_tokens":3,"completion_tokens":2}}"#], (3, 2));
        check(&[r#"{"choices":[{"delta":{"content":5}}]}"#, r#"{"choices":[{"delta":{"content":"Hi"}}]}"#], (7, 1));
        // A null usage, a usage without prompt tokens and a broken event change nothing.
        check(
            &[
                r#"{"choices":[{"delta":{"content":"Hi"}}],"usage":null}"#,
                r#"{"usage":{"completion_tokens":9}}"#,
                "{broken",
            ],
            (7, 1),
        );
        // The last usage chunk wins over the text.
        check(
            &[
                r#"{"choices":[{"delta":{"content":"Hi"}}]}"#,
                r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":4}}"#,
                "[DONE]",
            ],
            (9, 4),
        );
        check(
            &[r#"{"choices":[{"delta":{"content":"caf\u00e9 \"quoted\""}}]}"#],
            (7, tokenizer::count("gpt-4o", "café \"quoted\"")),
        );
    }
}
