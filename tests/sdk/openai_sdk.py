"""The official `openai` package (AzureOpenAI client) against `limitlab mock`.

Usage: python tests/sdk/openai_sdk.py path/to/limitlab
Starts `limitlab mock --config mocks/sdk.toml --listen 127.0.0.1:0`, reads the port from
its first line, and checks chat (plain and streamed), structured outputs, JSON mode and
tool calls (parsed by the SDK's own pydantic models), completions, embeddings, the
Responses API (plain and streamed, on the dated path and on /openai/v1/), chat,
completions, embeddings and the model list on /openai/v1/ with the plain OpenAI client, and that
the SDK's own retry honours the mock's 429 headers. Exits non-zero on failure.
"""

import json
import subprocess
import sys
import time
import urllib.request

import datetime
from typing import Literal, Optional

import openai
import pydantic
from openai import AzureOpenAI, OpenAI


def start(limitlab):
    proc = subprocess.Popen(
        [limitlab, "mock", "--config", "mocks/sdk.toml", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip()
    assert line.startswith("listening on http://"), f"unexpected first line: {line!r}"
    return proc, line.removeprefix("listening on ")


def stats(base):
    with urllib.request.urlopen(f"{base}/_mock/stats") as r:
        return json.load(r)["deployments"]


def check_responses(base):
    """The Responses API: AzureOpenAI on `/openai/responses?api-version=...`, and
    OpenAI on `/openai/v1/` (the key as `api-key`, as Azure takes it)."""
    dated = AzureOpenAI(azure_endpoint=base, api_key="test-key", api_version="2025-03-01-preview", max_retries=0)
    v1 = OpenAI(base_url=f"{base}/openai/v1/", api_key="unused", default_headers={"api-key": "test-key"}, max_retries=0)
    for client in (dated, v1):
        response = client.responses.create(model="gpt-4o", instructions="Be brief.", input="Say hello")
        assert response.status == "completed" and response.output_text.startswith("The quick"), response
        assert response.usage.output_tokens == 16, response.usage
        assert response.usage.total_tokens == response.usage.input_tokens + 16, response.usage

        text, final = "", None
        for event in client.responses.create(model="gpt-4o", input="Say hello", stream=True, max_output_tokens=5):
            if event.type == "response.output_text.delta":
                text += event.delta
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
        assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens", final
        assert final.usage.output_tokens == 5 and final.output_text == text, (final.usage, text)
        check_responses_structured(client)
        check_stored(client)


def check_stored(client):
    """Stored responses: retrieved, continued (`previous_response_id` carries the
    earlier input and output into the next input), run in the background and
    polled, cancelled, and deleted."""
    first = client.responses.create(model="gpt-4o", input="My name is Ada.")
    again = client.responses.retrieve(first.id)
    assert again.status == "completed" and again.output_text == first.output_text, again
    alone = client.responses.create(model="gpt-4o", input="What is my name?", store=False)
    continued = client.responses.create(model="gpt-4o", input="What is my name?", previous_response_id=first.id)
    carried = first.usage.input_tokens + first.usage.output_tokens
    assert continued.usage.input_tokens == alone.usage.input_tokens + carried, (continued.usage, alone.usage)
    assert continued.previous_response_id == first.id, continued
    try:
        client.responses.create(model="gpt-4o", input="Hi", previous_response_id=alone.id)
        raise AssertionError("a response made with store=False cannot be continued")
    except openai.BadRequestError as e:
        assert e.code == "previous_response_not_found", e

    queued = client.responses.create(model="gpt-4o", input="Say hello", background=True)
    assert queued.status == "queued" and queued.usage is None, queued
    polled = client.responses.retrieve(queued.id)
    while polled.status in ("queued", "in_progress"):
        time.sleep(0.02)
        polled = client.responses.retrieve(queued.id)
    assert polled.status == "completed" and polled.usage.output_tokens == 16, polled

    slow = client.responses.create(model="slow", input="Say hello", background=True)
    cancelled = client.responses.cancel(slow.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(slow.id).status == "cancelled", cancelled

    client.responses.delete(first.id)
    try:
        client.responses.retrieve(first.id)
        raise AssertionError("a deleted response is gone")
    except openai.NotFoundError:
        pass


def check_responses_structured(client):
    """The Responses API's structured outputs (parsed by the SDK's pydantic model)
    and function calls, plain and streamed, and a call's result answered in words."""
    parsed = client.responses.parse(model="gpt-4o", input="Describe a person.", text_format=Person)
    assert isinstance(parsed.output_parsed, Person) and parsed.status == "completed", parsed
    weather = {"type": "function", "name": "get_weather", "parameters": GetWeather.model_json_schema()}
    called = client.responses.create(model="gpt-4o", input="Weather in Oslo?", tools=[weather])
    call = called.output[0]
    assert call.type == "function_call" and call.name == "get_weather", called.output
    GetWeather.model_validate_json(call.arguments)
    assert called.usage.output_tokens == 16, called.usage

    arguments, final = "", None
    for event in client.responses.create(model="gpt-4o", input="Weather in Oslo?", tools=[weather], stream=True):
        if event.type == "response.function_call_arguments.delta":
            arguments += event.delta
        if event.type == "response.completed":
            final = event.response
    assert arguments == call.arguments == final.output[0].arguments, (arguments, final)

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    echoed = {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
    reply = client.responses.create(
        model="gpt-4o", input=[{"role": "user", "content": "Weather in Oslo?"}, echoed, result], tools=[weather]
    )
    assert reply.output_text.startswith("The quick"), reply


class Pet(pydantic.BaseModel):
    name: str
    legs: int


class Person(pydantic.BaseModel):
    name: str
    born: datetime.date
    tags: list[str]
    pet: Optional[Pet]
    kind: Literal["customer", "supplier"]
    age: int = pydantic.Field(ge=18)


class GetWeather(pydantic.BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]
    days: int


def check_structured(client):
    """Structured outputs and JSON mode give JSON the SDK's own parsing accepts;
    tools are called (plain and streamed), and a call's result is answered in words."""
    messages = [{"role": "user", "content": "Describe a person."}]
    parsed = client.chat.completions.parse(model="gpt-4o", messages=messages, response_format=Person)
    person = parsed.choices[0].message.parsed
    assert isinstance(person, Person) and person.age >= 18 and parsed.choices[0].finish_reason == "stop", parsed
    assert parsed.usage.completion_tokens >= 16, parsed.usage

    json_mode = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Answer in JSON."}], response_format={"type": "json_object"}
    )
    answer = json.loads(json_mode.choices[0].message.content)
    assert answer["answer"].startswith("The quick") and json_mode.usage.completion_tokens == 16, json_mode

    tools = [openai.pydantic_function_tool(GetWeather)]
    asked = [{"role": "user", "content": "Weather in Oslo?"}]
    called = client.chat.completions.parse(model="gpt-4o", messages=asked, tools=tools)
    choice = called.choices[0]
    call = choice.message.tool_calls[0]
    assert choice.finish_reason == "tool_calls" and isinstance(call.function.parsed_arguments, GetWeather), choice
    assert called.usage.completion_tokens == 16, called.usage

    with client.chat.completions.stream(model="gpt-4o", messages=asked, tools=tools) as stream:
        streamed = stream.get_final_completion()
    streamed_call = streamed.choices[0].message.tool_calls[0]
    assert streamed_call.function.arguments == call.function.arguments, (streamed_call, call)
    assert isinstance(streamed_call.function.parsed_arguments, GetWeather), streamed_call

    answered = asked + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    reply = client.chat.completions.create(model="gpt-4o", messages=answered, tools=tools)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content.startswith("The quick"), reply

    named = client.chat.completions.create(
        model="gpt-4o", messages=asked, tools=tools, tool_choice={"type": "function", "function": {"name": "GetWeather"}}
    )
    assert named.choices[0].finish_reason == "stop" and named.choices[0].message.tool_calls, named


def check_v1(base):
    """Azure's v1 API with the plain OpenAI client: the deployment is `model`,
    and the key goes as a bearer token."""
    v1 = OpenAI(base_url=f"{base}/openai/v1/", api_key="test-key", max_retries=0)
    chat = v1.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], n=2)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 2 * 16, chat
    text = ""
    for chunk in v1.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Say hello"}], stream=True, max_tokens=3
    ):
        text += "".join(choice.delta.content or "" for choice in chunk.choices)
    assert text == "The quick brown", text
    completion = v1.completions.create(model="gpt-35-turbo-instruct", prompt="Say this is a test")
    assert completion.usage.completion_tokens == 8, completion.usage
    embeddings = v1.embeddings.create(model="text-embedding-3-small", input="one", dimensions=8)
    assert len(embeddings.data[0].embedding) == 8, embeddings
    listed = [m.id for m in v1.models.list()]
    assert "gpt-4o" in listed and v1.models.retrieve("gpt-4o").id == "gpt-4o", listed


def main():
    proc, base = start(sys.argv[1])
    try:
        client = AzureOpenAI(azure_endpoint=base, api_key="test-key", api_version="2024-10-21", max_retries=2)
        messages = [{"role": "user", "content": "Say hello"}]

        chat = client.chat.completions.create(model="gpt-4o", messages=messages)
        assert chat.choices[0].message.role == "assistant"
        assert chat.usage.completion_tokens == 16, chat.usage
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + 16

        stream = client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}, max_tokens=5
        )
        text, usage, finish = "", None, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert finish == "length", finish
        assert usage.completion_tokens == 5 and text.startswith("The quick"), (usage, text)

        scored = client.chat.completions.create(model="gpt-4o", messages=messages, logprobs=True, top_logprobs=2)
        entries = scored.choices[0].logprobs.content
        assert "".join(e.token for e in entries) == scored.choices[0].message.content, entries
        assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token for e in entries), entries

        several = client.chat.completions.create(model="gpt-4o", messages=messages, n=3)
        assert [c.index for c in several.choices] == [0, 1, 2], several.choices
        assert several.usage.completion_tokens == 3 * 16, several.usage

        completion = client.completions.create(model="gpt-35-turbo-instruct", prompt="Say this is a test")
        assert completion.choices[0].text and completion.usage.completion_tokens == 8, completion

        embeddings = client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
        assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) == 1536
        again = client.embeddings.create(model="text-embedding-3-small", input=["one"])
        assert again.data[0].embedding == embeddings.data[0].embedding, "embeddings are deterministic"
        # Inputs as tokens (cl100k_base: "one" is 606, "two" 20375), as LangChain sends them.
        tokens = client.embeddings.create(model="text-embedding-3-small", input=[[606], [20375]])
        assert [d.embedding for d in tokens.data] == [d.embedding for d in embeddings.data], "tokens embed as text"
        assert tokens.usage.prompt_tokens == 2, tokens.usage
        short = client.embeddings.create(model="text-embedding-3-small", input="one", dimensions=256)
        assert len(short.data[0].embedding) == 256, len(short.data[0].embedding)

        check_structured(client)
        check_responses(base)
        check_v1(base)

        try:
            AzureOpenAI(azure_endpoint=base, api_key="wrong", api_version="2024-10-21").chat.completions.create(
                model="gpt-4o", messages=messages
            )
            raise AssertionError("a wrong key must be refused")
        except openai.AuthenticationError:
            pass

        # rpm 6: the second call in a row is throttled for about 10 s; the SDK must
        # wait what `retry-after-ms` says (its own backoff would be under 1 s).
        client.chat.completions.create(model="throttled", messages=messages)
        started = time.monotonic()
        client.chat.completions.create(model="throttled", messages=messages)
        waited = time.monotonic() - started
        counts = stats(base)["throttled"]
        assert counts["throttled"] == 1 and counts["completed"] == 2, counts
        assert 9.0 <= waited <= 12.0, f"waited {waited:.1f} s"
        print(f"openai {openai.__version__}: chat, n choices, stream, logprobs, structured outputs, tools, completions, embeddings (text and tokens), responses (structured, calls, stored, continued, background), the v1 API, auth and 429 retry ok "
              f"(retry waited {waited:.1f} s)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
