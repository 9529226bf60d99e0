"""Token log-probs in OpenAI's two formats, for the text the client actually received.

The client gets text, not tokens: the output guard releases it word by word (and may redact words), stop strings cut
it. So each generated token is placed in the output text by its character offsets (the decoded prefix lengths), and
reported once the text it covers has been released, with that *released* text as its `token`: a redacted word shows
as its asterisks, never as the token that was generated, and tokens cut off by a stop string or a block are not
reported. A token that ends inside a multi-byte character covers no text of its own (the character goes to the token
that completes it). Log-probs are the model's own (untempered, before logit_bias and penalties); alternatives are
the most likely tokens under the same distribution, decoded on their own.
"""

from __future__ import annotations

from typing import Any

from ligero.serve.schemas import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


class LogprobTracker:
    """Reports each generated token once, in the chunk that releases its text (`take`)."""

    def __init__(self, tokenizer: Any, top: int, chat: bool) -> None:
        self.tokenizer, self.top, self.chat = tokenizer, top, chat
        self.ends: list[int] = []  # per token: the end of its text in the output, in characters
        self.sent = 0  # tokens reported so far

    def _extend_ends(self, tokens: list[int]) -> None:
        while len(self.ends) < len(tokens):
            k = len(self.ends)
            end = len(self.tokenizer.decode(tokens[: k + 1]).rstrip("\ufffd"))  # an unfinished character: not yet
            self.ends.append(max(end, self.ends[-1] if self.ends else 0))

    def take(self, tokens: list[int], logprobs: list[float], alternatives: list[list[tuple[int, float]] | None],
             released: str, final: bool) -> CompletionLogprobs | ChatLogprobs:
        """The tokens whose text lies within `released` (all released text so far) and were not reported yet; at the
        end (`final`) also a last token that the released text ends inside of."""
        self._extend_ends(tokens)
        limit, picked = len(released), []
        while self.sent < len(tokens):
            start = self.ends[self.sent - 1] if self.sent else 0
            end = self.ends[self.sent]
            if not (end <= limit or (final and start < limit)):
                break
            picked.append((released[start:min(end, limit)], start, logprobs[self.sent], alternatives[self.sent]))
            self.sent += 1
        return self._chat(picked) if self.chat else self._completion(picked)

    def _alternatives(self, alternatives: list[tuple[int, float]] | None) -> list[tuple[str, float]]:
        return [(self.tokenizer.decode([t], skip_special=False), lp) for t, lp in (alternatives or [])[: self.top]]

    def _completion(self, picked: list) -> CompletionLogprobs:
        return CompletionLogprobs(
            tokens=[text for text, _, _, _ in picked], token_logprobs=[lp for _, _, lp, _ in picked],
            top_logprobs=[dict(self._alternatives(alt)) for _, _, _, alt in picked] if self.top else None,
            text_offset=[start for _, start, _, _ in picked])

    def _chat(self, picked: list) -> ChatLogprobs:
        def entry(text: str, lp: float) -> TopLogprob:
            return TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))

        return ChatLogprobs(content=[
            TokenLogprob(**entry(text, lp).model_dump(),
                         top_logprobs=[entry(t, v) for t, v in self._alternatives(alt)])
            for text, _, lp, alt in picked])
