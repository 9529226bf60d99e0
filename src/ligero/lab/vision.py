"""`ligero lab vision`: a LLaVA-style image + text model trained on this CPU, and what it learned.

Model: frozen EfficientNet-Lite0 -> MLP projector -> SmolLM2-135M-Instruct (dequantized fp32), images spliced into
the chat template, AnyRes views for wide and tall images (ligero.vision). Two stages, as LLaVA-1.5:
  1. the projector alone learns to caption images (the language model frozen);
  2. the projector and LoRA adapters on the language model's attention learn to answer questions.
Data (lab/vision_data.py): charts, forms, shape scenes and emoji, rendered here, with disjoint held-out sets.

Evaluation on the held-out sets: exact-match accuracy per question type with the image, against the same model
given the question without the image (the text-only baseline: what the language prior alone gets right) and
against chance; caption retrieval (the true caption ranked by likelihood among a family's candidates).

The encoder's features are computed once per image and kept (the encoder is frozen); each stage's result is saved
and reused when the lab is rerun, so a rerun only redoes what changed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ligero.errors import LigeroError
from ligero.eval.stats import wilson_interval
from ligero.eval.variants import build_vision_variant, scheme_recipe
from ligero.io.checkpoint import load_model
from ligero.lab.bitnet import provenance
from ligero.lab.vision_data import (
    FAMILIES,
    QUESTION_TYPES,
    Sample,
    emoji_available,
    make_split,
    normalise,
    samples_digest,
)
from ligero.lab.vision_probe import highest_probes
from ligero.models.generate import BatchGeneration
from ligero.models.lora import add_lora
from ligero.vision.model import FEATURE_DIM, FINE_DIM, HEAD_DIM, TOKENS_PER_VIEW, EncodedImage, VisionLanguageModel
from ligero.vision.pretrained import load_vision_model, save_adapter

BASE_MODEL = "smollm2-135m"
CAPTION_PROMPT = "Describe the image."
ANSWER_TOKENS = 12


@dataclass(frozen=True)
class Plan:
    train_images: int  # per family (charts: chart_train_images when set)
    heldout_images: int  # per family
    stage1_steps: int
    stage2_steps: int
    batch: int = 16
    stage1_lr: float = 1e-3  # LLaVA-1.5's stage 1 rate for the projector
    stage2_lr: float = 2e-4  # LoRA in stage 2
    stage2_projector_lr: float = 5e-4  # the projector in stage 2: far above the language model's (nanoVLM: ~100x)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # every linear layer (QLoRA)
    warmup: float = 0.03  # share of each stage's steps
    retrieval_candidates: int = 10
    retrieval_images: int = 40  # per family
    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    quant_schemes: tuple[str, ...] = ("int8", "int4")  # variants evaluated after training (language model + projector)
    # More training charts than other families' images (None: train_images). A linear probe of the encoder's
    # features reads "which bar is highest" at 85 % from 800 charts and 99 % from 4000; but a full run with 4000
    # wide charts (16-pt labels), 260 + 520 steps, reached only 34 % on it (titles 100 %) while forms and scenes
    # fell (colour 87 -> 42 %): the mix starved the other families, so the full plan keeps equal families.
    chart_train_images: int | None = None
    # Matrix products in bfloat16 under torch.autocast, parameters, gradients and AdamW's state in fp32 (mixed
    # precision, as LLaVA trains): a training step took 0.64x the fp32 time here (AVX512-BF16; 3 pairs of steps of
    # 16 conversations, 5.1 vs 7.9 s), which pays for the steps added to stage 2. "fp32": everything in fp32.
    precision: str = "bf16"


FULL = Plan(train_images=1000, heldout_images=100, stage1_steps=320, stage2_steps=400, retrieval_images=25)
PRECISIONS = ("bf16", "fp32")
PRECISION_NOTES = {"bf16": "Both stages in mixed precision: matrix products in bfloat16 (torch.autocast), parameters, "
                           "gradients and AdamW's state in fp32.",
                   "fp32": "Both stages in fp32."}
QUICK = Plan(train_images=6, heldout_images=3, stage1_steps=2, stage2_steps=2, batch=4, retrieval_candidates=3,
             retrieval_images=2, quant_schemes=("int8",))


# --- examples ----------------------------------------------------------------------------------------------------


@dataclass
class Example:
    image: int  # index into the split's encoded images
    question: str
    answer: str
    kind: str  # "caption" or a question type
    follow_ups: tuple[tuple[str, str], ...] = ()  # further (question, answer) turns about the same image (training)


def encode_all(vlm: VisionLanguageModel, samples: list[Sample], log, label: str) -> list[EncodedImage]:
    """Encoder features of every sample's image (fp16 to halve the memory), in batches."""
    out: list[EncodedImage] = []
    t0 = time.perf_counter()
    for start in range(0, len(samples), 32):
        for e in vlm.encode_images([s.image for s in samples[start : start + 32]]):
            out.append(EncodedImage(e.features.half(), e.views, e.grid))
    log(f"  encoded {len(samples)} {label} images ({sum(e.features.shape[0] for e in out)} views) in "
        f"{time.perf_counter() - t0:.0f} s")
    return out


def examples(samples: list[Sample], stage: int) -> list[Example]:
    if stage == 1:
        return [Example(i, CAPTION_PROMPT, s.caption, "caption") for i, s in enumerate(samples)]
    return [Example(i, q.question, q.answer, q.kind) for i, s in enumerate(samples) for q in s.qa]


def conversations(samples: list[Sample], seed: int) -> list[Example]:
    """Stage 2's training data: one conversation per image holding all its questions, in a random order (as
    LLaVA's instruction data). The image's tokens and the prompt are paid once for 1-3 answers: about twice the
    answers per step of compute than one question per sequence. Evaluation asks one question at a time."""
    rng = random.Random(f"conversations-{seed}")
    out = []
    for i, s in enumerate(samples):
        qa = rng.sample(s.qa, len(s.qa))
        out.append(Example(i, qa[0].question, qa[0].answer, qa[0].kind,
                           tuple((q.question, q.answer) for q in qa[1:])))
    return out


def sequence(vlm: VisionLanguageModel, ex: Example, image: EncodedImage | None) \
        -> tuple[list[int], list, list[int]]:
    """(tokens, image spans, the positions of answer tokens) of an example: each answer ends with the end-of-turn
    token; follow-up turns are rendered by the chat template after the previous answer."""
    n = [image.n_tokens] if image is not None else []
    messages = vlm.messages(ex.question, len(n))
    prompt = vlm.tokenizer.apply_chat_template(messages)
    layout = vlm.layout_text(prompt, n)
    tokens, targets = list(layout.tokens), []
    eos_text = vlm.tokenizer.decode(list(vlm.tokenizer.eos_ids[:1]), skip_special=False)
    for k, (question, answer) in enumerate(((ex.question, ex.answer), *ex.follow_ups)):
        if k:  # the template's text between the previous answer's end-of-turn token and this answer
            done = prompt + eos_text
            messages = messages + [{"role": "user", "content": question}]
            prompt = vlm.tokenizer.apply_chat_template(messages)
            if not prompt.startswith(done):
                raise LigeroError("the chat template does not render a conversation turn by turn")
            tokens += vlm.tokenizer.encode(prompt[len(done):], add_bos=False)
        answer_tokens = vlm.tokenizer.encode(answer, add_bos=False) + list(vlm.tokenizer.eos_ids[:1])
        targets += range(len(tokens), len(tokens) + len(answer_tokens))
        tokens += answer_tokens
        prompt += answer
        messages = messages + [{"role": "assistant", "content": answer}]
    return tokens, layout.image_spans, targets


def batch_loss(vlm: VisionLanguageModel, batch: list[Example], images: list[EncodedImage]) -> torch.Tensor:
    """Mean cross-entropy of the answers' tokens (prompts and images are not predicted)."""
    rows, pad = [], vlm.tokenizer.pad_id or 0
    for ex in batch:
        rows.append(sequence(vlm, ex, images[ex.image]))
    T = max(len(t) for t, _, _ in rows)
    tokens = torch.full((len(rows), T), pad, dtype=torch.long)
    for i, (t, _, _) in enumerate(rows):
        tokens[i, : len(t)] = torch.tensor(t)
    embeds = vlm.lm.embed_tokens(tokens)  # [B, T, C]; right padding: causal attention never looks at it
    parts = []
    for i, (t, spans, _) in enumerate(rows):
        v = vlm.project(images[batch[i].image])
        (s, n), = spans
        parts.append(torch.cat([embeds[i, :s], v, embeds[i, s + n :]]))
    embeds = torch.stack(parts)
    hidden = vlm.lm(tokens, embeds=embeds, apply_head=False)  # [B, T, C]
    sel_rows, sel_pos, targets = [], [], []
    for i, (t, _, answer_positions) in enumerate(rows):
        for p in answer_positions:  # position p - 1 predicts token p
            sel_rows.append(i)
            sel_pos.append(p - 1)
            targets.append(t[p])
    logits = vlm.lm.logits(hidden[sel_rows, sel_pos])  # [N, V]: the head only where answers are predicted
    return F.cross_entropy(logits.float(), torch.tensor(targets))


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step <= warmup:
        return peak * step / max(1, warmup)
    t = (step - warmup) / max(1, steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def train_stage(vlm: VisionLanguageModel, groups: list[tuple[list, float]], data: list[Example],
                images: list[EncodedImage], steps: int, plan: Plan, seed: int, log, label: str) -> list[dict]:
    """AdamW (no weight decay, as LLaVA) over (parameters, peak rate) groups, warm-up then cosine, clipping at 1;
    batches of similar length (images with the same number of views) so little is padded. Returns the per-step
    log."""
    params = [p for group, _ in groups for p in group]
    opt = torch.optim.AdamW([{"params": g, "lr": lr, "peak": lr} for g, lr in groups], weight_decay=0.0,
                            betas=(0.9, 0.999))
    buckets: dict[int, list[Example]] = {}
    for ex in data:
        buckets.setdefault(images[ex.image].n_tokens, []).append(ex)
    keys = sorted(buckets)
    weights = [len(buckets[k]) for k in keys]
    rng = random.Random(f"{label}-{seed}")
    warmup = max(1, round(plan.warmup * steps))
    history, t0 = [], time.perf_counter()
    vlm.train()
    for step in range(1, steps + 1):
        bucket = buckets[rng.choices(keys, weights)[0]]
        batch = [bucket[rng.randrange(len(bucket))] for _ in range(plan.batch)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, g["peak"], warmup)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.precision == "bf16"):
            loss = batch_loss(vlm, batch, images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"step": step, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],
                        "seconds": round(time.perf_counter() - t0, 1)})
        if step % max(1, steps // 10) == 0 or step == steps:
            recent = [h["loss"] for h in history[-max(1, steps // 10):]]
            log(f"  {label} step {step}/{steps}: loss {sum(recent) / len(recent):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    vlm.eval()
    return history


# --- evaluation --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def answers(vlm: VisionLanguageModel, data: list[Example], images: list[EncodedImage] | None, rows: int = 16) \
        -> list[str]:
    """Greedy answers; `images` None: the text-only baseline (the question without its image)."""
    out = []
    for start in range(0, len(data), rows):
        chunk = data[start : start + rows]
        prompts, embeds = [], []
        for ex in chunk:
            enc = images[ex.image] if images is not None else None
            n = [enc.n_tokens] if enc is not None else []
            layout = vlm.layout(vlm.messages(ex.question, len(n)), n)
            prompts.append(layout.tokens)
            embeds.append(vlm.embed(layout, [vlm.project(enc)] if enc is not None else []))
        batch = BatchGeneration(vlm.lm, prompts, ANSWER_TOKENS, None, vlm.tokenizer.eos_ids, vlm.tokenizer.pad_id,
                                prompt_embeds=embeds)
        while not batch.done:
            batch.step()
        out += [vlm.tokenizer.decode(t).strip() for t in batch.tokens]
    return out


def add_significance(table: dict, data: list[Example], with_image: list[str], text_only: list[str]) -> None:
    """Per question type, McNemar's exact test of with-image against text-only on the same questions, with Holm's
    correction over all the question types (the family of claims "the image helps on type T")."""
    from ligero.eval.stats import holm, mcnemar

    kinds = list(table)
    for kind in kinds:
        idx = [i for i, ex in enumerate(data) if ex.kind == kind]
        right = [normalise(with_image[i]) == normalise(data[i].answer) for i in idx]
        base = [normalise(text_only[i]) == normalise(data[i].answer) for i in idx]
        b = sum(1 for r, t in zip(right, base) if t and not r)  # text-only right, with image wrong
        c = sum(1 for r, t in zip(right, base) if r and not t)
        table[kind]["mcnemar"] = mcnemar(b, c)
    for kind, p in zip(kinds, holm([table[k]["mcnemar"]["p_value"] for k in kinds])):
        table[kind]["p_holm"] = p


# Where a quantized variant's LoRA adapters sit (eval.variants.build_vision_variant): recorded with its table, so a
# rerun re-evaluates variants measured another way. "merged": folded into the weights before quantizing (until
# session 28); "beside": full precision next to the quantized base weights (QLoRA's setting).
QUANTIZED_ADAPTERS = "beside"


ADAPTER_PLACES = {
    "merged": "the LoRA adapters were merged into the language model's weights before quantizing.",
    "beside": "the language model's base weights are quantized and its LoRA adapters stay beside them in full "
              "precision (QLoRA's setting; merged into the weights before quantizing, as until session 28, int4's "
              "rounding erased the adapters' small updates: 64 % of its held-out answers became sentences).",
}


def quantized_table(data: list[Example], full: list[str], variant: list[str], projector: str) -> dict:
    """Per question type: the quantized variant's accuracy, its change from full precision and McNemar's test."""
    from ligero.eval.stats import mcnemar

    table = {"projector_format": projector, "adapters": QUANTIZED_ADAPTERS}
    for kind in QUESTION_TYPES:
        idx = [i for i, ex in enumerate(data) if ex.kind == kind]
        if not idx:
            continue
        base = [normalise(full[i]) == normalise(data[i].answer) for i in idx]
        mine = [normalise(variant[i]) == normalise(data[i].answer) for i in idx]
        b = sum(1 for x, y in zip(base, mine) if x and not y)  # right in full precision, wrong quantized
        c = sum(1 for x, y in zip(base, mine) if y and not x)
        table[kind] = {"n": len(idx), "accuracy": sum(mine) / len(idx), "change": (sum(mine) - sum(base)) / len(idx),
                       "ci95": wilson_interval(sum(mine), len(idx)), "mcnemar": mcnemar(b, c),
                       "same_answer": sum(normalise(full[i]) == normalise(variant[i]) for i in idx) / len(idx),
                       "wordy": sum(wordy(variant[i], data[i].answer) for i in idx) / len(idx)}
    return table


def wordy(answer: str, reference: str) -> bool:
    """A sentence where a short answer was asked for: more than two words beyond the reference's."""
    return len(normalise(answer).split()) > len(normalise(reference).split()) + 2


def holm_over_variants(quantized: dict) -> None:
    """Holm's correction over every (variant, question type) test of "quantization changed the accuracy"."""
    from ligero.eval.stats import holm

    keys = [(s, k) for s, t in quantized.items() for k in t if k in QUESTION_TYPES]
    for (s, k), p in zip(keys, holm([quantized[s][k]["mcnemar"]["p_value"] for s, k in keys])):
        quantized[s][k]["p_holm"] = p


def accuracy_table(data: list[Example], with_image: list[str], text_only: list[str],
                   choices: dict[int, int]) -> dict:
    """Per question type: n, accuracy with the image and without, Wilson 95 % intervals, and chance."""
    table = {}
    for kind in QUESTION_TYPES:
        idx = [i for i, ex in enumerate(data) if ex.kind == kind]
        if not idx:
            continue
        hits = sum(normalise(with_image[i]) == normalise(data[i].answer) for i in idx)
        base = sum(normalise(text_only[i]) == normalise(data[i].answer) for i in idx)
        chance = sum(1 / choices[i] for i in idx) / len(idx)
        table[kind] = {"family": QUESTION_TYPES[kind], "n": len(idx), "accuracy": hits / len(idx),
                       "ci95": wilson_interval(hits, len(idx)), "text_only": base / len(idx),
                       "text_only_ci95": wilson_interval(base, len(idx)), "chance": chance}
    return table


@torch.inference_mode()
def caption_logprob(vlm: VisionLanguageModel, image: EncodedImage, captions: list[str]) -> list[float]:
    """Mean log-probability per token of each caption given the image: the candidates as one right-padded batch."""
    rows = [sequence(vlm, Example(0, CAPTION_PROMPT, c, "caption"), image) for c in captions]
    T = max(len(t) for t, _, _ in rows)
    tokens = torch.full((len(rows), T), vlm.tokenizer.pad_id or 0, dtype=torch.long)
    for i, (t, _, _) in enumerate(rows):
        tokens[i, : len(t)] = torch.tensor(t)
    (s, n), = rows[0][1]  # the same prompt and image for every candidate: the same span
    embeds = vlm.lm.embed_tokens(tokens)
    embeds[:, s : s + n] = vlm.project(image).to(embeds.dtype)
    log_probs = F.log_softmax(vlm.lm(tokens, embeds=embeds).float(), -1)  # [B, T, V]
    scores = []
    for i, (t, _, answer_positions) in enumerate(rows):
        start = answer_positions[0]  # one answer: the caption, to the end
        target = torch.tensor(t[start:])
        scores.append(float(log_probs[i, start - 1 : len(t) - 1].gather(1, target[:, None]).mean()))
    return scores


def retrieval(vlm: VisionLanguageModel, samples: list[Sample], images: list[EncodedImage], plan: Plan) -> dict:
    """Recall@1 of the true caption among `retrieval_candidates` captions of the same family's held-out images."""
    out = {}
    for family in plan.families:
        idx = [i for i, s in enumerate(samples) if s.family == family]
        if len(idx) < plan.retrieval_candidates:
            continue
        rng = random.Random(f"retrieval-{family}-{plan.seed}")
        hits = 0
        chosen = idx[: plan.retrieval_images]
        for i in chosen:
            others = rng.sample([j for j in idx if j != i and samples[j].caption != samples[i].caption],
                                plan.retrieval_candidates - 1)
            captions = [samples[i].caption] + [samples[j].caption for j in others]
            scores = caption_logprob(vlm, images[i], captions)
            hits += int(max(range(len(scores)), key=scores.__getitem__) == 0)
        out[family] = {"n": len(chosen), "recall_at_1": hits / len(chosen),
                       "ci95": wilson_interval(hits, len(chosen)), "chance": 1 / plan.retrieval_candidates}
    return out


# --- the lab -----------------------------------------------------------------------------------------------------


EVALUATION_KEYS = ("accuracy", "retrieval", "examples", "quantized", "eval_seconds")


def evaluate(adapter: Path, held: list[Sample], held_images: list[EncodedImage], plan: Plan, log) -> dict:
    """Held-out accuracy with and without the image, caption retrieval, and the quantized variants' accuracy."""
    log("vision lab: held-out evaluation")
    t0 = time.perf_counter()
    shipped = load_vision_model(adapter)
    qa = examples(held, 2)
    choices = {i: next(q.choices for q in held[ex.image].qa if q.kind == ex.kind and q.question == ex.question)
               for i, ex in enumerate(qa)}
    with_image = answers(shipped, qa, held_images)
    text_only = answers(shipped, qa, None)
    result = {"accuracy": accuracy_table(qa, with_image, text_only, choices)}
    add_significance(result["accuracy"], qa, with_image, text_only)
    result["retrieval"] = retrieval(shipped, held, held_images, plan)
    result["examples"] = [{"image": ex.image, "kind": ex.kind, "question": ex.question, "answer": ex.answer,
                           "with_image": with_image[i], "text_only": text_only[i]} for i, ex in enumerate(qa)]
    del shipped
    result["quantized"] = evaluate_quantized(adapter, qa, with_image, held_images, plan, log)
    result["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def evaluate_quantized(adapter: Path, qa: list[Example], with_image: list[str], held_images: list[EncodedImage],
                       plan: Plan, log) -> dict:
    """Every quantized variant's held-out answers (with the image) against full precision's, Holm over all."""
    quantized = {}
    for scheme in plan.quant_schemes:
        log(f"vision lab: held-out evaluation of the {scheme} variant")
        variant = build_vision_variant(str(adapter), scheme)
        quantized[scheme] = quantized_table(qa, with_image, answers(variant, qa, held_images), variant.projector_format)
        del variant
    holm_over_variants(quantized)
    return quantized


def requantize(evaluation: dict, adapter: Path, held: list[Sample], held_images: list[EncodedImage], plan: Plan,
               log) -> dict:
    """A saved evaluation whose quantized variants were measured another way (QUANTIZED_ADAPTERS): the variants
    again, against the saved full-precision answers (the rest of the evaluation stands)."""
    qa = examples(held, 2)
    with_image = [ex["with_image"] for ex in evaluation["examples"]]
    if len(with_image) != len(qa) or any(e["question"] != q.question for e, q in zip(evaluation["examples"], qa)):
        return evaluate(adapter, held, held_images, plan, log)  # not the same questions: evaluate everything
    t0 = time.perf_counter()
    evaluation["quantized"] = evaluate_quantized(adapter, qa, with_image, held_images, plan, log)
    evaluation["eval_seconds"] = round(evaluation["eval_seconds"] + time.perf_counter() - t0, 1)
    return evaluation


PROBE_KEY = "highest_probe"  # in evaluation.json: where "which is highest" is lost (ligero.lab.vision_probe)


def _evaluation_part(results: dict) -> dict:
    """What evaluation.json keeps of a run's results (the diagnosis once it has been made)."""
    return {k: results[k] for k in (*EVALUATION_KEYS, PROBE_KEY) if k in results}


def diagnose_highest(shipped: VisionLanguageModel, train: list[Sample], train_images: list[EncodedImage],
                     held: list[Sample], held_images: list[EncodedImage], plan: Plan, log) -> dict:
    """Linear probes of the highest bar's position (encoder features, the shipped projector's output) and the
    shipped model's own answers to "which is highest" on training charts it learned from (does it fit them?)."""
    log("vision lab: where 'which bar is highest' is lost (linear probes; answers on training charts)")
    t0 = time.perf_counter()
    result = highest_probes(train, train_images, held, held_images, shipped.project)
    charts = [i for i, s in enumerate(train) if s.family == "charts"][: plan.heldout_images]
    qa = [Example(i, q.question, q.answer, q.kind) for i in charts for q in train[i].qa if q.kind == "chart_highest"]
    if qa:
        right = [normalise(a) == normalise(ex.answer) for a, ex in zip(answers(shipped, qa, train_images), qa)]
        result["train_answers"] = {"n": len(right), "accuracy": sum(right) / len(right),
                                   "ci95": wilson_interval(sum(right), len(right))}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def _with_probe(evaluation_file: Path, results: dict, out: Path, plan: Plan, held: list[Sample], log,
                train: list[Sample] | None = None, train_images: list[EncodedImage] | None = None,
                held_images: list[EncodedImage] | None = None) -> None:
    """Add the diagnosis to results and evaluation.json when the run has none yet (a run evaluated before it
    existed: its training charts are rendered and encoded again, nothing is trained)."""
    if PROBE_KEY in results or "chart_highest" not in results["accuracy"]:
        return
    shipped = load_vision_model(out / "adapter")  # the same encoder encodes what is not encoded yet
    if train is None or train_images is None:
        held_keys = {s.key for s in held if s.family == "charts"}
        train = make_split("charts", "train", plan.chart_train_images or plan.train_images, plan.seed, held_keys)
        train_images = encode_all(shipped, train, log, "training chart")
    if held_images is None:
        held_images = encode_all(shipped, held, log, "held-out")
    results[PROBE_KEY] = diagnose_highest(shipped, train, train_images, held, held_images, plan, log)
    saved = json.loads(evaluation_file.read_text())
    saved[PROBE_KEY] = results[PROBE_KEY]
    evaluation_file.write_text(json.dumps(saved))


def build_data(plan: Plan, log, held_out_only: bool = False) -> tuple[list[Sample], list[Sample]]:
    families = tuple(f for f in plan.families if f != "emoji" or emoji_available())
    if families != plan.families:
        log("  the emoji family is left out: Debian's fonts-noto-color-emoji is not installed")
    train, held = [], []
    for family in families:
        h = make_split(family, "heldout", plan.heldout_images, plan.seed)
        held += h
        if held_out_only:
            continue
        n = plan.chart_train_images if family == "charts" and plan.chart_train_images else plan.train_images
        train += make_split(family, "train", n, plan.seed, exclude={s.key for s in h})
    return train, held


def check_plan(plan: Plan) -> None:
    """An unknown quantization scheme or training precision fails now, not after an hour of training."""
    for scheme in plan.quant_schemes:
        scheme_recipe(scheme)
    if plan.precision not in PRECISIONS:
        raise LigeroError(f"the vision lab trains in {' or '.join(PRECISIONS)}, not {plan.precision!r}")


def lab_vision(quick: bool, out: str | Path, docs: str | Path | None = None, ship: str | Path | None = None,
               log=print, plan: Plan | None = None) -> dict:
    """Train both stages (or reuse them), evaluate, write results.json, the adapter and (with docs) the doc."""
    plan = plan or (QUICK if quick else FULL)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan_file = out / "plan.json"
    check_plan(plan)
    # The training stages depend on every field but the evaluated variants: those may change between invocations.
    training = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(plan))).items() if k != "quant_schemes"}
    if plan_file.exists() and {k: v for k, v in json.loads(plan_file.read_text()).items()
                               if k != "quant_schemes"} != training:
        raise LigeroError(f"{out} holds runs of another plan; pass a new --out folder (or delete {out})")
    plan_file.write_text(json.dumps(dataclasses.asdict(plan), indent=2))
    finished = _finished_run(out, plan)
    if finished is not None:  # both stages trained and evaluated: only the document is written again
        return _republish(finished, out, plan, docs, ship, log)
    t_start = time.perf_counter()
    torch.manual_seed(plan.seed)
    log("vision lab: rendering data")
    train, held = build_data(plan, log)
    loaded = load_model(BASE_MODEL)
    lm = loaded.model
    lm.requires_grad_(False)
    vlm = VisionLanguageModel(lm, loaded.tokenizer)
    log("vision lab: encoding images")
    train_images = encode_all(vlm, train, log, "training")
    held_images = encode_all(vlm, held, log, "held-out")
    results: dict = {"plan": dataclasses.asdict(plan), "provenance": provenance(),
                     "data": {"train_images": len(train), "heldout_images": len(held),
                              "train_sha256": samples_digest(train), "heldout_sha256": samples_digest(held)},
                     "base_model": {"id": BASE_MODEL, "sha256": loaded.info["source"]["sha256"]}}
    # Stage 1: captions, projector only.
    stage1 = out / "stage1.pt"
    if stage1.exists():
        vlm.projector.load_state_dict(torch.load(stage1, weights_only=True)["projector"])
        history1 = json.loads((out / "stage1.json").read_text())
        log("  stage 1 reused")
    else:
        history1 = train_stage(vlm, [(list(vlm.projector.parameters()), plan.stage1_lr)], examples(train, 1),
                               train_images, plan.stage1_steps, plan, plan.seed, log, "stage 1")
        torch.save({"projector": vlm.projector.state_dict()}, stage1)
        (out / "stage1.json").write_text(json.dumps(history1))
    # Stage 2: questions, projector + LoRA.
    lora_params = add_lora(vlm.lm, plan.lora_rank, plan.lora_alpha, plan.lora_targets)
    stage2 = out / "stage2.pt"
    stage2_reused = False
    if stage2.exists():
        state = torch.load(stage2, weights_only=True)
        vlm.projector.load_state_dict(state["projector"])
        vlm.lm.load_state_dict(state["lora"], strict=False)
        history2 = json.loads((out / "stage2.json").read_text())
        stage2_reused = True
        log("  stage 2 reused")
    else:
        groups = [(list(vlm.projector.parameters()), plan.stage2_projector_lr), (lora_params, plan.stage2_lr)]
        history2 = train_stage(vlm, groups, conversations(train, plan.seed), train_images, plan.stage2_steps, plan,
                               plan.seed, log, "stage 2")
        lora = {k: v for k, v in vlm.lm.state_dict().items() if "lora_" in k}
        torch.save({"projector": vlm.projector.state_dict(), "lora": lora}, stage2)
        (out / "stage2.json").write_text(json.dumps(history2))
    results["training"] = {"stage1": history1, "stage2": history2}
    adapter_meta = {"base_model": results["base_model"], "recipe": dataclasses.asdict(plan), "data": results["data"]}
    save_adapter(vlm, out / "adapter", adapter_meta)
    del vlm, lm, loaded
    # Held-out evaluation of the adapter as saved (bf16, LoRA merged): what `ligero generate --image` runs. Kept in
    # evaluation.json, so a rerun with both stages reused only rewrites the document.
    evaluation_file = out / "evaluation.json"
    saved = json.loads(evaluation_file.read_text()) if evaluation_file.exists() and stage2_reused else None
    if saved is not None and _quantized_current(saved, plan):
        results.update(saved)
        log("  held-out evaluation reused")
    elif saved is not None and set(saved["quantized"]) == set(plan.quant_schemes):
        log("  held-out evaluation reused; its quantized variants are measured again (adapters now "
            f"{QUANTIZED_ADAPTERS} the quantized weights)")
        results.update(requantize(saved, out / "adapter", held, held_images, plan, log))
        evaluation_file.write_text(json.dumps(_evaluation_part(results)))
    else:
        results.update(evaluate(out / "adapter", held, held_images, plan, log))
        evaluation_file.write_text(json.dumps(_evaluation_part(results)))
    _with_probe(evaluation_file, results, out, plan, held, log, train, train_images, held_images)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    meta_path = out / "adapter" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    meta["heldout_accuracy"] = {k: round(v["accuracy"], 4) for k, v in results["accuracy"].items()}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return _publish(results, held, out, docs, ship, log)


def _republish(finished: dict, out: Path, plan: Plan, docs, ship, log) -> dict:
    """A finished run's document again: what its evaluation lacks (quantized variants built the current way, the
    diagnosis) is measured, nothing is trained."""
    log("vision lab: both stages and the evaluation reused; rendering the held-out images for the document")
    held = build_data(plan, log, held_out_only=True)[1]
    evaluation = json.loads((out / "evaluation.json").read_text())
    held_images = None
    if not _quantized_current(evaluation, plan):
        log(f"  its quantized variants are measured again (adapters now {QUANTIZED_ADAPTERS} the quantized "
            "weights)")
        encoder = load_vision_model(out / "adapter")
        held_images = encode_all(encoder, held, log, "held-out")
        del encoder
        finished.update(requantize(evaluation, out / "adapter", held, held_images, plan, log))
        (out / "evaluation.json").write_text(json.dumps(_evaluation_part(finished)))
    if PROBE_KEY in evaluation:
        finished[PROBE_KEY] = evaluation[PROBE_KEY]
    _with_probe(out / "evaluation.json", finished, out, plan, held, log, held_images=held_images)
    finished["provenance"] = provenance()  # this commit; the times stay those of the runs that made them
    return _publish(finished, held, out, docs, ship, log)


def _quantized_current(evaluation: dict, plan: Plan) -> bool:
    """Whether a saved evaluation holds the plan's quantized variants, built as eval.variants builds them now."""
    return set(evaluation["quantized"]) == set(plan.quant_schemes) and \
        all(t.get("adapters", "merged") == QUANTIZED_ADAPTERS for t in evaluation["quantized"].values())


def _finished_run(out: Path, plan: Plan) -> dict | None:
    """The results of a run of this plan whose stages and evaluation are all on disk, else None."""
    files = [out / name for name in ("results.json", "stage1.pt", "stage2.pt", "evaluation.json")]
    if not all(f.exists() for f in files) or not (out / "adapter" / "adapter.json").exists():
        return None
    results = json.loads(files[0].read_text())
    if results.get("plan") != json.loads(json.dumps(dataclasses.asdict(plan))):
        return None
    return results


def _publish(results: dict, held: list[Sample], out: Path, docs, ship, log) -> dict:
    """results.json, the shipped adapter (with ship) and the document (with docs)."""
    if ship is not None:
        shutil.copytree(out / "adapter", ship, dirs_exist_ok=True)
        log(f"  adapter shipped to {ship}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if docs is not None:
        write_docs(results, held, Path(docs))
    for kind, row in results["accuracy"].items():
        quant = "  ".join(f"{s} {q[kind]['accuracy']:.1%}" for s, q in results["quantized"].items())
        log(f"  {kind:<14} n={row['n']:<4} with image {row['accuracy']:.1%}  text only {row['text_only']:.1%}  "
            f"chance {row['chance']:.1%}  {quant}")
    return results


# --- the document ------------------------------------------------------------------------------------------------

FAMILY_NAMES = {"charts": "charts", "documents": "forms", "scenes": "shape scenes", "emoji": "emoji (unseen)"}
QUESTION_NAMES = {
    "chart_highest": "which bar / point is highest (3-6)", "chart_value": "value of a labelled bar / point",
    "chart_title": "chart title (12)", "doc_field": "a field's value on a form", "doc_title": "document title (8)",
    "scene_count": "how many shapes (1-6)", "scene_colour": "colour of the shapes (6)",
    "scene_shape": "shape (3)", "emoji_choice": "which emoji, 4 unseen names offered",
}


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _ci(ci) -> str:
    return f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def write_docs(results: dict, held: list[Sample], docs: Path) -> None:
    """docs/lab-vision.md, .json and figures (training curves, held-out examples with the model's answers)."""
    from ligero.eval.metrics.plots import pyplot, save

    docs.mkdir(parents=True, exist_ok=True)
    figures = docs / "lab-vision"
    figures.mkdir(exist_ok=True)
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, (stage, title) in zip(axes, (("stage1", "stage 1: captions (projector)"),
                                         ("stage2", "stage 2: questions (projector + LoRA)"))):
        hist = results["training"][stage]
        losses = [h["loss"] for h in hist]
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1])
                  for i in range(len(losses))]
        ax.plot([h["step"] for h in hist], losses, color="0.8", lw=0.8, label="per step")
        ax.plot([h["step"] for h in hist], smooth, color="tab:blue", label=f"mean of {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("answer cross-entropy")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, figures / "training.png")
    # Examples: the first held-out image of each family with its first question.
    shown, seen = [], set()
    for ex in results["examples"]:
        family = held[ex["image"]].family
        if family not in seen:
            seen.add(family)
            shown.append(ex)
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(3.6 * max(1, len(shown)), 3.9))
    for ax, ex in zip(list(axes) if len(shown) > 1 else [axes], shown):
        ax.imshow(held[ex["image"]].image)
        ax.set_xticks([])
        ax.set_yticks([])
        text = [ex["question"], f"truth: {ex['answer']}", f"with image: {ex['with_image']}",
                f"text only: {ex['text_only']}"]
        ax.set_title("\n".join(textwrap.shorten(t.replace("\n", " "), 60) for t in text), fontsize=7, loc="left")
    save(fig, figures / "examples.png")
    (docs / "lab-vision.json").write_text(json.dumps({k: v for k, v in results.items() if k != "examples"},
                                                     indent=2) + "\n")
    (docs / "lab-vision.md").write_text(render(results))


HIGHEST_TARGET = 0.8  # issue 16's bar for "which bar is highest"


def _findings(results: dict) -> list[str]:
    """What the tables say, computed from them: the chart target, where the image does not help, what is not clearly
    above chance, and how the quantized variants fail."""
    acc, examples_ = results["accuracy"], results.get("examples", [])
    lines = ["", "## What the numbers say", ""]
    if "chart_highest" in acc:
        row = acc["chart_highest"]
        met = "met" if row["ci95"][0] >= HIGHEST_TARGET else "not met"
        model = _model_highest(examples_)
        split = [f"{labels}: {model[kind][0]}/{model[kind][1]}" for kind, labels in
                 (("line", "line charts, days as labels in order"), ("bar", "bar charts, fruit labels"))
                 if model[kind][1]]
        lines.append(f"- Which bar / point is highest: {_pct(row['accuracy'])} {_ci(row['ci95'])} against a target "
                     f"of {HIGHEST_TARGET:.0%}: **{met}**" + (f" ({'; '.join(split)})" if split else "") + ".")
    # McNemar is two-sided: a significant difference where text-only does better is not the image helping
    weak = [QUESTION_NAMES.get(k, k) for k, r in acc.items()
            if r.get("p_holm", 1.0) >= 0.05 or r["accuracy"] <= r["text_only"]]
    lines.append("- The image does not beat the text-only answer at a Holm-corrected 5 % on: "
                 + (", ".join(weak) if weak else "none") + ".")
    # Beating a blind answer is not reading: a question the prior gets wrong (0 % text only) can beat it at chance
    near_chance = [f"{QUESTION_NAMES.get(k, k)} ({_pct(r['accuracy'])} {_ci(r['ci95'])}, chance {_pct(r['chance'])})"
                   for k, r in acc.items() if r["ci95"][0] <= r["chance"]]
    lines.append("- Not clearly above chance (the 95 % interval reaches down to chance or below): "
                 + (", ".join(near_chance) if near_chance else "none") + ".")
    if examples_:
        full = sum(wordy(e["with_image"], e["answer"]) for e in examples_) / len(examples_)
        parts = [f"full precision {full:.0%}"]
        for scheme, table in results.get("quantized", {}).items():
            rows = [r for k, r in table.items() if k in QUESTION_TYPES and "wordy" in r]
            if rows:
                share = sum(r["wordy"] * r["n"] for r in rows) / sum(r["n"] for r in rows)
                parts.append(f"{scheme} {share:.0%}")
        lines.append("- Answers given as a sentence instead of the short form asked for (more than two words beyond "
                     "the reference's, counted wrong): " + ", ".join(parts) + ".")
    return lines


def _model_highest(examples_: list[dict]) -> dict:
    """The model's held-out answers to "which is highest": right / asked, overall and per chart kind."""
    out = {}
    for kind, thing in (("all", ""), ("line", " point "), ("bar", " bar ")):
        rows = [e for e in examples_ if e["kind"] == "chart_highest" and thing in e["question"]]
        out[kind] = (sum(normalise(e["with_image"]) == normalise(e["answer"]) for e in rows), len(rows))
    return out


def _highest_section(results: dict) -> list[str]:
    """Where "which is highest" is lost: the probes against the model's answers (ligero.lab.vision_probe)."""
    diag = results.get(PROBE_KEY)
    if not diag:
        return []

    def probe_cells(name: str) -> str:
        right, kinds = diag[name]["right"], diag["kinds"]
        per = [sum(r for r, k in zip(right, kinds) if k == kind) for kind in ("line", "bar")]
        counts = [kinds.count("line"), kinds.count("bar")]
        return (f"{_pct(diag[name]['accuracy'])} {_ci(diag[name]['ci95'])} | {per[0]}/{counts[0]} | "
                f"{per[1]}/{counts[1]}")

    model = _model_highest(results.get("examples", []))
    right, n = model["all"]
    lines = ["", "## Where \"which bar is highest\" is lost", "",
             f"A linear probe (logistic regression, its L2 strength chosen on a fifth of the training charts) reads "
             f"the highest bar's or point's position (1-6 from the left) from the global view's {TOKENS_PER_VIEW} "
             f"tokens: fitted on the {diag['train_charts']} training charts, scored on the {diag['heldout_charts']} "
             "held-out ones. The model has to name the label; a line chart's label is its position's day (days in "
             "order), a bar chart's is the fruit written under it.", "",
             "| what reads it | held-out charts | line charts | bar charts |", "|---|---:|---:|---:|",
             f"| probe: the frozen encoder's features | {probe_cells('encoder')} |",
             f"| probe: the projector's output (what the language model receives) | {probe_cells('projected')} |",
             f"| the model's answer (the label) | {_pct(right / n) if n else '-'} | {model['line'][0]}/"
             f"{model['line'][1]} | {model['bar'][0]}/{model['bar'][1]} |", "",
             f"Chance for the position: {_pct(diag['chance'])}. The probes took {diag['seconds']:.0f} s."]
    fit = diag.get("train_answers")
    if fit:
        lines.append(f"On {fit['n']} training charts it was trained on, the model names the highest one "
                     f"{_pct(fit['accuracy'])} {_ci(fit['ci95'])} of the time.")
    projected = diag["projected"]
    if n and projected["ci95"][0] > (fit["ci95"][1] if fit else right / n):
        lines.append(f"The projector's output holds the position ({_pct(projected['accuracy'])}) far more often than "
                     "the model answers, even on the charts it learned from: the information reaches the language "
                     "model and is lost there. Its adaptation (LoRA on a frozen 135M model, this budget) does not "
                     "learn to compare the image tokens; the encoder and the projector are not the limit.")
    return lines


def _lora_where(plan: dict) -> str:
    targets = set(plan.get("lora_targets", ("qkv_proj", "o_proj")))
    if targets == {"qkv_proj", "o_proj"}:
        return "the attention's q/k/v and output projections"
    return "every linear layer of the attention and MLP" if targets >= {"qkv_proj", "o_proj", "gate_up_proj",
                                                                         "down_proj"} else ", ".join(sorted(targets))


def _retrieval_and_quantized(results: dict) -> list[str]:
    """The caption-retrieval and quantized-variant sections of the document."""
    acc, plan, lines = results["accuracy"], results["plan"], []
    ret = results.get("retrieval", {})
    if ret:
        lines += ["", "## Caption retrieval", "",
                  f"Each held-out image scores its own caption and {plan['retrieval_candidates'] - 1} other held-out "
                  "captions of its family by mean log-likelihood; recall@1 is how often its own caption wins.", "",
                  "| family | images | recall@1 | chance |", "|---|---:|---:|---:|"]
        for family, row in ret.items():
            lines.append(f"| {FAMILY_NAMES.get(family, family)} | {row['n']} | {_pct(row['recall_at_1'])} "
                         f"{_ci(row['ci95'])} | {_pct(row['chance'])} |")
    quant = results.get("quantized", {})
    if quant:
        schemes = list(quant)
        lines += ["", "## Quantized variants", "",
                  "The same held-out questions (with the image) answered by variants whose language model and "
                  "projector are quantized; " + ADAPTER_PLACES[next(iter(quant.values())).get("adapters", "merged")]
                  + " The encoder stays in full precision. Change is against the "
                  "full-precision row above; McNemar's exact test pairs the answers, Holm-corrected over every "
                  "(variant, question type).", "",
                  "Projector format: " + ", ".join(f"{s_} {quant[s_]['projector_format']}" for s_ in schemes) + ".",
                  "", "| question | full precision | " + " | ".join(f"{s_} (change, p Holm)" for s_ in schemes) + " |",
                  "|---|---:|" + "---:|" * len(schemes)]
        for kind, row in acc.items():
            cells = [f"{_pct(quant[s_][kind]['accuracy'])} ({100 * quant[s_][kind]['change']:+.1f}, "
                     f"{quant[s_][kind]['p_holm']:.2g})" for s_ in schemes if kind in quant[s_]]
            lines.append(f"| {QUESTION_NAMES.get(kind, kind)} | {_pct(row['accuracy'])} | " + " | ".join(cells) + " |")
    return lines


def render(results: dict) -> str:
    plan, data, acc = results["plan"], results["data"], results["accuracy"]
    t1 = results["training"]["stage1"][-1]["seconds"] if results["training"]["stage1"] else 0
    t2 = results["training"]["stage2"][-1]["seconds"] if results["training"]["stage2"] else 0
    lines = [
        "# Lab: a LLaVA-style image + text model on CPU",
        "",
        "Written by `ligero lab vision` (src/ligero/lab/vision.py) from its own run; rerun it to reproduce "
        "(runs are reused, so a rerun only rewrites this page).",
        "",
        "## Setup",
        "",
        f"- Model: frozen EfficientNet-Lite0 (ImageNet; per 224-px view a 7x7 grid of its head's {HEAD_DIM} "
        f"channels with the 2x2-averaged {FINE_DIM} channels of the last stride-16 block beside them), pixel shuffle "
        f"2x2 -> {TOKENS_PER_VIEW} tokens of {FEATURE_DIM} per view -> projector (LayerNorm, Linear "
        f"{FEATURE_DIM}->576, GELU, Linear 576->576, plus learned vectors for the view's place and for the token's "
        "place in the view's grid) -> SmolLM2-135M-Instruct "
        "(its Q4_1 GGUF dequantized to fp32). AnyRes: a global view plus the tiles of a grid chosen among "
        f"1x1, 2x1, 1x2, 2x2, 3x1, 1x3 by aspect ratio (a 448x224 image = 3 views = {3 * TOKENS_PER_VIEW} image "
        "tokens).",
        f"- Stage 1 (LLaVA-1.5's recipe): the projector alone learns to caption, {plan['stage1_steps']} steps of "
        f"{plan['batch']} captions at lr {plan['stage1_lr']:g} (warm-up {plan['warmup']:.0%}, cosine, AdamW without "
        f"weight decay). Stage 2: projector + LoRA (rank {plan['lora_rank']}, alpha {plan['lora_alpha']:g}, on "
        f"{_lora_where(plan)}) on questions, {plan['stage2_steps']} steps of {plan['batch']} conversations (all of "
        "an image's questions in one, in a random order), "
        f"the projector at lr {plan['stage2_projector_lr']:g} and LoRA at {plan['stage2_lr']:g}. Loss on answer "
        f"tokens only. {PRECISION_NOTES[plan.get('precision', 'fp32')]} The rates are the recipes' (LLaVA-1.5's "
        "stage 1 rate; a LoRA-typical rate), not swept: the budget of this CPU went to training steps.",
        f"- Data, rendered offline: {data['train_images']} training and {data['heldout_images']} held-out images, "
        f"{plan['train_images']} / {plan['heldout_images']} per family"
        + (f", {plan['chart_train_images']} training charts" if plan.get("chart_train_images") else "")
        + f" (sha256 train {data['train_sha256'][:12]}, "
        f"held-out {data['heldout_sha256'][:12]}). Held-out charts, forms and scenes never share content with "
        "training ones; held-out emoji are characters never seen in training (so that family measures transfer "
        "of the language model's knowledge of the names, not memory).",
        f"- Time on this machine ({results['provenance']['machine'].get('cpu', 'CPU')}, commit "
        f"{results['provenance']['commit']}): stage 1 {t1 / 60:.1f} min, stage 2 {t2 / 60:.1f} min, evaluation "
        f"{results['eval_seconds'] / 60:.1f} min, whole lab {results['seconds'] / 60:.1f} min (stages reused from "
        "an earlier invocation keep their own times).",
        "",
        "## Held-out accuracy: with the image, without it, and chance",
        "",
        "Exact match after VQA's normalisation (lower case; articles and final punctuation dropped). *Text only* "
        "is the same trained model asked the same question with no "
        "image: what the language prior alone gets right. McNemar's exact test pairs the two answers to each "
        "question; p is Holm-corrected over the question types. Intervals are Wilson 95 %.",
        "",
        "| family | question | n | with image | text only | chance | p (Holm) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {FAMILY_NAMES.get(row['family'], row['family'])} | {QUESTION_NAMES.get(kind, kind)} | "
              f"{row['n']} | {_pct(row['accuracy'])} {_ci(row['ci95'])} | {_pct(row['text_only'])} "
              f"{_ci(row['text_only_ci95'])} | {_pct(row['chance'])} | {row.get('p_holm', float('nan')):.2g} |"
              for kind, row in acc.items()]
    lines += _retrieval_and_quantized(results)
    lines += _findings(results)
    lines += _highest_section(results)
    lines += [
        "", "## Training and examples", "",
        "![training curves](lab-vision/training.png)", "",
        "![held-out examples with the model's answers](lab-vision/examples.png)", "",
        "## Against the anchors", "",
        "- nanoVLM-222M (SigLIP-B/16 + SmolLM2-135M, 49 image tokens, ~6 h on one H100) reaches 35.3 % on MMStar. "
        "This lab trains for minutes on 2 CPU cores on synthetic tasks with closed answer sets, so its numbers are "
        "not comparable to MMStar; what carries over is the recipe (frozen encoder, MLP projector, captions then "
        "instructions, projector learning rate far above the language model's).",
        "- LLaVA-1.5: stage 1 on 558K captions at lr 1e-3, stage 2 on 665K instructions at 2e-5 with the whole "
        "language model trained; here stage 2 trains LoRA adapters instead (they ship in a few MB) at a LoRA-typical "
        "rate.",
        "",
        "## What the course's Gemini row asks, and what is here",
        "",
        "| modality | status |",
        "|---|---|",
        "| text | yes: the runtime, quantization, audit and serving |",
        "| image + text | yes: this model; `ligero generate --image`, `ligero serve --vision` (OpenAI image_url "
        "parts, base64 only) |",
        "| audio | no |",
        "| video | no |",
        "",
    ]
    return "\n".join(lines)
