"""GPT-2 byte-level BPE through the ``tokenizers`` library, and a UTF-8-safe stream decoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import MinadeptError

EOT = "<|endoftext|>"



def token_ids(ids, vocab_size: int, name: str = "ids") -> np.ndarray:
    """``ids`` (a 1-D sequence or array of integer token ids, possibly empty) as int64 [T].
    Raises MinadeptError for another shape, a non-integer (float, bool, str) or an id outside
    [0, vocab_size), naming ``name``."""
    try:
        arr = np.asarray(ids)
    except (ValueError, TypeError):          # ragged nesting
        raise MinadeptError(f"{name} must be a 1-D sequence of token ids, got a ragged nested sequence") from None
    if arr.ndim != 1:
        raise MinadeptError(f"{name} must be a 1-D sequence of token ids, got {type(ids).__name__} of shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu" or (not isinstance(ids, np.ndarray)       # [1, True] -> int64
                                                    and not {bool, np.bool_}.isdisjoint(map(type, ids)))):
        raise MinadeptError(f"{name} must be integer token ids, got {'bool' if arr.dtype.kind in 'iu' else arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise MinadeptError(f"token id out of range [0, {vocab_size}), got {bad} in {name}")
    return arr.astype(np.int64, copy=False)


class Tokenizer:
    """Wraps ``tokenizers.Tokenizer``. Reads ``tokenizer.json``, else ``vocab.json`` +
    ``merges.txt`` (byte-level BPE, as HF's GPT2TokenizerFast builds it).

    ``eot_id`` is the id of ``<|endoftext|>``. Raises MinadeptError when the directory has
    neither form or a file cannot be parsed.
    """

    def __init__(self, tok):
        self._tok = tok
        self.eot_id = tok.token_to_id(EOT)
        if self.eot_id is None:
            raise MinadeptError(f"tokenizer has no {EOT} token")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer":
        import tokenizers
        from tokenizers import decoders, models, pre_tokenizers

        d = Path(model_dir)
        tj, vocab, merges = d / "tokenizer.json", d / "vocab.json", d / "merges.txt"
        try:
            if tj.is_file():
                tok = tokenizers.Tokenizer.from_file(str(tj))
            elif vocab.is_file() and merges.is_file():
                tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
                tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tok.decoder = decoders.ByteLevel()
                if tok.token_to_id(EOT) is not None:
                    tok.add_special_tokens([EOT])
            else:
                raise MinadeptError(f"no tokenizer in {d}: expected tokenizer.json or vocab.json + merges.txt")
        except MinadeptError:
            raise
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise MinadeptError(f"cannot read the tokenizer in {d} ({str(e).splitlines()[0][:160]})") from None
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Text -> token ids (``<|endoftext|>`` in the text becomes the special token).
        Raises MinadeptError when ``text`` is not a str."""
        if not isinstance(text, str):
            raise MinadeptError(f"text to encode must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Token ids -> text; incomplete UTF-8 at the end becomes U+FFFD (HF behaviour).
        Raises MinadeptError for ids that are not integers in [0, vocab_size) (the tokenizers
        library would silently drop them)."""
        return self._tok.decode(token_ids(ids, self.vocab_size).tolist(), skip_special_tokens=False)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Turns a stream of token ids into text pieces that never split a UTF-8 character.

    ``step(id)`` returns the text completed by this token (possibly ""), ``finish()`` whatever
    is left (bytes that never formed a character come out as U+FFFD, as ``decode`` does).
    The concatenation of all pieces equals ``Tokenizer.decode`` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=False)
        self._ids: list[int] = []
        self._emitted = 0  # characters emitted so far

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        piece = self._stream.step(self._tokenizer._tok, int(token_id))
        if not piece:
            return ""
        self._emitted += len(piece)
        return piece

    def finish(self) -> str:
        full = self._tokenizer.decode(self._ids)
        rest = full[self._emitted:]
        self._emitted = len(full)
        return rest
