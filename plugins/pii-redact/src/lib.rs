//! `pii-redact`: redacts personal data in prompts before they leave for the
//! provider: e-mail addresses, phone numbers and payment card numbers
//! (13–19 digits passing the Luhn check, spaces or dashes allowed). Each is
//! replaced by a placeholder. Settings of the rule:
//!
//! - `kinds`: which to redact, any of `"email"`, `"phone"`, `"card"`
//!   (all three by default);
//! - `placeholder`: the replacement, where `{kind}` becomes `EMAIL`,
//!   `PHONE` or `CARD` (default `"[{kind}]"`);
//! - `roles`: the message roles whose text is redacted (default all).
//!
//! Only the request hook is declared: answers and streams cost nothing.

use std::sync::OnceLock;

use regex_lite::Regex;
use wasmgate_pdk_filter::serde_json::{self, Value};
use wasmgate_pdk_filter::{
    prompt_texts_mut, settings, string_list, Filter, FilterContext, FilterInfo, Hook, RequestEdit, RequestVerdict,
};

fn email() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}").unwrap())
}

/// Card candidates: 13–19 digits, optionally grouped by single spaces or
/// dashes; confirmed by [`luhn`].
fn card() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\b\d(?:[ -]?\d){12,18}\b").unwrap())
}

/// Phone numbers: an optional `+` and country code, then 7–15 digits in
/// groups separated by spaces, dots, dashes or a parenthesised area code.
fn phone() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}").unwrap())
}

/// The Luhn checksum of the digits in `s`.
fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A phone-number candidate has 7 to 15 digits (E.164) and is not an ISO
/// date (`2024-12-05`).
fn phone_digits(s: &str) -> bool {
    let b = s.as_bytes();
    let date = b.len() == 10 && b[4] == b'-' && b[7] == b'-';
    !date && (7..=15).contains(&s.chars().filter(char::is_ascii_digit).count())
}

/// Redact `text` per `kinds` with `placeholder`; whether anything changed.
fn redact(text: &mut String, kinds: &[String], placeholder: &str) -> bool {
    let mut changed = false;
    let label = |kind: &str| placeholder.replace("{kind}", kind);
    let wants = |k: &str| kinds.iter().any(|x| x == k);
    if wants("email") && email().is_match(text) {
        *text = email().replace_all(text, label("EMAIL").as_str()).into_owned();
        changed = true;
    }
    // Cards before phones: a card number also looks like a long phone number.
    if wants("card") {
        let replaced = card().replace_all(
            text,
            |c: &regex_lite::Captures| {
                if luhn(&c[0]) {
                    label("CARD")
                } else {
                    c[0].to_string()
                }
            },
        );
        if replaced != *text {
            *text = replaced.into_owned();
            changed = true;
        }
    }
    if wants("phone") {
        let replaced = phone().replace_all(
            text,
            |c: &regex_lite::Captures| {
                if phone_digits(&c[0]) {
                    label("PHONE")
                } else {
                    c[0].to_string()
                }
            },
        );
        if replaced != *text {
            *text = replaced.into_owned();
            changed = true;
        }
    }
    changed
}

/// Whether `body` may hold anything to redact: an `@`, a run of seven
/// digits (spaces, dots, dashes and parentheses between them allowed), or
/// a JSON `\u` escape that could hide either. Most prompts have none, and
/// skip the JSON round trip.
fn may_hold_pii(body: &[u8]) -> bool {
    if body.contains(&b'@') || body.windows(2).any(|w| w == b"\\u") {
        return true;
    }
    let mut digits = 0;
    for &b in body {
        match b {
            b'0'..=b'9' => {
                digits += 1;
                if digits >= 7 {
                    return true;
                }
            }
            b' ' | b'-' | b'.' | b'(' | b')' | b'+' => {}
            _ => digits = 0,
        }
    }
    false
}

struct PiiRedact;

impl Filter for PiiRedact {
    fn info() -> FilterInfo {
        FilterInfo {
            name: "pii-redact".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "redacts e-mail addresses, phone numbers and card numbers in prompts".into(),
            hooks: vec![Hook::Request],
        }
    }

    fn on_request(ctx: &FilterContext, body: Vec<u8>) -> RequestVerdict {
        if !may_hold_pii(&body) {
            return RequestVerdict::Pass;
        }
        let settings = settings(ctx);
        let mut kinds = string_list(&settings, "kinds");
        if kinds.is_empty() {
            kinds = vec!["email".into(), "phone".into(), "card".into()];
        }
        let placeholder = settings.get("placeholder").and_then(Value::as_str).unwrap_or("[{kind}]");
        let roles = string_list(&settings, "roles");
        let Ok(mut value) = serde_json::from_slice::<Value>(&body) else { return RequestVerdict::Pass };
        let mut changed = false;
        prompt_texts_mut(&mut value, |role, text| {
            if roles.is_empty() || roles.iter().any(|r| r == role) {
                changed |= redact(text, &kinds, placeholder);
            }
        });
        match changed {
            false => RequestVerdict::Pass,
            true => match serde_json::to_vec(&value) {
                Ok(body) => RequestVerdict::Edit(RequestEdit { body: Some(body), headers: Vec::new() }),
                Err(_) => RequestVerdict::Pass,
            },
        }
    }
}

wasmgate_pdk_filter::export_filter!(PiiRedact);

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<String> {
        vec!["email".into(), "phone".into(), "card".into()]
    }

    fn redacted(text: &str) -> String {
        let mut s = text.to_string();
        redact(&mut s, &all(), "[{kind}]");
        s
    }

    #[test]
    fn emails_phones_and_cards_are_redacted() {
        assert_eq!(redacted("mail jane.doe+x@mail.example.com now"), "mail [EMAIL] now");
        assert_eq!(redacted("call +1 (415) 555-0132 or 020 7946 0958"), "call [PHONE] or [PHONE]");
        assert_eq!(redacted("card 4111 1111 1111 1111, exp 12/29"), "card [CARD], exp 12/29");
        assert_eq!(redacted("pay 4111-1111-1111-1111"), "pay [CARD]");
    }

    #[test]
    fn ordinary_numbers_stay() {
        for text in ["in 2024 we sold 1500 units", "version 1.2.3", "order 12345", "due 2026-12-05"] {
            assert_eq!(redacted(text), text);
        }
        // 16 digits failing the Luhn check are not a card (still a long
        // number, which reads as a phone number only up to 15 digits).
        assert_eq!(redacted("id 4111111111111112"), "id 4111111111111112");
    }

    #[test]
    fn the_prefilter_never_skips_what_could_be_redacted() {
        assert!(!may_hold_pii(br#"{"messages":[{"content":"in 2024 we sold 1500 units"}]}"#));
        assert!(may_hold_pii(br#"{"content":"me@x.example"}"#));
        assert!(may_hold_pii(br#"{"content":"+1 (415) 555-0132"}"#));
        assert!(may_hold_pii(br#"{"content":"jane\u0040corp.example"}"#));
        // An escaped e-mail is still redacted.
        let ctx = wasmgate_pdk_filter::test_context("{}", false);
        let body = br#"{"model":"m","messages":[{"role":"user","content":"jane\u0040corp.example"}]}"#;
        assert!(matches!(PiiRedact::on_request(&ctx, body.to_vec()), RequestVerdict::Edit(_)));
    }

    #[test]
    fn requests_are_edited_only_for_the_roles_named() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"ops@corp.example"},{"role":"user","content":"me@home.example"}]}"#;
        let ctx = wasmgate_pdk_filter::test_context(r#"{"roles": ["user"], "kinds": ["email"]}"#, false);
        let RequestVerdict::Edit(edit) = PiiRedact::on_request(&ctx, body.to_vec()) else { panic!("edited") };
        let out = String::from_utf8(edit.body.unwrap()).unwrap();
        assert!(out.contains("ops@corp.example") && out.contains("[EMAIL]") && !out.contains("me@home"), "{out}");
        let untouched = br#"{"model":"m","messages":[{"role":"user","content":"hello"}]}"#;
        assert!(matches!(PiiRedact::on_request(&ctx, untouched.to_vec()), RequestVerdict::Pass));
    }
}
