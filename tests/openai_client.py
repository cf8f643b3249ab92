#!/usr/bin/env python3
"""Drive a running `vajra-engine serve` with the official `openai` package.

    python tests/openai_client.py http://127.0.0.1:PORT MODEL_NAME

Checks a completion, a chat completion, a streamed chat completion and a bad request, and exits
non-zero with a message on the first mismatch. Run by crates/vajra-engine/tests/openai_client.rs.
"""
import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

models = [m.id for m in client.models.list()]
assert models == [model], models

c = client.completions.create(model=model, prompt="Paris is", max_tokens=6, temperature=0,
                              extra_body={"ignore_eos": True})
assert c.object == "text_completion", c
assert c.usage.completion_tokens == 6, c.usage
assert c.choices[0].finish_reason == "length", c.choices[0]
assert isinstance(c.choices[0].text, str) and c.choices[0].text, c.choices[0]

chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}],
                                      max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
assert chat.choices[0].message.role == "assistant", chat
assert chat.usage.completion_tokens == 5, chat.usage

pieces, finish = [], None
for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}):
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat.choices[0].message.content)
assert finish == "length", finish

try:
    client.completions.create(model=model, prompt="x", max_tokens=-1)
    raise SystemExit("max_tokens = -1 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "max_tokens" in str(e), e

try:
    client.completions.create(model="no-such-model", prompt="x")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert "no-such-model" in str(e), e

print(f"openai {openai.__version__}: completion, chat, streaming chat and bad requests OK")
