//! Inputs found worth keeping (`tests/fuzz-corpus/`), replayed every run:
//! request bodies must parse or be refused with a 400, never panic, and a
//! parsed one's bound must hold.

use bytes::Bytes;

use crate::plugins::Endpoint;
use crate::request::ClientRequest;

#[test]
fn the_corpus_replays() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fuzz-corpus/requests");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus directory").flatten() {
        let body = std::fs::read(entry.path()).expect("read");
        for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
            match ClientRequest::parse(endpoint, Bytes::from(body.clone())) {
                Ok(req) => {
                    let exact = crate::billing::tokenize::prompt_tokens(&req.model, &body);
                    assert!(req.prompt.token_bound() >= exact, "{}: bound below the count", entry.path().display());
                }
                Err(e) => assert_eq!(e.status, 400, "{}", entry.path().display()),
            }
        }
        n += 1;
    }
    assert!(n >= 10, "the corpus is there ({n} inputs)");
}
