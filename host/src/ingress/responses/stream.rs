//! A chat completion stream as the Responses API's typed events, each with
//! its `sequence_number`: `response.created`, `response.in_progress`, per
//! output item `response.output_item.added`, `response.content_part.added`,
//! `response.output_text.delta` (or `response.function_call_arguments.delta`),
//! their `.done` events and `response.output_item.done`, and at the end
//! `response.completed` / `response.incomplete` / `response.failed`.

use crate::ingress::answer::ChatUsage;
use bytes::BytesMut;
use serde::Serialize;
use serde_json::Value;

use super::reply::{Frame, OutputItem, OutputText, Status, assistant_message, call_item, message_item};
use crate::ingress::chat_stream::{ChatChunk, JsonOut, ToolCallDelta, Translator, non_empty, write_event};
use crate::ingress::new_id;

/// `response.created` / `.in_progress` / `.completed` / …
#[derive(Serialize)]
struct ResponseEvent<'a> {
    response: super::reply::ResponseObject<'a>,
}

/// `response.output_item.added` / `.done`.
#[derive(Serialize)]
struct ItemEvent<'a> {
    output_index: usize,
    item: OutputItem<'a>,
}

/// `response.content_part.added` / `.done`.
#[derive(Serialize)]
struct PartEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    part: OutputText<'a>,
}

/// `response.output_text.delta` (`delta`) and `.done` (`text`).
#[derive(Serialize)]
struct TextEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    logprobs: [u8; 0],
}

/// `response.function_call_arguments.delta` (`delta`) and `.done`
/// (`arguments`).
#[derive(Serialize)]
struct ArgumentsEvent<'a> {
    item_id: &'a str,
    output_index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<&'a str>,
}

/// Write event `kind` with `data`'s fields, numbered from `sequence`:
/// `{"type":KIND,"sequence_number":N,` written as bytes, then `data` (an
/// object with at least one field) serialized in place, its opening brace
/// overwritten by the comma — no `#[serde(flatten)]` (which goes through a
/// map serializer, field by field).
fn emit<T: Serialize>(sequence: &mut u64, out: &mut BytesMut, kind: &str, data: T) {
    let event = out.len();
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\ndata: {\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"sequence_number\":");
    let number = serde_json::to_writer(JsonOut(out), sequence).is_ok();
    let fields = out.len();
    let written = number && serde_json::to_writer(JsonOut(out), &data).is_ok();
    if written && out.get(fields) == Some(&b'{') && out.len() > fields + 2 {
        out[fields] = b',';
        out.extend_from_slice(b"\n\n");
    } else {
        debug_assert!(!written, "event data must be an object with fields");
        out.truncate(event);
        write_event(out, Some(kind), &serde_json::json!({"type": kind, "sequence_number": *sequence}));
    }
    *sequence += 1;
}

/// One output item as it streams.
enum Item {
    Text { id: String, text: String },
    Call { id: String, call_id: String, name: String, arguments: String, chat_index: u64 },
}

impl Item {
    fn output(&self, status: &'static str) -> OutputItem<'_> {
        match self {
            Item::Text { id, text } => message_item(id, text, status),
            Item::Call { id, call_id, name, arguments, .. } => call_item(id, call_id, name, arguments, status),
        }
    }
}

/// Called once with the final response and the assistant's chat message,
/// when the response completed (to store it).
pub type OnComplete = Box<dyn FnOnce(Value, Value) + Send>;

/// The translator's state.
pub struct ResponsesStream {
    frame: Frame,
    sequence: u64,
    started: bool,
    items: Vec<Item>,
    /// Whether the last item is still open.
    open: bool,
    finish: Option<String>,
    usage: Option<ChatUsage>,
    on_complete: Option<OnComplete>,
    pending: Option<Box<dyn FnOnce() + Send>>,
}

impl ResponsesStream {
    /// A stream of `frame`'s response; `on_complete` stores it.
    pub fn new(frame: Frame, on_complete: Option<OnComplete>) -> Self {
        Self {
            frame,
            sequence: 0,
            started: false,
            items: Vec::new(),
            open: false,
            finish: None,
            usage: None,
            on_complete,
            pending: None,
        }
    }

    fn start(&mut self, out: &mut BytesMut) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        for kind in ["response.created", "response.in_progress"] {
            let response = self.frame.response(Status::InProgress, &[], None);
            emit(&mut self.sequence, out, kind, ResponseEvent { response });
        }
    }

    /// Close the open item with its `.done` events.
    fn close(&mut self, out: &mut BytesMut) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        let output_index = self.items.len() - 1;
        let item = &self.items[output_index];
        let seq = &mut self.sequence;
        match item {
            Item::Text { id, text } => {
                let (item_id, text) = (id.as_str(), text.as_str());
                let done =
                    TextEvent { item_id, output_index, content_index: 0, delta: None, text: Some(text), logprobs: [] };
                emit(seq, out, "response.output_text.done", done);
                let part = PartEvent { item_id, output_index, content_index: 0, part: OutputText::new(text) };
                emit(seq, out, "response.content_part.done", part);
            }
            Item::Call { id, arguments, .. } => {
                let done = ArgumentsEvent { item_id: id, output_index, delta: None, arguments: Some(arguments) };
                emit(seq, out, "response.function_call_arguments.done", done);
            }
        }
        emit(seq, out, "response.output_item.done", ItemEvent { output_index, item: item.output("completed") });
    }

    fn add(&mut self, out: &mut BytesMut, item: Item) {
        self.close(out);
        let output_index = self.items.len();
        self.items.push(item);
        self.open = true;
        let item = &self.items[output_index];
        let seq = &mut self.sequence;
        emit(seq, out, "response.output_item.added", ItemEvent { output_index, item: item.output("in_progress") });
        if let Item::Text { id, .. } = item {
            let part = PartEvent { item_id: id, output_index, content_index: 0, part: OutputText::new("") };
            emit(seq, out, "response.content_part.added", part);
        }
    }

    fn text(&mut self, out: &mut BytesMut, delta: &str) {
        if !(self.open && matches!(self.items.last(), Some(Item::Text { .. }))) {
            self.add(out, Item::Text { id: new_id("msg_"), text: String::new() });
        }
        let output_index = self.items.len() - 1;
        let Some(Item::Text { id, text }) = self.items.last_mut() else { return };
        text.push_str(delta);
        let event =
            TextEvent { item_id: id, output_index, content_index: 0, delta: Some(delta), text: None, logprobs: [] };
        emit(&mut self.sequence, out, "response.output_text.delta", event);
    }

    fn call(&mut self, out: &mut BytesMut, call: &ToolCallDelta<'_>) {
        let n = call.index;
        let same = self.open && matches!(self.items.last(), Some(Item::Call { chat_index, .. }) if *chat_index == n);
        if !same {
            let item = Item::Call {
                id: new_id("fc_"),
                call_id: call.id.as_deref().unwrap_or_default().to_string(),
                name: call.function.name.as_deref().unwrap_or_default().to_string(),
                arguments: String::new(),
                chat_index: n,
            };
            self.add(out, item);
        }
        let Some(delta) = non_empty(&call.function.arguments) else { return };
        let output_index = self.items.len() - 1;
        let Some(Item::Call { id, arguments, .. }) = self.items.last_mut() else { return };
        arguments.push_str(delta);
        let event = ArgumentsEvent { item_id: id, output_index, delta: Some(delta), arguments: None };
        emit(&mut self.sequence, out, "response.function_call_arguments.delta", event);
    }

    /// Write the final `kind` event of the response in `status`; returns
    /// the response as JSON when it is to be stored.
    fn end(&mut self, out: &mut BytesMut, kind: &str, status: Status<'_>, keep: bool) -> Option<Value> {
        let output: Vec<OutputItem<'_>> = self.items.iter().map(|i| i.output("completed")).collect();
        let response = self.frame.response(status, &output, self.usage);
        let stored = (keep && self.on_complete.is_some()).then(|| serde_json::to_value(&response).ok()).flatten();
        emit(&mut self.sequence, out, kind, ResponseEvent { response });
        stored
    }
}

impl Translator for ResponsesStream {
    fn chunk(&mut self, chunk: &ChatChunk<'_>, out: &mut BytesMut) {
        self.start(out);
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        let Some(choice) = chunk.first() else { return };
        if let Some(text) = non_empty(&choice.delta.content) {
            self.text(out, text);
        }
        for call in &choice.delta.tool_calls {
            self.call(out, call);
        }
        if let Some(reason) = &choice.finish_reason {
            self.finish = Some(reason.to_string());
        }
    }

    fn error(&mut self, error: &Value, out: &mut BytesMut) {
        self.start(out);
        self.close(out);
        let message = error["message"].as_str().unwrap_or("The upstream stream failed.");
        self.end(out, "response.failed", Status::Failed(message), false);
    }

    fn finish(&mut self, out: &mut BytesMut) {
        self.start(out);
        self.close(out);
        let status = Status::of_finish(self.finish.as_deref());
        let kind = if matches!(status, Status::Completed) { "response.completed" } else { "response.incomplete" };
        let stored = self.end(out, kind, status, true);
        if let (Some(store), Some(response)) = (self.on_complete.take(), stored) {
            let text: String = self
                .items
                .iter()
                .filter_map(|i| match i {
                    Item::Text { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            let calls: Vec<(&str, &str, &str)> = self
                .items
                .iter()
                .filter_map(|i| match i {
                    Item::Call { call_id, name, arguments, .. } => {
                        Some((call_id.as_str(), name.as_str(), arguments.as_str()))
                    }
                    Item::Text { .. } => None,
                })
                .collect();
            let assistant = assistant_message(&text, &calls);
            self.pending = Some(Box::new(move || store(response, assistant)));
        }
    }

    fn pending(&mut self) -> Option<Box<dyn FnOnce() + Send>> {
        self.pending.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_and_call_events_are_numbered_and_closed() {
        let frame = Frame::new(&crate::ingress::responses::request::ResponsesRequest::default(), "m", 1);
        let mut t = ResponsesStream::new(frame, None);
        let mut out = BytesMut::new();
        let c =
            |delta: Value, finish: Value| json!({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        let first = c(json!({"content": "Hi"}), Value::Null).to_string();
        t.chunk(&serde_json::from_str::<ChatChunk<'_>>(&first).expect("chunk"), &mut out);
        let call = c(
            json!({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{}"}}]}),
            json!("tool_calls"),
        )
        .to_string();
        t.chunk(&serde_json::from_str::<ChatChunk<'_>>(&call).expect("chunk"), &mut out);
        t.finish(&mut out);
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
        assert_eq!(
            events,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        for (n, data) in text.lines().filter_map(|l| l.strip_prefix("data: ")).enumerate() {
            let event: Value = serde_json::from_str(data).expect("each event is JSON");
            assert_eq!((event["type"].as_str(), event["sequence_number"].as_u64()), (Some(events[n]), Some(n as u64)));
        }
        let last: Value =
            serde_json::from_str(text.lines().rfind(|l| !l.is_empty()).expect("line").trim_start_matches("data: "))
                .expect("json");
        assert_eq!(last["sequence_number"], 12);
        assert_eq!(last["response"]["output"][1]["call_id"], "c1");
    }
}
