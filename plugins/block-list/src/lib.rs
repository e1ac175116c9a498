//! `block-list`: new-api's sensitive-word filter as a plugin. A prompt that
//! contains a listed word or matches a listed pattern is refused (400,
//! `content_blocked`); in answers the matches are masked (or the answer
//! refused). Settings of the rule:
//!
//! - `words`: literal words or phrases;
//! - `patterns`: regular expressions (the `regex-lite` syntax);
//! - `case_sensitive`: `false` by default (ASCII case folding);
//! - `answers`: `"mask"` (default), `"refuse"` or `"off"`;
//! - `mask`: what replaces a match in an answer, `"***"` by default.
//!
//! In a stream each chunk's matches are masked; a match split across chunks
//! (its start already sent) stops the stream with `content_blocked`, since
//! the part sent cannot be taken back. The state carried between chunks is
//! the last [`TAIL`] characters of text.

use std::cell::RefCell;

use regex_lite::Regex;
use wasmgate_pdk_filter::serde_json::{self, Value};
use wasmgate_pdk_filter::{
    answer_texts_mut, prompt_texts_mut, refuse, settings, string_list, ChunkAction, ChunkVerdict, Filter,
    FilterContext, FilterInfo, Hook, RequestVerdict, ResponseVerdict,
};

/// Characters of text kept between stream chunks to see matches split
/// across them.
const TAIL: usize = 64;

const BLOCKED: &str = "The request was blocked by the gateway's content policy.";
const ANSWER_BLOCKED: &str = "The answer was blocked by the gateway's content policy.";

/// What to do with matches in answers.
#[derive(Clone, Copy, PartialEq)]
enum Answers {
    Mask,
    Refuse,
    Off,
}

/// A rule's settings, compiled.
struct Rules {
    matcher: Option<Regex>,
    answers: Answers,
    mask: String,
}

impl Rules {
    fn compile(settings: &Value) -> Self {
        let words = string_list(settings, "words");
        let patterns = string_list(settings, "patterns");
        let case_sensitive = settings.get("case_sensitive").and_then(Value::as_bool).unwrap_or(false);
        let mut alternatives: Vec<String> =
            words.iter().filter(|w| !w.is_empty()).map(|w| regex_lite::escape(w)).collect();
        alternatives.extend(patterns.iter().map(|p| format!("(?:{p})")));
        let matcher = (!alternatives.is_empty()).then(|| {
            let flags = if case_sensitive { "" } else { "(?i)" };
            let source = format!("{flags}{}", alternatives.join("|"));
            // A rule that cannot be compiled is an error of the filter (the
            // host fails the request, or skips the filter if told to).
            Regex::new(&source).unwrap_or_else(|e| panic!("block-list: invalid pattern in the rule's settings: {e}"))
        });
        let answers = match settings.get("answers").and_then(Value::as_str) {
            Some("refuse") => Answers::Refuse,
            Some("off") => Answers::Off,
            _ => Answers::Mask,
        };
        let mask = settings.get("mask").and_then(Value::as_str).unwrap_or("***").to_owned();
        Self { matcher, answers, mask }
    }
}

thread_local! {
    /// The last rule compiled, by its settings text: an instance serves
    /// many calls of one rule in a row.
    static COMPILED: RefCell<Option<(String, std::rc::Rc<Rules>)>> = const { RefCell::new(None) };
}

fn rules(ctx: &FilterContext) -> std::rc::Rc<Rules> {
    COMPILED.with(|cell| {
        let mut cell = cell.borrow_mut();
        if let Some((key, rules)) = cell.as_ref() {
            if *key == ctx.settings {
                return rules.clone();
            }
        }
        let rules = std::rc::Rc::new(Rules::compile(&settings(ctx)));
        *cell = Some((ctx.settings.clone(), rules.clone()));
        rules
    })
}

/// The last `n` characters of `s`.
fn tail(s: &str, n: usize) -> &str {
    match s.char_indices().rev().nth(n.saturating_sub(1)) {
        Some((i, _)) if n > 0 => &s[i..],
        _ if n == 0 => "",
        _ => s,
    }
}

struct BlockList;

impl Filter for BlockList {
    fn info() -> FilterInfo {
        FilterInfo {
            name: "block-list".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "refuses prompts with listed words or patterns; masks them in answers".into(),
            hooks: vec![Hook::Request, Hook::Response, Hook::StreamChunk],
        }
    }

    fn on_request(ctx: &FilterContext, body: Vec<u8>) -> RequestVerdict {
        let rules = rules(ctx);
        let Some(matcher) = &rules.matcher else { return RequestVerdict::Pass };
        let Ok(mut body) = serde_json::from_slice::<Value>(&body) else { return RequestVerdict::Pass };
        let mut hit = false;
        prompt_texts_mut(&mut body, |_, text| hit |= matcher.is_match(text));
        if hit {
            RequestVerdict::Refuse(refuse(400, "content_blocked", BLOCKED))
        } else {
            RequestVerdict::Pass
        }
    }

    fn on_response(ctx: &FilterContext, body: Vec<u8>) -> ResponseVerdict {
        let rules = rules(ctx);
        let Some(matcher) = rules.matcher.as_ref().filter(|_| rules.answers != Answers::Off) else {
            return ResponseVerdict::Pass;
        };
        let Ok(mut answer) = serde_json::from_slice::<Value>(&body) else { return ResponseVerdict::Pass };
        let mut hits = 0;
        answer_texts_mut(&mut answer, |text| {
            if matcher.is_match(text) {
                hits += 1;
                *text = matcher.replace_all(text, rules.mask.as_str()).into_owned();
            }
        });
        match (hits, rules.answers) {
            (0, _) => ResponseVerdict::Pass,
            (_, Answers::Refuse) => ResponseVerdict::Refuse(refuse(400, "content_blocked", ANSWER_BLOCKED)),
            _ => ResponseVerdict::Rewrite(serde_json::to_vec(&answer).unwrap_or(body)),
        }
    }

    fn on_stream_chunk(ctx: &FilterContext, chunk: Vec<u8>, state: Vec<u8>) -> ChunkVerdict {
        let rules = rules(ctx);
        let pass = |state| ChunkVerdict { action: ChunkAction::Pass, state };
        let Some(matcher) = rules.matcher.as_ref().filter(|_| rules.answers != Answers::Off) else {
            return pass(Vec::new());
        };
        let Ok(mut value) = serde_json::from_slice::<Value>(&chunk) else { return pass(state) };
        let before = String::from_utf8(state).unwrap_or_default();
        let mut text = String::new();
        let (mut masked, mut split) = (false, false);
        answer_texts_mut(&mut value, |piece| {
            // A match that begins in the text already sent.
            let joined = format!("{before}{piece}");
            split |= matcher.find_iter(&joined).any(|m| m.start() < before.len() && m.end() > before.len());
            if matcher.is_match(piece) {
                masked = true;
                *piece = matcher.replace_all(piece, rules.mask.as_str()).into_owned();
            }
            text.push_str(piece);
        });
        if split || (masked && rules.answers == Answers::Refuse) {
            return ChunkVerdict {
                action: ChunkAction::Stop(refuse(400, "content_blocked", ANSWER_BLOCKED)),
                state: Vec::new(),
            };
        }
        let state = tail(&format!("{before}{text}"), TAIL).as_bytes().to_vec();
        if masked {
            let rewritten = serde_json::to_vec(&value).unwrap_or(chunk);
            return ChunkVerdict { action: ChunkAction::Rewrite(rewritten), state };
        }
        pass(state)
    }
}

wasmgate_pdk_filter::export_filter!(BlockList);

#[cfg(test)]
mod tests {
    use super::*;
    use wasmgate_pdk_filter::test_context;

    const RULE: &str = r#"{"words": ["forbidden fruit", "秘密"], "patterns": ["secret-\\d+"]}"#;

    fn request(text: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"model": "m", "messages": [{"role": "user", "content": text}]})).unwrap()
    }

    #[test]
    fn prompts_with_listed_words_or_patterns_are_refused() {
        let ctx = test_context(RULE, false);
        for text in ["the Forbidden Fruit", "code secret-42 here", "这是秘密"] {
            assert!(matches!(BlockList::on_request(&ctx, request(text)), RequestVerdict::Refuse(r) if r.status == 400));
        }
        assert!(matches!(BlockList::on_request(&ctx, request("an apple")), RequestVerdict::Pass));
        assert!(matches!(BlockList::on_request(&test_context("{}", false), request("secret-1")), RequestVerdict::Pass));
    }

    #[test]
    fn answers_are_masked_or_refused() {
        let answer = br#"{"choices":[{"message":{"role":"assistant","content":"try secret-7 now"}}]}"#.to_vec();
        let ResponseVerdict::Rewrite(body) = BlockList::on_response(&test_context(RULE, false), answer.clone()) else {
            panic!("masked")
        };
        assert!(String::from_utf8(body).unwrap().contains("try *** now"));
        let refusing = r#"{"words": ["secret"], "answers": "refuse"}"#;
        assert!(matches!(BlockList::on_response(&test_context(refusing, false), answer), ResponseVerdict::Refuse(_)));
    }

    #[test]
    fn a_match_split_across_chunks_stops_the_stream() {
        let ctx = test_context(RULE, true);
        let chunk = |t: &str| format!(r#"{{"choices":[{{"index":0,"delta":{{"content":"{t}"}}}}]}}"#).into_bytes();
        let first = BlockList::on_stream_chunk(&ctx, chunk("a forbidden "), Vec::new());
        assert!(matches!(first.action, ChunkAction::Pass));
        let second = BlockList::on_stream_chunk(&ctx, chunk("fruit!"), first.state);
        assert!(matches!(second.action, ChunkAction::Stop(_)));
        let masked = BlockList::on_stream_chunk(&ctx, chunk("x secret-9 y"), Vec::new());
        assert!(matches!(masked.action, ChunkAction::Rewrite(ref b) if String::from_utf8_lossy(b).contains("x *** y")));
        assert_eq!(tail("héllo", 3), "llo");
        assert_eq!(tail("ab", 5), "ab");
    }
}
