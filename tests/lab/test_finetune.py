"""`ligero finetune`: LoRA / QLoRA adapters on a frozen base. Data files and their errors, the adapter's algebra
(zero start, merge), an interrupted run resuming with the same losses, and an adapter refusing another base."""

import json

import pytest
import torch

from ligero.cli import main
from ligero.errors import LigeroError
from ligero.eval.domain import read_documents, split_documents
from ligero.io.checkpoint import load_model
from ligero.lab.finetune import (
    ADAPTER_FILE,
    ADAPTER_META,
    LoRAPlan,
    finetune,
    load_with_adapter,
    merge_adapter,
)
from ligero.lab.trainer import TrainConfig
from ligero.models.lora import add_lora, merge_lora

TINY_TC = TrainConfig(steps=4, batch_rows=2, seq_len=64, lr=1e-3, warmup_steps=1, weight_decay=0.0, eval_every=2,
                      eval_tokens=256, checkpoint_every=2)


class NoTemplate:
    class meta:  # noqa: N801 - mimics Tokenizer.meta
        chat_template = None


# --- data -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"caf\xe9 au lait", r"is not UTF-8 text \(byte 3\)"),
])
def test_unusable_text_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content)
    with pytest.raises(LigeroError, match=message):
        read_documents(path)
    with pytest.raises(LigeroError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken\n')
    with pytest.raises(LigeroError, match=r"line 4 is not valid JSON"):
        read_documents(path)
    path.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    with pytest.raises(LigeroError, match=r"line 2 has none of"):
        read_documents(path)
    path.write_text('{"prompt": "hi", "response": "hello"}\n')
    with pytest.raises(LigeroError, match="no chat template"):
        read_documents(path, NoTemplate())
    # a user's empty row is an error; a built-in set's (XSum has one article without text) is left out
    path.write_text('{"document": "one"}\n{"document": ""}\n{"document": "two"}\n')
    with pytest.raises(LigeroError, match=r"line 2 has none of"):
        read_documents(path)
    assert read_documents(path, skip_empty=True) == ["one", "two"]


def test_documents_of_each_format(tmp_path, smollm2):
    text = tmp_path / "notes.txt"
    text.write_text("First document,\ntwo lines.\n\n\nSecond one.\n")
    assert read_documents(text) == ["First document,\ntwo lines.", "Second one."]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "What is 2+2?", "response": "4."}) + "\n"
                     + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello."}]}) + "\n"
                     + json.dumps({"document": "A plain document."}) + "\n")
    docs = read_documents(pairs, smollm2.tokenizer)
    assert "What is 2+2?" in docs[0] and "4." in docs[0] and "<|im_start|>assistant" in docs[0]
    assert "Hello." in docs[1] and docs[2] == "A plain document."


def test_the_split_depends_on_the_documents_not_their_order():
    docs = [f"document number {i}" for i in range(400)]
    train, held = split_documents(docs)
    assert not set(train) & set(held) and len(train) + len(held) == 400 and 20 < len(held) < 60
    train2, held2 = split_documents(docs[::-1])
    assert set(held2) == set(held)
    with pytest.raises(LigeroError, match="too few"):
        split_documents(docs[:2])


# --- the adapter's algebra --------------------------------------------------------------------------------------


def test_a_fresh_adapter_is_the_base_exactly_and_a_merged_one_is_base_plus_update(tiny_pair):
    _, _, folder = tiny_pair
    model = load_model(str(folder), device="cpu").model
    tokens = torch.arange(24)[None] % model.cfg.vocab_size
    with torch.no_grad():
        base = model(tokens)
        add_lora(model, rank=4, alpha=8.0, targets=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
        torch.testing.assert_close(model(tokens), base, atol=0, rtol=0)  # B = 0: not one bit moved
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_(0, 0.02)
        adapted = model(tokens)
        assert (adapted - base).abs().max() > 1e-3
        assert merge_lora(model) == 4 * model.cfg.n_layers
        torch.testing.assert_close(model(tokens), adapted, atol=1e-4, rtol=1e-4)


def test_rank_and_targets_are_checked(tiny_pair):
    _, _, folder = tiny_pair
    model = load_model(str(folder), device="cpu").model
    width = model.cfg.dim
    with pytest.raises(LigeroError, match=f"rank {width + 1} is larger than the layer"):
        add_lora(model, rank=width + 1)
    with pytest.raises(LigeroError, match="unknown LoRA target"):
        LoRAPlan(targets=("q_proj",))


# --- a real run ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """SmolLM2 held in NF4, 4 steps on the legal domain (QLoRA)."""
    out = tmp_path_factory.mktemp("qlora")
    meta = finetune("smollm2-135m", "legal", out, scheme="nf4", plan=LoRAPlan(rank=4), tc=TINY_TC,
                    log=lambda m: None)
    return out, meta


@pytest.mark.slow
def test_qlora_learns_the_domain_and_writes_a_small_adapter(qlora_run):
    out, meta = qlora_run
    assert meta["base"]["scheme"] == "nf4" and meta["heldout_ppl_after"] < meta["heldout_ppl_before"]
    assert meta["data"]["domain"] == "legal" and len(meta["data"]["train_sha256"]) == 64
    assert (out / ADAPTER_FILE).stat().st_size < 5e6
    assert json.loads((out / ADAPTER_META).read_text()) == json.loads(json.dumps(meta))
    assert [r["step"] for r in meta["curve"]] == [1, 2, 3, 4] and meta["train_peak_rss_mb"] > 0


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_the_same_losses(qlora_run, tmp_path):
    _, whole = qlora_run

    def stop_at_step_4(message: str) -> None:
        if message.startswith("step 4/4"):  # logged before step 4's checkpoint: step 2's is the last one written
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune("smollm2-135m", "legal", tmp_path, scheme="nf4", plan=LoRAPlan(rank=4), tc=TINY_TC,
                 log=stop_at_step_4)
    messages = []
    resumed = finetune("smollm2-135m", "legal", tmp_path, scheme="nf4", plan=LoRAPlan(rank=4), tc=TINY_TC,
                       log=messages.append)
    assert any(m.startswith("resuming at step 2") for m in messages)
    assert [r["loss"] for r in resumed["curve"]] == [r["loss"] for r in whole["curve"]]  # dropout included


@pytest.mark.slow
def test_the_adapter_loads_on_its_base_refuses_another_and_merges(qlora_run, tmp_path):
    out, meta = qlora_run
    loaded, _ = load_with_adapter(out)
    text = ("The court granted the motion for class certification and appointed counsel for the plaintiffs, who "
            "alleged that the county jail's conditions violated the Eighth Amendment.")
    tokens = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        adapted = loaded.model(tokens)
    with pytest.raises(LigeroError, match="was trained on smollm2-135m .* not on gemma3-270m"):
        load_with_adapter(out, "gemma3-270m")
    merged = merge_adapter(out, tmp_path / "merged")
    again = load_model(str(merged), device="cpu")
    info = json.loads((merged / "ligero.json").read_text())
    assert "re-quantized to nf4" in json.dumps(info)
    with torch.no_grad():  # merged in fp32, then NF4 again: close to the adapter on its NF4 base, not equal
        merged_logits = again.model(tokens)
    agree = (merged_logits.argmax(-1) == adapted.argmax(-1)).float().mean()
    kl = torch.nn.functional.kl_div(merged_logits.log_softmax(-1), adapted.log_softmax(-1), log_target=True,
                                    reduction="batchmean") / tokens.shape[1]
    assert agree >= 0.7 and kl < 0.1, (agree, kl)  # measured: 0.79 of 28 tokens, KL 0.03 nats per token


def test_bad_input_through_the_command_line(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["finetune", "--data", str(empty), "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is empty" in err[0] and "Traceback" not in err[0]
    assert main(["finetune", "--domain", "legal", "--targets", "q_proj", "--out", str(tmp_path / "r2")]) == 2
    assert "unknown LoRA target" in capsys.readouterr().err


# --- an adapter wherever --model goes -------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_adapter_folder_is_a_model_the_base_with_the_adapters_merged(qlora_run, tmp_path, capsys):
    out, _ = qlora_run
    merged = load_model(str(out), device="cpu")  # the base in fp32, adapters folded into its weights
    assert merged.info["format"] == "adapter" and merged.info["finetune"]["base"]["held_in"] == "nf4"
    unmerged, _ = load_with_adapter(out, scheme="fp32")  # the same base, adapters beside the weights
    tokens = torch.tensor([merged.tokenizer.encode("The district court dismissed the complaint because the plaintiffs "
                                                   "lacked standing to challenge the county's jail conditions.")])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(tokens), unmerged.model(tokens), atol=2e-4, rtol=1e-4)
    # exported for llama.cpp (the base's GGUF metadata, the merged weights in Q8_0) and loaded back
    gguf = tmp_path / "legal-q8_0.gguf"
    assert main(["export", "--model", str(out), "--scheme", "q8_0", "--out", str(gguf)]) == 0
    back = load_model(str(gguf), device="cpu")
    with torch.no_grad():  # Q8_0's rounding only: a KL of a few thousandths of a nat per token (0.0026 in the audit)
        kl = torch.nn.functional.kl_div(back.model(tokens).log_softmax(-1), merged.model(tokens).log_softmax(-1),
                                        log_target=True, reduction="batchmean") / tokens.shape[1]
    assert back.info["source"]["path"] == str(gguf) and kl < 0.02, kl
    # a base whose files differ from the adapter's record: one line, exit 2
    other = tmp_path / "other-base"
    other.mkdir()
    for name in ("adapter.safetensors", "adapter.json"):
        (other / name).write_bytes((out / name).read_bytes())
    meta = json.loads((other / "adapter.json").read_text())
    meta["base"]["sha256"] = "0" * 64
    (other / "adapter.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["generate", "--model", str(other), "--max-new-tokens", "2", "Hello"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on smollm2-135m" in err[0] and "pass its base model" in err[0]
    assert main(["audit", "--adapter", str(out), "--model", "gemma3-270m", "--quick", "--out", str(tmp_path)]) == 2
    assert "not on gemma3-270m" in capsys.readouterr().err


@pytest.mark.slow
def test_the_audit_of_an_adapter_compares_base_and_fine_tuned_and_its_card_is_served(qlora_run, tmp_path):
    from ligero.card import card_errors, read_card
    from ligero.card.publish import run_audit
    from ligero.eval.audit import Audit
    from ligero.serve.server import build_config

    out, meta = qlora_run
    audit = Audit(adapter=out, variants=["ft"], budget="quick", out=tmp_path, log=lambda m: None)
    assert audit.variants == ["ft"] and audit.source.label == "smollm2-135m"
    report = run_audit(audit)
    rows = report["rows"]
    # the domain's held-out text: the fine-tuned model is better at it than its base (4 steps already move it)
    assert rows["ft"]["domain_ppl"] < rows["fp32"]["domain_ppl"]
    assert rows["fp32"]["domain_delta_ppl_pct"] == 0
    card = read_card(audit.folder / "cards" / "ft.json")
    assert card_errors(card) == []
    assert card["identity"]["relation"] == "fine-tuned"
    ft = card["format"]["finetune"]
    assert ft["base"]["held_in"] == "nf4" and ft["data"]["heldout_sha256"] == meta["data"]["heldout_sha256"]
    assert "domain perplexity" in (audit.folder / "cards" / "ft.md").read_text()
    assert "Δ domain PPL" in (audit.folder / "report.md").read_text()
    # the card the audit wrote is served, with the adapter folder as the model
    cfg = build_config(str(out), [], card=str(audit.folder / "cards" / "ft.json"), store_url="sqlite://")
    assert list(cfg.variants) == ["ft"]
    with pytest.raises(LigeroError, match="pass that `ligero finetune` run folder with --model"):
        build_config("smollm2-135m", [], card=str(audit.folder / "cards" / "ft.json"), store_url="sqlite://")


@pytest.mark.slow
def test_a_rank_larger_than_the_layers_is_one_line_before_training(tmp_path, capsys):
    assert main(["finetune", "--domain", "legal", "--rank", "100000", "--steps", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is larger than the layer" in err[0] and "choose a smaller --rank" in err[0]
    assert not (tmp_path / "train").exists()  # nothing started
