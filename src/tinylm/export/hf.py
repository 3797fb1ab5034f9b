"""Hugging Face directories out (hf_import.py reads them back).

`export_hf_model`: a LLaMA recipe becomes a directory that `transformers` loads with no remote code
(LlamaForCausalLM): config.json, model.safetensors, generation_config.json, tokenizer.json (+ tokenizer_config.json,
special_tokens_map.json) and README.md. Our q/k rows already use HF's half-split RoPE layout, so no permutation.
- pinv recipes: the unembedding is computed once, pinv(E)^T, and written as an untied lm_head.
- w1_bias recipes: HF Llama has one switch, `mlp_bias`, for all three MLP projections; the export sets it and writes
  zero biases for up_proj and down_proj, which keeps the logits exact.
- NTK-scaled RoPE is static here, so the stretched base is written as a plain rope_theta; linear scaling is written as
  HF's linear rope type.
- The tokenizer.json gains a post-processor that adds the recipe's frame prefix (BOS, ...) so that
  `tokenizer("Once upon a time")` gives the ids tinylm's prompts start with; load_hf_dir removes it again, so the
  tokenizer's fingerprint still matches the run's shards.
An architecture transformers does not have (MicroMixer) gets model.safetensors under tinylm's names, our own
config.json ("model_type": "tinylm-micromixer") and the tokenizer; tinylm loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tinylm.data.shards import frame_prefix
from tinylm.models import rope
from tinylm.recipe import ModelConfig, Recipe
from tinylm.storage.atomic import atomic_directory

TEMPLATE_FLAG = "export_template"  # marks the post-processor an export added to tokenizer.json


def native_model_type(family: str) -> str:
    """config.json's model_type for an architecture transformers does not have (read back by tinylm only)."""
    return f"tinylm-{family}"


# ------------------------------------------------------------------------------------------------------ weight names
def layer_names(i: int, bias: bool) -> dict[str, str]:
    """Our name -> HF name for layer i."""
    ours, hf = f"layers.{i}.", f"model.layers.{i}."
    names = {
        "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
        "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
        "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
        "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    if bias:
        names["feed_forward.w1.bias"] = "mlp.gate_proj.bias"
    return {ours + k: hf + v for k, v in names.items()}


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """A Llama's weights under transformers' LlamaForCausalLM names (contiguous CPU float copies)."""
    c = model.config
    ours = model.state_dict()
    out = {"model.embed_tokens.weight": ours["tok_embeddings.weight"], "model.norm.weight": ours["norm.weight"]}
    for i in range(c.n_layers):
        for name, hf in layer_names(i, c.w1_bias).items():
            out[hf] = ours[name]
        if c.w1_bias:  # HF's mlp_bias covers up and down too: zeros keep the function unchanged
            out[f"model.layers.{i}.mlp.up_proj.bias"] = torch.zeros(c.resolved_hidden_dim())
            out[f"model.layers.{i}.mlp.down_proj.bias"] = torch.zeros(c.dim)
    if c.unembedding != "tied":
        out["lm_head.weight"] = model.unembedding_matrix().detach()
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------- configs
def _rope_fields(m: ModelConfig) -> dict:
    theta, scaling = rope.scaled_base(m), None  # our NTK scaling is static: the stretched base is all there is to it
    if m.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": m.rope_scaling_factor}
    # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
    parameters = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    return {"rope_parameters": parameters, "rope_theta": theta, "rope_scaling": scaling}


def hf_config(recipe: Recipe, tokenizer, max_positions: int) -> dict:
    m = recipe.model
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m.dim, "intermediate_size": m.resolved_hidden_dim(), "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.resolved_kv_heads(),
        "head_dim": m.resolved_head_dim(), "max_position_embeddings": max_positions, **_rope_fields(m),
        "rms_norm_eps": m.norm_eps, "hidden_act": "silu", "attention_bias": False, "mlp_bias": m.w1_bias,
        "attention_dropout": 0.0, "initializer_range": 0.02, "tie_word_embeddings": m.unembedding == "tied",
        "vocab_size": m.vocab_size, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id, "use_cache": True, "dtype": "float32", "torch_dtype": "float32",
        "tinylm": recipe.to_dict(),  # the whole recipe, so load_hf_dir gets framing and sampling back
    }


def generation_config(recipe: Recipe, tokenizer, max_positions: int) -> dict:
    """What `generate` uses by default: it stops where `tinylm sample` stops, at any of the tokenizer's story end ids
    (EOS, and BOS: a BOS-framed model starts the next story with it), and within the context."""
    s, prefix = recipe.sample, frame_prefix(tokenizer, recipe.data.framing)
    ends = tokenizer.story_end_ids
    out = {"bos_token_id": tokenizer.bos_id, "eos_token_id": ends if len(ends) > 1 else (ends or [None])[0],
           "pad_token_id": tokenizer.pad_id, "do_sample": s.temperature > 0,
           "repetition_penalty": s.repetition_penalty}
    if len(prefix) + s.max_new_tokens < max_positions:
        out["max_new_tokens"] = s.max_new_tokens
    else:  # the budget reaches the context from the frame prefix alone: a total length bounds prompt and story
        out["max_length"] = max_positions
    if s.temperature > 0:  # transformers' own defaults are top_k=50, top_p=1: write ours explicitly
        out.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        if s.min_p > 0:
            out["min_p"] = s.min_p
    return out


# --------------------------------------------------------------------------------------------------------- tokenizer
def _export_tokenizer(tokenizer, prefix: list[int], out: Path, max_positions: int) -> None:
    definition = json.loads(tokenizer.to_json())
    if prefix and definition.get("post_processor") is None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import processors

        names = [tokenizer.id_to_token(i) for i in prefix]
        head = " ".join(names)
        hf = HFTokenizer.from_str(json.dumps(definition))
        hf.post_processor = processors.TemplateProcessing(
            single=f"{head} $A", pair=f"{head} $A {head} $B",
            special_tokens=sorted({(n, i) for n, i in zip(names, prefix, strict=True)}))
        definition["post_processor"] = json.loads(hf.to_str())["post_processor"]
        definition["model"].setdefault("tinylm", dict(tokenizer.meta))[TEMPLATE_FLAG] = True
    (out / "tokenizer.json").write_text(json.dumps(definition, indent=1, ensure_ascii=False) + "\n", "utf-8")
    roles = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id,
             "unk_token": tokenizer.unk_id}
    special = {role: tokenizer.id_to_token(i) for role, i in roles.items() if i is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
              "clean_up_tokenization_spaces": False, **special}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special)


# ------------------------------------------------------------------------------------------------------------ export
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _default_card(recipe: Recipe, arch_note: str) -> str:
    return (f"# {recipe.name}\n\nA tiny language model trained with tinylm ({recipe.source or 'custom recipe'}).\n\n"
            f"{arch_note}\n")


def export_hf_model(model, recipe: Recipe, tokenizer, out_dir: str | Path, card: str | None = None,
                    attachments: dict[str, Path] | None = None) -> list[str]:
    """Write `model` as a Hugging Face directory (see the module doc); returns lines worth printing.

    `card` is the README.md text; without one a short placeholder is written (`tinylm card` writes the real one).
    `attachments` (name -> file) are copied in beside it: the card's loss plot and samples."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    with atomic_directory(out_dir, kind="tinylm hf export") as tmp:
        if model.transformers_model_type is None:
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
            config = {"model_type": native_model_type(model.family), "architectures": [type(model).__name__],
                      "vocab_size": recipe.model.vocab_size, "max_position_embeddings": model.max_positions,
                      "tinylm": recipe.to_dict()}
            note = (f"{type(model).__name__} has no transformers class: load this directory with tinylm "
                    f"(`tinylm sample {out_dir}`).")
        else:
            tensors = hf_state_dict(model)
            config = hf_config(recipe, tokenizer, model.max_positions)
            _write_json(tmp / "generation_config.json", generation_config(recipe, tokenizer, model.max_positions))
            note = "Load it with transformers' AutoModelForCausalLM and AutoTokenizer (no remote code)."
            if recipe.model.unembedding == "pinv":
                note += " The pseudo-inverse unembedding pinv(E)^T is stored as an untied lm_head."
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _export_tokenizer(tokenizer, prefix, tmp, model.max_positions)
        (tmp / "README.md").write_text(card if card is not None else _default_card(recipe, note), encoding="utf-8")
        for name, source in (attachments or {}).items():
            shutil.copyfile(source, tmp / name)
    if model.transformers_model_type is None:
        return [f"wrote {out_dir}: model.safetensors, config.json (model_type {native_model_type(model.family)}), "
                "tokenizer.json", note.replace(":", ", so", 1).rstrip(".") + ", not with AutoModelForCausalLM"]
    lines = [f"wrote {out_dir}: LlamaForCausalLM for transformers (AutoModelForCausalLM / AutoTokenizer)"]
    if recipe.model.unembedding == "pinv":
        lines.append("the pseudo-inverse unembedding pinv(E)^T is stored as an untied lm_head")
    if recipe.model.w1_bias:
        lines.append("mlp_bias is set: gate_proj has the w1 bias, up_proj and down_proj zero biases")
    return lines


