"""`lm export --format hf`: a run's checkpoint as a Hugging Face model directory that
`transformers.AutoModelForCausalLM` and `AutoTokenizer` (and so lm-evaluation-harness) load:

    config.json                       LlamaForCausalLM's config (Qwen3ForCausalLM's: qk_norm)
    model.safetensors                 fp32 weights (or model-0000i-of-0000n.safetensors and
                                      model.safetensors.index.json past --max-shard-gb)
    tokenizer.model, tokenizer_config.json   the run's SentencePiece model (not for synthetic data)

The model is Llama's: pre-norm RMSNorm (x * rsqrt(mean(x^2) + eps) * scale), rotary embeddings
on the two halves of each head's vector (Llama's `rotate_half`), attention scaled by
1/sqrt(head_dim), grouped-query heads (query head i reads kv head i // (h/g), as Llama's
`repeat_kv`), SwiGLU (silu(x W_gate) * x W_up) W_down and a tied or untied head. With
model.qk_norm it is Qwen3's: Llama with an RMSNorm on each head's queries and keys before RoPE,
its scales shared by the heads. The layout changes — lm's stacked layers [l, ...] and head axes
[d, h, k] become torch's [out, in] matrices — and muP's attention scale (1/head_dim) and logit
multiplier fold into the weights. A model setting neither architecture can express is an
error, never an export that computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from lm import checkpoint, config as config_lib, corpus, flops, rundir
from lm.config import Config, ModelConfig
from lm.errors import CheckpointError, ConfigError

# Model settings that the export carries over, and settings that change how lm computes the
# model but not what it computes (memory, speed, training). Any other setting must keep its
# default: a new model feature is refused until it is mapped here.
MAPPED = {"vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "context", "mlp",
          "tie_embeddings", "rope_theta", "norm_eps", "qk_norm", "parametrization", "base_width"}
UNCHANGED = {"init_std", "dtype", "remat", "scan_layers", "loss_chunk", "attention"}
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"


def check_mappable(m: ModelConfig) -> None:
    """Refuse a model that no transformers architecture computes as lm does."""
    if m.mlp != "swiglu":
        raise ConfigError(f"model.mlp={m.mlp}: no matching transformers architecture (Llama's "
                          "MLP is SwiGLU); lm export --format hf exports model.mlp=swiglu models")
    default = ModelConfig()
    for field in dataclasses.fields(m):
        value, usual = getattr(m, field.name), getattr(default, field.name)
        if field.name not in MAPPED | UNCHANGED and value != usual:
            raise ConfigError(f"model.{field.name}={value!r}: no matching transformers "
                              "architecture (Llama has no counterpart); lm export --format hf "
                              f"exports models with model.{field.name}={usual!r}")


def architecture(m: ModelConfig) -> tuple[str, str]:
    """transformers' class and model_type for `m`."""
    return ("Qwen3ForCausalLM", "qwen3") if m.qk_norm else ("LlamaForCausalLM", "llama")


def hf_config(m: ModelConfig, eos_id: int | None) -> dict:
    """config.json of the architecture (rope_theta given both ways: transformers 4 and 5)."""
    name, model_type = architecture(m)
    return {
        "architectures": [name], "model_type": model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": m.context, "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": m.init_std, "bos_token_id": None, "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def hf_tensors(m: ModelConfig, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The architecture's weights by name, in torch's [out, in] layout, from lm's by path
    (`blocks.wq`). transformers scales q.k by 1/sqrt(head_dim) and has no logit multiplier:
    muP's scale goes into the queries (after their norm, if any), its multiplier into the final
    norm, whose output only the head reads (a tied embedding cannot take it)."""
    d, h, g, k = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    q_scale = flops.attention_scale(m) * k ** 0.5
    logit_scale = flops.scales(m, flops.UNEMBEDDING).output
    out = {"model.embed_tokens.weight": params["embed"],
           "model.norm.weight": params["final_norm"] * logit_scale}
    if not m.tie_embeddings:
        out["lm_head.weight"] = params["unembed"].T
    for i in range(m.n_layers):
        p = {name.removeprefix("blocks."): w[i] for name, w in params.items()
             if name.startswith("blocks.")}
        layer = f"model.layers.{i}."
        q_dhk = p["wq"].reshape(d, h * k)
        if m.qk_norm:
            out[layer + "self_attn.q_norm.weight"] = p["q_norm"] * q_scale
            out[layer + "self_attn.k_norm.weight"] = p["k_norm"]
        else:
            q_dhk = q_dhk * q_scale
        out |= {
            layer + "input_layernorm.weight": p["attn_norm"],
            layer + "self_attn.q_proj.weight": q_dhk.T,
            layer + "self_attn.k_proj.weight": p["wk"].reshape(d, g * k).T,
            layer + "self_attn.v_proj.weight": p["wv"].reshape(d, g * k).T,
            layer + "self_attn.o_proj.weight": p["wo"].reshape(h * k, d).T,
            layer + "post_attention_layernorm.weight": p["mlp_norm"],
            layer + "mlp.gate_proj.weight": p["w_gate"].T,
            layer + "mlp.up_proj.weight": p["w_up"].T,
            layer + "mlp.down_proj.weight": p["w_down"].T,
        }
    return {name: np.ascontiguousarray(w, np.float32) for name, w in out.items()}


def shards(tensors: dict[str, np.ndarray], max_bytes: float) -> list[list[str]]:
    """The tensors' names in files of at most `max_bytes` each (a larger tensor alone)."""
    groups, size = [[]], 0
    for name, w in tensors.items():
        if groups[-1] and size + w.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += w.nbytes
    return groups


def write_weights(tensors: dict[str, np.ndarray], out: Path, max_bytes: float) -> list[str]:
    """safetensors files of `tensors` in `out`, with an index when there is more than one (as
    transformers' save_pretrained writes them); their names."""
    from safetensors.numpy import save_file

    groups = shards(tensors, max_bytes)
    if len(groups) == 1:
        names = [WEIGHTS]
    else:
        names = [f"model-{i:05d}-of-{len(groups):05d}.safetensors"
                 for i in range(1, len(groups) + 1)]
    umask = os.umask(0)
    os.umask(umask)
    for name, group in zip(names, groups):
        # transformers refuses safetensors files without format metadata
        save_file({t: tensors[t] for t in group}, str(out / name), metadata={"format": "pt"})
        os.chmod(out / name, 0o666 & ~umask)  # safetensors writes 0600: a server could not read it
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
                 "weight_map": {t: name for name, group in zip(names, groups) for t in group}}
        (out / INDEX).write_text(json.dumps(index, indent=1))
        names.append(INDEX)
    return names


def write_tokenizer(dataset: corpus.Dataset, context: int, out: Path) -> list[str]:
    """The dataset's SentencePiece model and a tokenizer_config.json: AutoTokenizer builds a
    fast tokenizer from the model's own settings (byte fallback, no normalisation, no dummy
    prefix), encoding and decoding as SentencePiece does; no BOS is added, as lm trains without
    one."""
    sp = dataset.tokenizer()
    shutil.copyfile(dataset.dir / dataset.manifest["tokenizer"], out / corpus.TOKENIZER)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
                "add_eos_token": False, "bos_token": None,
                "eos_token": sp.id_to_piece(corpus.EOD_ID), "unk_token": sp.id_to_piece(sp.unk_id()),
                "model_max_length": context, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    return [corpus.TOKENIZER, "tokenizer_config.json"]


def restored_params(run_dir: Path, cfg: Config, step: int | None) -> tuple[dict, int]:
    """The parameters of checkpoint `step` (default: the newest that restores) on one CPU
    device, as numpy arrays by path (`blocks.wq`), and the step."""
    import jax

    from lm import state as state_lib

    one = config_lib.replace(cfg, mesh={"replica": 1, "data": 1, "model": 1, "fsdp": False})
    lay = state_lib.layout(one, jax.local_devices(backend="cpu")[:1])
    mngr = checkpoint.manager(run_dir, read_only=True)
    available = sorted(mngr.all_steps())
    wanted = available if step is None else [s for s in available if s == step]
    which = "" if step is None else f" at step {step}"
    if not wanted:
        raise CheckpointError(f"no checkpoint{which} in {checkpoint.directory(run_dir)}; "
                              f"available: {available}")
    restored = checkpoint.restore_latest(mngr, lay.abstract, lay.shardings, ("params",),
                                         steps=wanted)
    if restored is None:
        raise CheckpointError(f"no checkpoint{which} in {checkpoint.directory(run_dir)} "
                              "restores (see the warnings above); train again or give --step")
    state, meta = restored
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state["params"]))[0]
    return {".".join(str(key.key) for key in path if hasattr(key, "key")): np.asarray(leaf)
            for path, leaf in flat}, meta["step"]


def export_hf(run_dir: str | Path, out: str | Path, step: int | None = None, overrides=(),
              max_shard_gb: float = 5.0) -> dict:
    """Export a run's checkpoint into the new or empty directory `out`; what was written."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = rundir.load_config(run_dir, overrides)
    check_mappable(cfg.model)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} exists and is not an empty directory; give a new one")
    # the topmost directory this export creates (out's parents too): gone again if it fails
    made = None if out.exists() else next(p for p in [*reversed(out.parents), out]
                                          if not p.exists())
    try:  # before the restore: a directory this user cannot write fails first
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if made:  # it failed partway (a name too long, say): the parents it made go too
            shutil.rmtree(made, ignore_errors=True)
        raise ConfigError(f"--out {out} cannot be created ({e.strerror}); give another "
                          "--out") from None
    try:
        params, step = restored_params(run_dir, cfg, step)
        # the tokenizer (synthetic tokens have none), found or prepared before anything is written
        dataset = None if cfg.data.source == "synthetic" else corpus.prepare(cfg, validation=False)
        rundir.bind_data(run_dir, corpus.identity(cfg), training=False)
        files = write_tokenizer(dataset, cfg.model.context, out) if dataset else []
        (out / "config.json").write_text(
            json.dumps(hf_config(cfg.model, corpus.EOD_ID if dataset else None), indent=1))
        files += ["config.json", *write_weights(hf_tensors(cfg.model, params), out,
                                                max_shard_gb * 1e9)]
    except BaseException:  # out was empty: leave it so, or as absent as it was
        if made:
            shutil.rmtree(made)
        else:
            for path in out.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise
    return {"step": step, "out": str(out), "files": files, "tokenizer": dataset is not None,
            "architecture": architecture(cfg.model)[0],
            "parameters": sum(w.size for w in params.values())}
