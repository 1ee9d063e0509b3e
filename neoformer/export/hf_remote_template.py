"""Tail of the generated ``modeling_neoformer.py`` (read as text by remote_code.py, never imported here).

Everything below the template marker is appended after neoformer's vendored model code, so names
such as ``DecoderLM``, ``ModelConfig`` and ``_positions`` refer to that code.
"""
# ruff: noqa: F821 - the vendored names are defined in the generated file
# ---- template ----
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, MaskedLMOutput, Seq2SeqLMOutput

from .configuration_neoformer import NeoFormerConfig


class HFCacheAdapter:
    """neoformer's cache protocol (prepare / update / model_state) over a transformers Cache.

    The keys' positions and padding come from the forward's attention mask; the RMC running
    summary of NeoFormer-X (model-owned state) rides on the Cache object as an attribute
    (greedy and sampling generate; beam search would not reorder it)."""

    def __init__(self, cache, k_pos, key_keep, layer_offset: int = 0):
        self.cache, self.keys, self.layer_offset = cache, (k_pos, key_keep), layer_offset
        self.model_state = getattr(cache, "neoformer_model_state", None)

    def prepare(self, q_pos, new_keep):
        return self.keys

    def update(self, layer_idx, k, v):
        return self.cache.update(k, v, layer_idx - self.layer_offset)

    def close(self) -> None:
        self.cache.neoformer_model_state = self.model_state


class NeoFormerPreTrainedModel(PreTrainedModel):
    config_class = NeoFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """neoformer initialises its own modules; from_pretrained then loads every weight."""

    def get_input_embeddings(self):
        return self.model.embed.tokens

    def get_output_embeddings(self):
        return self.model.lm_head


class NeoFormerForCausalLM(NeoFormerPreTrainedModel, GenerationMixin):
    def __init__(self, config: NeoFormerConfig):
        super().__init__(config)
        self.model = DecoderLM(ModelConfig.from_dict(config.neoformer))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, labels=None,
                **kwargs):
        B, L = input_ids.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past_key_values = kwargs.get("cache") if past_key_values is None else past_key_values  # transformers >= 5.2x
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, past_len + L, dtype=torch.long, device=input_ids.device)
        _, k_pos, keep = _positions(L, past_len, input_ids.device, attention_mask)
        cache = HFCacheAdapter(past_key_values, k_pos, keep) if past_key_values is not None else None
        out = self.model.forward_hidden(input_ids, attention_mask=attention_mask, kv_cache=cache, use_cache=False)
        if cache is not None:
            cache.close()
        logits = self.model.logits(out.hidden)
        loss = cross_entropy(logits[:, :-1], labels[:, 1:]) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)


class NeoFormerForMaskedLM(NeoFormerPreTrainedModel):
    def __init__(self, config: NeoFormerConfig):
        super().__init__(config)
        self.model = EncoderMLM(ModelConfig.from_dict(config.neoformer))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        logits = self.model(input_ids, attention_mask=attention_mask)
        loss = cross_entropy(logits, labels) if labels is not None else None
        return MaskedLMOutput(loss=loss, logits=logits)


class _EncoderView(nn.Module):
    """What ``generate`` calls as ``model.get_encoder()`` (not registered: no duplicate weights)."""

    main_input_name = "input_ids"

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "model", model)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.model.encode(input_ids, attention_mask))


class NeoFormerForSeq2SeqLM(NeoFormerPreTrainedModel, GenerationMixin):
    def __init__(self, config: NeoFormerConfig):
        super().__init__(config)
        self.model = EncoderDecoderLM(ModelConfig.from_dict(config.neoformer))
        self.post_init()

    def get_encoder(self):
        return _EncoderView(self.model)

    def forward(self, input_ids=None, attention_mask=None, decoder_input_ids=None, encoder_outputs=None,
                past_key_values=None, use_cache=None, labels=None, **kwargs):
        if decoder_input_ids is None:
            raise ValueError("NeoFormerForSeq2SeqLM needs decoder_input_ids (start with decoder_start_token_id)")
        memory = self.model.encode(input_ids, attention_mask) if encoder_outputs is None else encoder_outputs[0]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        past_key_values = kwargs.get("cache") if past_key_values is None else past_key_values
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(), DynamicCache())
        self_cache = past_key_values.self_attention_cache if isinstance(past_key_values, EncoderDecoderCache) \
            else past_key_values
        B, L = decoder_input_ids.shape
        past_len = self_cache.get_seq_length() if self_cache is not None else 0
        positions = torch.arange(past_len, past_len + L, device=decoder_input_ids.device)[None]
        k_pos = torch.arange(past_len + L, device=decoder_input_ids.device)[None]
        cache = None if self_cache is None else HFCacheAdapter(self_cache, k_pos, None, self.model.cache_layers.start)
        out = self.model.decode_hidden(decoder_input_ids, memory, attention_mask, positions=positions,
                                       kv_cache=cache, use_cache=False)
        logits = self.model.logits(out.hidden)
        loss = cross_entropy(logits, labels) if labels is not None else None
        return Seq2SeqLMOutput(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
