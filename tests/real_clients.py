"""The clients staff actually use, unchanged, against `sovereign serve`: the
OpenAI SDK, LangChain (langchain-openai) and LiteLLM's openai/ provider.
Structured output parses, tool calls round-trip, streams report usage and
refused fields name themselves.

Usage: real_clients.py BASE_URL API_KEY MODEL   (run by tests/serve.rs)
"""
import json
import os
import sys

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # never fetch the cost map

import litellm  # noqa: E402
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402
from langchain_openai import ChatOpenAI  # noqa: E402
from openai import BadRequestError, OpenAI  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

base_url, api_key, model = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=api_key)
question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
place_schema = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
    },
    "required": ["city", "country"],
    "additionalProperties": False,
}
weather_tool = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
weather_question = {"role": "user", "content": "What is the weather in Paris?"}

# --- the OpenAI SDK ---
assert client.models.retrieve(model).id == model

reply = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Name a city and its country, as JSON."}],
    response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": place_schema, "strict": True}},
    temperature=0,
    max_tokens=60,
)
place = json.loads(reply.choices[0].message.content)
assert set(place) == {"city", "country"} and all(isinstance(v, str) for v in place.values()), place

reply = client.chat.completions.create(
    model=model, messages=question, temperature=0, max_tokens=8, logprobs=True, top_logprobs=3
)
tokens = reply.choices[0].logprobs.content
assert len(tokens) == reply.usage.completion_tokens, (len(tokens), reply.usage)
assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in tokens), tokens
# Greedy: the chosen token is the most likely one.
assert all(t.token == t.top_logprobs[0].token for t in tokens), tokens
assert "".join(t.token for t in tokens) == reply.choices[0].message.content

chunks = list(
    client.chat.completions.create(
        model=model, messages=question, temperature=0, max_tokens=8, stream=True,
        stream_options={"include_usage": True},
    )
)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, chunks[-1]
assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens

for field, value in [("n", 2), ("reasoning_effort", "high")]:
    try:
        client.chat.completions.create(model=model, messages=question, max_tokens=4, **{field: value})
        raise AssertionError(f"{field} was accepted")
    except BadRequestError as error:
        assert error.body["param"] == field and field in error.body["message"], error.body

reply = client.chat.completions.create(
    model=model, messages=[weather_question], tools=[weather_tool], tool_choice="required",
    temperature=0, max_tokens=60,
)
choice = reply.choices[0]
assert choice.finish_reason == "tool_calls", choice
call = choice.message.tool_calls[0]
assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments), call
followup = client.chat.completions.create(
    model=model,
    messages=[
        weather_question,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C."},
    ],
    tools=[weather_tool],
    tool_choice="none",
    temperature=0,
    max_tokens=30,
)
assert followup.choices[0].message.content, followup

streamed_calls = [
    tc
    for chunk in client.chat.completions.create(
        model=model, messages=[weather_question], tools=[weather_tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=60, stream=True,
    )
    for choice in chunk.choices
    for tc in (choice.delta.tool_calls or [])
]
assert streamed_calls and streamed_calls[0].function.name == "get_weather", streamed_calls
json.loads(streamed_calls[0].function.arguments)

# --- LangChain ---
llm = ChatOpenAI(base_url=base_url, api_key=api_key, model=model, temperature=0, max_tokens=40)
assert "Paris" in llm.invoke("What is the capital of France? Answer in one sentence.").content
streamed = list(ChatOpenAI(base_url=base_url, api_key=api_key, model=model, temperature=0,
                           max_tokens=12, stream_usage=True).stream("Count to three."))
assert "".join(c.content for c in streamed), streamed
usage = [c.usage_metadata for c in streamed if c.usage_metadata]
assert usage and usage[-1]["output_tokens"] > 0, usage


class Place(BaseModel):
    """A city and the country it is in."""

    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


place = llm.with_structured_output(Place).invoke("Name a city and its country.")
assert isinstance(place, Place) and place.city, place


def get_weather(city: str) -> str:
    """The current weather in a city."""
    return "Sunny, 21 C."


message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather", message
assert isinstance(message.tool_calls[0]["args"].get("city"), str), message.tool_calls
answer = llm.bind_tools([get_weather], tool_choice="none").invoke([
    HumanMessage("What is the weather in Paris?"),
    message,
    ToolMessage(get_weather(**message.tool_calls[0]["args"]), tool_call_id=message.tool_calls[0]["id"]),
])
assert answer.content, answer

# --- LiteLLM ---
common = {"model": "openai/" + model, "api_base": base_url, "api_key": api_key, "temperature": 0}
reply = litellm.completion(messages=question, max_tokens=24, **common)
assert "Paris" in reply.choices[0].message.content, reply
chunks = list(litellm.completion(messages=question, max_tokens=8, stream=True,
                                 stream_options={"include_usage": True}, **common))
usage = [c.usage for c in chunks if getattr(c, "usage", None)]
assert usage and usage[-1].completion_tokens > 0 and usage[-1].prompt_tokens > 10, usage
reply = litellm.completion(
    messages=[{"role": "user", "content": "Name a city and its country, as JSON."}], max_tokens=60,
    response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": place_schema, "strict": True}},
    **common,
)
assert set(json.loads(reply.choices[0].message.content)) == {"city", "country"}, reply
reply = litellm.completion(messages=[weather_question], tools=[weather_tool], tool_choice="required",
                           max_tokens=60, **common)
call = reply.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments), call
try:
    litellm.completion(messages=question, max_tokens=4, n=2, **common)
    raise AssertionError("n = 2 was accepted")
except litellm.BadRequestError as error:
    assert "`n`" in str(error), error

print("real clients ok")
