//! Chat prompts rendered with the model's own Jinja template (`tokenizer.chat_template`).
//!
//! A chat model only behaves when the prompt has exactly the shape it was trained on, and that
//! shape lives in the template, so we run the template itself rather than hard-coding ChatML.
//! Hugging Face renders these templates with Python's jinja2 using `trim_blocks` and
//! `lstrip_blocks` and a `raise_exception` helper; minijinja is set up the same way, plus the
//! handful of Python `str`/`dict` methods that templates commonly call.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value as GgufValue;
use minijinja::value::{from_args, Value, ValueKind};
use minijinja::{context, Environment, Error, ErrorKind, State};

use crate::tokenizer::{Literals, Tokenizer};
use crate::ModelError;

const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_ARCH: &str = "general.architecture";

/// llama.cpp's built-in `gemma` chat format (`LLM_CHAT_TEMPLATE_GEMMA` in `src/llama-chat.cpp`)
/// as Jinja: system text merged into the next user turn, `assistant` called `model`, contents
/// trimmed. Used for Gemma files that carry no template of their own (the Gemma 3 270M GGUF).
const GEMMA_TEMPLATE: &str = "{%- set ns = namespace(system='') -%}\
{%- for message in messages -%}\
{%- if message['role'] == 'system' -%}\
{%- set ns.system = ns.system + (message['content'] | trim) -%}\
{%- else -%}\
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\
{{- '<start_of_turn>' + role + '\n' -}}\
{%- if ns.system and role != 'model' -%}\
{{- ns.system + '\n\n' -}}{%- set ns.system = '' -%}\
{%- endif -%}\
{{- (message['content'] | trim) + '<end_of_turn>\n' -}}\
{%- endif -%}\
{%- endfor -%}\
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}";

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("GGUF metadata key `{0}` has the wrong type: expected a string")]
    WrongType(&'static str),
    #[error("chat template failed: {0}")]
    Template(#[from] minijinja::Error),
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(source: String, bos_token: String, eos_token: String) -> Self {
        ChatTemplate {
            source,
            bos_token,
            eos_token,
        }
    }

    /// Reads the template from GGUF metadata; `None` when the file has none (Gemma files without
    /// one get llama.cpp's built-in Gemma format). `bos_token` and `eos_token` are looked up in
    /// the vocabulary; if that is impossible they are left empty (the tokenizer reports broken
    /// vocabularies, templates often do not use them).
    pub fn from_gguf(md: &HashMap<String, GgufValue>) -> Result<Option<Self>, ChatTemplateError> {
        let source = match md.get(KEY_TEMPLATE) {
            None => match md.get(KEY_ARCH) {
                Some(GgufValue::String(arch)) if arch.starts_with("gemma") => {
                    GEMMA_TEMPLATE.to_string()
                }
                _ => return Ok(None),
            },
            Some(GgufValue::String(source)) => source.clone(),
            Some(_) => return Err(ChatTemplateError::WrongType(KEY_TEMPLATE)),
        };
        let token_text = |key: &str| -> String {
            let id = match md.get(key) {
                Some(GgufValue::U32(id)) => usize::try_from(*id).ok(),
                Some(GgufValue::I32(id)) => usize::try_from(*id).ok(),
                Some(GgufValue::U64(id)) => usize::try_from(*id).ok(),
                _ => None,
            };
            match (id, md.get(KEY_TOKENS)) {
                (Some(id), Some(GgufValue::Array(tokens))) => match tokens.get(id) {
                    Some(GgufValue::String(text)) => text.clone(),
                    _ => String::new(),
                },
                _ => String::new(),
            }
        };
        Ok(Some(Self::new(
            source,
            token_text(KEY_BOS),
            token_text(KEY_EOS),
        )))
    }

    /// Renders the conversation; with `add_generation_prompt` the result ends with the header
    /// of an assistant turn, ready for the model to continue.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(python_method);
        let template = env.template_from_str(&self.source)?;
        Ok(template.render(context! {
            messages,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            add_generation_prompt,
        })?)
    }
}

impl ChatTemplate {
    /// Prompt ids of the conversation (without the BOS the tokenizer may want in front): the
    /// template's own markup with its special tokens parsed, and every message's role and
    /// content as plain text, so that a message cannot end its turn and open another one (a
    /// system turn, say) by writing the markup itself.
    ///
    /// Contents are marked before rendering ([`Tokenizer::mark_literal`]) rather than cut out
    /// after it, so the template can still trim or split them, and text without control-token
    /// markup renders and tokenizes exactly as before (the ids llama.cpp gives).
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, ModelError> {
        let mut literals = Literals::default();
        let marked: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: tokenizer.mark_literal(&m.role, &mut literals),
                content: tokenizer.mark_literal(&m.content, &mut literals),
            })
            .collect();
        let text = self.render(&marked, add_generation_prompt)?;
        Ok(tokenizer.encode_marked(&text, &literals)?)
    }
}

/// Templates call this to reject conversations they cannot format (e.g. roles out of order).
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The Python methods HF templates use most (`content.strip()`, `.startswith(..)`,
/// `.split(..)`, `dict.items()` ...), which minijinja does not have natively.
fn python_method(
    state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() != ValueKind::Map {
        return Err(Error::from(ErrorKind::UnknownMethod));
    }
    match method {
        "items" => {
            let () = from_args(args)?;
            state.apply_filter("items", std::slice::from_ref(value))
        }
        "keys" => {
            let () = from_args(args)?;
            Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
        }
        "values" => {
            let () = from_args(args)?;
            let values = value.try_iter()?.map(|key| value.get_item(&key));
            Ok(Value::from(values.collect::<Result<Vec<_>, _>>()?))
        }
        "get" => {
            let (key, default): (Value, Option<Value>) = from_args(args)?;
            let found = value.get_item(&key)?;
            Ok(if found.is_undefined() {
                default.unwrap_or(Value::from(()))
            } else {
                found
            })
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    Ok(match method {
        "strip" | "lstrip" | "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            let strip = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
            Value::from(match method {
                "strip" => s.trim_matches(strip),
                "lstrip" => s.trim_start_matches(strip),
                _ => s.trim_end_matches(strip),
            })
        }
        "startswith" => {
            let (prefix,): (&str,) = from_args(args)?;
            Value::from(s.starts_with(prefix))
        }
        "endswith" => {
            let (suffix,): (&str,) = from_args(args)?;
            Value::from(s.ends_with(suffix))
        }
        "lower" => {
            let () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "upper" => {
            let () = from_args(args)?;
            Value::from(s.to_uppercase())
        }
        "replace" => {
            let (from, to): (&str, &str) = from_args(args)?;
            Value::from(s.replace(from, to))
        }
        "split" => {
            let (separator,): (Option<&str>,) = from_args(args)?;
            let parts: Vec<Value> = match separator {
                None => s.split_whitespace().map(Value::from).collect(),
                Some("") => {
                    return Err(Error::new(ErrorKind::InvalidOperation, "empty separator"));
                }
                Some(separator) => s.split(separator).map(Value::from).collect(),
            };
            Value::from(parts)
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.into(), "<s>".into(), "</s>".into())
    }

    #[test]
    fn smollm2_template_adds_default_system_prompt() {
        let out = template(SMOLLM2)
            .render(&[message("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = template(SMOLLM2)
            .render(
                &[message("system", "Be brief."), message("user", "Hi")],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn blocks_are_trimmed_like_hugging_face_jinja() {
        // Expected output as produced by jinja2 with trim_blocks and lstrip_blocks.
        let source =
            "{{ bos_token }}\n  {% for m in messages %}\n  [{{ m.role }}]\n  {% endfor %}\n{{ eos_token }}\n";
        let out = template(source)
            .render(&[message("user", "  hello  ")], false)
            .unwrap();
        assert_eq!(out, "<s>\n  [user]\n</s>");
    }

    #[test]
    fn python_methods_work() {
        let source = "{{ messages[0].content.split('</think>')[-1].lstrip('\\n') }}|\
                      {{ messages[0].content.startswith('a') }}|{{ ' x '.strip() }}|{{ messages[0].get('role') }}|\
                      {{ messages[0].get('missing', 'none') }}|{% for k, v in messages[0].items() %}{{ k }}{% endfor %}";
        let out = template(source)
            .render(&[message("user", "a</think>\n\nanswer")], false)
            .unwrap();
        assert_eq!(out, "answer|True|x|user|none|rolecontent");
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_errors() {
        let source =
            "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}";
        let err = template(source)
            .render(&[message("user", "x")], false)
            .unwrap_err();
        assert!(err.to_string().contains("system first"), "{err}");
        assert!(template("{% for %}").render(&[], false).is_err());
        assert!(template("{{ messages[0].content.nope() }}")
            .render(&[message("user", "x")], false)
            .is_err());
    }

    #[test]
    fn from_gguf_reads_template_and_special_tokens() {
        let tokens = ["<s>", "</s>", "x"]
            .iter()
            .map(|t| GgufValue::String(t.to_string()))
            .collect();
        let mut md = HashMap::from([
            (KEY_TOKENS.to_string(), GgufValue::Array(tokens)),
            (KEY_BOS.to_string(), GgufValue::U32(0)),
            (KEY_EOS.to_string(), GgufValue::U32(7)),
        ]);
        assert!(ChatTemplate::from_gguf(&md).unwrap().is_none());
        md.insert(KEY_TEMPLATE.to_string(), GgufValue::U32(1));
        assert!(matches!(
            ChatTemplate::from_gguf(&md),
            Err(ChatTemplateError::WrongType(KEY_TEMPLATE))
        ));
        md.insert(
            KEY_TEMPLATE.to_string(),
            GgufValue::String("{{ bos_token }}|{{ eos_token }}".into()),
        );
        let template = ChatTemplate::from_gguf(&md).unwrap().unwrap();
        // The out-of-range EOS id renders as empty rather than failing.
        assert_eq!(template.render(&[], false).unwrap(), "<s>|");
    }

    #[test]
    fn loop_controls_work() {
        let source = "{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}\
                      {% if m.role == 'stop' %}{% break %}{% endif %}{{ m.content }}{% endfor %}";
        let out = template(source)
            .render(
                &[
                    message("user", "a"),
                    message("skip", "b"),
                    message("user", "c"),
                    message("stop", "d"),
                    message("user", "e"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(out, "ac");
    }

    #[test]
    fn gemma_files_without_a_template_get_the_gemma_format() {
        let mut md = HashMap::from([(KEY_ARCH.to_string(), GgufValue::String("gemma3".into()))]);
        let template = ChatTemplate::from_gguf(&md).unwrap().expect("built-in");
        let out = template
            .render(
                &[
                    message("system", " Be brief. "),
                    message("user", "Hi\n"),
                    message("assistant", "Hello"),
                    message("user", "Bye"),
                ],
                true,
            )
            .unwrap();
        // As llama.cpp's built-in `gemma` format renders it.
        assert_eq!(
            out,
            "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        md.insert(KEY_ARCH.to_string(), GgufValue::String("llama".into()));
        assert!(ChatTemplate::from_gguf(&md).unwrap().is_none());
    }
}
