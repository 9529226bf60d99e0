"""The vision-language model's plumbing, with a fake encoder and a tiny random language model: image vectors land
exactly on the image tokens' positions, in view order, and batching or padding never changes an answer."""

import dataclasses

import pytest
import torch
from PIL import Image
from torch import nn

from ligero.errors import LigeroError
from ligero.io.checkpoint import load_tokenizer
from ligero.models.config import ModelConfig
from ligero.models.generate import BatchGeneration
from ligero.models.transformer import Transformer
from ligero.vision.model import FEATURE_DIM, IMAGE_MARK, TOKENS_PER_VIEW, VisionLanguageModel


class FakeEncoder(nn.Module):
    """Each view's feature vectors encode the view's mean pixel value and the grid cell: distinct per view."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        mean = pixels.mean(dim=(1, 2, 3))[:, None, None] / 255  # [N, 1, 1]
        cell = torch.arange(TOKENS_PER_VIEW, dtype=torch.float32)[None, :, None] / TOKENS_PER_VIEW
        return (mean + cell).expand(n, TOKENS_PER_VIEW, FEATURE_DIM) + torch.linspace(0, 1, FEATURE_DIM)


@pytest.fixture(scope="module")
def vlm():
    tokenizer = load_tokenizer("smollm2-135m")
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=48, max_seq_len=1024)
    return VisionLanguageModel(Transformer(cfg).eval(), tokenizer, encoder=FakeEncoder()).eval()


def _wide() -> Image.Image:  # 2 x 1 grid: global view + 2 tiles, left half dark, right half light
    image = Image.new("RGB", (448, 224), (20, 20, 20))
    image.paste((230, 230, 230), (224, 0, 448, 224))
    return image


def test_image_vectors_reach_the_language_model_at_their_positions(vlm):
    images = [_wide(), Image.new("RGB", (100, 100), (120, 0, 0))]
    encoded = vlm.encode_images(images)
    assert [e.n_tokens for e in encoded] == [3 * TOKENS_PER_VIEW, TOKENS_PER_VIEW]
    assert encoded[0].views.tolist() == [0, 1, 2]  # global, then tile (0, 0), tile (0, 1)
    # The tiles are the image's halves, in order: the left (dark) tile's features are lower than the right's.
    assert encoded[0].features[1].mean() < encoded[0].features[2].mean()

    layout, embeds = vlm.prompt("What is shown?", images)
    (s0, n0), (s1, n1) = layout.image_spans
    assert (n0, n1) == (3 * TOKENS_PER_VIEW, TOKENS_PER_VIEW) and s0 + n0 <= s1
    seen = {}

    def capture(_module, args):
        seen["x"] = args[0].detach()

    hook = vlm.lm.layers[0].register_forward_pre_hook(capture)
    try:
        tokens = torch.tensor(layout.tokens)[None]
        with torch.no_grad():
            vlm.lm(tokens, embeds=embeds[None])
    finally:
        hook.remove()
    x = seen["x"][0]
    with torch.no_grad():
        text = vlm.lm.embed_tokens(tokens)[0]
        torch.testing.assert_close(x[s0 : s0 + n0], vlm.project(encoded[0]))
        torch.testing.assert_close(x[s1 : s1 + n1], vlm.project(encoded[1]))
    image_positions = set(range(s0, s0 + n0)) | set(range(s1, s1 + n1))
    text_positions = [i for i in range(len(layout.tokens)) if i not in image_positions]
    torch.testing.assert_close(x[text_positions], text[text_positions])
    # The question follows the images inside the user turn of the chat template.
    after = vlm.tokenizer.decode(layout.tokens[s1 + n1 :])
    assert after.lstrip().startswith("What is shown?") and "assistant" in after


def test_answers_do_not_depend_on_the_batch(vlm):
    questions = ["Which colour?", "A much longer question without any image in it, to force left padding?"]
    images = [[_wide()], []]
    together = vlm.answer(questions, images, max_new_tokens=6)
    alone = [vlm.answer([q], [i], max_new_tokens=6)[0] for q, i in zip(questions, images)]
    assert together == alone


def test_prompt_vectors_equal_to_the_embeddings_change_nothing(vlm):
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    plain = BatchGeneration(vlm.lm, prompts, 5)
    with torch.no_grad():
        vectors = [vlm.lm.embed_tokens(torch.tensor(p)[None])[0] for p in prompts]
    given = BatchGeneration(vlm.lm, prompts, 5, prompt_embeds=[vectors[0], None])
    while not plain.done:
        plain.step()
        given.step()
    assert plain.tokens == given.tokens


def test_mismatched_images_and_marks_are_refused(vlm):
    with pytest.raises(LigeroError, match="mark 1 images but 2"):
        vlm.layout(vlm.messages("q", 1), [49, 49])
    with pytest.raises(LigeroError, match="embeddings of shape"):
        BatchGeneration(vlm.lm, [[1, 2, 3]], 2, prompt_embeds=[torch.zeros(2, 32)])


def test_the_projector_marks_where_a_token_sits_in_its_view(vlm):
    """The same features in two cells of the token grid give two different vectors (a convolutional encoder's
    features barely say where a cell is); the same cell in two views differs by the view's embedding only."""
    feats = torch.ones(2, TOKENS_PER_VIEW, FEATURE_DIM)
    out = vlm.projector(feats, torch.tensor([0, 1])).reshape(2, TOKENS_PER_VIEW, -1)
    assert not torch.allclose(out[0, 0], out[0, 1])
    delta = out[1] - out[0]  # [T, C]: one vector, the difference of the two views' embeddings, for every cell
    torch.testing.assert_close(delta, delta[:1].expand_as(delta))


def test_a_training_conversation_holds_every_question_of_its_image(vlm):
    """Stage 2 trains on one conversation per image: the chat template's own rendering of all the turns, the
    loss on each answer and its end-of-turn token only; its first turn is the evaluation's one-question prompt."""
    import random

    from ligero.lab.vision import conversations, sequence
    from ligero.lab.vision_data import chart

    samples = [chart(random.Random(3)), chart(random.Random(4))]
    convs = conversations(samples, seed=0)
    for sample, ex in zip(samples, convs):
        asked = [(ex.question, ex.answer), *ex.follow_ups]
        assert sorted(asked) == sorted((q.question, q.answer) for q in sample.qa)
    ex = convs[0]
    image = vlm.encode_images([samples[0].image])[0]
    tokens, spans, targets = sequence(vlm, ex, image)
    tok = vlm.tokenizer
    messages = vlm.messages(ex.question, 1)
    for k, (question, answer) in enumerate([(ex.question, ex.answer), *ex.follow_ups]):
        messages += ([{"role": "user", "content": question}] if k else []) + [{"role": "assistant", "content": answer}]
    (start, n), = spans
    rendered = tok.decode(tokens[:start] + tokens[start + n:], skip_special=False)
    whole = tok.apply_chat_template(messages, add_generation_prompt=False).replace(IMAGE_MARK, "")
    assert whole.startswith(rendered) and whole[len(rendered):].strip() == ""
    eos = tok.decode(list(tok.eos_ids[:1]), skip_special=False)
    assert tok.decode([tokens[p] for p in targets], skip_special=False) == \
        "".join(a + eos for _, a in [(ex.question, ex.answer), *ex.follow_ups])
    first, _, first_targets = sequence(vlm, dataclasses.replace(ex, follow_ups=()), image)
    prompt = vlm.layout(vlm.messages(ex.question, 1), [image.n_tokens]).tokens
    assert first[: first_targets[0]] == prompt  # the first turn is the prompt evaluation asks
