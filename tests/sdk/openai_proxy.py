"""The official `openai` package (AzureOpenAI, api_key="demo-key") through `limitlab proxy`.

Usage: python tests/sdk/openai_proxy.py path/to/limitlab
Starts two `limitlab mock` (mocks/fast.toml) as `primary` and `secondary` and `limitlab proxy
--config examples/proxy.toml` in front of them, then checks chat (plain and
streamed), the Responses API (plain and streamed), the policy's token headers
for both, the plain OpenAI client on Azure's v1 API, an inline image's tokens,
and the 429 the SDK sees past the rate limit.
"""

import subprocess
import sys

import openai
from openai import AzureOpenAI, OpenAI


PNG_300_BY_200 = (
    "iVBORw0KGgoAAAANSUhEUgAAASwAAADICAIAAADdvUsCAAAAxUlEQVR42u3BMQEAAADCoPVPbQsvoAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAOBvwAYAAbry13gAAAAASUVORK5CYII="
)


def start(args, lines):
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    urls = [proc.stdout.readline().strip().rsplit(" ", 1)[-1] for _ in range(lines)]
    assert all(u.startswith("http://") for u in urls), urls
    return proc, urls


def main():
    limitlab = sys.argv[1]
    procs = []
    try:
        mock = [limitlab, "mock", "--config", "mocks/fast.toml", "--listen", "127.0.0.1:0"]
        p1, (primary,) = start(mock, 1)
        p2, (secondary,) = start(mock, 1)
        procs += [p1, p2]
        p3, (front, admin) = start(
            [limitlab, "proxy", "--config", "examples/proxy.toml", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             "--backend", f"primary={primary}", "--backend", f"secondary={secondary}"],
            2,
        )
        procs.append(p3)
        client = AzureOpenAI(azure_endpoint=front, api_key="demo-key", api_version="2024-10-21", max_retries=0)
        messages = [{"role": "user", "content": "Say hello"}]

        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
        chat = raw.parse()
        assert chat.usage.total_tokens == int(raw.headers["consumed-tokens"]), raw.headers
        assert int(raw.headers["remaining-tokens"]) == 5000 - chat.usage.total_tokens

        stream = client.chat.completions.create(
            model="gpt-4o", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        usage = None
        text = ""
        for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
        assert usage.completion_tokens == 20 and text.startswith("The quick"), (usage, text)

        # The Responses API is charged its usage too: the policy's headers say so.
        responses = AzureOpenAI(azure_endpoint=front, api_key="demo-key", api_version="2025-03-01-preview", max_retries=0)
        raw = responses.responses.with_raw_response.create(model="gpt-4o", input="Say hello")
        response = raw.parse()
        assert response.output_text.startswith("The quick"), response
        assert response.usage.total_tokens == int(raw.headers["consumed-tokens"]), raw.headers
        spent = chat.usage.total_tokens + usage.total_tokens + response.usage.total_tokens
        assert int(raw.headers["remaining-tokens"]) == 5000 - spent, (raw.headers, spent)
        final = None
        for event in responses.responses.create(model="gpt-4o", input="Say hello", stream=True):
            if event.type == "response.completed":
                final = event.response
        assert final.usage.output_tokens == 20, final.usage
        spent += final.usage.total_tokens
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
        spent += raw.parse().usage.total_tokens
        assert int(raw.headers["remaining-tokens"]) == 5000 - spent, (raw.headers, spent)

        # The plain client on Azure's v1 path sends its key as a bearer token.
        v1 = OpenAI(base_url=f"{front}/openai/v1/", api_key="demo-key", max_retries=0)
        assert v1.responses.create(model="gpt-4o", input="Say hello").output_text.startswith("The quick")
        raw = v1.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages)
        assert raw.parse().usage.total_tokens == int(raw.headers["consumed-tokens"]), raw.headers

        # An inline image (a real 300 x 200 PNG) costs gpt-4o 85 tokens and 170 for its one tile.
        image = {"url": "data:image/png;base64," + PNG_300_BY_200}
        content = [{"type": "text", "text": "Say hello"}, {"type": "image_url", "image_url": image}]
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=[{"role": "user", "content": content}])
        seen = raw.parse().usage
        assert seen.prompt_tokens == chat.usage.prompt_tokens + 255, (seen, chat.usage)
        assert seen.total_tokens == int(raw.headers["consumed-tokens"]), raw.headers

        for _ in range(2):
            client.chat.completions.create(model="gpt-4o", messages=messages)
        try:
            client.chat.completions.create(model="gpt-4o", messages=messages)
            raise AssertionError("the 11th call in a minute must be refused")
        except openai.RateLimitError as e:
            assert e.status_code == 429 and "Rate limit is exceeded" in str(e), e
        print(f"openai {openai.__version__} through limitlab proxy: chat, stream, responses, the v1 API, an image, token headers and the 429 ok")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=10)


if __name__ == "__main__":
    main()
