"""Export to and import from the Hugging Face Mixtral format (what the Hub, vLLM and
``transformers.MixtralForCausalLM`` read).

Export writes the classic per-expert tensor names
(``model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight``); transformers 5.x fuses them into
``mlp.experts.gate_up_proj`` / ``down_proj`` while loading and writes the classic names back on
``save_pretrained``. Import accepts both spellings (``save_pretrained(save_original_format=False)``
writes the fused one).

What can be expressed as Mixtral: ``moe_every == 1`` and a ``topk`` or ``noisy_topk`` router
(noise only acts in training, so in eval noisy top-k *is* Mixtral's softmax-then-renormalised
top-k). ``switch`` (unrenormalised top-1 weight), ``expert_choice`` and ``hash`` routers raise
:class:`ConfigError`. A ``capacity_factor`` is dropped with a warning: Mixtral is dropless, so the
exported model matches this one run without a capacity limit. A non-zero expert selection bias
(``balance_bias_rate``) raises :class:`ConfigError`: Mixtral's router has no bias, and dropping it
would send tokens to other experts than the model was trained with.
"""

from __future__ import annotations

import json
import re
import warnings
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from expertmesh.platform.checkpoint import _Dir, assemble_model, load_model, read_tokenizer
from expertmesh.platform.config import ModelConfig
from expertmesh.platform.data import EOS_TOKEN, PAD_TOKEN
from expertmesh.platform.errors import CheckpointError, ConfigError
from expertmesh.platform.model import MoETransformer

ARCHITECTURE = "MixtralForCausalLM"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_MOE_KEY = re.compile(r"model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.(.+)")
_EXPERT_KEY = re.compile(r"experts\.(\d+)\.(w[123])\.weight")


def check_mixtral_compatible(cfg: ModelConfig) -> None:
    """Raise :class:`ConfigError` if ``cfg`` cannot be written as Mixtral; warn on what is lost."""
    if cfg.moe_every != 1:
        raise ConfigError(
            "moe_every",
            f"Mixtral has an MoE FFN in every layer; moe_every={cfg.moe_every} has dense layers",
        )
    if not cfg.uniform_experts:
        counts = {layer: cfg.experts_in(layer) for layer in cfg.moe_layers}
        raise ConfigError(
            "layer_experts",
            f"Mixtral has one expert count for every layer, this model's layers differ: {counts} "
            "(a model grown by add_expert in some layers only); serve it with expertmesh",
        )
    if cfg.router not in ("topk", "noisy_topk"):
        raise ConfigError(
            "router",
            f"the {cfg.router!r} router has no Mixtral equivalent (Mixtral renormalises the "
            "softmax weights of each token's top-k experts); use topk or noisy_topk",
        )
    if cfg.router == "noisy_topk":
        warnings.warn("noisy_topk exports as plain top-k (its eval-mode behaviour)", stacklevel=3)
    if cfg.capacity_factor is not None:
        warnings.warn(
            f"capacity_factor={cfg.capacity_factor} is not exported: Mixtral is dropless",
            stacklevel=3,
        )


def check_no_selection_bias(model: MoETransformer) -> None:
    """Raise :class:`ConfigError` if any MoE layer's selection bias is non-zero (an all-zero
    bias, e.g. balancing enabled but never trained, selects exactly as Mixtral does)."""
    for layer, moe in model.moe_layers().items():
        if moe.expert_bias is not None and bool(moe.expert_bias.any()):
            raise ConfigError(
                "balance_bias_rate",
                f"MoE layer {layer} has a non-zero expert selection bias (max |b| = "
                f"{float(moe.expert_bias.abs().max()):.4g}) from auxiliary-loss-free balancing; "
                "Mixtral's router has no such bias, and exporting without it would route tokens "
                "to other experts than this model does",
            )


def config_to_hf(
    cfg: ModelConfig, *, dtype: torch.dtype, token_ids: dict[str, int | None]
) -> dict[str, Any]:
    """A ``MixtralConfig``-shaped dict; ``token_ids`` holds ``bos/eos/pad_token_id``."""
    check_mixtral_compatible(cfg)
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # NOTE: transformers 4.x and older vLLM read this key
        "max_position_embeddings": cfg.max_seq_len,
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "router_aux_loss_coef": cfg.aux_loss_weight,
        "router_jitter_noise": 0.0,
        "attention_dropout": 0.0,
        "use_cache": True,
        **token_ids,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],  # the pre-5.0 spelling
    }


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Mixtral ``config.json``; raises ConfigError naming the HF key."""
    if hf.get("model_type") != "mixtral":
        raise ConfigError("model_type", f"expected 'mixtral', got {hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(
            "hidden_act", f"only silu experts are supported, got {hf['hidden_act']!r}"
        )
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError("rope_parameters", f"only default RoPE is supported, got {rope}")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d_model // n_heads):
        raise ConfigError(
            "head_dim", f"must equal hidden_size / num_attention_heads, got {hf['head_dim']}"
        )
    max_len = hf.get("max_position_embeddings", 4096 * 32)
    window = hf.get("sliding_window")
    if window is not None and window < max_len:
        # NOTE: within the window sliding-window attention equals full attention
        warnings.warn(f"sliding_window={window}: max_seq_len capped to {window}", stacklevel=2)
        max_len = window
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_ff=hf["intermediate_size"],
        n_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        router="topk",
        max_seq_len=max_len,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        aux_loss_weight=hf.get("router_aux_loss_coef", 0.001),
        init_std=hf.get("initializer_range", 0.02),
    )


def state_to_hf(model: MoETransformer) -> dict[str, torch.Tensor]:
    """The model's tensors under HF Mixtral names (per-expert ``w1``/``w3``/``w2``)."""
    check_no_selection_bias(model)
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith((".experts.w13", ".experts.w2", ".expert_bias")):  # bias: checked zero
            continue
        if name == "lm_head.weight":
            if not model.cfg.tie_embeddings:
                out[name] = t.contiguous()
            continue
        out["model." + name.replace(".ffn.", ".block_sparse_moe.")] = t.contiguous()
    for layer, moe in model.moe_layers().items():
        if moe.experts is None:
            raise ValueError("the model holds no experts; export a checkpoint URI instead")
        scale = model.cfg.routed_scale  # Mixtral has none: w2 is linear, so fold it in
        for e in range(model.cfg.n_experts):
            for w, t in moe.experts.expert_tensors(e).items():
                if w == "w2" and scale != 1.0:
                    t = (t.float() * scale).to(t.dtype)
                out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"] = t
    return out


def _token_ids(tokenizer_json: str | None) -> dict[str, int | None]:
    ids: dict[str, int] = {}
    if tokenizer_json is not None:
        try:
            added = json.loads(tokenizer_json).get("added_tokens") or []
        except ValueError as exc:
            raise ValueError(f"tokenizer_json must be a tokenizer.json's text: {exc}") from None
        ids = {t["content"]: t["id"] for t in added}
    eos = ids.get(EOS_TOKEN)
    # NOTE: no separate BOS; documents are delimited by <|endoftext|> (GPT-2 convention)
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": ids.get(PAD_TOKEN)}


def export_hf(
    model_or_uri: MoETransformer | str, out_dir: str, tokenizer_json: str | None = None
) -> str:
    """Write a Hugging Face Mixtral directory that ``MixtralForCausalLM.from_pretrained`` and vLLM load.

    Args:
        model_or_uri: a model, or a checkpoint URI (its tokenizer is used when none is given).
        out_dir: local directory or pyarrow URI to write ``config.json``, ``model.safetensors``,
            ``generation_config.json`` and (with a tokenizer) ``tokenizer.json`` +
            ``tokenizer_config.json`` into.
        tokenizer_json: the text of a ``tokenizers`` ``tokenizer.json``.

    Returns:
        ``out_dir`` as a normalised URI or absolute path.

    Example:
        >>> export_hf(".state/checkpoints/tiny", "/tmp/tiny-hf")
        >>> transformers.MixtralForCausalLM.from_pretrained("/tmp/tiny-hf")
    """
    if isinstance(model_or_uri, str):
        if tokenizer_json is None:
            tokenizer_json = read_tokenizer(model_or_uri)
        model, _ = load_model(model_or_uri)
    else:
        model = model_or_uri
    cfg = model.cfg
    token_ids = _token_ids(tokenizer_json)
    hf_config = config_to_hf(cfg, dtype=model.embed_tokens.weight.dtype, token_ids=token_ids)
    with torch.no_grad():
        weights = st_save(state_to_hf(model), metadata={"format": "pt"})
    out = _Dir(out_dir)
    out.write(WEIGHTS, weights)
    out.write("config.json", json.dumps(hf_config, indent=2).encode())
    generation = {"_from_model_config": False, **token_ids}
    out.write("generation_config.json", json.dumps(generation, indent=2).encode())
    if tokenizer_json is not None:
        tok_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
        }
        if token_ids["eos_token_id"] is not None:
            tok_config |= {"eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN}
        if token_ids["pad_token_id"] is not None:
            tok_config["pad_token"] = PAD_TOKEN
        out.write("tokenizer.json", tokenizer_json.encode())
        out.write("tokenizer_config.json", json.dumps(tok_config, indent=2).encode())
    return out.uri


def _read_hf_tensors(d: _Dir) -> dict[str, torch.Tensor]:
    if d.exists(WEIGHTS_INDEX):
        files = sorted(set(json.loads(d.read(WEIGHTS_INDEX))["weight_map"].values()))
    elif d.exists(WEIGHTS):
        files = [WEIGHTS]
    else:
        raise CheckpointError(
            f"{d.uri}: no {WEIGHTS} or {WEIGHTS_INDEX} (only safetensors is read)"
        )
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors |= st_load(d.read(f))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{d.uri_of(f)}: not a safetensors file ({exc})") from exc
    return tensors


def _split_hf_state(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, where: str
) -> tuple[dict[str, torch.Tensor], dict[tuple[int, int], dict[str, torch.Tensor]]]:
    """(dense state dict in expertmesh names, {(layer, expert): {w1, w3, w2}})."""
    dense: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints saved the RoPE buffer
            continue
        if m := _MOE_KEY.fullmatch(name):
            layer, rest = int(m[1]), m[2]
            if rest == "gate.weight":
                dense[f"layers.{layer}.ffn.gate.weight"] = t
            elif e := _EXPERT_KEY.fullmatch(rest):
                experts.setdefault((layer, int(e[1])), {})[e[2]] = t
            elif rest == "experts.gate_up_proj":  # fused (E, 2F, D): gate rows, then up rows
                for j, w13_2FD in enumerate(t):
                    w1_FD, w3_FD = w13_2FD.chunk(2, dim=0)
                    experts.setdefault((layer, j), {}).update(w1=w1_FD, w3=w3_FD)
            elif rest == "experts.down_proj":  # fused (E, D, F)
                for j, w2_DF in enumerate(t):
                    experts.setdefault((layer, j), {})["w2"] = w2_DF
            else:
                raise CheckpointError(f"{where}: unexpected tensor {name}")
        elif name.startswith("model."):
            dense[name.removeprefix("model.")] = t
        elif name == "lm_head.weight":
            dense[name] = t
        else:
            raise CheckpointError(f"{where}: unexpected tensor {name}")
    want = {(layer, j) for layer in range(cfg.n_layers) for j in range(cfg.n_experts)}
    incomplete = sorted(k for k in want if set(experts.get(k, {})) != {"w1", "w2", "w3"})
    extra = sorted(set(experts) - want)
    if incomplete or extra:
        raise CheckpointError(
            f"{where}: (layer, expert) weights incomplete {incomplete[:3]} or extra {extra[:3]}"
        )
    return dense, experts


def import_hf(hf_dir: str) -> MoETransformer:
    """Build an expertmesh model (eval mode, the checkpoint's dtype) from a Mixtral directory,
    e.g. one written by ``MixtralForCausalLM.save_pretrained``. Its config is ``model.cfg``.
    """
    d = _Dir(hf_dir)
    cfg = config_from_hf(json.loads(d.read("config.json")))
    dense, experts = _split_hf_state(_read_hf_tensors(d), cfg, d.uri)
    return assemble_model(cfg, dense, experts.items(), where=d.uri)


__all__ = [
    "check_mixtral_compatible",
    "check_no_selection_bias",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "import_hf",
    "state_to_hf",
]
