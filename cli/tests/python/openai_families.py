"""The official `openai` client against `edge-node serve-api` for one model family.

Run by cli/tests/it/families.rs with BASE_URL, MODEL_ID and EXPECTED (JSON: question, text,
prompt_tokens, tokens: the single-process greedy chat answer, rendered with the file's own
chat template). Exits non-zero with a message on the first mismatch.
"""

import json
import os
import sys

import openai

expected = json.loads(os.environ["EXPECTED"])
model = os.environ["MODEL_ID"]
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key="unused", max_retries=0,
                       timeout=300)
n = expected["tokens"]
messages = [{"role": "user", "content": expected["question"]}]
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


ids = [m.id for m in client.models.list().data]
check(ids == [model], f"models.list() = {ids}")

stream = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=n, stream=True,
    stream_options={"include_usage": True})
pieces, usage = [], None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
check("".join(pieces) == expected["text"], f"streamed {''.join(pieces)!r} != {expected['text']!r}")
check(usage is not None and usage.prompt_tokens == expected["prompt_tokens"], f"usage {usage}")

r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=n)
check(r.choices[0].message.content == expected["text"],
      f"chat {r.choices[0].message.content!r} != {expected['text']!r}")
print(f"ok: {checks} checks")
