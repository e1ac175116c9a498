//! A chat completion stream as the Responses API's typed events, each with
//! its `sequence_number`: `response.created`, `response.in_progress`, per
//! output item `response.output_item.added`, `response.content_part.added`,
//! `response.output_text.delta` (or `response.function_call_arguments.delta`),
//! their `.done` events and `response.output_item.done`, and at the end
//! `response.completed` / `response.incomplete` / `response.failed`.

use bytes::BytesMut;
use serde_json::{Value, json};

use super::reply::{Frame, Status, assistant_message, call_item, message_item};
use crate::ingress::chat_stream::{ChatChunk, ToolCallDelta, Translator, non_empty, write_event};
use crate::ingress::new_id;

/// `response.output_text.delta`, the most frequent event, serialized
/// without building a JSON tree.
#[derive(serde::Serialize)]
struct TextDeltaEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    sequence_number: u64,
    item_id: &'a str,
    output_index: usize,
    content_index: u32,
    delta: &'a str,
    logprobs: [u8; 0],
}

/// One output item as it streams.
enum Item {
    Text { id: String, text: String },
    Call { id: String, call_id: String, name: String, arguments: String, chat_index: u64 },
}

impl Item {
    fn value(&self, status: &str) -> Value {
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
    usage: Option<Value>,
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

    fn emit(&mut self, out: &mut BytesMut, kind: &str, mut data: Value) {
        data["type"] = kind.into();
        data["sequence_number"] = self.sequence.into();
        self.sequence += 1;
        write_event(out, Some(kind), &data);
    }

    fn start(&mut self, out: &mut BytesMut) {
        if std::mem::replace(&mut self.started, true) {
            return;
        }
        let response = self.frame.response(Status::InProgress, &[], None);
        self.emit(out, "response.created", json!({"response": response}));
        self.emit(out, "response.in_progress", json!({"response": response}));
    }

    /// Close the open item with its `.done` events.
    fn close(&mut self, out: &mut BytesMut) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        let index = self.items.len() - 1;
        let item = &self.items[index];
        let done = item.value("completed");
        match item {
            Item::Text { id, text } => {
                let (id, text) = (id.clone(), text.clone());
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let at = json!({"item_id": id, "output_index": index, "content_index": 0});
                self.emit(out, "response.output_text.done", merge(&at, json!({"text": text, "logprobs": []})));
                self.emit(out, "response.content_part.done", merge(&at, json!({"part": part})));
            }
            Item::Call { id, arguments, .. } => {
                let data = json!({"item_id": id, "output_index": index, "arguments": arguments});
                self.emit(out, "response.function_call_arguments.done", data);
            }
        }
        self.emit(out, "response.output_item.done", json!({"output_index": index, "item": done}));
    }

    fn add(&mut self, out: &mut BytesMut, item: Item) {
        self.close(out);
        let index = self.items.len();
        let added = item.value("in_progress");
        let text_id = match &item {
            Item::Text { id, .. } => Some(id.clone()),
            Item::Call { .. } => None,
        };
        self.items.push(item);
        self.open = true;
        self.emit(out, "response.output_item.added", json!({"output_index": index, "item": added}));
        if let Some(id) = text_id {
            let part = json!({"type": "output_text", "text": "", "annotations": []});
            self.emit(
                out,
                "response.content_part.added",
                json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
            );
        }
    }

    fn text(&mut self, out: &mut BytesMut, delta: &str) {
        if !(self.open && matches!(self.items.last(), Some(Item::Text { .. }))) {
            self.add(out, Item::Text { id: new_id("msg_"), text: String::new() });
        }
        let index = self.items.len() - 1;
        let Some(Item::Text { id, text }) = self.items.last_mut() else { return };
        text.push_str(delta);
        let event = TextDeltaEvent {
            kind: "response.output_text.delta",
            sequence_number: self.sequence,
            item_id: id,
            output_index: index,
            content_index: 0,
            delta,
            logprobs: [],
        };
        write_event(out, Some(event.kind), &event);
        self.sequence += 1;
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
        let index = self.items.len() - 1;
        let Some(Item::Call { id, arguments, .. }) = self.items.last_mut() else { return };
        arguments.push_str(delta);
        let data = json!({"item_id": id, "output_index": index, "delta": delta});
        self.emit(out, "response.function_call_arguments.delta", data);
    }

    fn output(&self) -> Vec<Value> {
        self.items.iter().map(|i| i.value("completed")).collect()
    }
}

fn merge(base: &Value, extra: Value) -> Value {
    let mut v = base.clone();
    if let (Some(m), Value::Object(e)) = (v.as_object_mut(), extra) {
        m.extend(e);
    }
    v
}

impl Translator for ResponsesStream {
    fn chunk(&mut self, chunk: &ChatChunk<'_>, out: &mut BytesMut) {
        self.start(out);
        if let Some(u) = chunk.usage.as_ref().filter(|u| u.is_object()) {
            self.usage = Some(u.clone());
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
        let response = self.frame.response(Status::Failed(message), &self.output(), self.usage.as_ref());
        self.emit(out, "response.failed", json!({"response": response}));
    }

    fn finish(&mut self, out: &mut BytesMut) {
        self.start(out);
        self.close(out);
        let status = Status::of_finish(self.finish.as_deref());
        let response = self.frame.response(status, &self.output(), self.usage.as_ref());
        let kind = if matches!(status, Status::Completed) { "response.completed" } else { "response.incomplete" };
        self.emit(out, kind, json!({"response": response}));
        if let Some(store) = self.on_complete.take() {
            let text: String = self
                .items
                .iter()
                .filter_map(|i| match i {
                    Item::Text { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            let calls: Vec<(String, String, String)> = self
                .items
                .iter()
                .filter_map(|i| match i {
                    Item::Call { call_id, name, arguments, .. } => {
                        Some((call_id.clone(), name.clone(), arguments.clone()))
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

    #[test]
    fn text_and_call_events_are_numbered_and_closed() {
        let frame = Frame::new(&serde_json::Map::new(), "m", 1);
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
        let last: Value =
            serde_json::from_str(text.lines().rfind(|l| !l.is_empty()).expect("line").trim_start_matches("data: "))
                .expect("json");
        assert_eq!(last["sequence_number"], 12);
        assert_eq!(last["response"]["output"][1]["call_id"], "c1");
    }
}
