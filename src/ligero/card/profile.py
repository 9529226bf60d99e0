"""`ligero card profile`: measure a larger reference profile for the card of the variant you deploy.

A full audit profiles every variant with 40 requests, enough for drift monitoring's KS tests but not for PSI and
Jensen-Shannon, which need at least 20 values per bin in the effective sample size (ligero.serve.drift). This
rebuilds the card's variant (the base model and the card's recipe), answers `n` profile prompts with the card's
own sampling settings, replaces monitoring.reference_profile and writes the card again, sealed.
"""

from __future__ import annotations

from pathlib import Path

from ligero.card import card_errors, read_card, write_card
from ligero.errors import LigeroError
from ligero.eval.profile import reference_profile
from ligero.eval.variants import AS_SHIPPED, build_variant
from ligero.quant.config import Recipe


def reprofile_card(card_path: str | Path, n_prompts: int = 200, out_dir: str | Path | None = None,
                   device: str = "cpu") -> Path:
    """Write <out_dir>/<card stem>.json (and .md) with a reference profile of `n_prompts` responses."""
    if n_prompts < 8:
        raise LigeroError(f"--prompts must be at least 8, got {n_prompts}")
    path = Path(card_path)
    card = read_card(path)
    errors = card_errors(card)
    if errors:
        raise LigeroError(f"{path} is not a valid deployment card ({errors[0]}); check it with `ligero card "
                          f"validate` or take one written by `ligero run`")
    folder = Path(out_dir) if out_dir is not None else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LigeroError(f"cannot create {folder} ({exc.strerror}); choose a writable --out") from None
    recipe = card["format"]["recipe"]
    calibration = card["format"]["calibration"] or {}
    as_shipped = card["format"]["scheme"] == AS_SHIPPED  # the file as stored: its recipe is a record, not a plan
    loaded = build_variant(card["identity"]["base_model"], AS_SHIPPED if as_shipped else None,
                           recipe=Recipe.from_dict(recipe) if recipe and not as_shipped else None,
                           calib_windows=calibration.get("windows", 8),
                           calib_tokens_per_window=calibration.get("tokens_per_window", 256), device=device)
    old = card["monitoring"]["reference_profile"]
    sampling = old["sampling"]
    card["monitoring"]["reference_profile"] = reference_profile(
        loaded.model, loaded.tokenizer, n_prompts=n_prompts, max_new_tokens=sampling["max_new_tokens"],
        temperature=sampling["temperature"], top_p=sampling["top_p"], seed=sampling["seed"],
        batch_size=sampling.get("batch_size", 8))
    json_path, _ = write_card({k: v for k, v in card.items() if k != "integrity"}, folder, path.stem)
    return json_path
