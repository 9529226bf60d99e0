"""Energy per 1,000 decoded tokens: measured through CodeCarbon, labelled an estimate unless read from counters."""

import pytest

from ligero.errors import LigeroError
from ligero.eval.energy import MEASURED_CPU_MODES, decode_energy, energy_text


def test_decode_energy_is_positive_scaled_per_1k_tokens_and_labelled(tiny_pair):
    _, model, _ = tiny_pair
    e = decode_energy(model, 16)
    assert e["tokens"] == 16 and e["seconds"] > 0 and e["wh_per_1k_tokens"] > 0
    parts = e["cpu_wh_per_1k_tokens"] + e["ram_wh_per_1k_tokens"] + e["gpu_wh_per_1k_tokens"]
    assert parts == pytest.approx(e["wh_per_1k_tokens"], rel=1e-6)
    cpu_mode = e["modes"]["cpu"]["mode"]
    assert e["estimate"] is (cpu_mode not in MEASURED_CPU_MODES)
    text = energy_text(e)
    assert text.startswith(f"{e['wh_per_1k_tokens']:.3g} Wh per 1,000 decoded tokens")
    assert ("(estimate)" in text) is e["estimate"] and e["library"].startswith("codecarbon ")
    with pytest.raises(LigeroError, match="at least 1 decoded token"):
        decode_energy(model, 0)
