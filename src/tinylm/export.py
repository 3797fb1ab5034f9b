"""Export a run: `hf` (a Hugging Face directory; export_hf.py) or `llama2c` (run.c's model.bin + tokenizer.bin;
export_llama2c.py). `load_hf_dir` reads a Hugging Face directory back (ours, or any LlamaForCausalLM);
`load_model_dir` takes a run, such a directory, or the hub id of one."""

from __future__ import annotations

from pathlib import Path

from . import hub
from .errors import TinylmError
from .export_hf import export_hf, export_hf_model, hf_state_dict, load_hf_dir
from .export_llama2c import export_llama2c, export_llama2c_model, llama2c_problems

FORMATS = ("hf", "llama2c")

__all__ = ["FORMATS", "export", "export_hf", "export_hf_model", "export_llama2c", "export_llama2c_model",
           "hf_state_dict", "llama2c_problems", "load_hf_dir", "load_model_dir"]


def export(run_dir: str | Path, fmt: str, out_dir: str | Path, which: str = "best") -> list[str]:
    """Export a run's checkpoint `which` in format `fmt`; returns lines worth printing."""
    from .checkpoint import read_run_recipe

    recipe = read_run_recipe(run_dir)
    if fmt == "hf":
        export_hf(run_dir, out_dir, which)
        if recipe.model.arch == "mixer":
            return [f"wrote {out_dir}: model.safetensors, config.json (model_type tinylm-micromixer), tokenizer.json",
                    "MicroMixer has no transformers class: load this directory with tinylm "
                    f"(`tinylm sample {out_dir}`), not with AutoModelForCausalLM"]
        lines = [f"wrote {out_dir}: LlamaForCausalLM for transformers (AutoModelForCausalLM / AutoTokenizer)"]
        if recipe.model.unembedding == "pinv":
            lines.append("the pseudo-inverse unembedding pinv(E)^T is stored as an untied lm_head")
        if recipe.model.w1_bias:
            lines.append("mlp_bias is set: gate_proj has the w1 bias, up_proj and down_proj zero biases")
        return lines
    if fmt == "llama2c":
        notes = export_llama2c(run_dir, out_dir, which)
        return [f"wrote {out_dir}/model.bin and {out_dir}/tokenizer.bin for llama2.c's run.c",
                *(f"note: {n}" for n in notes)]
    raise TinylmError(f"unknown export format '{fmt}' ({', '.join(FORMATS)})")


def load_model_dir(path: str | Path, which: str = "best", device: str = "cpu"):
    """(model, recipe, tokenizer) from a run directory (checkpoint `which`), a Hugging Face directory, or a hub
    repository id ('owner/name', fetched into the hub cache) of such a directory. A local path wins over an id."""
    local = Path(path)
    if not local.exists() and hub.is_repo_id(str(path)):
        try:
            local = hub.model_snapshot(str(path))
        except TinylmError as exc:  # perhaps a mistyped local path: say both
            raise TinylmError(f"{path}: no such directory; as a hub model id, {exc}") from None
    if (local / "recipe.toml").is_file():
        from .checkpoint import load_run_model

        return load_run_model(local, which, device=device)
    if (local / "config.json").is_file():
        return load_hf_dir(local, device=device)
    raise TinylmError(f"{path}: neither a run directory (recipe.toml), a Hugging Face directory (config.json) nor a "
                      "hub model id (owner/name)")
