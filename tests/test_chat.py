"""Supervised fine-tuning on chat data (jaxlm/data/chat.py): only the assistant's tokens are
trained, conversations are packed with segment ids or padded, bad rows and mismatched sources
exit 2, and a model fine-tuned on a rule answers with it in transformers after export.

The corpus: the user says noise (consonant-only words) with one colour word in it; the assistant
answers with that colour twice. Nothing in the user's turns can be predicted; the answer can."""

import json
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm.data import chat, corpus, orders, prepare, shards, sources, tokenizer
from jaxlm.data.pipeline import PackedBatches
from jaxlm.errors import UsageError

COLOURS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "navy"]
VOCAB = 384


def noise(rng: random.Random, words: int) -> str:
    return " ".join(
        "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(2, 5)))
        for _ in range(words)
    )


def question(rng: random.Random) -> tuple[str, str]:
    """A user turn and its colour."""
    colour = rng.choice(COLOURS)
    return f"{noise(rng, rng.randint(2, 6))} {colour} {noise(rng, rng.randint(1, 4))}", colour


def conversation(rng: random.Random) -> list[dict]:
    user, colour = question(rng)
    return [
        {"role": "user", "content": user},
        {"role": "assistant", "content": f"{colour} {colour}"},
    ]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> pathlib.Path:
    """chats.jsonl (1,600 conversations) and a tokenizer trained on their text."""
    directory = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    rows = [{"messages": conversation(rng)} for _ in range(1600)]
    (directory / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [
        corpus.Document(
            str(i), "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in r["messages"]), 0
        )
        for i, r in enumerate(rows)
    ]
    tokenizer.train(iter(texts), VOCAB, directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def encoder(corpus_dir) -> chat.ChatEncoder:
    return chat.ChatEncoder(corpus_dir / "tokenizer.model", chat.BUILTIN_TEMPLATE)


@pytest.fixture(scope="module")
def prepared(corpus_dir) -> pathlib.Path:
    out = corpus_dir / "prepared"
    prepare.prepare(
        corpus.resolve_inputs([str(corpus_dir / "chats.jsonl")], "messages"),
        corpus_dir / "tokenizer.model",
        out,
        chat_template=chat.BUILTIN_TEMPLATE,
        workers=1,
    )
    return out


def trained_text(encoder, ids, trained) -> str:
    return "".join(encoder.sp.id_to_piece(int(i)) for i in ids[trained]).replace("▁", " ")


def test_only_the_answers_and_their_end_of_turn_are_trained(encoder):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "qq red zz"},
        {"role": "assistant", "content": "red red"},
        {"role": "user", "content": "kk blue"},
        {"role": "assistant", "content": "blue blue"},
    ]
    ids, trained = encoder.encode(messages)
    assert trained_text(encoder, ids, trained) == "red red</s>blue blue</s>"
    untrained = "".join(encoder.sp.id_to_piece(int(i)) for i in ids[~trained])
    for text in ("be▁brief", "qq▁red▁zz", "kk▁blue", "<|assistant|>"):
        assert text in untrained
    # the prompt a model answers is the conversation's text up to the answer, token for token
    prompt = encoder.prompt_ids(messages[:2])
    assert list(ids[: len(prompt)]) == list(prompt)
    assert encoder.sp.eos_id() in ids  # </s> in the template's text is the EOS id


def test_templates_from_files_and_from_the_run_fine_tuned(tmp_path):
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    (tmp_path / "t.jinja").write_text(chatml)
    assert chat.load_template(tmp_path / "t.jinja") == chatml
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
    assert chat.load_template(tmp_path / "tokenizer_config.json") == chatml
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": chatml}]
    (tmp_path / "named.json").write_text(json.dumps({"chat_template": named}))
    assert chat.load_template(tmp_path / "named.json") == chatml
    assert chat.load_template(None) == chat.BUILTIN_TEMPLATE
    # checkpoint.init_from: the run, its checkpoints/ or one step's directory
    run = tmp_path / "imported"
    (run / "checkpoints" / "5").mkdir(parents=True)
    (run / "tokenizer_config.json").write_text(json.dumps({"chat_template": chatml}))
    for init_from in (run, run / "checkpoints", run / "checkpoints" / "5"):
        assert chat.template_for(None, str(init_from)) == chatml
    assert chat.template_for(str(tmp_path / "t.jinja"), str(run)) == chatml
    (run / "tokenizer_config.json").write_text("{}")
    assert chat.template_for(None, str(run)) == chat.BUILTIN_TEMPLATE
    for bad, message in (
        (tmp_path / "none.jinja", "does not exist"),
        (run / "tokenizer_config.json", "holds no chat_template"),
    ):
        with pytest.raises(UsageError, match=message):
            chat.load_template(bad)


def test_a_template_that_rewrites_earlier_turns_is_refused(corpus_dir):
    # shows an assistant message only while it is the last one
    forgetful = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    encoder = chat.ChatEncoder(corpus_dir / "tokenizer.model", forgetful)
    messages = conversation(random.Random(1)) * 2
    with pytest.raises(UsageError, match="renders earlier turns differently"):
        encoder.encode(messages)
    with pytest.raises(UsageError, match="does not parse"):
        chat.ChatEncoder(corpus_dir / "tokenizer.model", "{% for %}")


@pytest.mark.parametrize(
    "row, message",
    [
        ({"text": "hi"}, "has no field 'messages'"),
        ({"messages": "hi"}, "is not a list of messages"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant message"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "has role 'robot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "message 1 has no text content"),
    ],
)
def test_prepare_refuses_a_bad_row_naming_its_line(corpus_dir, tmp_path, row, message):
    good = json.dumps({"messages": conversation(random.Random(2))})
    (tmp_path / "bad.jsonl").write_text(f"{good}\n{json.dumps(row)}\n")
    result = data_cli(
        "prepare", "--format", "chat", "--input", str(tmp_path / "bad.jsonl"),
        "--tokenizer", str(corpus_dir / "tokenizer.model"), "--out", str(tmp_path / "out"),
        "--workers", "1",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "bad.jsonl:2" in result.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def data_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxlm.data", *args], capture_output=True, text=True, timeout=120
    )


def test_prepare_cli_writes_chat_shards_and_the_template(corpus_dir, tmp_path):
    (tmp_path / "t.jinja").write_text(chat.BUILTIN_TEMPLATE + "{#- a copy -#}")
    result = data_cli(
        "prepare", "--format", "chat", "--input", str(corpus_dir / "chats.jsonl"),
        "--tokenizer", str(corpus_dir / "tokenizer.model"), "--out", str(tmp_path / "out"),
        "--chat-template", str(tmp_path / "t.jinja"), "--workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = shards.read_manifest(tmp_path / "out")
    assert manifest["dtype"] == "uint32" and manifest["documents"]["train"] > 1500
    # the tools that only look at a source take chat data as they take text
    look = data_cli("inspect", str(tmp_path / "out"))
    assert look.returncode == 0, look.stderr
    assert json.loads(look.stdout)["format"] == "chat"
    first = data_cli(
        "samples", "--source", str(tmp_path / "out"), "--seq-len", "16", "--count", "4",
        "--out", str(tmp_path / "first.npy"),
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert np.load(tmp_path / "first.npy").shape == (4, 17)
    assert manifest["chat_template_sha256"] == chat.fingerprint((tmp_path / "t.jinja").read_text())
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == (
        tmp_path / "t.jinja"
    ).read_text()
    wrong = data_cli(
        "prepare", "--input", str(corpus_dir / "chats.jsonl"), "--chat-template",
        str(tmp_path / "t.jinja"), "--tokenizer", str(corpus_dir / "tokenizer.model"),
        "--out", str(tmp_path / "text"),
    )  # fmt: skip
    assert wrong.returncode == 2 and "--chat-template needs --format chat" in wrong.stderr


def windows(prepared, packing: str, seq_len: int = 64) -> PackedBatches:
    split = shards.PreparedSplit(prepared, "train")
    kind = orders.PaddedOrder if packing == "padded" else orders.PackedOrder
    return PackedBatches(kind(split, seq_len=seq_len, seed=3), global_batch=16)


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_user_tokens_get_zero_weight_in_the_batch(prepared, encoder, corpus_dir, packing):
    """Each conversation's targets are weighted 1 exactly where the encoder trains them, in
    packed windows (documents cut at window ends) and in padded ones."""
    by_text = {}
    for line in (corpus_dir / "chats.jsonl").read_text().splitlines():
        ids, trained = encoder.encode(json.loads(line)["messages"])
        by_text[tuple(ids)] = trained
    batch = windows(prepared, packing)[0]
    assert batch["inputs"].max() < VOCAB and batch["targets"].max() < VOCAB  # flags removed
    checked = 0
    for r in range(16):
        # the inputs, each with its weight as a target (the window's first token is none)
        tokens, segments = batch["inputs"][r], batch["segments"][r]
        weights = np.concatenate([[0.0], batch["weights"][r, :-1]])
        for s in set(segments.tolist()) - {0}:
            piece, piece_weights = tokens[segments == s], weights[segments == s]
            match = [k for k in by_text if _contains(k, piece)]
            assert match, "every piece is a part of one conversation"
            ids, trained = np.asarray(match[0]), by_text[match[0]]
            start = next(i for i in range(len(ids)) if list(ids[i : i + len(piece)]) == list(piece))
            expected = trained[start : start + len(piece)].astype(np.float32)
            # a piece's first token is nobody's target in this window
            np.testing.assert_array_equal(piece_weights[1:], expected[1:])
            checked += 1
        if packing == "padded":
            padding = segments == 0
            assert segments[0] == 1 and set(segments.tolist()) <= {0, 1}
            assert not weights[padding].any() and padding.any()
    assert checked >= 16
    # what is trained: the answers (colours) and their end of turn, nothing the user said
    trained = batch["targets"][batch["weights"] > 0]
    pieces = {encoder.sp.id_to_piece(int(t)).lstrip("▁") for t in trained} - {"</s>"}
    assert all(any(p in c for c in COLOURS) for p in pieces), pieces
    assert (trained == encoder.sp.eos_id()).sum() >= 8


def _contains(ids: tuple, piece: np.ndarray) -> bool:
    n = len(piece)
    return any(list(ids[i : i + n]) == list(piece) for i in range(len(ids) - n + 1))


def test_sources_must_hold_what_data_format_says(prepared, corpus_dir, tmp_path):
    def check(*overrides):
        cfg = config_lib.validate(config_lib.apply_overrides(config_lib.Config(), overrides))
        return sources.resolve(cfg.data, VOCAB)

    assert check(f"data.source={prepared}", "data.format=chat")[0].path == prepared
    (tmp_path / "fake.idx").write_bytes(b"")
    for overrides, message in (
        ((f"data.source={prepared}",), "holds chat data but data.format=text"),
        ((f"data.source={corpus_dir / 'chats.jsonl'}",), "conversations need data.format=chat"),
        (("data.source=synthetic", "data.format=chat"), "needs conversations"),
        ((f"data.source=megatron:{tmp_path / 'fake'}", "data.format=chat"), "no loss masks"),
        (("data.packing=padded", "data.order=megatron"), "needs data.order=jaxlm"),
        (("data.chat_template=x.jinja",), "data.format is not chat"),
    ):
        with pytest.raises(UsageError, match=message):
            check(*overrides)
    assert not (corpus_dir / "cache").exists(), "a refused source prepares nothing"


@pytest.mark.slow
@pytest.mark.hf
def test_fine_tuned_model_answers_with_the_rule_in_transformers(corpus_dir, encoder, tmp_path):
    """Fine-tune the tiny model on the raw JSONL (prepared on first use) on a dp x fsdp x tp
    mesh: the loss on the answers falls to near zero; exported, transformers' own chat template
    gives the same prompt ids and the model answers with the rule. Then fine-tune again from the
    model imported back from Hugging Face: its chat template comes with it."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    from jaxlm import mesh as mesh_lib
    from jaxlm import training
    from jaxlm.convert import from_hf, to_hf

    settings = [
        "model.compute_dtype=float32",
        f"model.vocab_size={VOCAB}",
        "model.max_seq_len=64",
        "train.seq_len=64",
        "train.steps=300",
        "train.eval_every=300",
        f"data.source={corpus_dir / 'chats.jsonl'}",
        "data.format=chat",
        f"data.tokenizer={corpus_dir / 'tokenizer.model'}",
        "data.packing=padded",
        "checkpoint.async_save=false",
    ]
    mesh = mesh_lib.make_mesh("dp=2,fsdp=2,tp=2")
    rows = training.run(config_lib.load("tiny", settings), mesh, tmp_path / "run")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 2.0 and np.mean(losses[-10:]) < 0.3, losses[::10]
    assert [r["val_loss"] for r in rows if "val_loss" in r][-1] < 0.3
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == chat.BUILTIN_TEMPLATE

    to_hf.convert(tmp_path / "run", tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    rng, right = random.Random(99), 0
    for _ in range(16):
        user, colour = question(rng)
        messages = [{"role": "user", "content": user}]
        prompt = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = list(getattr(prompt, "input_ids", prompt))
        assert prompt == list(encoder.prompt_ids(messages))
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
        answer = hf_tokenizer.decode(out[0, len(prompt) :], skip_special_tokens=True)
        right += answer.strip() == f"{colour} {colour}"
        assert out[0, -1] == hf_tokenizer.eos_token_id, "the answer ends the turn"
    assert right >= 15, f"{right} of 16 answers follow the rule"

    # back into jaxlm, with the model's template (text that renders the same, so the weights
    # still fit it): fine-tuning from it takes that template, and the loss starts low
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    config["chat_template"] = chat.BUILTIN_TEMPLATE + "{#- the model's own -#}"
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(config))
    from_hf.convert(tmp_path / "hf", tmp_path / "imported", mesh_spec="dp=8")
    tuned = training.run(
        config_lib.load(
            "tiny",
            [*settings, "train.steps=2", "train.eval_every=0", "train.lr=1e-4"]
            + [f"checkpoint.init_from={tmp_path / 'imported'}"],
        ),
        mesh,
        tmp_path / "tuned",
    )
    assert tuned[0]["loss"] < 0.5
    assert (tmp_path / "tuned" / "chat_template.jinja").read_text() == config["chat_template"]
