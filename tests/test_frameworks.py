"""Agent frameworks drive the server unchanged: the official openai SDK and the OpenAI Agents SDK
(openai-agents, OpenAIChatCompletionsModel with a custom base_url) against a tiny real checkpoint
(tests.helpers.tool_calling_checkpoint: a few seconds of training, so that its calls end), with
grammar-constrained decoding: tool_choice required / named / auto / none, schema-valid arguments,
structured outputs (json_schema, json_object), streamed and not."""

import asyncio
import json

import openai
import pytest
from jsonschema import validate
from pydantic import BaseModel

from tests.helpers import start_server, stop_server, tool_calling_checkpoint

WEATHER = {  # the client tool, with more to get wrong: an enum and integer bounds
    "name": "get_weather",
    "description": "the weather in a city",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city"],
        "additionalProperties": False,
    },
}
ORDER = {
    "name": "place_order",
    "parameters": {
        "type": "object",
        "properties": {
            "item": {"type": "string", "maxLength": 20},
            "count": {"type": "integer", "minimum": 1},
            "price": {"type": "number"},
            "gift": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["item", "count", "gift"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": f} for f in (WEATHER, ORDER)]
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, ORDER)}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


class Forecast(BaseModel):
    city: str
    degrees: int
    sunny: bool


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tag = tool_calling_checkpoint()
    flags = ("-i", "sft", "--tag", tag, "--device-type", "cpu", "--max-tokens", "256")
    proc, url = start_server(flags, tmp_path_factory.mktemp("frameworks") / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def one_call(client, stream, **kw):
    """(finish_reason, content, [(name, arguments)]) of one reply, streamed or not."""
    kw = dict(model="nanocode", messages=ASK, tools=TOOLS, temperature=1.0, **kw)
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls = choice.message.tool_calls or []
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in calls]
        return choice.finish_reason, choice.message.content, calls
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:  # (pieces of calls, by index, as the protocol has it)
            name, arguments = calls.get(call.index, ("", ""))
            calls[call.index] = (
                name + (call.function.name or ""),
                arguments + call.function.arguments,
            )
        finish = chunk.choices[0].finish_reason or finish
    return finish, content, [(name, json.loads(args)) for name, args in calls.values()]


def test_required_and_forced_calls_always_match_their_schema(client):
    """100% of 60 replies sampled at temperature 1 (half of them streamed; seeded, so that a failure
    replays): a call, of a tool that is allowed, with arguments valid against its schema."""
    names = set()
    for k in range(60):
        named = {"type": "function", "function": {"name": "place_order"}}
        choice = "required" if k % 2 else named
        finish, content, calls = one_call(client, k % 4 < 2, tool_choice=choice, seed=k)
        assert finish == "tool_calls" and not content and len(calls) == 1, (finish, content, calls)
        name, arguments = calls[0]
        assert name == "place_order" or choice == "required"
        validate(arguments, SCHEMAS[name])
        names.add(name)
    assert names == set(SCHEMAS)  # under "required" the model chose each tool at times


def test_auto_none_and_the_tool_round_trip(client):
    """auto: a call, if any, names one of the request's tools and matches; none: text only; the
    tool's result sent back, the model answers in text (finish_reason stop)."""
    for k in range(8):
        finish, content, calls = one_call(client, stream=k % 2, seed=k)
        assert finish in ("tool_calls", "stop") and (finish == "tool_calls") == bool(calls)
        for name, arguments in calls:
            validate(arguments, SCHEMAS[name])
        finish, content, calls = one_call(client, stream=k % 2, seed=k, tool_choice="none")
        assert finish == "stop" and not calls and content
    forced = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model="nanocode", messages=ASK, tools=TOOLS, tool_choice=forced, temperature=0
    )
    call = r.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}
    messages = ASK + [r.choices[0].message, result]
    r = client.chat.completions.create(
        model="nanocode", messages=messages, tools=TOOLS, temperature=0
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content
    assert not r.choices[0].message.tool_calls
    for stream in (False, True):  # out of tokens inside the call
        finish, _, calls = one_call(client, stream, tool_choice="required", max_tokens=3)
        assert finish == "length" and not calls


def test_structured_outputs_parse(client):
    """response_format json_schema through the SDK's own parser (strict, from a pydantic model),
    streamed and not; json_object gives an object."""
    ask = [{"role": "user", "content": "As JSON: the weather in Lima?"}]
    for seed in range(5):
        r = client.chat.completions.parse(
            model="nanocode", messages=ask, response_format=Forecast, temperature=1.0, seed=seed
        )
        assert r.choices[0].finish_reason == "stop"
        assert isinstance(r.choices[0].message.parsed, Forecast)
    with client.chat.completions.stream(
        model="nanocode", messages=ask, response_format=Forecast, temperature=1.0
    ) as stream:
        assert isinstance(stream.get_final_completion().choices[0].message.parsed, Forecast)
    r = client.chat.completions.create(
        model="nanocode", messages=ask, response_format={"type": "json_object"}, temperature=1.0
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_agents_sdk(url):
    """The OpenAI Agents SDK on our server: a run whose first turn must call the tool (tool_choice
    required, then the SDK's reset to auto) completes the round trip with schema-valid arguments
    (the SDK validates them before calling the function), streamed and not; an agent with an
    output_type gets a parsed structured output."""
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # (traces would go to OpenAI's servers)
    model = OpenAIChatCompletionsModel(
        model="nanocode", openai_client=openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
    )
    cities = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        cities.append(city)
        return f"sunny in {city}, 21 C"

    assert get_weather.strict_json_schema  # sent with "strict": true, additionalProperties false
    weather = Agent(
        name="weather",
        instructions="Answer briefly.",
        model=model,
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="required", temperature=0.0),
    )

    async def runs():
        done = await Runner.run(weather, "Weather in Paris?", max_turns=3)
        streamed = Runner.run_streamed(weather, "Weather in Rome?", max_turns=3)
        async for _ in streamed.stream_events():
            pass
        forecaster = Agent(name="forecast", model=model, output_type=Forecast)
        return done, streamed, await Runner.run(forecaster, "As JSON: the weather in Oslo?")

    done, streamed, forecast = asyncio.run(runs())
    assert len(cities) == 2 and all(isinstance(c, str) for c in cities)
    for result in (done, streamed):
        kinds = [item.type for item in result.new_items]
        assert kinds == ["tool_call_item", "tool_call_output_item", "message_output_item"]
        assert isinstance(result.final_output, str) and result.final_output
    assert isinstance(forecast.final_output, Forecast)
