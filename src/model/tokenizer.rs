//! Tokenizer and chat template, through llama.cpp (`llama-cpp-2`) with the
//! model file loaded vocab-only.

use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: llama.cpp could not load the vocabulary{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Load {
        path: String,
        reason: Option<String>,
    },
    #[error("{0}: the model has no tokenizer (tokenizer.ggml.model is missing or 'no_vocab')")]
    NoVocab(String),
    #[error(transparent)]
    Gguf(#[from] crate::ggml::gguf::GgufError),
    #[error("chat template failed: {0}")]
    Template(String),
    #[error("message holds a NUL byte")]
    Nul,
}

/// The process-wide llama.cpp backend (it may be initialised only once).
pub fn llama_backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        crate::ggml::log::install();
        crate::ggml::batch_invariant_products();
        LlamaBackend::init().expect("the llama.cpp backend is initialised only here")
    })
}

/// A chat message: role ("system", "user", "assistant") and content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

pub struct Tokenizer {
    vocab_model: LlamaModel,
    /// The chat format of a file without a template (a base model): its
    /// family's, as llama.cpp names its built-in templates.
    fallback_template: &'static str,
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Self, TokenizerError> {
        // Validate the file ourselves first: llama.cpp aborts on some bad
        // input, and tokenizing with a vocabulary-less model asserts.
        let gguf = crate::ggml::gguf::GgufFile::open(path)?;
        let arch = gguf.get_str("general.architecture")?;
        let fallback_template = match arch.as_deref().and_then(super::Arch::from_name) {
            Some(a) if a.is_gemma() => "gemma",
            _ => "chatml",
        };
        match gguf.get_str("tokenizer.ggml.model")?.as_deref() {
            None | Some("no_vocab") | Some("none") => {
                return Err(TokenizerError::NoVocab(path.display().to_string()))
            }
            Some(_) => {}
        }
        drop(gguf);
        let backend = llama_backend();
        crate::ggml::log::take_last_error();
        let params = LlamaModelParams::default().with_vocab_only(true);
        let vocab_model = LlamaModel::load_from_file(backend, path, &params).map_err(|_| {
            TokenizerError::Load {
                path: path.display().to_string(),
                reason: crate::ggml::log::take_last_error(),
            }
        })?;
        Ok(Tokenizer {
            vocab_model,
            fallback_template,
        })
    }

    /// Tokenizes `text` as given: special tokens are parsed, and BOS is added
    /// only where the model's metadata asks for it (`add_special`).
    pub fn encode(&self, text: &str, add_special: bool) -> Vec<u32> {
        self.vocab_model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .map(|t| t.0 as u32)
            .collect()
    }

    /// The bytes a token stands for (special tokens rendered as text).
    pub fn piece(&self, token: u32) -> Vec<u8> {
        self.vocab_model
            .vocab()
            .token_to_piece(LlamaToken(token as i32), true, None)
    }

    /// The text of `tokens`, invalid UTF-8 replaced.
    pub fn decode(&self, tokens: &[u32]) -> String {
        let bytes: Vec<u8> = tokens.iter().flat_map(|&t| self.piece(t)).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// End-of-generation tokens (EOS, EOT, `<|im_end|>`, ...).
    pub fn is_eog(&self, token: u32) -> bool {
        self.vocab_model.vocab().is_eog(LlamaToken(token as i32))
    }

    /// Control tokens (BOS, turn markers, ...): not text.
    pub fn is_control(&self, token: u32) -> bool {
        self.vocab_model
            .vocab()
            .is_control(LlamaToken(token as i32))
    }

    /// The number of tokens.
    pub fn n_vocab(&self) -> u32 {
        self.vocab_model.vocab().n_tokens().max(0) as u32
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        let eos = self.vocab_model.vocab().eos().0;
        (eos >= 0).then_some(eos as u32)
    }

    /// Renders `messages` with the model's chat template; `add_assistant`
    /// opens the assistant's turn. A file without a template (a base model)
    /// gets its family's turns: Gemma's (`<start_of_turn>user` …
    /// `<end_of_turn>`, special tokens of every Gemma vocabulary) for
    /// gemma3, ChatML (llama-server's default) for the others.
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_assistant: bool,
    ) -> Result<String, TokenizerError> {
        let template = match self.vocab_model.chat_template(None) {
            Ok(template) => template,
            Err(_) => {
                LlamaChatTemplate::new(self.fallback_template).map_err(|_| TokenizerError::Nul)?
            }
        };
        let chat = messages
            .iter()
            .map(|m| {
                LlamaChatMessage::new(m.role.clone(), m.content.clone())
                    .map_err(|_| TokenizerError::Nul)
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.vocab_model
            .apply_chat_template(&template, &chat, add_assistant)
            .map_err(|e| TokenizerError::Template(e.to_string()))
    }
}
