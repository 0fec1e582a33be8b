"""CLIP's 77-token window: warn, per row, when a prompt will be truncated (the image is unchanged).

SDXL's text encoders see at most ``tokenizer.model_max_length`` tokens (77, start and end tokens
included); diffusers silently cuts the rest (it logs the cut text, without saying which row).
Counting with the artifact's own tokenizers tells the user which row and field lost words.
Only rows sent to diffusers as plain text are cut: with ``prompt_weighting="auto"`` (the default)
long prompts take the chunked-embeddings path of ``prompts.py`` instead and lose nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from model_pkg.request import RowSpec

logger = logging.getLogger(__name__)


def truncation_warnings(rows: Iterable[RowSpec], tokenizers: Sequence[object]) -> list[str]:
    """One message per row whose prompt or negative prompt exceeds a tokenizer's window; also logged."""
    tokenizers = [t for t in tokenizers if t is not None]
    messages = []
    for row in rows:
        for field in ("prompt", "negative_prompt"):
            text = getattr(row, f"effective_{field}")  # after the style preset is applied
            if not text:
                continue
            for tokenizer in tokenizers:
                limit = tokenizer.model_max_length
                count = len(tokenizer(text, truncation=False, verbose=False).input_ids)
                if count > limit:
                    messages.append(
                        f"Row {row.index}: '{field}' has {count} CLIP tokens; only the first {limit} are used "
                        "(the rest is ignored)"
                    )
                    break  # one warning per row and field, whichever encoder cut first
    for message in messages:
        logger.warning(message)
    return messages
