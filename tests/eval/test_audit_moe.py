"""`ligero audit` of a mixture-of-experts model: routing agreement and per-expert shift in results, report and cards
(a small random Mixtral-shaped model saved as a Ligero folder with SmolLM2's tokenizer)."""

import json

import pytest
import torch

from ligero.card import card_errors, read_card
from ligero.cli import main
from ligero.eval.routing import baseline_routing, routing_comparison
from ligero.io.checkpoint import gguf_tokenizer, load_model, resolve_spec, save_checkpoint
from ligero.models.config import ModelConfig
from ligero.models.transformer import Transformer
from ligero.quant.api import quantize
from ligero.quant.config import recipe_for


def random_mixtral(vocab: int, seed: int = 0) -> Transformer:
    cfg = ModelConfig(arch="mixtral", vocab_size=vocab, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                      ffn_dim=128, n_experts=4, n_experts_per_token=2, max_seq_len=1024)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Transformer(cfg)
        for name, p in model.named_parameters():
            if p.dim() > 1:  # routers ten times larger: the choices are clear-cut, as in trained models
                torch.nn.init.normal_(p, std=0.2 if name.endswith("router.weight") else 0.05)
            else:
                torch.nn.init.ones_(p)
    return model.eval()


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    tokenizer = gguf_tokenizer(resolve_spec("smollm2-135m"))
    folder = tmp_path_factory.mktemp("moe") / "tiny-mixtral"
    save_checkpoint(random_mixtral(tokenizer.vocab_size), tokenizer, folder, {"base": "random"})
    return folder


def test_routing_comparison_counts_changed_choices():
    model = random_mixtral(96)
    windows = [torch.randint(0, 96, (40,), generator=torch.Generator().manual_seed(s)).tolist() for s in (0, 1)]
    base = baseline_routing(model, windows)
    same = routing_comparison(base, model, windows)  # the baseline against itself: nothing moves
    assert same["tokens"] == 80 and same["same_experts"] == same["same_top1"] == same["overlap"] == 1.0
    assert same["worst_expert"]["rel_error"] == 0.0
    assert sum(same["layers"][0]["load_baseline"]) == 80 * 2
    quantized = quantize(random_mixtral(96), recipe_for("int4"))
    moved = routing_comparison(base, quantized, windows)
    assert 0.5 < moved["same_experts"] < 1.0 and moved["overlap"] >= moved["same_experts"]
    assert 0.02 < moved["worst_expert"]["rel_error"] < 0.3  # int4 g128 weight error on an expert's output


@pytest.mark.slow
def test_audit_of_an_moe_model_reports_routing(moe_folder, tmp_path):
    out = tmp_path / "out"
    assert main(["audit", "--model", str(moe_folder), "--variants", "int4", "--quick", "--out", str(out)]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    report = json.loads((folder / "results.json").read_text())
    row = report["rows"]["int4"]
    assert 0 < row["routing_same_experts"] <= 1 and 0 < row["worst_expert_rel_error"] < 0.5
    assert "routing_same_experts" not in report["rows"]["fp32"]  # the baseline against itself: nothing to say
    card = read_card(folder / "cards" / "int4.json")
    assert card_errors(card) == []
    routing = card["metrics"]["expert_routing"]
    assert routing["tokens"] == 64 and routing["moe_layers"] == 2 and len(routing["layers"]) == 2
    assert routing["same_experts"] == row["routing_same_experts"]
    assert "tokens routed to the baseline's experts" in (folder / "cards" / "int4.md").read_text()
    assert "expert_routing" not in read_card(folder / "cards" / "fp32.json")["metrics"]
    text = (folder / "report.md").read_text()
    assert "Expert routing" in text and "same experts" in text
    assert len(list(folder.rglob("expert_shift.png"))) == 1
    model = load_model(str(moe_folder), device="cpu").model
    assert model.cfg.n_experts == 4
