"""The official `openai` package (AzureOpenAI client) against `limitlab mock`.

Usage: python tests/sdk/openai_sdk.py path/to/limitlab
Starts `limitlab mock --config mocks/sdk.toml --listen 127.0.0.1:0`, reads the port from
its first line, and checks chat (plain and streamed), completions, embeddings, the
Responses API (plain and streamed, on the dated path and on /openai/v1/), chat,
completions, embeddings and the model list on /openai/v1/ with the plain OpenAI client, and that
the SDK's own retry honours the mock's 429 headers. Exits non-zero on failure.
"""

import json
import subprocess
import sys
import time
import urllib.request

import openai
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
        print(f"openai {openai.__version__}: chat, n choices, stream, completions, embeddings (text and tokens), responses, the v1 API, auth and 429 retry ok "
              f"(retry waited {waited:.1f} s)")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
