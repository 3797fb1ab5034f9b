"""Hugging Face directories in: our exports and any LlamaForCausalLM directory with config.json, model.safetensors
(or a sharded model.safetensors.index.json) and tokenizer.json. Weights are read only through safetensors; a
directory with a manifest.json (our exports) is checked against it first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tinylm.data.tokenizer import Tokenizer, read_tokenizer_definition
from tinylm.errors import TinylmError
from tinylm.export.hf import TEMPLATE_FLAG, layer_names, native_model_type
from tinylm.models import ARCHITECTURES, build_model
from tinylm.models.weights import check_fits, load_checked, shapes
from tinylm.recipe import ModelConfig, recipe_from_dict
from tinylm.storage.atomic import verify_manifest


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Map HF names back to ours; anything missing, unexpected or misshapen is a TinylmError naming it."""
    expected = shapes(build_model(config, device="meta"))
    mapping = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(config.n_layers):
        mapping.update({ours: hf for ours, hf in layer_names(i, config.w1_bias).items()})
    if config.unembedding == "untied":
        mapping["output.weight"] = "lm_head.weight"
    zero_biases = [f"model.layers.{i}.mlp.{p}_proj.bias" for i in range(config.n_layers) for p in ("up", "down")
                   if config.w1_bias]
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF buffers
    if config.unembedding == "tied" and "lm_head.weight" in tensors:
        if not torch.equal(tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")):
            raise TinylmError(f"{where}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    expected_hf = {hf: expected[ours] for ours, hf in mapping.items()}
    expected_hf.update({name: (config.resolved_hidden_dim() if "up_proj" in name else config.dim,)
                        for name in zero_biases})
    check_fits(expected_hf, tensors, where, "its config.json")
    for name in zero_biases:
        if bool(tensors[name].ne(0).any()):
            raise TinylmError(f"{where}: {name} is not zero; tinylm's decoder has a bias on the gate projection only")
    return {ours: tensors[hf].to(torch.float32) for ours, hf in mapping.items()}


def model_config_from_hf(cfg: dict, where: str) -> ModelConfig:
    """Our model section from a LlamaForCausalLM config.json (refusing what our decoder cannot express)."""
    if cfg.get("model_type") != "llama":
        raise TinylmError(f"{where}: model_type {cfg.get('model_type')!r} is not supported (only llama, and "
                          "tinylm's own tinylm-* types)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise TinylmError(f"{where}: hidden_act {cfg['hidden_act']!r}: tinylm's SwiGLU uses silu")
    if cfg.get("attention_bias"):
        raise TinylmError(f"{where}: attention_bias is set; tinylm's attention has no biases")
    try:
        rope = dict(cfg.get("rope_parameters") or {})
        if not rope:
            rope = {**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear"):
            raise TinylmError(f"{where}: rope type {rope_type!r} is not supported (default or linear)")
        factor = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
        heads = int(cfg["num_attention_heads"])
        max_positions = int(cfg["max_position_embeddings"])
        return ModelConfig(
            arch="llama", n_layers=int(cfg["num_hidden_layers"]), dim=int(cfg["hidden_size"]),
            hidden_dim=int(cfg["intermediate_size"]), n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            context_length=max(1, round(max_positions / factor)), vocab_size=int(cfg["vocab_size"]),
            unembedding="tied" if cfg.get("tie_word_embeddings", False) else "untied",
            rope_theta=float(rope.get("rope_theta", 10000.0)), rope_scaling="linear" if factor != 1.0 else "none",
            rope_scaling_factor=factor, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), dropout=0.0,
            w1_bias=bool(cfg.get("mlp_bias", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise TinylmError(f"{where}: incomplete or malformed Llama config ({exc!r})") from None


def _load_tokenizer_file(path: Path):
    if not path.is_file():
        raise TinylmError(f"{path}: not found (tinylm needs a tokenizer.json beside the weights)")
    definition = read_tokenizer_definition(path)
    meta = definition["model"].get("tinylm")
    if isinstance(meta, dict) and meta.pop(TEMPLATE_FLAG, False):
        definition["post_processor"] = None  # back to the run's own tokenizer (same fingerprint as its shards)
    return Tokenizer(definition)


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise TinylmError(f"{index}: unreadable shard index ({exc})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise TinylmError(f"{directory}: no model.safetensors (tinylm reads weights only through safetensors)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise TinylmError(f"{file}: weights file not found")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TinylmError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def _read_json(path: Path) -> dict:
    """A JSON object file of the directory; {} when it is absent."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TinylmError(f"{path}: unreadable ({exc})") from None
    if not isinstance(value, dict):
        raise TinylmError(f"{path}: expected a JSON object")
    return value


def auto_tokenizer_prefix(directory: Path, tokenizer) -> list[int]:
    """The ids transformers' AutoTokenizer puts before a text from this directory: what tokenizer_config.json's
    add_bos_token says when it says it (transformers then rebuilds the post-processor from it), else what
    tokenizer.json's post-processor adds. Ids a template adds after the text are left out: a prompt is continued,
    not closed."""
    config = _read_json(directory / "tokenizer_config.json")
    if "add_bos_token" in config or "add_eos_token" in config:
        bos = config.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        bos_id = tokenizer.hf.token_to_id(bos) if isinstance(bos, str) else None
        return [bos_id] if config.get("add_bos_token") and bos_id is not None else []
    if tokenizer.hf.post_processor is None:
        return []
    encoding = tokenizer.hf.encode("a", add_special_tokens=True)
    prefix = []
    for token_id, special in zip(encoding.ids, encoding.special_tokens_mask, strict=True):
        if not special:
            break
        prefix.append(token_id)
    return prefix


def _framing_of(prefix: list[int], tokenizer, where: str) -> str:
    framings = {"none": [], "bos": [tokenizer.bos_id], "eos": [tokenizer.eos_id],
                "sink_bos": [tokenizer.sink_id, tokenizer.bos_id]}
    for framing, ids in framings.items():
        if prefix == ids:
            return framing
    raise TinylmError(f"{where}: its tokenizer starts every text with ids {prefix}, which no tinylm framing "
                      "(bos, eos, sink_bos, none) gives")


def hf_end_ids(directory: str | Path) -> list[int] | None:
    """Where generation stops for a directory tinylm did not write: generation_config.json's eos_token_id (else
    config.json's), as transformers' `generate` reads it. None for tinylm's exports (the tokenizer's story end ids,
    which their generation config holds too) and for a directory that names none."""
    directory = Path(directory)
    config = _read_json(directory / "config.json")
    if isinstance(config.get("tinylm"), dict):
        return None
    for source in (_read_json(directory / "generation_config.json"), config):
        ends = source.get("eos_token_id")
        if ends is not None:
            return [int(i) for i in (ends if isinstance(ends, list) else [ends])]
    return None


def _recipe_sections(cfg: dict, directory: Path, tokenizer, where: str) -> dict:
    """The non-model recipe sections: ours from an export, else taken from the tokenizer and generation config."""
    if isinstance(cfg.get("tinylm"), dict):
        return {k: v for k, v in cfg["tinylm"].items() if k != "model"}
    meta = tokenizer.meta
    framing = _framing_of(auto_tokenizer_prefix(directory, tokenizer), tokenizer, where)
    sections = {"name": directory.resolve().name, "source": str(cfg.get("_name_or_path") or directory),
                "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                              "special_tokens": list(tokenizer.special_ids), "bos": meta.get("bos") or "",
                              "eos": meta.get("eos") or "", "sink": meta.get("sink") or ""},
                "data": {"framing": framing}}
    g = _read_json(directory / "generation_config.json")
    if g:
        sample = {"temperature": float(g.get("temperature", 1.0)) if g.get("do_sample") else 0.0,
                  "top_k": int(g.get("top_k", 50) or 0), "top_p": float(g.get("top_p", 1.0) or 1.0),
                  "min_p": float(g.get("min_p") or 0.0), "repetition_penalty": float(g.get("repetition_penalty", 1.0)),
                  "max_new_tokens": int(g.get("max_new_tokens") or 200)}
        sections["sample"] = sample
    return sections


def load_hf_dir(path: str | Path, device: str | torch.device = "cpu"):
    """(model, recipe, tokenizer) from a Hugging Face directory (our export or any LlamaForCausalLM), eval mode."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise TinylmError(f"{directory}: no config.json (not a Hugging Face model directory)")
    if (directory / "manifest.json").is_file():  # our exports carry sizes and checksums: refuse a damaged one
        verify_manifest(directory)
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TinylmError(f"{config_file}: unreadable ({exc})") from None
    tokenizer = _load_tokenizer_file(directory / "tokenizer.json")
    native = {native_model_type(cls.family) for cls in ARCHITECTURES.values() if cls.transformers_model_type is None}
    if cfg.get("model_type") in native:
        model_section = (cfg.get("tinylm") or {}).get("model")
        if not isinstance(model_section, dict):
            raise TinylmError(f"{config_file}: a {cfg['model_type']} config needs its tinylm recipe")
    else:
        model_section = model_config_from_hf(cfg, str(config_file)).__dict__
    recipe = recipe_from_dict({**_recipe_sections(cfg, directory, tokenizer, str(config_file)),
                               "model": model_section}, origin=str(config_file))
    tensors = _read_safetensors(directory)
    if cfg.get("model_type") not in native:
        tensors = state_dict_from_hf(tensors, recipe.model, str(directory))
    model = build_model(recipe.model)
    load_checked(model, tensors, f"{directory}: weights")
    return model.to(device).eval(), recipe, tokenizer
