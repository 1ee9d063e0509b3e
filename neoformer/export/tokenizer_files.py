"""Tokenizer files transformers loads with no extra package: ``tokenizer.json`` for every tokenizer kind,
``tokenizer_config.json`` (special tokens + the chat template) and the special-token ids."""
from __future__ import annotations

import json
from pathlib import Path

from ..chat import chat_template_of
from .common import ExportError, write_json

TEST_TEXT = "Hello, world! Export check: 123 tokens\n  indented\tline, ünïcödé."


def _fast_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes like ``tokenizer``."""
    if tokenizer.kind == "bpe":
        from tokenizers import Tokenizer

        return Tokenizer.from_str(tokenizer._tok.to_str())
    if tokenizer.kind == "sentencepiece":
        return _from_sentencepiece(tokenizer)
    if tokenizer.kind == "char":
        return _from_chars(tokenizer)
    raise ExportError(f"writing tokenizer.json for a {tokenizer.kind} tokenizer is not supported yet")


def _from_sentencepiece(tokenizer):
    """transformers' SentencePiece reader, which follows the model's own normaliser settings (needs
    sentencepiece + protobuf at export time only; loading the tokenizer.json needs neither)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
        from transformers.convert_slow_tokenizer import SpmConverter

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(tokenizer._proto)
        pieces = [(p.piece, p.score) for p in proto.pieces]
        is_bpe = proto.trainer_spec.model_type == proto.trainer_spec.BPE
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)} if is_bpe else pieces
        fast = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    except (ImportError, AttributeError) as error:  # protobuf missing, or a transformers without the reader
        raise ExportError(f"converting SentencePiece to tokenizer.json needs protobuf and transformers >= 5 "
                          f"({error}); pip install protobuf 'transformers>=5'") from None
    if fast is None:
        raise ExportError("cannot convert this SentencePiece model type to tokenizer.json")
    return fast


def _from_chars(tokenizer):
    """Character vocabulary -> WordLevel over single characters (every character one token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokenizer.SPECIALS)}
    vocab.update({char: i for i, char in enumerate(tokenizer.chars, start=len(tokenizer.SPECIALS))})
    fast = Tokenizer(models.WordLevel(vocab, unk_token=tokenizer.SPECIALS[tokenizer.unk_id]))
    fast.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    fast.decoder = decoders.Fuse()
    return fast


def _token(tokenizer, fast, token_id):
    return None if token_id is None else fast.id_to_token(token_id)


def write_tokenizer(out: Path, tokenizer, checkpoint_config: dict) -> dict:
    """Write tokenizer.json + tokenizer_config.json; return the special ids for config.json.
    Refuses a conversion that would encode differently from neoformer's tokenizer."""
    fast = _fast_tokenizer(tokenizer)
    if fast.encode(TEST_TEXT, add_special_tokens=False).ids != tokenizer.encode(TEST_TEXT):
        raise ExportError(f"the {tokenizer.kind} tokenizer converted to tokenizer.json encodes differently; "
                          "not writing a tokenizer that would disagree with the model")
    fast.save(str(out / "tokenizer.json"))
    specials = {name: _token(tokenizer, fast, getattr(tokenizer, f"{name}_id", None))
                for name in ("bos", "eos", "pad", "unk", "mask")}
    template = chat_template_of(checkpoint_config or {})
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{name}_token": token for name, token in specials.items() if token is not None},
        "chat_template": template.template, "clean_up_tokenization_spaces": False,
        "model_max_length": int(checkpoint_config.get("model", {}).get("max_seq_len", 1 << 30)),
    })
    write_json(out / "special_tokens_map.json",
               {f"{name}_token": token for name, token in specials.items() if token is not None})
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def set_special_ids(out: Path, ids: dict, decoder_start: int | None = None) -> None:
    """Put the ids into config.json and write generation_config.json (HF ``generate`` stops at EOS)."""
    config = json.loads((out / "config.json").read_text())
    config.update(ids)
    generation = {k: v for k, v in ids.items() if v is not None}
    if decoder_start is not None:
        config["decoder_start_token_id"] = generation["decoder_start_token_id"] = decoder_start
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation)
