//! The `openai` adapter: OpenAI and every OpenAI-compatible API (DeepSeek,
//! Mistral, Groq, vLLM, Ollama's `/v1`, ...), selected per channel by its
//! base URL. All the work is the PDK's reusable `openai_compat` adapter.

wasmgate_pdk::export_adapter!(wasmgate_pdk::openai_compat::OpenAiCompat);
