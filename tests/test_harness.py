"""lm-evaluation-harness on a jaxlm run (jaxlm/harness.py) agrees with lm-eval's own Hugging Face
backend on the same model exported with `convert to-hf`: local tasks written here, no download."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import mesh as mesh_lib
from jaxlm import runs

pytestmark = [pytest.mark.hf, pytest.mark.harness]

TASKS = ["jaxlm_choice", "jaxlm_perplexity", "jaxlm_answer"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()


def task_yaml(name: str, data, output_type: str, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"test_split: test\noutput_type: {output_type}\n{body}"
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run directory, its Hugging Face export, a folder of three local tasks): a tiny float32
    model with random weights, a SentencePiece tokenizer, 64 tokens of context."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("transformers")
    from test_generate import random_params

    from jaxlm import config as config_lib
    from jaxlm.convert import from_hf, to_hf
    from jaxlm.data import corpus, tokenizer

    directory = tmp_path_factory.mktemp("harness")
    documents = list(corpus.stdlib_inputs().documents())[:100]
    model_file = tokenizer.train(documents, 512, directory / "tokenizer.model")
    cfg = config_lib.load(
        "tiny", ["model.compute_dtype=float32", "data.source=synthetic", "model.max_seq_len=64"]
    )
    mesh = mesh_lib.make_mesh("dp=8")
    from_hf.write_run(directory / "run", cfg, random_params(cfg.model, std=0.1), mesh, [model_file])
    to_hf.convert(directory / "run", directory / "hf")

    rng = np.random.default_rng(0)
    questions = []
    for _ in range(12):
        choices = [" " + w for w in rng.choice(WORDS, 4, replace=False)]
        answer = int(rng.integers(4))
        question = f"Question: {' '.join(rng.choice(WORDS, 5))}\nAnswer:"
        questions.append({"question": question, "choices": choices, "answer": answer})
    write_jsonl(directory / "choice.jsonl", questions)
    # texts longer than the context: the rolling log-likelihood scores several windows each
    write_jsonl(directory / "text.jsonl", [{"text": d.text[:600]} for d in documents[:6]])
    answers = [
        {"question": q["question"], "answer": q["choices"][q["answer"]].strip()} for q in questions
    ]
    write_jsonl(directory / "answer.jsonl", answers[:6])

    tasks = directory / "tasks"
    tasks.mkdir()
    (tasks / "choice.yaml").write_text(
        task_yaml(
            "jaxlm_choice",
            directory / "choice.jsonl",
            "multiple_choice",
            'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
        )
    )
    (tasks / "perplexity.yaml").write_text(
        task_yaml(
            "jaxlm_perplexity",
            directory / "text.jsonl",
            "loglikelihood_rolling",
            'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
            "  - metric: word_perplexity\n  - metric: byte_perplexity\n"
            "  - metric: bits_per_byte\n",
        )
    )
    (tasks / "answer.yaml").write_text(
        task_yaml(
            "jaxlm_answer",
            directory / "answer.jsonl",
            "generate_until",
            'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
            'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
            "metric_list:\n  - metric: exact_match\n",
        )
    )
    return directory / "run", directory / "hf", tasks


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def both(exported):
    """lm-eval's results of the three tasks on the jaxlm run and on its export."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from jaxlm import harness

    run_dir, hf_dir, tasks = exported
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    ours = harness.evaluate(
        runs.open_run(run_dir),
        mesh_lib.make_mesh("dp=2", jax.devices()[:2]),
        TASKS,
        include_path=str(tasks),
        batch_size=4,
        log_samples=True,
    )
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32"},
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=4,
        device="cpu",
        log_samples=True,
    )
    return ours, theirs


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, metrics",
    [
        ("jaxlm_choice", ["acc,none", "acc_norm,none"]),
        (
            "jaxlm_perplexity",
            ["word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"],
        ),
    ],
)
def test_metrics_agree_with_the_hugging_face_backend(both, task, metrics):
    ours, theirs = both
    for metric in metrics:
        np.testing.assert_allclose(
            ours["results"][task][metric], theirs["results"][task][metric], rtol=1e-4
        )


@pytest.mark.slow
def test_every_choices_log_likelihood_agrees(both):
    """The per-example scores behind the accuracy, so that agreeing is not a coincidence."""
    ours, theirs = both

    def scores(results):
        return [
            [score for score, _ in sample["resps"][i]]
            for sample in results["samples"]["jaxlm_choice"]
            for i in range(len(sample["resps"]))
        ]

    np.testing.assert_allclose(scores(ours), scores(theirs), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_greedy_answers_agree_where_the_text_decodes(both):
    """generate_until: the same greedy text. Random weights also emit byte tokens that are not
    text on their own, which SentencePiece and the Hugging Face tokenizer render differently
    (a replacement character, a '?', the raw byte): answers with any character outside
    printable ASCII are left out, and at least two remain."""
    ours, theirs = both
    pairs = [
        (a["resps"][0][0], b["resps"][0][0])
        for a, b in zip(
            ours["samples"]["jaxlm_answer"], theirs["samples"]["jaxlm_answer"], strict=True
        )
    ]
    readable = [(a, b) for a, b in pairs if all(" " <= c <= "~" for c in a + b)]
    assert len(readable) >= 2, pairs
    assert [a for a, _ in readable] == [b for _, b in readable]


@pytest.mark.slow
def test_the_command_writes_lm_evals_results_json(exported, tmp_path):
    run_dir, _, tasks = exported
    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxlm.eval",
            "--run",
            str(run_dir),
            "--harness",
            "jaxlm_choice,jaxlm_perplexity",
            "--harness-include",
            str(tasks),
            "--limit",
            "4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(out.read_text())
    assert set(written["results"]) == {"jaxlm_choice", "jaxlm_perplexity"}
    assert json.loads(result.stdout) == written
    assert "acc_norm" in result.stderr  # lm-eval's table


def test_the_run_model_implements_every_request_of_lm_evals_interface():
    pytest.importorskip("lm_eval")
    from jaxlm import harness

    assert not harness.RunLM.__abstractmethods__


@pytest.mark.slow
def test_an_unknown_task_exits_2_naming_it(exported):
    run_dir, _, tasks = exported
    result = subprocess.run(
        [
            *(sys.executable, "-m", "jaxlm.eval", "--run", str(run_dir)),
            *("--harness", "jaxlm_choise", "--harness-include", str(tasks)),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "lm-eval has no task jaxlm_choise" in result.stderr
