"""Clients people point at an OpenAI-compatible server, run against serve.app over real HTTP: lm-evaluation-harness
(its ``local-completions`` model, which scores choices by the prompt log-probabilities that ``echo`` returns) and
langchain-openai (structured output and forced tool calls). They come from the ``clients`` extra: ``make
test-clients`` installs it and runs this module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress import builtin

pytestmark = pytest.mark.clients

FACTS = Path(__file__).parent / "data" / "facts.jsonl"  # 40 four-way cloze questions of our own
TASK = """task: raypress_facts
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def clients_url(deploy):
    return deploy("clients", {"model": "smollm2-135m", "model_name": "smol", "num_threads": 2})


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "raypress_facts.yaml").write_text(TASK.format(data=FACTS))
    return d


def lm_eval(task_dir: Path, out: Path, model: str, model_args: dict) -> tuple[float, dict[int, list[float]]]:
    """Run the ``lm_eval`` command on the task: its accuracy, and each question's log-likelihood of each choice, from
    the files it writes."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [Path(sys.executable).with_name("lm_eval"), "--model", model, "--model_args", args, "--tasks",
           "raypress_facts", "--include_path", str(task_dir), "--output_path", str(out), "--seed", "0",
           "--log_samples", "--batch_size", "8" if model == "hf" else "1",
           *(["--device", "cpu"] if model == "hf" else [])]
    run = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results, samples = sorted(out.rglob("results_*.json")), sorted(out.rglob("samples_raypress_facts_*.jsonl"))
    assert results and samples, f"lm_eval wrote no results under {out}: {run.stdout[-2000:]}"
    scores = {}
    for line in samples[-1].read_text().splitlines():
        sample = json.loads(line)
        scores[sample["doc_id"]] = [float(r[0]) for r in sample["filtered_resps"]]
    return json.loads(results[-1].read_text())["results"]["raypress_facts"]["acc,none"], scores


@pytest.mark.timeout(1800)
def test_lm_eval_local_completions_scores_as_its_own_hf_backend_on_the_same_weights(clients_url, task_dir, tmp_path):
    folder = builtin.builtin_path("smollm2-135m")  # the float32 folder the server loads
    reference, reference_scores = lm_eval(task_dir, tmp_path / "hf", "hf", {"pretrained": folder, "dtype": "float32"})
    served = {"model": "smol", "base_url": f"{clients_url}/v1/completions", "tokenizer_backend": "huggingface",
              "tokenizer": folder, "num_concurrent": 1, "max_retries": 1}
    assert reference > 0.5  # the model knows most of these: a broken scorer lands near chance (0.25)
    for tokenized in (True, False):  # prompts as token ids (lm-eval's default), then as text
        accuracy, scores = lm_eval(task_dir, tmp_path / f"tokenized-{tokenized}", "local-completions",
                                   {**served, "tokenized_requests": tokenized})
        gap = max(abs(a - b) for k in reference_scores for a, b in zip(scores[k], reference_scores[k], strict=True))
        print(f"raypress_facts accuracy: lm-eval hf {reference:.3f}, local-completions (tokenized_requests="
              f"{tokenized}) {accuracy:.3f}; largest log-likelihood difference {gap:.2e}")
        assert len(scores) == len(reference_scores) == 40
        assert abs(accuracy - reference) <= 0.01 and gap < 1e-3, (accuracy, reference, gap)


@pytest.fixture(scope="module")
def chat(clients_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=f"{clients_url}/v1", api_key="unused", model="smol", temperature=0, max_tokens=96,
                      max_retries=0, timeout=120)


@pytest.mark.timeout(600)
def test_langchain_with_structured_output_returns_the_pydantic_model(chat):
    import pydantic

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=40)
        country: str = pydantic.Field(max_length=40)
        population_millions: float = pydantic.Field(ge=0, le=100)
        landmarks: list[str] = pydantic.Field(max_length=3)

    for place in ("Paris", "Tokyo", "Cairo"):
        city = chat.with_structured_output(City).invoke(f"Describe {place} as a city record.")
        assert isinstance(city, City)
        assert 0 <= city.population_millions <= 100 and len(city.landmarks) <= 3


@pytest.mark.timeout(600)
def test_langchain_bind_tools_with_a_forced_choice_gets_calls_whose_arguments_parse(chat):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str, unit: str = "celsius") -> str:
        """The weather in a city, in celsius or fahrenheit."""
        return f"sunny in {city}"

    @tool
    def get_time(zone: str) -> str:
        """The time now in a time zone."""
        return zone

    for choice in ("get_weather", "any"):  # a named function, then any of them (OpenAI's "required")
        message = chat.bind_tools([get_weather, get_time], tool_choice=choice).invoke("What is the weather in Rome?")
        assert message.tool_calls, message
        call = message.tool_calls[0]
        assert call["name"] in ("get_weather", "get_time") and (choice == "any" or call["name"] == "get_weather")
        assert isinstance(call["args"], dict) and message.invalid_tool_calls == []
        if call["name"] == "get_weather":
            assert isinstance(call["args"]["city"], str)
