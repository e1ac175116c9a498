//! Load for the failure tests: workers sending one request body in a loop
//! to each gateway until stopped, recording per gateway the request ids
//! answered and what failed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// Workers running against a set of gateways.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
    answered: Vec<Arc<Mutex<Vec<String>>>>,
    failures: Vec<Arc<Mutex<Vec<String>>>>,
}

/// What a stopped load saw, per gateway.
pub struct Seen {
    /// The `x-request-id` of each request answered 200 with a whole body.
    pub answered: Vec<Vec<String>>,
    /// Each failure: the status and body, or the transport error.
    pub failures: Vec<Vec<String>>,
}

impl Load {
    /// Start `per_gateway` workers for each of `urls` (a full endpoint
    /// URL), each posting `body` with `key` as a bearer token.
    pub fn start(urls: &[String], key: &str, body: &Value, per_gateway: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let answered: Vec<Arc<Mutex<Vec<String>>>> = urls.iter().map(|_| Arc::default()).collect();
        let failures: Vec<Arc<Mutex<Vec<String>>>> = urls.iter().map(|_| Arc::default()).collect();
        let mut workers = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            for _ in 0..per_gateway {
                let (stop, answered, failures) = (stop.clone(), answered[i].clone(), failures[i].clone());
                let (url, key, body) = (url.clone(), key.to_string(), body.clone());
                workers.push(tokio::spawn(async move {
                    let http = super::client();
                    while !stop.load(Ordering::Relaxed) {
                        let outcome = match http.post(&url).bearer_auth(&key).json(&body).send().await {
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                let id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok());
                                let id = id.unwrap_or_default().to_string();
                                match resp.text().await {
                                    Ok(_) if status == 200 => Ok(id),
                                    Ok(text) => Err(format!("{status}: {text}")),
                                    Err(e) => Err(format!("{status}, body cut: {e}")),
                                }
                            }
                            Err(e) => Err(format!("not sent: {e}")),
                        };
                        match outcome {
                            Ok(id) => answered.lock().expect("lock").push(id),
                            Err(failure) => failures.lock().expect("lock").push(failure),
                        }
                    }
                }));
            }
        }
        Self { stop, workers, answered, failures }
    }

    /// Requests answered so far by gateway `i`.
    pub fn answered(&self, i: usize) -> usize {
        self.answered[i].lock().expect("lock").len()
    }

    /// The request id gateway `i` answered first, if any.
    pub fn first_answered(&self, i: usize) -> Option<String> {
        self.answered[i].lock().expect("lock").first().cloned()
    }

    /// Stop the workers, wait for their last requests, and return what
    /// they saw.
    pub async fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.await;
        }
        let take = |v: &[Arc<Mutex<Vec<String>>>]| v.iter().map(|a| a.lock().expect("lock").clone()).collect();
        Seen { answered: take(&self.answered), failures: take(&self.failures) }
    }
}
