//! Log probabilities of the text the mock writes, when a request asks for them
//! (chat's `logprobs` and `top_logprobs`, a legacy completion's `logprobs`).
//!
//! They are made up but consistent: the written token is always the likeliest
//! (a probability from 0.65 to 0.95, by its place), the alternatives follow in
//! falling order, and together they never exceed one. The same request gets
//! the same figures.

use serde_json::{json, Map, Value};

/// Most alternatives chat's `top_logprobs` may ask for.
pub const MAX_TOP_CHAT: u64 = 20;

/// Most alternatives a legacy completion's `logprobs` may ask for.
pub const MAX_TOP_COMPLETIONS: u64 = 5;

/// Tokens offered as the alternatives of a written one.
const ALTERNATIVES: [&str; 20] = [
    " A", " This", " It", " We", " I", " Here", " Sure", " Yes", " No", " One", " Two", " In", " On", " At", " For",
    " With", " By", " As", " If", " So",
];

/// The likeliest tokens at place `i`, where `piece` was written: the piece
/// first, then `top - 1` alternatives, each with its log probability.
fn ranked(piece: &str, i: u64, top: u64) -> Vec<(String, f64)> {
    let chosen = 0.95 - 0.05 * (i % 7) as f64;
    let mut ranked = vec![(piece.to_owned(), chosen.ln())];
    let others = ALTERNATIVES.iter().cycle().skip((i % ALTERNATIVES.len() as u64) as usize);
    let others = others.filter(|t| **t != piece).take(top.saturating_sub(1) as usize);
    for (k, token) in others.enumerate() {
        // Halving shares of what the written token leaves: always less likely, summing under one.
        ranked.push(((*token).to_owned(), ((1.0 - chosen) * 0.5f64.powi(k as i32 + 1)).ln()));
    }
    ranked
}

/// Chat's entry for the piece written at place `i`, with `top` alternatives.
pub fn chat_entry(piece: &str, i: u64, top: u64) -> Value {
    let token =
        |(token, logprob): &(String, f64)| json!({ "token": token, "logprob": logprob, "bytes": token.as_bytes() });
    let ranked = ranked(piece, i, top.max(1));
    let mut entry = token(&ranked[0]);
    entry["top_logprobs"] = json!(ranked.iter().take(top as usize).map(token).collect::<Vec<_>>());
    entry
}

/// A chat choice's `logprobs` for the pieces written, from place `first` on;
/// `content` is null for a choice that writes no content (a call).
pub fn chat(pieces: Option<&[&str]>, first: u64, top: u64) -> Value {
    let content = pieces.map(|pieces| {
        let entries = pieces.iter().zip(first..).map(|(piece, i)| chat_entry(piece, i, top));
        entries.collect::<Vec<_>>()
    });
    json!({ "content": content, "refusal": null })
}

/// A legacy completion choice's `logprobs` for the pieces written from place
/// `first` on, the first of them at character `offset` of the text.
pub fn completions(pieces: &[&str], first: u64, top: u64, offset: usize) -> Value {
    let mut offsets = Vec::with_capacity(pieces.len());
    let mut at = offset;
    for piece in pieces {
        offsets.push(at);
        at += piece.chars().count();
    }
    let ranked: Vec<Vec<(String, f64)>> = pieces.iter().zip(first..).map(|(p, i)| ranked(p, i, top.max(1))).collect();
    let tops =
        ranked.iter().map(|r| r.iter().take(top as usize).map(|(t, lp)| (t.clone(), json!(lp))).collect::<Map<_, _>>());
    json!({
        "tokens": pieces,
        "token_logprobs": ranked.iter().map(|r| r[0].1).collect::<Vec<_>>(),
        "top_logprobs": tops.collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_token_is_likeliest_and_the_rest_fall_and_sum_under_one() {
        for i in 0..40 {
            for top in 1..=MAX_TOP_CHAT {
                let ranked = ranked(" the", i, top);
                assert_eq!(ranked.len() as u64, top);
                assert_eq!(ranked[0].0, " the");
                assert!(ranked.windows(2).all(|w| w[0].1 > w[1].1), "{ranked:?}");
                let total: f64 = ranked.iter().map(|(_, lp)| lp.exp()).sum();
                assert!(total < 1.0 && ranked.iter().all(|(_, lp)| *lp < 0.0), "{ranked:?}");
                let tokens: std::collections::BTreeSet<_> = ranked.iter().map(|(t, _)| t).collect();
                assert_eq!(tokens.len(), ranked.len(), "no token twice: {ranked:?}");
            }
        }
    }

    #[test]
    fn entries_carry_the_bytes_and_as_many_alternatives_as_asked() {
        let entry = chat_entry("é", 3, 2);
        assert_eq!(entry["bytes"], json!([0xc3, 0xa9]));
        assert_eq!(entry["top_logprobs"].as_array().map(Vec::len), Some(2));
        assert_eq!(chat_entry("x", 0, 0)["top_logprobs"], json!([]));
        let legacy = completions(&["The", " quick"], 0, 3, 0);
        assert_eq!(legacy["text_offset"], json!([0, 3]));
        assert_eq!(legacy["top_logprobs"][1].as_object().map(Map::len), Some(3));
    }
}
