"""Tokenizers: load a local tokenizer.json and check the chat template's special tokens,
or train a small byte-level BPE tokenizer on synthetic text.

The chat template (paper Table 5) needs five special tokens, each a single id:
`<|endoftext|>` ends every turn, `<|system|>`, `<|user|>` and `<|assistant|>` open turns, and
`<|frame|>` is the placeholder id at every vision-token position. GPT-NeoX's tokenizer has
only `<|endoftext|>` (id 0); `load_tokenizer(..., add_missing=True)` appends the others after
its 50,277 ids (they land inside the released checkpoints' vocabulary padding).

`save_tokenizer` writes the tokenizer a run trained with (added tokens included) beside an
exported model, with Hugging Face's tokenizer_config.json (the chat template as Jinja) so
that `transformers.AutoTokenizer` reads it too; `load_tokenizer(dir/tokenizer.json)` reads it
back with the same ids.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ma2mba_jax.data.errors import DataError

log = logging.getLogger(__name__)

ENDOFTEXT = "<|endoftext|>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
FRAME = "<|frame|>"
# In this order; `train_tokenizer` gives them ids 0..4.
SPECIAL_TOKENS = (ENDOFTEXT, SYSTEM, USER, ASSISTANT, FRAME)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Token ids of the chat template's special tokens."""
  endoftext: int
  system: int
  user: int
  assistant: int
  frame: int


def special_ids(tokenizer: tokenizers.Tokenizer, *, source: str = "<tokenizer>") -> SpecialIds:
  """The ids of the five special tokens; DataError naming `source` and what is missing."""
  ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
  missing = [token for token, i in ids.items() if i is None]
  if missing:
    raise DataError(
        f"{source}: tokenizer lacks the chat template's special token(s) {', '.join(missing)}; "
        "load it with add_missing=True (config data.add_special_tokens) to append them")
  return SpecialIds(
      endoftext=ids[ENDOFTEXT], system=ids[SYSTEM], user=ids[USER],
      assistant=ids[ASSISTANT], frame=ids[FRAME])


def load_tokenizer(path: str, *, add_missing: bool = False) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` from a local tokenizer.json, checked for the special tokens.

  With `add_missing`, absent special tokens are appended as new ids (logged); otherwise a
  DataError names the file and the missing tokens.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: tokenizer file not found")
  try:
    tokenizer = tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the Rust side raises a bare Exception for malformed JSON
    raise DataError(f"{path}: cannot read tokenizer ({e})") from e
  missing = [token for token in SPECIAL_TOKENS if tokenizer.token_to_id(token) is None]
  if missing and add_missing:
    tokenizer.add_special_tokens(missing)
    log.info("%s: appended special tokens %s (ids %s)", path, missing,
             [tokenizer.token_to_id(t) for t in missing])
  special_ids(tokenizer, source=path)
  tokenizer.encode_special_tokens = True  # "<|user|>" inside data text stays plain text
  return tokenizer


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def chat_template_jinja(system_prompt: str) -> str:
  """The paper's template (data/template.py) as a transformers chat template (text only:
  our code puts the `<|frame|>` tokens of the frames at the start of a user turn)."""
  quoted = system_prompt.replace("\\", "\\\\").replace("'", "\\'")
  return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
          f"{SYSTEM}{{{{ '{quoted}' }}}}{ENDOFTEXT}"
          "{%- endif -%}"
          "{%- for message in messages -%}"
          "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
          "{{ raise_exception('roles are system, user and assistant') }}"
          "{%- endif -%}"
          "<|{{ message['role'] }}|>{{ message['content'] }}" + ENDOFTEXT +
          "{%- endfor -%}"
          "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}")


def save_tokenizer(tokenizer: tokenizers.Tokenizer, out_dir: str, *,
                   system_prompt: str | None = None) -> str:
  """Writes out_dir/tokenizer.json (with every added token), tokenizer_config.json and
  special_tokens_map.json (transformers' files; the chat template as Jinja, and under
  "ma2mba_chat" the special token ids and system prompt our template uses). Returns the
  path of tokenizer.json."""
  if system_prompt is None:
    from ma2mba_jax.data.template import SYSTEM_PROMPT  # noqa: PLC0415 (imports this module)
    system_prompt = SYSTEM_PROMPT
  ids = special_ids(tokenizer, source="<tokenizer to save>")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, TOKENIZER_FILE)
  tokenizer.save(path)
  special = {"eos_token": ENDOFTEXT, "bos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
             "pad_token": ENDOFTEXT,
             "additional_special_tokens": [SYSTEM, USER, ASSISTANT, FRAME]}
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast", **special,
      "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
      "model_max_length": 1_000_000_000,
      "chat_template": chat_template_jinja(system_prompt),
      "ma2mba_chat": {"system_prompt": system_prompt,
                      "special_token_ids": dataclasses.asdict(ids),
                      "vocab_size": vocab_size(tokenizer)},
  }
  for name, data in ((TOKENIZER_CONFIG_FILE, config), (SPECIAL_TOKENS_MAP_FILE, special)):
    with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
      json.dump(data, f, indent=2, ensure_ascii=False)
      f.write("\n")
  return path


def vocab_size(tokenizer: tokenizers.Tokenizer) -> int:
  """Number of ids the embedding table must cover (added tokens included)."""
  return tokenizer.get_vocab_size(with_added_tokens=True)


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024) -> tokenizers.Tokenizer:
  """A byte-level BPE tokenizer trained on `texts` (GPT-NeoX's scheme, small vocabulary).

  The special tokens get ids 0..4 in `SPECIAL_TOKENS` order. Byte-level means any text
  encodes, even words never seen in training.
  """
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer=trainer)
  special_ids(tokenizer, source="<trained tokenizer>")
  tokenizer.encode_special_tokens = True  # "<|user|>" inside data text stays plain text
  return tokenizer
