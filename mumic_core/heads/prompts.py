"""A prompt template whose context words are learned (MKT's stage-2 prompt tuning): "There is a {} in the
scene" with the embeddings of "there is a" and "in the scene" as parameters, shared by every label, and
each label's own name tokens taken, fixed, from the text tower's token embedding.

Before any training the context parameters equal the words' token embeddings, so the encoding is exactly
the text tower's encoding of the filled-in template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PromptContext(nn.Module):
    def __init__(self, clip: nn.Module, tokenizer: Any, template: str):
        super().__init__()
        if template.count("{}") != 1:
            raise ValueError(f"option template must contain '{{}}' once, got {template!r:.60}")
        if not hasattr(clip, "token_embedding") or not hasattr(tokenizer, "encode"):
            raise ValueError("prompt tuning needs open_clip's own text tower and tokenizer (not a HF one)")
        prefix, suffix = template.split("{}")
        self.prefix_ids = tokenizer.encode(prefix)  # e.g. there, is, a
        self.suffix_ids = tokenizer.encode(suffix)  # e.g. in, the, scene
        if not self.prefix_ids and not self.suffix_ids:
            raise ValueError(f"option template {template!r:.60} has no context words to learn")
        self.sot, self.eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        self.context_length = int(clip.positional_embedding.shape[0])
        self.tokenizer = tokenizer
        words = torch.tensor(self.prefix_ids + self.suffix_ids, dtype=torch.long)
        self.context = nn.Parameter(clip.token_embedding.weight.detach()[words].clone())  # [n_ctx, W]
        self._token_cache: tuple[tuple, tuple[Tensor, ...]] | None = None  # see cached_tokens

    def _tokens(self, names: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Token ids [C, L] of the filled-in template, and where the context words sit: (row, position,
        context index), one entry per context word kept (a very long name may push some out)."""
        n_pre = len(self.prefix_ids)
        tokens = torch.zeros(len(names), self.context_length, dtype=torch.long)
        rows, positions, which = [], [], []
        for i, name in enumerate(names):
            name_ids = self.tokenizer.encode(name)
            ids = [self.sot, *self.prefix_ids, *name_ids, *self.suffix_ids, self.eot]
            context_at = [1 + j for j in range(n_pre)]
            context_at += [1 + n_pre + len(name_ids) + j for j in range(len(self.suffix_ids))]
            if len(ids) > self.context_length:  # truncated as open_clip's tokenizer does: EOT last
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            tokens[i, : len(ids)] = torch.tensor(ids)
            for k, pos in enumerate(context_at):
                if pos < len(ids) - 1:
                    rows.append(i)
                    positions.append(pos)
                    which.append(k)
        return tokens, torch.tensor(rows), torch.tensor(positions), torch.tensor(which)

    def cached_tokens(self, names: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`_tokens(names)` on the context's device, made once for the names a stage-2 step asks for every
        time: the context words' embeddings train, their token ids and positions do not."""
        device = self.context.device
        key = (tuple(names), str(device))
        if self._token_cache is None or self._token_cache[0] != key:
            self._token_cache = (key, tuple(t.to(device) for t in self._tokens(names)))
        return self._token_cache[1]

    def encode(self, clip: nn.Module, names: Sequence[str]) -> Tensor:
        """L2-normalised text embeddings [C, D] of the template filled with each name (open_clip's
        `CLIP.encode_text`, with the context words' embeddings replaced by the learned ones)."""
        tokens, rows, positions, which = self.cached_tokens(names)
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens).to(cast)  # [C, L, W]
        x = x.index_put((rows, positions), self.context[which].to(cast))  # not in place: grads reach context
        x = x + clip.positional_embedding.to(cast)
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        from open_clip.transformer import text_global_pool  # a clip exists: open_clip is imported already

        x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
        if isinstance(clip.text_projection, nn.Linear):
            x = clip.text_projection(x)
        elif clip.text_projection is not None:
            x = x @ clip.text_projection
        return F.normalize(x, dim=-1)
