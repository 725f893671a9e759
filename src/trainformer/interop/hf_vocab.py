"""A foreign vocabulary made ours: its special tokens moved to our fixed ids, nothing else changed.

trainformer reads its seven special tokens at ids 0-6 (`SPECIAL_TOKENS`:
pad, unk, bos, eos, mask, sep, cls). A checkpoint trained elsewhere has its
own: GPT-2 one ``<|endoftext|>`` at the end of the vocabulary, BERT ``[PAD]``
at 0 and ``[CLS]``/``[SEP]``/``[MASK]`` at 101-103. Import renumbers the
vocabulary: each of our roles takes the foreign token that plays it (named
ours from then on), a role nobody plays gets a new token, and every other
token keeps its place in the old order after the seven. The embedding rows
(and output rows and biases) move with their tokens; a new token's row is the
mean of the old rows. On the old tokens the imported model computes exactly
what the foreign one did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainformer.data.tokenizer import SPECIAL_TOKENS

ROLES = ("pad", "unk", "bos", "eos", "mask", "sep", "cls")  # our id = index (SPECIAL_TOKENS order)
# Who gets a token that plays several roles: GPT-2's <|endoftext|> is bos, eos and unk, and our
# language models separate documents with EOS, so it becomes EOS and the others new tokens.
ASSIGN_ORDER = ("eos", "pad", "cls", "sep", "mask", "unk", "bos")
# Tensors indexed by token id, in our parameter names.
VOCAB_ROWS = ("tok_embed.weight", "tgt_tok_embed.weight", "lm_head.weight", "head.decoder.weight", "head.bias")


@dataclass
class VocabMap:
    old_of_new: list[int | None]  # per new id, the old id it came from (None: a new token)
    names: dict[int, str]  # new id -> its token string, where it changed (our special names)

    @property
    def identity(self) -> bool:
        return not self.names and all(o == i for i, o in enumerate(self.old_of_new))


def special_roles(hf_dir: Path) -> dict[str, str]:
    """role -> token string, from the HF dir's tokenizer_config.json / special_tokens_map.json."""
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = hf_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        for role in ROLES:
            value = data.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and role not in roles:
                roles[role] = value
    return roles


def token_ids(tokenizer: dict[str, Any]) -> dict[str, int]:
    """token string -> id over the model vocabulary and the added tokens of a tokenizer.json."""
    vocab = tokenizer["model"]["vocab"]
    ids = {tok: i for i, (tok, _) in enumerate(vocab)} if isinstance(vocab, list) else dict(vocab)
    for added in tokenizer.get("added_tokens", []):
        ids[added["content"]] = added["id"]
    return ids


def plan(tokenizer: dict[str, Any], roles: dict[str, str]) -> VocabMap:
    """Which old token takes each of our seven ids; the rest follow in their old order."""
    ids = token_ids(tokenizer)
    taken: dict[str, int] = {}  # role -> old id
    used: set[int] = set()
    for role in ASSIGN_ORDER:
        ours = SPECIAL_TOKENS[ROLES.index(role)]
        for candidate in (roles.get(role), ours):  # the token playing it, else one already named ours
            old = ids.get(candidate) if candidate is not None else None
            if old is not None and old not in used:
                taken[role] = old
                used.add(old)
                break
    specials = [taken.get(role) for role in ROLES]
    n_old = max(ids.values()) + 1
    rest = [i for i in range(n_old) if i not in used]
    old_of_new = specials + rest
    old_names = {i: t for t, i in ids.items()}
    names = {new: SPECIAL_TOKENS[new] for new, old in enumerate(specials)
             if old is None or old_names.get(old) != SPECIAL_TOKENS[new]}
    return VocabMap(old_of_new, names)


def remap_tokenizer(tokenizer: dict[str, Any], vm: VocabMap) -> dict[str, Any]:
    """The tokenizer.json with ids renumbered and the special tokens named ours (no post-processor)."""
    data = json.loads(json.dumps(tokenizer))  # a deep copy
    old_ids = token_ids(tokenizer)
    old_names = {i: t for t, i in old_ids.items()}
    new_of_old = {old: new for new, old in enumerate(vm.old_of_new) if old is not None}
    name_of_new = {new: vm.names.get(new, old_names.get(old, "")) for new, old in enumerate(vm.old_of_new)}
    model = data["model"]
    if isinstance(model["vocab"], list):  # Unigram: the list position is the id
        scores = {i: s for i, (_, s) in enumerate(model["vocab"])}
        model["vocab"] = [[name_of_new[new], scores.get(old, 0.0) if old is not None else 0.0]
                          for new, old in enumerate(vm.old_of_new)]
        if model.get("unk_id") is not None:
            model["unk_id"] = ROLES.index("unk")
    else:
        model["vocab"] = {name_of_new[new_of_old[i]]: new_of_old[i] for i in model["vocab"].values()}
        for new in vm.names:
            model["vocab"][name_of_new[new]] = new
        if "unk_token" in model and model["unk_token"] is not None:
            model["unk_token"] = SPECIAL_TOKENS[ROLES.index("unk")]
    old_added = {a["id"]: a for a in tokenizer.get("added_tokens", [])}
    added = []
    for new, old in enumerate(vm.old_of_new):
        if new < len(ROLES) or old in old_added:
            entry = dict(old_added.get(old) or {"single_word": False, "lstrip": False, "rstrip": False,
                                                  "normalized": False})
            entry.update(id=new, content=name_of_new[new])
            if new < len(ROLES):
                entry["special"] = True
            added.append(entry)
    data["added_tokens"] = added
    data["post_processor"] = None
    return data


def remap_rows(state: dict[str, torch.Tensor], vm: VocabMap) -> dict[str, torch.Tensor]:
    """Token-indexed tensors reordered to the new ids; a new token's row is the mean of the old rows."""
    out = dict(state)
    for key in VOCAB_ROWS:
        if key not in state:
            continue
        old = state[key]
        extended = torch.cat([old, old.mean(dim=0, keepdim=True)])  # the last row: new tokens
        index = torch.tensor([len(old) if i is None else i for i in vm.old_of_new])
        out[key] = extended.index_select(0, index).contiguous()
    return out
