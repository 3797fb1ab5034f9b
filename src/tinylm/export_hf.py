"""Hugging Face directories, out and in.

Out (`export_hf`): a LLaMA recipe becomes a directory that `transformers` loads with no remote code
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
MicroMixer has no transformers class: its directory holds model.safetensors under tinylm's names, our own
config.json ("model_type": "tinylm-micromixer") and the tokenizer; tinylm loads it.

In (`load_hf_dir`): our exports and any LlamaForCausalLM directory with config.json, model.safetensors (or a sharded
model.safetensors.index.json) and tokenizer.json (local directories; no hub downloads). Weights are read only through
safetensors; a directory with a manifest.json (our exports) is checked against it first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .errors import TinylmError
from .files import atomic_directory, verify_manifest
from .models import build_model
from .recipe import ModelConfig, Recipe, recipe_from_dict

TEMPLATE_FLAG = "export_template"  # marks the post-processor an export added to tokenizer.json
MIXER_TYPE = "tinylm-micromixer"


# ------------------------------------------------------------------------------------------------------ weight names
def _layer_names(i: int, bias: bool) -> dict[str, str]:
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
        for name, hf in _layer_names(i, c.w1_bias).items():
            out[hf] = ours[name]
        if c.w1_bias:  # HF's mlp_bias covers up and down too: zeros keep the function unchanged
            out[f"model.layers.{i}.mlp.up_proj.bias"] = torch.zeros(c.resolved_hidden_dim())
            out[f"model.layers.{i}.mlp.down_proj.bias"] = torch.zeros(c.dim)
    if c.unembedding != "tied":
        out["lm_head.weight"] = model.unembedding_matrix().detach()
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Map HF names back to ours; anything missing, unexpected or misshapen is a TinylmError naming it."""
    model = build_model(config, device="meta")
    expected = model.state_dict()
    mapping = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(config.n_layers):
        mapping.update({ours: hf for ours, hf in _layer_names(i, config.w1_bias).items()})
    if config.unembedding == "untied":
        mapping["output.weight"] = "lm_head.weight"
    zero_biases = [f"model.layers.{i}.mlp.{p}_proj.bias" for i in range(config.n_layers) for p in ("up", "down")
                   if config.w1_bias]
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}  # old HF buffers
    if config.unembedding == "tied" and "lm_head.weight" in tensors:
        if not torch.equal(tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")):
            raise TinylmError(f"{where}: tie_word_embeddings is set but lm_head.weight differs from the embedding")
    missing = sorted(hf for hf in [*mapping.values(), *zero_biases] if hf not in tensors)
    unexpected = sorted(set(tensors) - set(mapping.values()) - set(zero_biases))
    if missing or unexpected:
        parts = ([f"missing tensors {_some(missing)}"] if missing else []) + \
                ([f"unexpected tensors {_some(unexpected)}"] if unexpected else [])
        raise TinylmError(f"{where}: does not fit its config.json: {'; '.join(parts)}")
    for name in zero_biases:
        if bool(tensors[name].ne(0).any()):
            raise TinylmError(f"{where}: {name} is not zero; tinylm's decoder has a bias on the gate projection only")
    out = {}
    for ours, hf in mapping.items():
        tensor = tensors[hf]
        if tuple(tensor.shape) != tuple(expected[ours].shape):
            raise TinylmError(f"{where}: tensor {hf} has shape {tuple(tensor.shape)}, config.json implies "
                              f"{tuple(expected[ours].shape)}")
        out[ours] = tensor.to(torch.float32)
    return out


def _some(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------------------------------- configs
def _rope_fields(m: ModelConfig) -> dict:
    theta, scaling = m.rope_theta, None
    if m.rope_scaling == "ntk":  # our NTK scaling is static: the stretched base is all there is to it
        hd = m.resolved_head_dim()
        theta = m.rope_theta * m.rope_scaling_factor ** (hd / (hd - 2))
    elif m.rope_scaling == "linear":
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


def generation_config(recipe: Recipe, tokenizer) -> dict:
    s = recipe.sample
    out = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
           "max_new_tokens": s.max_new_tokens, "do_sample": s.temperature > 0,
           "repetition_penalty": s.repetition_penalty}
    if s.temperature > 0:  # transformers' own defaults are top_k=50, top_p=1: write ours explicitly
        out.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        if s.min_p > 0:
            out["min_p"] = s.min_p
    return out


def model_config_from_hf(cfg: dict, where: str) -> ModelConfig:
    """Our model section from a LlamaForCausalLM config.json (refusing what our decoder cannot express)."""
    if cfg.get("model_type") != "llama":
        raise TinylmError(f"{where}: model_type {cfg.get('model_type')!r} is not supported (only llama, and "
                          f"tinylm's own {MIXER_TYPE})")
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
            special_tokens=sorted({(n, i) for n, i in zip(names, prefix)}))
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


def _load_tokenizer_file(path: Path):
    from .tokenizer import Tokenizer, read_tokenizer_definition

    if not path.is_file():
        raise TinylmError(f"{path}: not found (tinylm needs a tokenizer.json beside the weights)")
    definition = read_tokenizer_definition(path)
    meta = definition["model"].get("tinylm")
    if isinstance(meta, dict) and meta.pop(TEMPLATE_FLAG, False):
        definition["post_processor"] = None  # back to the run's own tokenizer (same fingerprint as its shards)
    return Tokenizer(definition)


# ------------------------------------------------------------------------------------------------------------ export
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _default_card(recipe: Recipe, arch_note: str) -> str:
    return (f"# {recipe.name}\n\nA tiny language model trained with tinylm ({recipe.source or 'custom recipe'}).\n\n"
            f"{arch_note}\n")


def export_hf_model(model, recipe: Recipe, tokenizer, out_dir: str | Path, card: str | None = None) -> Path:
    """Write `model` as a Hugging Face directory (see the module doc); returns out_dir.

    `card` is the README.md text; without one a short placeholder is written (`tinylm card` writes the real one)."""
    from safetensors.torch import save_file

    from .data import frame_prefix

    out_dir = Path(out_dir)
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    with atomic_directory(out_dir) as tmp:
        if recipe.model.arch == "mixer":
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
            config = {"model_type": MIXER_TYPE, "architectures": ["MicroMixer"], "vocab_size": recipe.model.vocab_size,
                      "max_position_embeddings": model.max_positions, "tinylm": recipe.to_dict()}
            note = f"MicroMixer has no transformers class: load this directory with tinylm (`tinylm sample {out_dir}`)."
        else:
            tensors = hf_state_dict(model)
            config = hf_config(recipe, tokenizer, model.max_positions)
            _write_json(tmp / "generation_config.json", generation_config(recipe, tokenizer))
            note = "Load it with transformers' AutoModelForCausalLM and AutoTokenizer (no remote code)."
            if recipe.model.unembedding == "pinv":
                note += " The pseudo-inverse unembedding pinv(E)^T is stored as an untied lm_head."
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        _export_tokenizer(tokenizer, prefix, tmp, model.max_positions)
        (tmp / "README.md").write_text(card if card is not None else _default_card(recipe, note), encoding="utf-8")
    return out_dir


def export_hf(run_dir: str | Path, out_dir: str | Path, which: str = "best",
              card: Callable[[Path], str] | str | None = None) -> Path:
    """Export a run's checkpoint `which`; README.md is `card` (text, or a function of the run directory), else
    RUN/README.md when it exists."""
    from .checkpoint import load_run_model

    run = Path(run_dir)
    model, recipe, tokenizer = load_run_model(run, which)
    if callable(card):
        card = card(run)
    if card is None and (run / "README.md").is_file():
        card = (run / "README.md").read_text(encoding="utf-8")
    return export_hf_model(model, recipe, tokenizer, out_dir, card)


# ------------------------------------------------------------------------------------------------------------ import
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


def _recipe_sections(cfg: dict, directory: Path, tokenizer, where: str) -> dict:
    """The non-model recipe sections: ours from an export, else guessed from the tokenizer and generation config."""
    if isinstance(cfg.get("tinylm"), dict):
        return {k: v for k, v in cfg["tinylm"].items() if k != "model"}
    meta = tokenizer.meta
    framing = "bos" if tokenizer.bos_id is not None else ("eos" if tokenizer.eos_id is not None else "none")
    sections = {"name": directory.resolve().name, "source": str(cfg.get("_name_or_path") or directory),
                "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                              "special_tokens": list(tokenizer.special_ids), "bos": meta.get("bos") or "",
                              "eos": meta.get("eos") or "", "sink": meta.get("sink") or ""},
                "data": {"framing": framing}}
    generation = directory / "generation_config.json"
    if generation.is_file():
        try:
            g = json.loads(generation.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TinylmError(f"{generation}: unreadable ({exc})") from None
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
    if cfg.get("model_type") == MIXER_TYPE:
        model_section = (cfg.get("tinylm") or {}).get("model")
        if not isinstance(model_section, dict):
            raise TinylmError(f"{config_file}: a {MIXER_TYPE} config needs its tinylm recipe")
    else:
        model_section = model_config_from_hf(cfg, str(config_file)).__dict__
    recipe = recipe_from_dict({**_recipe_sections(cfg, directory, tokenizer, str(config_file)),
                               "model": model_section}, origin=str(config_file))
    tensors = _read_safetensors(directory)
    if recipe.model.arch == "llama":
        tensors = state_dict_from_hf(tensors, recipe.model, str(directory))
    model = build_model(recipe.model)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TinylmError(f"{directory}: weights do not fit config.json (missing {_some(missing) or 'none'}; "
                          f"unexpected {_some(unexpected) or 'none'})")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise TinylmError(f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                              f"{tuple(expected[name].shape)}")
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), recipe, tokenizer
