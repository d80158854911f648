"""Stop handling of the native engine: stop token ids, stop strings, ``max_tokens`` and the context limit."""

from __future__ import annotations

from typing import Literal

from orz_fast.rollout.sampling import find_stop
from orz_fast.rollout.scheduler import Sequence


class StopChecker:
    """Decides after each sampled token whether a sequence is finished, and sets its ``finish_reason`` and
    (with a tokenizer) its whole ``text``.

    Stop strings are matched on incrementally detokenised text (``tokenizer`` needed); the text is cut
    right after the stop string. Without a tokenizer the text is left as it is (completions carry none).
    """

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer

    def __call__(self, seq: Sequence) -> bool:
        """True (and ``seq.finish_reason`` set) when ``seq``'s last token ends it."""
        req = seq.request
        token = seq.tokens[-1]
        reason: Literal["stop", "length"] | None = None
        cut = False
        if token in req.stop_ids:
            reason = "stop"
        elif req.params.stop and self._stop_string_hit(seq):
            reason, cut = "stop", True
        elif seq.length >= req.max_len:
            reason = "length"
        if reason is None:
            return False
        if self.tokenizer is not None and not cut:
            seq.text = self.tokenizer.decode(seq.tokens, skip_special_tokens=True)
        seq.finish_reason = reason
        return True

    def _stop_string_hit(self, seq: Sequence) -> bool:
        """Extend ``seq.text`` by the newly decodable characters; on a stop string cut the text after it."""
        tok, ids = self.tokenizer, seq.tokens
        # Decoding a short window from the last emitted tokens keeps per-step work constant; a
        # trailing U+FFFD means an unfinished multi-byte character, emitted once complete.
        prefix = tok.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        window = tok.decode(ids[seq.prefix_offset :], skip_special_tokens=True)
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return False
        start = max(0, len(seq.text) - seq.request.max_stop_chars + 1)
        seq.text += window[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        end = find_stop(seq.text, seq.request.params.stop, start)
        if end == -1:
            return False
        seq.text = seq.text[:end]
        return True
