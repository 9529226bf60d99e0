"""Long evaluation steps report progress: each advances its bar by exactly the work it announced (SmolLM2)."""

from collections import Counter

import pytest

from ligero.eval.data import wikipedia_split
from ligero.eval.perplexity import make_windows, perplexity, window_bos
from ligero.eval.profile import reference_profile
from ligero.eval.quality import base_logprobs, compare_models
from ligero.eval.scoring import sequence_logprobs
from ligero.eval.shift import internal_shift
from ligero.eval.speed import measure_speed, speed_runs


@pytest.mark.slow
def test_every_long_step_advances_by_its_announced_total(smollm2):
    model, tok = smollm2.model, smollm2.tokenizer
    done = Counter()

    def advance(step):
        return lambda n=1: done.update({step: n})

    ids = tok.encode(wikipedia_split("eval").text, add_bos=False)[:200]
    windows = make_windows(ids, 64, bos=window_bos(tok))
    perplexity(model, tok, ids, ctx=64, progress=advance("perplexity"))
    base_logprobs(model, windows, progress=advance("baseline log-probs"))
    compare_models(model, model, ids, ctx=64, progress=advance("quality"))
    internal_shift(model, model, windows[:2], progress=advance("shift"))
    measure_speed(model, prefill_tokens=8, decode_tokens=2, repeats=2, progress=advance("speed"))
    sequence_logprobs(model, tok, ["One.", "Two words.", "And three words."], batch_size=2,
                      progress=advance("scoring"))
    reference_profile(model, tok, n_prompts=3, max_new_tokens=2, batch_size=2, progress=advance("profile"))
    assert done == {"perplexity": len(windows), "baseline log-probs": len(windows), "quality": len(windows),
                    "shift": 2, "speed": speed_runs(2), "scoring": 3, "profile": 3}
