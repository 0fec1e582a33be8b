"""Long and weighted prompts: ``(text:weight)`` syntax and chunked CLIP embeddings past 77 tokens.

Modelled on diffusers' community ``lpw_stable_diffusion_xl`` pipeline, kept small:

- ``(text:1.3)`` (AWS / A1111 style) weights the tokens of ``text``; groups nest and multiply.
  ``\\(`` and ``\\)`` are literal parentheses; a group without ``:number`` stays literal text.
- Token ids are split into windows of 75, each encoded as ``<bos> window <eos> <pad>…`` (77 ids,
  exactly what the tokenizer gives a short prompt), and the windows' hidden states are concatenated:
  a long prompt is not truncated. The pooled embedding is the first window's (the part of the prompt
  plain diffusers would see). Every text of one pipeline call is padded to the same number of windows
  with empty ones (the batching key carries that number, so a row's image never depends on its batch).
- A weight ``w != 1`` moves a token's embedding away from (``w > 1``) or towards (``w < 1``) the
  window's last (padding) embedding: ``e_pad + (e - e_pad) × w``. Weight 1.0 leaves it bit-identical,
  so ``(cat:1.0)`` gives exactly the image of ``cat``.

Both text encoders are used for the base, only ``text_encoder_2`` for the refiner, as diffusers'
``encode_prompt`` does; the result is passed as ``prompt_embeds`` / ``pooled_prompt_embeds`` (and the
negative ones).

With ``prompt_weighting="off"`` prompts go to diffusers as text and CLIP truncates them at 77 tokens:
:func:`truncation_warnings` then names each row and field that lost words.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch

Segment = tuple[str, float]
_TOKEN = re.compile(r"\\[()\\:]|\(|:\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)|\)|[^\\():]+|[\\:]")


def parse_weighted(text: str) -> tuple[list[Segment], bool]:
    """``"a (red:1.5) cat"`` → ``([("a ", 1.0), ("red", 1.5), (" cat", 1.0)], True)``.

    The flag says whether any ``(text:weight)`` group was found (even with weight 1.0).
    """
    parts: list[list[Any]] = []  # [text, weight, is_open_paren_marker]
    opened: list[int] = []
    weighted = False
    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if token.startswith("\\") and len(token) == 2:
            parts.append([token[1], 1.0, False])
        elif token == "(":
            opened.append(len(parts))
            parts.append(["(", 1.0, True])
        elif m.group(1) is not None and opened:
            start = opened.pop()
            del parts[start]  # the "(" of a weight group is syntax, not text
            for part in parts[start:]:
                part[1] *= float(m.group(1))
            weighted = True
        elif token == ")" and opened:
            parts[opened.pop()][2] = False  # a plain "( … )" group: both parentheses stay text
            parts.append([")", 1.0, False])
        else:
            parts.append([token, 1.0, False])
    merged: list[Segment] = []
    for text_part, weight, _ in parts:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text_part, weight)
        else:
            merged.append((text_part, weight))
    return [s for s in merged if s[0]], weighted


MAX_WEIGHT = 10.0  # |weight| of a token after nested groups multiply ((cat:1e30) gave a black image)


def check_weights(text: str, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` when a token's weight is outside [-MAX_WEIGHT, MAX_WEIGHT]."""
    for segment, weight in parse_weighted(text)[0]:
        if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
            raise ValueError(
                f"'{field}': weight {weight:g} of {segment.strip()!r} is outside [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}] "
                "(nested (text:weight) groups multiply)"
            )


def _window(tokenizer) -> int:
    return tokenizer.model_max_length - 2  # room for <bos> and <eos>


def tokenize_weighted(text: str, tokenizer) -> tuple[list[int], list[float]]:
    """Token ids (no special tokens) and one weight per id."""
    ids: list[int] = []
    weights: list[float] = []
    for segment, weight in parse_weighted(text)[0]:
        segment_ids = tokenizer(segment, add_special_tokens=False).input_ids
        ids += segment_ids
        weights += [weight] * len(segment_ids)
    return ids, weights


def count_windows(text: str, tokenizers) -> int:
    """How many 75-token windows ``text`` needs with the largest of ``tokenizers`` (at least 1)."""
    return max(max(1, math.ceil(len(tokenize_weighted(text, t)[0]) / _window(t))) for t in tokenizers if t is not None)


def needs_chunked_encoding(texts: list[str], tokenizers) -> int:
    """0 when plain diffusers encodes these texts as written (no weights, ≤ 77 tokens); else the
    number of windows to encode every one of them with."""
    windows = max(count_windows(t, tokenizers) for t in texts)
    weighted = any(parse_weighted(t)[1] for t in texts)
    return windows if weighted or windows > 1 else 0


def _encode_texts(texts: list[str], tokenizer, text_encoder, windows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states [n, windows × 77, d], pooled [n, d'] or None) for one text encoder."""
    size = _window(tokenizer)
    rows, row_weights = [], []
    for text in texts:
        ids, weights = tokenize_weighted(text, tokenizer)
        if len(ids) > windows * size:
            raise ValueError(f"text needs more than {windows} windows")  # the batch key promised otherwise
        for w in range(windows):
            chunk, chunk_w = ids[w * size : (w + 1) * size], weights[w * size : (w + 1) * size]
            pad = size - len(chunk)
            rows.append([tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
            row_weights.append([1.0, *chunk_w, 1.0] + [1.0] * pad)
    ids_tensor = torch.tensor(rows, dtype=torch.long, device=text_encoder.device)
    output = text_encoder(ids_tensor, output_hidden_states=True)
    hidden = output.hidden_states[-2]  # SDXL uses the penultimate layer
    weights_tensor = torch.tensor(row_weights, dtype=hidden.dtype, device=hidden.device)
    if bool((weights_tensor != 1.0).any()):
        last = hidden[:, -1:, :]
        scaled = last + (hidden - last) * weights_tensor.unsqueeze(-1)
        hidden = torch.where((weights_tensor != 1.0).unsqueeze(-1), scaled, hidden)
    hidden = hidden.reshape(len(texts), windows * hidden.shape[1], hidden.shape[-1])
    pooled = output[0][::windows] if output[0].ndim == 2 else None  # the first window's pooled embedding
    return hidden, pooled


@torch.no_grad()
def encode(pipe, texts: list[str], windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled_prompt_embeds) of ``texts`` for a diffusers SDXL pipeline (base or refiner)."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    hidden_states, pooled = [], None
    for tokenizer, text_encoder in pairs:
        if text_encoder is None:
            continue
        hidden, pooled_here = _encode_texts(texts, tokenizer, text_encoder, windows)
        hidden_states.append(hidden)
        pooled = pooled_here if pooled_here is not None else pooled
    dtype = pipe.text_encoder_2.dtype
    return torch.concat(hidden_states, dim=-1).to(dtype), pooled.to(dtype)


def embeddings(pipe, prompts: list[str], negative_prompts: list[str] | None, windows: int) -> dict[str, Any]:
    """The ``prompt_embeds`` family of pipeline arguments, replacing ``prompt`` / ``negative_prompt``.

    No negative prompt gives zeros where the pipeline's ``force_zeros_for_empty_prompt`` says so (the
    base) and the embedding of "" otherwise (the refiner), as diffusers does.
    """
    prompt_embeds, pooled = encode(pipe, prompts, windows)
    if negative_prompts is None and pipe.config.force_zeros_for_empty_prompt:
        negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
    else:
        negative_embeds, negative_pooled = encode(pipe, negative_prompts or [""] * len(prompts), windows)
    return dict(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=negative_embeds,
        negative_pooled_prompt_embeds=negative_pooled,
    )


# -- truncation warnings (plain-text prompts) ------------------------------------------------------

logger = logging.getLogger(__name__)


def truncation_warnings(rows: Iterable[Any], tokenizers: Sequence[object]) -> list[str]:
    """One message per :class:`~model_pkg.request.RowSpec` whose prompt or negative prompt exceeds a
    tokenizer's window; also logged.

    Only rows sent to diffusers as plain text are cut (``prompt_weighting="off"``): diffusers cuts
    silently past ``tokenizer.model_max_length`` (77, start and end tokens included) and logs the cut
    text without saying which row; counting with the artifact's own tokenizers names the row and field.
    """
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
