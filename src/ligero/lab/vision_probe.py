"""Where "which bar / point is highest" is lost, measured: is the highest bar's position in the image tokens at all?

A linear probe (multinomial logistic regression, L2-regularised, its strength chosen on a split of the training
charts) reads the position of the highest bar or point (1-6 from the left) from the global view's tokens, once from
the frozen encoder's features and once from the trained projector's output, i.e. what the language model receives.
Fitted on the training charts and scored on the held-out ones. If the projector's output holds the position while
the model's answers miss it, the information reaches the language model and is lost there, not in the encoder or the
projector. For line charts the position is the answer (days in order); a bar chart's answer is the label under it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ligero.eval.stats import wilson_interval
from ligero.lab.vision_data import Sample, chart_kind, chart_values
from ligero.vision.model import TOKENS_PER_VIEW, EncodedImage

DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 strengths tried (on the mean cross-entropy)
CLASSES = 6  # at most 6 bars or points


def highest_position(sample: Sample) -> int:
    """0-based position (from the left) of a chart's highest bar or point."""
    values = [v for _, v in chart_values(sample)]
    return values.index(max(values))


def global_tokens(images: list[EncodedImage], project=None) -> torch.Tensor:
    """[N, TOKENS_PER_VIEW * D] the global view's tokens of each image (view 0), flattened in raster order: encoder
    features, or with `project` the projector's output."""
    rows = []
    with torch.no_grad():
        for image in images:
            tokens = project(image)[:TOKENS_PER_VIEW] if project is not None else image.features[0]
            rows.append(tokens.float().flatten())
    return torch.stack(rows)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, decay: float, iterations: int = 100) -> torch.nn.Linear:
    """Multinomial logistic regression by L-BFGS on standardised features (x already standardised)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], CLASSES)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _accuracy(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    """Held-out accuracy of a linear probe; the L2 strength chosen on the last fifth of the training rows (never the
    held-out ones), then refitted on all of them."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # zero-padded tokens have no spread
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    cut = max(1, len(y_train) * 4 // 5)
    scores = {}
    for decay in DECAYS:
        if cut < len(y_train):
            scores[decay] = _accuracy(fit_logistic(x_train[:cut], y_train[:cut], decay), x_train[cut:],
                                      y_train[cut:])
    decay = max(scores, key=lambda d: (scores[d], d)) if scores else DECAYS[len(DECAYS) // 2]  # ties: stronger
    model = fit_logistic(x_train, y_train, decay)
    with torch.no_grad():
        right = (model(x_test).argmax(-1) == y_test).tolist()
    return {"decay": decay, "right": right, "accuracy": sum(right) / len(right),
            "ci95": wilson_interval(sum(right), len(right))}


def highest_probes(train: list[Sample], train_images: list[EncodedImage], held: list[Sample],
                   held_images: list[EncodedImage], project) -> dict:
    """Both probes (encoder features, projector output) on the charts of the given samples."""
    tr = [i for i, s in enumerate(train) if s.family == "charts"]
    he = [i for i, s in enumerate(held) if s.family == "charts"]
    y_train = torch.tensor([highest_position(train[i]) for i in tr])
    y_test = torch.tensor([highest_position(held[i]) for i in he])
    out = {"train_charts": len(tr), "heldout_charts": len(he),
           "chance": sum(1 / len(chart_values(held[i])) for i in he) / max(1, len(he)),
           "kinds": [chart_kind(held[i]) for i in he]}
    for name, fn in (("encoder", None), ("projected", project)):
        x_train = global_tokens([train_images[i] for i in tr], fn)
        x_test = global_tokens([held_images[i] for i in he], fn)
        out[name] = probe(x_train, y_train, x_test, y_test)
    return out
