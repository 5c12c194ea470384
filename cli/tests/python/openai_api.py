"""Drives `edge-node serve-api` with the official `openai` package, as any user's script would.

Run by cli/tests/it/api.rs with:
  BASE_URL   http://127.0.0.1:PORT/v1
  MODEL_ID   the model id the gateway serves
  EXPECTED   JSON: {"chat_prompt", "chat_text", "chat_prompt_tokens", "completion_prompt",
             "completion_text", "tokens"} from the single-process reference (greedy)
Exits non-zero with a message on the first mismatch.
"""

import json
import os
import sys

import openai

base_url = os.environ["BASE_URL"]
model = os.environ["MODEL_ID"]
expected = json.loads(os.environ["EXPECTED"])
n = expected["tokens"]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


# Models.
ids = [m.id for m in client.models.list().data]
check(ids == [model], f"models.list() = {ids}")

# Non-streaming chat, greedy: token-for-token the local reference.
messages = [{"role": "user", "content": expected["chat_prompt"]}]
r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=n)
check(r.object == "chat.completion", f"object {r.object}")
check(r.choices[0].message.role == "assistant", "role")
check(r.choices[0].message.content == expected["chat_text"],
      f"chat text {r.choices[0].message.content!r} != {expected['chat_text']!r}")
check(r.usage.prompt_tokens == expected["chat_prompt_tokens"], f"prompt tokens {r.usage}")
check(r.usage.completion_tokens == n and r.choices[0].finish_reason == "length",
      f"usage {r.usage} finish {r.choices[0].finish_reason}")
check(r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "total")

# Streaming chat: same text, piece by piece, then the finish reason and usage.
stream = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=n, stream=True,
    stream_options={"include_usage": True})
pieces, finish, usage, chunks = [], None, None, 0
for chunk in stream:
    chunks += 1
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
check("".join(pieces) == expected["chat_text"], f"streamed {''.join(pieces)!r}")
check(len(pieces) > 1, f"streamed in {len(pieces)} piece(s), expected several")
check(finish == "length", f"stream finish {finish}")
check(usage is not None and usage.completion_tokens == n, f"stream usage {usage}")

# Legacy completions, plain text prompt.
r = client.completions.create(model=model, prompt=expected["completion_prompt"], temperature=0,
                              max_tokens=n)
check(r.choices[0].text == expected["completion_text"],
      f"completion {r.choices[0].text!r} != {expected['completion_text']!r}")
pieces = [c.choices[0].text for c in client.completions.create(
    model=model, prompt=expected["completion_prompt"], temperature=0, max_tokens=n, stream=True)
    if c.choices]
check("".join(pieces) == expected["completion_text"], f"streamed completion {pieces}")

# A stop sequence cuts the text before it and ends with "stop".
text = expected["chat_text"]
cut = max(1, len(text) // 2)
stop = text[cut:cut + 3]
if stop.strip():
    r = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                       max_tokens=n, stop=[stop])
    want = text[:text.index(stop)]
    check(r.choices[0].message.content == want, f"stop: {r.choices[0].message.content!r} != {want!r}")
    check(r.choices[0].finish_reason == "stop", f"stop finish {r.choices[0].finish_reason}")

# Sampling with a seed is reproducible; another seed gives another text.
def sampled(seed):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=0.9, top_p=0.95, seed=seed, max_tokens=24).choices[0].message.content
a = sampled(7)
check(a == sampled(7), "same seed, same text")
check(a != sampled(8), "another seed, another text")

# Errors in OpenAI's shape, raised as the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    check(False, "unknown model accepted")
except openai.NotFoundError as e:
    check(e.status_code == 404 and e.code == "model_not_found", f"unknown model: {e}")
try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    check(False, "temperature 5 accepted")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.param == "temperature", f"bad temperature: {e}")
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x" * 40000}])
    check(False, "over-long prompt accepted")
except openai.BadRequestError as e:
    check(e.code == "context_length_exceeded", f"long prompt: {e}")

print(f"ok: {checks} checks")
