// `js-clamp`: a wasmgate traffic filter written in JavaScript, built into a
// component by componentize-js (through jco) against the same WIT contract
// as the Rust filters (`wit/filter.wit`, world `filter-plugin`).
//
// Settings of a rule:
//   max_tokens  — clamp the request's `max_tokens` / `max_completion_tokens`
//                 to this (set it when absent);
//   replace     — { "from": "to", ... } replaced in answers, streamed or not.
// Every request it sees goes upstream with `x-js-filter: js-clamp`.

const decoder = new TextDecoder();
const encoder = new TextEncoder();

function settings(ctx) {
  try {
    const s = JSON.parse(ctx.settings);
    return s && typeof s === "object" ? s : {};
  } catch {
    return {};
  }
}

function replaceAll(text, table) {
  let out = text;
  for (const [from, to] of Object.entries(table)) {
    if (from) out = out.split(from).join(String(to));
  }
  return out;
}

// Apply `f` to every piece of generated text of an answer or a chunk.
function mapAnswer(answer, f) {
  let changed = false;
  for (const choice of answer.choices ?? []) {
    for (const key of ["message", "delta"]) {
      const m = choice[key];
      if (m && typeof m.content === "string") {
        const next = f(m.content);
        changed ||= next !== m.content;
        m.content = next;
      }
    }
    if (typeof choice.text === "string") {
      const next = f(choice.text);
      changed ||= next !== choice.text;
      choice.text = next;
    }
  }
  return changed;
}

export const filter = {
  info() {
    return {
      name: "js-clamp",
      version: "0.1.0",
      description: "clamps max_tokens and replaces words in answers (JavaScript, componentize-js)",
      hooks: ["request", "response", "stream-chunk"],
    };
  },

  onRequest(ctx, body) {
    const header = { name: "x-js-filter", value: "js-clamp" };
    const cap = Number(settings(ctx).max_tokens);
    let request;
    try {
      request = JSON.parse(decoder.decode(body));
    } catch {
      return { tag: "pass" };
    }
    if (!Number.isFinite(cap) || cap <= 0) {
      return { tag: "edit", val: { body: undefined, headers: [header] } };
    }
    let changed = false;
    for (const key of ["max_tokens", "max_completion_tokens"]) {
      if (typeof request[key] === "number" && request[key] > cap) {
        request[key] = cap;
        changed = true;
      }
    }
    if (request.max_tokens === undefined && request.max_completion_tokens === undefined) {
      request.max_tokens = cap;
      changed = true;
    }
    const edited = changed ? encoder.encode(JSON.stringify(request)) : undefined;
    return { tag: "edit", val: { body: edited, headers: [header] } };
  },

  onResponse(ctx, body) {
    const table = settings(ctx).replace ?? {};
    let answer;
    try {
      answer = JSON.parse(decoder.decode(body));
    } catch {
      return { tag: "pass" };
    }
    if (!mapAnswer(answer, (t) => replaceAll(t, table))) return { tag: "pass" };
    return { tag: "rewrite", val: encoder.encode(JSON.stringify(answer)) };
  },

  onStreamChunk(ctx, chunk, _state) {
    const table = settings(ctx).replace ?? {};
    let value;
    try {
      value = JSON.parse(decoder.decode(chunk));
    } catch {
      return { action: { tag: "pass" }, state: new Uint8Array() };
    }
    if (!mapAnswer(value, (t) => replaceAll(t, table))) {
      return { action: { tag: "pass" }, state: new Uint8Array() };
    }
    return { action: { tag: "rewrite", val: encoder.encode(JSON.stringify(value)) }, state: new Uint8Array() };
  },
};
