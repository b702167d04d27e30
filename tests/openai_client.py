"""The official OpenAI Python client against `sovereign serve`, unchanged.

Usage: openai_client.py BASE_URL API_KEY MODEL [CA_FILE]   (run by tests/serve.rs
and vm-tests/tests/node_image.rs). With CA_FILE (the cluster CA certificate),
TLS trusts that certificate alone.
"""
import ssl
import sys

import httpx
from openai import OpenAI

base_url, api_key, model = sys.argv[1:4]
if len(sys.argv) > 4:
    only_the_ca = ssl.create_default_context(cafile=sys.argv[4])
    client = OpenAI(base_url=base_url, api_key=api_key, http_client=httpx.Client(verify=only_the_ca))
else:
    client = OpenAI(base_url=base_url, api_key=api_key)

models = [m.id for m in client.models.list()]
assert models == [model], models

question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
reply = client.chat.completions.create(model=model, messages=question, temperature=0, max_tokens=24, seed=1)
text = reply.choices[0].message.content
assert "Paris" in text, text
assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0

stream = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=24, seed=1, stream=True
)
streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
assert streamed == text, (streamed, text)

completion = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
assert "Paris" in completion.choices[0].text, completion.choices[0].text

try:
    client.chat.completions.create(model="no-such-model", messages=question)
    raise AssertionError("an unknown model was accepted")
except Exception as error:  # openai.NotFoundError
    assert getattr(error, "status_code", None) == 404, error

print("openai client ok:", text)
