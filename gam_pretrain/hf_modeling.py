"""The Hugging Face face of a gam-pretrain model: a `PretrainedConfig` and a `PreTrainedModel` for
every family, so that `AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)` loads
an export.

An export carries this file as `modeling_gam_pretrain.py`, with the line importing `.models`
replaced by the source of gam_pretrain/models (`export.modeling_source`): the export is
self-contained (no import of gam_pretrain) and runs the very equations that trained it.
The weights keep our names (`tok_emb.weight`, `blocks.0.ln1.weight`, ...): the model's modules sit
directly on the Hugging Face class, so the export's model.safetensors loads into both.

Hugging Face's `generate()` recomputes the window for every new token (the models keep no
`Cache`); `gam-pretrain generate` decodes with each family's state. There is no attention mask:
every sequence must be whole (no padding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .models import REGISTRY, ModelConfig


class GamPretrainConfig(PretrainedConfig):
    """`model` holds gam-pretrain's ModelConfig fields; the usual Hugging Face names are derived."""

    model_type = "gam_pretrain"  # as export.hf_config writes it

    def __init__(self, model: dict | None = None, **kwargs):
        self.model = dict(model or {})
        cfg = ModelConfig(**self.model)
        kwargs.update(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                      max_position_embeddings=cfg.block_size, tie_word_embeddings=False)
        super().__init__(**kwargs)


class GamPretrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = GamPretrainConfig
    base_model_prefix = ""

    def __init__(self, config: GamPretrainConfig):
        super().__init__(config)
        cfg = ModelConfig(**config.model)
        family = REGISTRY[cfg.arch].build(cfg)
        # the family's modules become this model's own (the weights keep gam-pretrain's names), and
        # its forward runs on them
        for name, module in family._modules.items():
            self.add_module(name, module)
        for name, value in vars(family).items():  # plain attributes: cfg, a family's options, pos_emb = None
            if not name.startswith("_") and name != "training":
                setattr(self, name, value)
        self.family_forward = type(family).forward
        self.post_init()

    def _init_weights(self, module):
        pass  # every weight comes from model.safetensors

    def get_input_embeddings(self):
        return self.tok_emb

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("gam-pretrain models have no attention mask: pass whole sequences, without padding")
        logits = self.family_forward(self, input_ids)
        loss = None
        if labels is not None:  # Hugging Face's convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
