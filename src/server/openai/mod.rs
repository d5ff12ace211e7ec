//! The OpenAI API's JSON, without I/O: a chat or completion request body
//! becomes the same `GenerateRequest` the gRPC API takes (so the
//! validation layer checks both alike), and engine results become OpenAI's
//! response objects and stream chunks. `http.rs` does the transport.
//!
//! What a request may say: every field OpenAI defines is either honoured,
//! accepted because its value asks nothing of us (`n: 1`, `user`, zero
//! penalties, `stream: false`, `null` anywhere), or refused with a 400 that
//! names it; a field we do not know is refused unless it is `null`. Never
//! silently ignored. Extensions: `top_k`, `min_p`, `repetition_penalty`
//! (as vLLM names them), `svfit.mix`, and `response_format` types `regex`
//! and `lark`. `tools.rs` has the tool-call format.
//!
//! `request.rs` reads a body field by field (`values.rs` has the readers
//! of JSON values whose errors name the field); `response.rs` writes the
//! response objects, stream chunks, usage and log-probabilities.

mod request;
mod response;
mod tools;
mod values;

use tonic::Status;

use super::pb;

pub use request::parse;
pub use response::{append_logprobs, finish_reason, usage, Answer};
pub use tools::{Answer as ToolAnswer, Calls, Piece};

/// The two generation endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`
    Chat,
    /// `POST /v1/completions`
    Completions,
}

/// A parsed request: what the validation layer checks, and how to answer.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The `model` as the client wrote it (echoed in responses).
    pub model: String,
    pub body: pb::GenerateRequest,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// Alternatives per token, when log-probabilities are asked for.
    pub logprobs: Option<usize>,
    /// The answer may hold tool calls (`tools.rs` reads them back).
    pub tool_calls: bool,
}

/// A 400 about `param`.
pub fn invalid(param: &str, message: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{param}: {message}"))
}
