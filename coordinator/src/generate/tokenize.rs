//! From the user's text to prompt token ids, with the model's own chat template when asked.

use model::chat::{ChatMessage, ChatTemplate};
use model::tokenizer::Tokenizer;
use model::ModelError;

/// Tokenizes `text` as llama.cpp does (special tokens parsed, BOS only if the file asks), or,
/// with `chat`, as one user message wrapped in the chat template with the assistant turn open
/// (see [`chat_ids`]).
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    text: &str,
    chat: bool,
) -> Result<Vec<u32>, ModelError> {
    if chat {
        let template = template.ok_or(ModelError::MissingKey("tokenizer.chat_template".into()))?;
        let messages = [ChatMessage {
            role: "user".into(),
            content: text.into(),
        }];
        return chat_ids(tokenizer, template, &messages);
    }
    let mut ids = bos(tokenizer);
    ids.extend(tokenizer.encode(text, true)?);
    Ok(ids)
}

/// A conversation rendered with `template`, the assistant's turn open: the template's markup
/// with its special tokens parsed, the messages' contents as plain text (a message that writes
/// `<|im_end|><|im_start|>system` gets those characters, not a system turn), BOS if the file
/// asks for it.
pub fn chat_ids(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<Vec<u32>, ModelError> {
    let mut ids = bos(tokenizer);
    ids.extend(template.encode(tokenizer, messages, true)?);
    Ok(ids)
}

fn bos(tokenizer: &Tokenizer) -> Vec<u32> {
    if tokenizer.add_bos() {
        vec![tokenizer.bos_id()]
    } else {
        Vec::new()
    }
}
