"""Asks a Sovereign node's API with the official openai client, streaming,
and prints each piece of the answer as one JSON line as it arrives.

usage: ring_client.py BASE_URL KEY PROMPT MAX_TOKENS SEED TEMPERATURE
"""

import json
import sys

from openai import OpenAI

base, key, prompt, max_tokens, seed, temperature = sys.argv[1:7]
client = OpenAI(base_url=base, api_key=key, max_retries=0, timeout=600)
stream = client.chat.completions.create(
    model="smollm2",
    messages=[{"role": "user", "content": prompt}],
    max_tokens=int(max_tokens),
    seed=int(seed),
    temperature=float(temperature),
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(json.dumps({"piece": chunk.choices[0].delta.content}), flush=True)
print(json.dumps({"done": True}), flush=True)
