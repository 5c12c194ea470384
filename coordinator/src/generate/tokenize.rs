//! From the user's text to prompt token ids, with the model's own chat template when asked.

use model::chat::{ChatMessage, ChatTemplate};
use model::tokenizer::Tokenizer;
use model::ModelError;

/// Tokenizes `text` as llama.cpp does (special tokens parsed, BOS only if the file asks), or,
/// with `chat`, as one user message wrapped in the chat template with the assistant turn open.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    template: Option<&ChatTemplate>,
    text: &str,
    chat: bool,
) -> Result<Vec<u32>, ModelError> {
    let rendered;
    let text = if chat {
        let template = template.ok_or(ModelError::MissingKey("tokenizer.chat_template".into()))?;
        rendered = template.render(
            &[ChatMessage {
                role: "user".into(),
                content: text.into(),
            }],
            true,
        )?;
        rendered.as_str()
    } else {
        text
    };
    let mut ids = Vec::new();
    if tokenizer.add_bos() {
        ids.push(tokenizer.bos_id());
    }
    ids.extend(tokenizer.encode(text, true)?);
    Ok(ids)
}
