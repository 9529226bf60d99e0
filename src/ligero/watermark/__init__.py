"""Watermarks for generated text: Kirchenbauer et al.'s green-list watermark (context-seeded, with additive, min-hash
and self-hash seeding) and the Unigram watermark (one fixed green list), applied as a logits processor in Ligero's
generation, and their detector (z-score, exact binomial p-value, repeated n-grams scored once).

    key = new_key(WatermarkSettings(), tokenizer, "smollm2-135m"); save_key(key, "wm.key")
    sampling = SamplingConfig(temperature=1.0, logits_processor=Watermarker(key, model.cfg.vocab_size))
    detect_text(text, tokenizer, key).z
"""

from ligero.watermark.detect import Detection, Detector, detect_text, detect_tokens
from ligero.watermark.greenlist import GreenList
from ligero.watermark.keys import WatermarkKey, WatermarkSettings, load_key, new_key, save_key
from ligero.watermark.processor import Watermarker

__all__ = ["Detection", "Detector", "GreenList", "WatermarkKey", "WatermarkSettings", "Watermarker", "detect_text",
           "detect_tokens", "load_key", "new_key", "save_key"]
