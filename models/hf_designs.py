"""The classic VLM designs to and from their transformers classes (docs/designs.md).

`HF_DESIGNS` maps a transformers `model_type` to the design that reads and writes it:

    import_hf(DIR, OUT)         # a transformers checkpoint → a splitvlm export (SplitVLM.from_pretrained)
    export_hf(model, OUT, ...)  # a SplitVLM of that design's shape → the transformers checkpoint

Import reads the checkpoint tensor by tensor (the LLM through `models.pretrained.PretrainedLLM`,
the vision tower and connector through `SafetensorsDir`); the parts of our model the design does
not have (image head, mask embedding) keep their seeded init.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import yaml
from models.config import ModelConfig, VisionConfig
from models.pretrained import (
    SUPPORTED_LLMS,
    LLMFamily,
    PretrainedLLM,
    checkpoint_tensors,
    language_model_family,
)
from models.safetensors_dir import SafetensorsDir
from models.split_vlm import SplitVLM
from models.vision import (
    PIXEL_NORMALIZATIONS,
    PIXEL_RESCALE,
    Blip2QueryTower,
    Blip2TowerConfig,
    ChameleonVQTower,
    CLIPTower,
    DeepseekHybridTower,
    DeepseekHybridTowerConfig,
    Idefics3Tower,
    IdeficsTower,
    JanusTower,
    JanusTowerConfig,
    MllamaTower,
    PackedPixtralVisionModel,
    PackedQwen2VisionModel,
    PackedSiglipVisionModel,
    SmolVLMTower,
)

# Files of a transformers tokenizer that an import copies into OUT/tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# The original transformers config, kept in an import so that an export writes it back.
HF_CONFIG_FILE = "hf_config.json"


@dataclass(frozen=True)
class HFDesign:
    """One classic design: its transformers class and the two directions."""

    transformers_class: str
    # (checkpoint directory, seed of what the checkpoint lacks) → our model, weights loaded
    import_checkpoint: Callable[[Path, int], SplitVLM]
    # (model, out, the imported transformers config or None, the tokenizer's image token id)
    export_checkpoint: Callable[[SplitVLM, Path, dict | None, int | None], None]
    # None when a model has this design's shape, else the first reason it has not.
    mismatch: Callable[[SplitVLM], str | None]


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{config_file}: cannot read it ({err})") from None


def import_hf(path: str | Path, out: str | Path, seed: int = 0) -> str:
    """Write the transformers checkpoint directory `path` as a splitvlm export to `out`;
    returns the design's transformers class."""
    path, out = Path(path), Path(out)
    model_type = _read_config(path).get("model_type")
    if model_type not in HF_DESIGNS:
        raise ValueError(
            f"{path / 'config.json'}: a {model_type!r} checkpoint; supported: "
            + ", ".join(f"{name} ({d.transformers_class})" for name, d in HF_DESIGNS.items())
        )
    design = HF_DESIGNS[model_type]
    model = design.import_checkpoint(path, seed)
    write_export(model, out, source=str(path))
    (out / HF_CONFIG_FILE).write_text((path / "config.json").read_text())
    copied = [name for name in _TOKENIZER_FILES if (path / name).is_file()]
    if copied:
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        for name in copied:
            shutil.copy2(path / name, out / "tokenizer" / name)
    return design.transformers_class


def write_export(model: SplitVLM, out: Path, source: str = "") -> None:
    """The model's files of a splitvlm export (what `SplitVLM.from_pretrained` reads): weights,
    config.yaml, vision_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:  # one tensor under two names; safetensors stores it once
        del weights["lm_head.weight"]
    save_file(weights, str(out / "model.safetensors"), metadata={"source": source})
    model_cfg = dataclasses.asdict(model.cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(model_cfg, sort_keys=False))
    (out / "vision_config.json").write_text(json.dumps(model.vision.config.to_dict(), indent=1))


def export_hf(path: str | Path, out: str | Path) -> str:
    """A splitvlm export (`splitvlm export`, or `import-hf`) at `path` → the transformers
    checkpoint of its design at `out`; returns the transformers class."""
    path, out = Path(path), Path(out)
    model = SplitVLM.from_pretrained(path)
    reasons = {}
    for name, design in HF_DESIGNS.items():
        reasons[name] = design.mismatch(model)
        if reasons[name] is None:
            break
    else:
        raise ValueError(
            f"{path}: not a model of a design with a transformers class ("
            + "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
            + ")"
        )
    original = path / HF_CONFIG_FILE
    base = json.loads(original.read_text()) if original.is_file() else None
    image_id = None  # the id transformers finds image positions by
    if (path / "tokenizer").is_dir():
        from transformers import AutoTokenizer  # seconds; only when exporting

        tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
        # LLaVA's processor writes <image>; our decoder writes the pad id there, or, where an
        # image is its start marker alone (LLaMA-3.2-Vision's <|image|>), that marker.
        vocab = tokenizer.get_vocab()
        image_id = vocab.get("<image>", tokenizer.pad_token_id)
        if model.cfg.image_markers == "start":
            image_id = vocab.get(model.cfg.image_start_token, image_id)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(path / "tokenizer", out, dirs_exist_ok=True)
    design.export_checkpoint(model, out, base, image_id)
    return design.transformers_class


# -- LLaVA-1.5 -------------------------------------------------------------------------------

# The vision towers a LLaVA checkpoint may have: model_type → (our tower name, the select strategy
# whose tokens are the patch grid: CLIP's CLS is dropped, SigLIP and Pixtral have none).
_LLAVA_TOWERS = {
    "clip_vision_model": ("clip", "default"),
    "siglip_vision_model": ("siglip", "full"),
    "pixtral": ("pixtral", "full"),
}
# How each tower's images enter the sequence: CLIP and SigLIP on square images, the patches
# only; Pixtral (Pixtral-12B's LLaVA) at their own size, [IMG_BREAK] after every row but the
# last and [IMG_END] after the image.
_LLAVA_IMAGE_TOKENS = {
    "clip": {"resize": "square", "image_row_break": False, "image_markers": False},
    "siglip": {"resize": "square", "image_row_break": False, "image_markers": False},
    "pixtral": {"resize": "longest_side", "image_row_break": True, "image_markers": "end"},
}
# Pixtral's tokens for them (its processor's defaults), whose embedding rows the checkpoint
# trained: an import names them, so a run from it uses those rows.
_PIXTRAL_TOKEN_NAMES = {"image_end_token": "[IMG_END]", "image_row_break_token": "[IMG_BREAK]"}


def llava_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers LlavaConfig (the LLM's fields come from the checkpoint
    later, `PretrainedLLM.apply_config`); LLaVA-NeXT's too, before its tiling. ValueError for
    what our model cannot be exactly."""
    vision = hf.vision_config
    if vision.model_type not in _LLAVA_TOWERS:
        raise ValueError(
            f"a {vision.model_type!r} vision tower; supported: {', '.join(_LLAVA_TOWERS)}"
        )
    tower, strategy = _LLAVA_TOWERS[vision.model_type]
    if hf.vision_feature_select_strategy != strategy:
        raise ValueError(
            f"vision_feature_select_strategy={hf.vision_feature_select_strategy!r}; with a "
            f"{vision.model_type} only {strategy!r} (the patch grid, no CLS token) is supported"
        )
    layer = hf.vision_feature_layer
    if not isinstance(layer, int) or layer == 0:
        raise ValueError(f"vision_feature_layer={layer!r}; only one layer index (not 0)")
    if hf.projector_hidden_act != "gelu" or not getattr(hf, "multimodal_projector_bias", True):
        raise ValueError("only a GELU projector with biases (projector_hidden_act: gelu)")
    cfg = decoder_vlm_config("causal", "mlp", vision, tower, feature_layer=layer)
    _set_image_tokens(cfg, tower)
    return cfg


def _set_image_tokens(cfg: ModelConfig, tower: str) -> None:
    """How images of this LLaVA-like design's tower enter the sequence, and for Pixtral the
    names of its break and end tokens."""
    tokens = dict(_LLAVA_IMAGE_TOKENS[tower])
    cfg.vision.resize = tokens.pop("resize")
    if tower == "pixtral":
        tokens.update(_PIXTRAL_TOKEN_NAMES)
    for key, value in tokens.items():
        setattr(cfg, key, value)


def decoder_vlm_config(
    image_attention: str, adaptor: str, vision, tower: str, feature_layer: int
) -> ModelConfig:
    """`decoder_config` with the transformers vision config's tower."""
    return decoder_config(
        image_attention,
        adaptor,
        VisionConfig(
            tower=tower,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_size=vision.hidden_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            feature_layer=feature_layer,
            normalization="siglip" if tower == "siglip" else "clip",
        ),
    )


def decoder_config(image_attention: str, adaptor: str, vision: VisionConfig) -> ModelConfig:
    """A classic design's shape in our config: one decoder (every per-modality depth 0), no
    image markers, no masked image loss."""
    return ModelConfig(
        num_text_in_blocks=0,
        num_image_in_blocks=0,
        num_text_head_blocks=0,
        num_image_head_blocks=0,
        image_attention=image_attention,
        image_markers=False,
        adaptor=adaptor,
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        vision=vision,
    )


def _llava_prefixes(files: dict) -> tuple[str, str]:  # PaliGemma's too
    """(vision tower, projector) tensor prefixes: transformers' saved names, or its nested ones."""
    if any(name.startswith("model.vision_tower.") for name in files):
        return "model.vision_tower.", "model.multi_modal_projector."
    return "vision_tower.", "multi_modal_projector."


def _import_llava(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(path, seed, "llava", llava_model_config, _LLAVA_PROJECTOR)


# Our adaptor's submodules → the transformers projector's (`multi_modal_projector.*`); a
# submodule not listed has the same name in both.
_LLAVA_PROJECTOR = {"0": "linear_1", "2": "linear_2"}
_PALIGEMMA_PROJECTOR = {"": "linear"}


def _import_vlm(
    path: Path,
    seed: int,
    design: str,
    model_config,
    projector: dict[str, str],
    prefixes=None,
    extra=None,
    tower_config=None,
    processor_keys=("image_mean", "image_std"),
    modules: dict[str, str] | None = None,
) -> SplitVLM:
    """A LLaVA-like checkpoint (`vision_tower.*`, `multi_modal_projector.*`, a language model of
    `SUPPORTED_LLMS[design]`) as our model: `model_config` turns its config into ours,
    `projector` maps our adaptor's submodules to the projector's (`_projector_names`);
    `prefixes(tensor names)` gives the tower's and projector's tensor prefixes (LLaVA's; "" for
    BLIP-2's tower, whose modules sit at the top level), `extra(tensor names)` our other
    parameters' tensors ({ours: theirs}; LLaVA-NeXT's newline), `tower_config(hf config)`
    the tower's transformers config as a dict (default: its `vision_config`),
    `processor_keys` the image processor's mean and std our normalization is read from, and
    `modules` ({our module: prefix}) our modules whose parameters have transformers' names
    under a prefix (Janus's generation path)."""
    llm = PretrainedLLM(path)
    try:
        cfg = model_config(llm.hf_config)
    except ValueError as err:
        raise ValueError(f"{path / 'config.json'} ({design}): {err}") from None
    cfg.pretrained_llm = str(path)
    llm.apply_config(cfg)
    normalization = _image_normalization(path, *processor_keys)
    if normalization is not None:
        cfg.vision.normalization = normalization
    cfg.pretrained_llm = ""  # the export holds the weights
    if tower_config is None:
        vision = getattr(llm.hf_config, "vision_config", None)  # Fuyu has no tower
        tower = vision.to_dict() if vision is not None else None
    else:
        tower = tower_config(llm.hf_config)
    model = SplitVLM(cfg, vision_config=tower)
    model.reset_parameters(seed)  # what the checkpoint lacks (image head, mask embedding)
    llm.load_into(model)
    checkpoint = SafetensorsDir(path, what="our model")
    vision_prefix, projector_prefix = (prefixes or _llava_prefixes)(checkpoint.tensor_files)
    sources = {
        f"vision.{name}": vision_prefix + name for name, _ in model.vision.named_parameters()
    }
    for ours, theirs in _projector_names(model, projector).items():
        sources[ours] = projector_prefix + theirs
    sources |= extra(checkpoint.tensor_files) if extra else {}
    module_names = []  # their names of our `modules`' submodules
    for ours, prefix in (modules or {}).items():
        for name, _ in getattr(model, ours).named_parameters():
            sources[f"{ours}.{name}"] = prefix + name
        module_names += [prefix + top for top, _ in getattr(model, ours).named_children()]
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for ours, theirs in sources.items():
            parameters[ours].copy_(checkpoint.read(theirs, tuple(parameters[ours].shape)))
    # The tower's tensors: all under its prefix, or, for a tower of several modules that sit
    # beside the language model (BLIP-2's, DeepSeek-VL 7B's), its modules' names under it.
    tower_names = (vision_prefix,)
    if getattr(model.vision, "modules_at_model_level", False):
        tops = {name.split(".")[0] for name, _ in model.vision.named_parameters()}
        tower_names = tuple(vision_prefix + top for top in tops)
    unread = [
        name
        for name in checkpoint.tensor_files
        if name.startswith((*tower_names, *filter(None, [projector_prefix]), *module_names))
        and name not in sources.values()
    ]
    if unread:
        raise ValueError(
            f"{checkpoint.listed_in}: tensor {unread[0]!r} (and {len(unread) - 1} more) has no "
            f"place in our {design} model; refusing to import without it"
        )
    return model


def _projector_names(model: SplitVLM, projector: dict[str, str]) -> dict[str, str]:
    """Our adaptor's parameter names → the transformers projector's (without its prefix)."""
    names = {}
    for name, _ in model.adaptor.named_parameters():
        module, _, leaf = name.rpartition(".")
        theirs = projector.get(module, module)
        names[f"adaptor.{name}"] = f"{theirs}.{leaf}" if theirs else leaf
    return names


def _save_vlm(
    model: SplitVLM,
    out: Path,
    family: str | LLMFamily,
    projector: dict[str, str],
    hf,
    prefixes=("vision_tower.", "multi_modal_projector."),
    extra: dict[str, str] | None = None,
    adjust: Callable[[dict], None] | None = None,
) -> None:
    """A LLaVA-like transformers checkpoint: the language model under transformers' saved names
    (what save_pretrained writes and every version loads: `family`, or SUPPORTED_LLMS[family]), the tower and projector under
    `prefixes` (LLaVA's `vision_tower.*`, `multi_modal_projector.*`), our parameters `extra`
    names ({ours: theirs}), and `hf` (its config) as config.json; `adjust` may change the
    tensors (by their names) before they are written."""
    state = model.state_dict()
    if isinstance(family, str):
        family = SUPPORTED_LLMS[family]
    tensors = checkpoint_tensors(family, model.cfg, state)
    for name, value in state.items():
        if name.startswith("vision."):
            tensors[prefixes[0] + name.removeprefix("vision.")] = value
    for ours, theirs in _projector_names(model, projector).items():
        tensors[prefixes[1] + theirs] = state[ours]
    for ours, theirs in (extra or {}).items():
        tensors[theirs] = state[ours]
    if adjust is not None:
        adjust(tensors)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(hf.to_json_string())


def _image_normalization(
    path: Path, mean_key: str = "image_mean", std_key: str = "image_std"
) -> str | None:
    """Our normalization name for the checkpoint's image processor (its `mean_key` and
    `std_key`), None without one or without those keys."""
    processor = path / "preprocessor_config.json"
    if not processor.is_file():
        return None
    config = json.loads(processor.read_text())
    if mean_key not in config:
        return None
    pair = (tuple(config.get(mean_key, ())), tuple(config.get(std_key, ())))
    for name, (mean, std) in PIXEL_NORMALIZATIONS.items():
        close = all(
            len(a) == 3 and all(abs(x - y) < 1e-4 for x, y in zip(a, b, strict=True))
            for a, b in zip(pair, (mean, std), strict=True)
        )
        if close:
            return name
    raise ValueError(
        f"{processor}: {mean_key}/{std_key} {list(pair[0])}/{list(pair[1])} are neither of "
        f"our normalizations ({', '.join(PIXEL_NORMALIZATIONS)})"
    )


def _llava_mismatch(model: SplitVLM) -> str | None:
    return _llava_like_mismatch(model, "LLaVA", adaptor="mlp", towers=_LLAVA_TOWER_CLASSES)


# Our tower classes → their names in _LLAVA_IMAGE_TOKENS.
_LLAVA_TOWER_CLASSES = {
    CLIPTower: "clip",
    PackedSiglipVisionModel: "siglip",
    PackedPixtralVisionModel: "pixtral",
}


# What every classic design is in our config: one decoder (every per-modality depth 0), one
# span per image, untiled unless the design tiles.
_DECODER_SHAPE = {
    "num_text_in_blocks": 0,
    "num_image_in_blocks": 0,
    "num_text_head_blocks": 0,
    "num_image_head_blocks": 0,
    "image_scales": [],
    "dual_input": False,
    "visual_expert": False,
    "vision.tiling": "none",
    "learned_positions": 0,
}
# The block of every design's LLM but Fuyu's Persimmon: a gated MLP, no output biases, RoPE on
# whole heads.
_GATED_BLOCK = {
    "mlp_gated": True,
    "mlp_bias": False,
    "attention_output_bias": False,
    "rope_fraction": 1.0,
}
# A LLaVA-like design with a Llama-layout language model (Llama, Mistral).
_LLAVA_SHAPE = {
    **_DECODER_SHAPE,
    **_GATED_BLOCK,
    "image_attention": "causal",
    "image_positions": "sequential",
    "norm_style": "default",
    "post_norms": False,
    "scale_embeddings": False,
    "mlp_activation": "silu",
    "attention_scale": 0.0,
    "qk_norm": False,
    "attention_bias": False,
    "layer_types": [],
}


def _shape_mismatch(cfg: ModelConfig, design: str, shape: dict) -> str | None:
    """The first field of `shape` ("vision.*" for the vision config's) `cfg` differs in."""
    for key, value in shape.items():
        owner, _, name = key.rpartition(".")
        have = getattr(cfg.vision if owner else cfg, name)
        if have != value:
            return f"model.{key}={have!r}, {design} has {value!r}"
    return None


def _llava_like_mismatch(
    model: SplitVLM, design: str, adaptor: str, towers: dict, tiling: str = "none"
) -> str | None:
    """Why `model` is not a LLaVA-shaped `design` with this adaptor, one of these towers and
    this `model.vision.tiling`."""
    cfg = model.cfg
    shape = {**_LLAVA_SHAPE, "adaptor": adaptor, "vision.tiling": tiling}
    reason = _shape_mismatch(cfg, design, shape)
    if reason:
        return reason
    if type(model.vision) not in towers:
        names = ", ".join(towers.values())
        return f"{design}'s vision tower is one of: {names}"
    tower = towers[type(model.vision)]
    for key, value in _LLAVA_IMAGE_TOKENS[tower].items():
        have = getattr(cfg.vision if key == "resize" else cfg, key)
        if have != value:
            return f"model.{key}={have!r}, {design} with a {tower} tower has {value!r}"
    if cfg.vision.feature_layer == 0:
        return f"model.vision.feature_layer=0 (last_hidden_state); {design} reads a hidden state"
    if adaptor != "patch_merger" and cfg.vision.spatial_merge != 1:
        return f"model.vision.spatial_merge={cfg.vision.spatial_merge}, {design} has 1"
    return None


def _text_config(model: SplitVLM, base: dict | None) -> dict:
    """The language model's transformers config fields every design writes alike, over the
    imported config's `text_config` (`base`) where there is one."""
    cfg = model.cfg
    return {
        **((base or {}).get("text_config") or {}),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": model.core[0].mlp.up.out_features if cfg.num_core_blocks else 0,
        "num_hidden_layers": cfg.num_core_blocks,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
    }


def _rope_scaling(cfg: ModelConfig) -> dict | None:
    """transformers' `rope_scaling` of our RoPE settings."""
    if cfg.rope_llama3_factor:
        return {
            "rope_type": "llama3",
            "factor": cfg.rope_llama3_factor,
            "low_freq_factor": cfg.rope_llama3_low_freq_factor,
            "high_freq_factor": cfg.rope_llama3_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_llama3_original_max_positions,
        }
    if cfg.rope_linear_factor:
        return {"rope_type": "linear", "factor": cfg.rope_linear_factor}
    return None


def _llava_fields(model: SplitVLM, base: dict | None, image_id: int | None, design: str) -> dict:
    """The transformers config fields LLaVA and LLaVA-NeXT share."""
    cfg = model.cfg
    rows, cols = cfg.square_grid
    return {
        "vision_config": model.vision.config.to_dict(),
        "text_config": _llama_layout_text_config(model, base),
        "image_token_index": _image_token(base, image_id, design),
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default" if model.vision.num_prefix_tokens else "full",
        "vision_feature_layer": cfg.vision.feature_layer,
        "image_seq_length": rows * cols,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


def _llava_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import LlavaConfig  # seconds; only when exporting

    cfg = model.cfg
    hf = LlavaConfig(**_llava_fields(model, base, image_id, "LLaVA"))
    hf.architectures = ["LlavaForConditionalGeneration"]
    _save_vlm(model, out, "llava", _LLAVA_PROJECTOR, hf)
    _write_image_processor(cfg, out)


def _llama_layout_text_config(model: SplitVLM, base: dict | None):
    """The transformers config of a Llama-layout language model: the imported one's family
    (Mistral for Pixtral and Mistral 3), else Llama (the same layout)."""
    from transformers import AutoConfig

    cfg = model.cfg
    text = {
        **_text_config(model, base),
        "rope_scaling": _rope_scaling(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
    return AutoConfig.for_model(text.pop("model_type", "llama"), **text)


def _opt_text_config(model: SplitVLM, base: dict | None):
    """The transformers OPTConfig of our OPT-shaped language model (pre-norm, ReLU, biases)."""
    from transformers import OPTConfig

    cfg = model.cfg
    text = {
        **((base or {}).get("text_config") or {}),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "word_embed_proj_dim": cfg.d_model,
        "ffn_dim": model.core[0].mlp.up.out_features if cfg.num_core_blocks else 0,
        "num_hidden_layers": cfg.num_core_blocks,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.learned_positions,
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "activation_function": "relu",
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    text.pop("model_type", None)
    return OPTConfig(**text)


def _image_token(
    base: dict | None, image_id: int | None, design: str, key: str = "image_token_index"
) -> int:
    """The id transformers finds image positions by: the imported config's (its field `key`),
    else the tokenizer's (`export_hf`)."""
    image_token = (base or {}).get(key, image_id)
    if image_token is None:
        raise ValueError(
            f"no image token id: the export has neither the original {design} config "
            f"({HF_CONFIG_FILE}) nor a tokenizer with an <image> or a pad token"
        )
    return image_token


def _save_image_processor(out: Path, cfg: ModelConfig, processor_type: str, **fields) -> None:
    """preprocessor_config.json of a transformers `processor_type`: uint8 pixels rescaled to
    [0, 1] and normalized as `model.vision.normalization`, plus the design's own `fields`."""
    mean, std = PIXEL_NORMALIZATIONS[cfg.vision.normalization]
    processor = {
        "image_processor_type": processor_type,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_normalize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        **fields,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))


def _write_image_processor(cfg: ModelConfig, out: Path) -> None:
    """preprocessor_config.json: Pixtral's processor for longest-side grids (its patch size
    the image token's side, as Mistral 3's processor passes it), else CLIP's."""
    size, token = cfg.vision.image_size, cfg.vision.token_size
    if cfg.vision.resize == "longest_side":  # Pixtral's processor: the same grid rule
        _save_image_processor(
            out,
            cfg,
            "PixtralImageProcessor",
            size={"longest_edge": size},
            patch_size={"height": token, "width": token},
            do_resize=True,
        )
    else:
        _save_image_processor(
            out,
            cfg,
            "CLIPImageProcessor",
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_center_crop=True,
        )


# -- LLaVA-NeXT -------------------------------------------------------------------------------


def llava_next_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers LlavaNextConfig: LLaVA-1.5's (a CLIP or SigLIP tower on
    square tiles, the MLP projector, a Llama-layout LLM) with its any-res tiling
    (`model.vision.tiling: llava_next` over `image_grid_pinpoints`) and the newline embedding."""
    if hf.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(
            f"a {hf.vision_config.model_type!r} vision tower; supported: clip_vision_model, "
            "siglip_vision_model"
        )
    cfg = llava_model_config(hf)
    cfg.vision.tiling = "llava_next"
    cfg.vision.grid_pinpoints = [list(pin) for pin in hf.image_grid_pinpoints]
    return cfg


def _llava_next_newline(files: dict) -> dict[str, str]:
    nested = "model.image_newline" in files
    return {"image_newline": "model.image_newline" if nested else "image_newline"}


def _import_llava_next(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "llava_next",
        llava_next_model_config,
        _LLAVA_PROJECTOR,
        extra=_llava_next_newline,
    )


def _llava_next_mismatch(model: SplitVLM) -> str | None:
    towers = {CLIPTower: "clip", PackedSiglipVisionModel: "siglip"}
    return _llava_like_mismatch(
        model, "LLaVA-NeXT", adaptor="mlp", towers=towers, tiling="llava_next"
    )


def _llava_next_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import LlavaNextConfig  # seconds; only when exporting

    cfg = model.cfg
    hf = LlavaNextConfig(
        **_llava_fields(model, base, image_id, "LLaVA-NeXT"),
        image_grid_pinpoints=[list(pin) for pin in cfg.vision.grid_pinpoints],
    )
    hf.architectures = ["LlavaNextForConditionalGeneration"]
    newline = {"image_newline": "image_newline"}
    _save_vlm(model, out, "llava_next", _LLAVA_PROJECTOR, hf, extra=newline)
    size = cfg.vision.image_size
    _save_image_processor(
        out,
        cfg,
        "LlavaNextImageProcessor",
        image_grid_pinpoints=[list(pin) for pin in cfg.vision.grid_pinpoints],
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_pad=True,
    )


# -- Mistral 3 --------------------------------------------------------------------------------


def mistral3_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers Mistral3Config: Pixtral's ViT, its 2 × 2 patch merger
    projector (`model.adaptor: patch_merger`, `model.vision.spatial_merge`), Pixtral's image
    tokens at the merged grid, a Mistral (Llama-layout) LLM."""
    vision = hf.vision_config
    if vision.model_type != "pixtral":
        raise ValueError(f"a {vision.model_type!r} vision tower; supported: pixtral")
    layer = hf.vision_feature_layer
    if not isinstance(layer, int) or layer == 0:
        raise ValueError(f"vision_feature_layer={layer!r}; only one layer index (not 0)")
    if hf.projector_hidden_act != "gelu" or hf.multimodal_projector_bias:
        raise ValueError("only a GELU projector without biases (Mistral 3's)")
    cfg = decoder_vlm_config("causal", "patch_merger", vision, "pixtral", feature_layer=layer)
    _set_image_tokens(cfg, "pixtral")
    cfg.vision.spatial_merge = hf.spatial_merge_size
    return cfg


# Mistral 3's projector has our PatchMergerAdaptor's names.
_MISTRAL3_PROJECTOR: dict[str, str] = {}


def _import_mistral3(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(path, seed, "mistral3", mistral3_model_config, _MISTRAL3_PROJECTOR)


def _mistral3_mismatch(model: SplitVLM) -> str | None:
    towers = {PackedPixtralVisionModel: "pixtral"}
    return _llava_like_mismatch(model, "Mistral 3", adaptor="patch_merger", towers=towers)


def _mistral3_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import Mistral3Config  # seconds; only when exporting

    cfg = model.cfg
    hf = Mistral3Config(
        vision_config=model.vision.config.to_dict(),
        text_config=_llama_layout_text_config(model, base).to_dict(),
        image_token_index=_image_token(base, image_id, "Mistral 3"),
        projector_hidden_act="gelu",
        vision_feature_layer=cfg.vision.feature_layer,
        multimodal_projector_bias=False,
        spatial_merge_size=cfg.vision.spatial_merge,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf.architectures = ["Mistral3ForConditionalGeneration"]
    _save_vlm(model, out, "mistral3", _MISTRAL3_PROJECTOR, hf)
    _write_image_processor(cfg, out)


# -- PaliGemma --------------------------------------------------------------------------------


def paligemma_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers PaliGemmaConfig (its Gemma's fields come from the
    checkpoint later). PaliGemma divides the projected image features by sqrt(width) before
    GemmaModel multiplies the whole input sequence by it; our Gemma scales the token
    embeddings only, so the image tokens are the projector's output as they are."""
    vision = hf.vision_config
    if vision.model_type != "siglip_vision_model":
        raise ValueError(f"a {vision.model_type!r} vision tower; supported: siglip_vision_model")
    if hf.projection_dim != hf.text_config.hidden_size:
        raise ValueError(
            f"projection_dim={hf.projection_dim} differs from the language model's width "
            f"{hf.text_config.hidden_size}"
        )
    return decoder_vlm_config("prefix", "linear", vision, "siglip", feature_layer=0)


def _import_paligemma(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(path, seed, "paligemma", paligemma_model_config, _PALIGEMMA_PROJECTOR)


# What a model needs to be a PaliGemma: one decoder, prefix-LM, a linear projector, Gemma (1).
_PALIGEMMA_SHAPE = {
    **_DECODER_SHAPE,
    **_GATED_BLOCK,
    "image_attention": "prefix",
    "image_markers": False,
    "image_row_break": False,
    "image_positions": "sequential",
    "adaptor": "linear",
    "norm_style": "gemma",
    "post_norms": False,
    "scale_embeddings": True,
    "mlp_activation": "gelu_tanh",
    "attention_scale": 0.0,
    "qk_norm": False,
    "attention_bias": False,
    "layer_types": [],
}


def _paligemma_mismatch(model: SplitVLM) -> str | None:
    cfg = model.cfg
    reason = _shape_mismatch(cfg, "PaliGemma", _PALIGEMMA_SHAPE)
    if reason:
        return reason
    if type(model.vision) is not PackedSiglipVisionModel or cfg.vision.resize != "square":
        return "PaliGemma's vision tower is a SigLIP one on square images"
    if cfg.vision.feature_layer != 0:
        return "PaliGemma reads the tower's last_hidden_state (model.vision.feature_layer: 0)"
    return None


def _paligemma_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import GemmaConfig, PaliGemmaConfig  # seconds; only when exporting

    cfg = model.cfg
    text = {
        **_text_config(model, base),
        "rope_scaling": _rope_scaling(cfg),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
    }
    text.pop("model_type", None)
    hf = PaliGemmaConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=GemmaConfig(**text).to_dict(),
        image_token_index=_image_token(base, image_id, "PaliGemma"),
        vocab_size=cfg.vocab_size,
        projection_dim=cfg.d_model,
        hidden_size=cfg.d_model,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf.architectures = ["PaliGemmaForConditionalGeneration"]
    _save_vlm(model, out, "paligemma", _PALIGEMMA_PROJECTOR, hf)
    size = cfg.vision.image_size
    _save_image_processor(
        out,
        cfg,
        "SiglipImageProcessor",
        size={"height": size, "width": size},
        image_seq_length=cfg.square_grid[0] * cfg.square_grid[1],
    )


# -- Qwen2-VL ---------------------------------------------------------------------------------

# Qwen2-VL's image processor budget, when the checkpoint has no preprocessor_config.json.
_QWEN2_VL_PIXELS = (56 * 56, 28 * 28 * 1280)


def qwen2_vl_model_config(hf, path: Path | None = None) -> ModelConfig:
    """Our ModelConfig of a transformers Qwen2VLConfig: its ViT (packed, at the grid of
    `smart_resize` within the processor's pixel budget), its merger as the adaptor (image tokens
    of 2 × 2 patches), <|vision_start|> and <|vision_end|> around each image, M-RoPE (set from
    the language model's `mrope_section`), Qwen2."""
    vision = hf.vision_config
    if vision.hidden_act != "quick_gelu" or vision.mlp_ratio * vision.embed_dim % 1:
        raise ValueError("only Qwen2-VL's ViT (hidden_act: quick_gelu)")
    min_pixels, max_pixels = _QWEN2_VL_PIXELS
    processor = path / "preprocessor_config.json" if path else None
    if processor is not None and processor.is_file():
        config = json.loads(processor.read_text())
        size = config.get("size") or {}
        min_pixels = config.get("min_pixels", size.get("shortest_edge", min_pixels))
        max_pixels = config.get("max_pixels", size.get("longest_edge", max_pixels))
    token = vision.patch_size * vision.spatial_merge_size
    cfg = ModelConfig(
        num_text_in_blocks=0,
        num_image_in_blocks=0,
        num_text_head_blocks=0,
        num_image_head_blocks=0,
        image_attention="causal",
        image_markers=True,
        image_start_token="<|vision_start|>",
        image_end_token="<|vision_end|>",
        adaptor="qwen2_merger",
        mask_rate_min=0.0,
        mask_rate_max=0.0,
        vision=VisionConfig(
            tower="qwen2_vl",
            # Only the budget's default and the validation read it: the largest square side.
            image_size=max(token, int(math.sqrt(max_pixels)) // token * token),
            patch_size=vision.patch_size,
            spatial_merge=vision.spatial_merge_size,
            hidden_size=vision.embed_dim,
            num_layers=vision.depth,
            num_heads=vision.num_heads,
            resize="smart",
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            normalization="clip",
        ),
    )
    return cfg


def _qwen2_vl_prefixes(files: dict) -> tuple[str, str]:
    """(tower, merger) tensor prefixes: transformers' saved names, or its nested ones."""
    if any(name.startswith("model.visual.") for name in files):
        return "model.visual.", "model.visual.merger."
    return "visual.", "visual.merger."


def _import_qwen2_vl(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "qwen2_vl",
        lambda hf: qwen2_vl_model_config(hf, path),
        {},  # our Qwen2MergerAdaptor has transformers' names
        _qwen2_vl_prefixes,
    )


_QWEN2_VL_SHAPE = {
    **_DECODER_SHAPE,
    **_GATED_BLOCK,
    "image_attention": "causal",
    "image_markers": True,
    "image_row_break": False,
    "image_positions": "mrope",
    "adaptor": "qwen2_merger",
    "norm_style": "default",
    "post_norms": False,
    "scale_embeddings": False,
    "mlp_activation": "silu",
    "attention_scale": 0.0,
    "qk_norm": False,
    "attention_bias": True,
}


def _qwen2_vl_mismatch(model: SplitVLM) -> str | None:
    cfg = model.cfg
    reason = _shape_mismatch(cfg, "Qwen2-VL", _QWEN2_VL_SHAPE)
    if reason:
        return reason
    if type(model.vision) is not PackedQwen2VisionModel:
        return "Qwen2-VL's vision tower is its own ViT"
    if cfg.vision.feature_layer not in (0, -1):
        return "Qwen2-VL reads its ViT's last layer (model.vision.feature_layer: 0)"
    return None


def _qwen2_vl_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import AutoTokenizer, Qwen2VLConfig  # seconds; only when exporting

    cfg = model.cfg
    text = {
        **_text_config(model, base),
        "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
    }
    text.pop("model_type", None)
    text.pop("head_dim", None)  # Qwen2: hidden_size / heads
    ids = dict.fromkeys(("image_token_id", "vision_start_token_id", "vision_end_token_id"))
    ids.update({k: v for k, v in (base or {}).items() if k in ids})
    if None in ids.values() and (out / "tokenizer_config.json").is_file():
        vocab = AutoTokenizer.from_pretrained(str(out)).get_vocab()
        ids["vision_start_token_id"] = vocab.get(cfg.image_start_token)
        ids["vision_end_token_id"] = vocab.get(cfg.image_end_token)
        ids["image_token_id"] = image_id
    if None in ids.values():
        raise ValueError(
            "no Qwen2-VL image token ids: the export has neither the original config "
            f"({HF_CONFIG_FILE}) nor a tokenizer with the image tokens"
        )
    vision = {**model.vision.config.to_dict(), "hidden_size": cfg.d_model}
    hf = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    hf.architectures = ["Qwen2VLForConditionalGeneration"]
    _save_vlm(model, out, "qwen2_vl", {}, hf, prefixes=("visual.", "visual.merger."))
    min_pixels, max_pixels = cfg.vision.pixel_budget
    _save_image_processor(
        out,
        cfg,
        "Qwen2VLImageProcessor",
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=cfg.vision.patch_size,
        merge_size=cfg.vision.spatial_merge,
        temporal_patch_size=model.vision.config.temporal_patch_size,
    )


# -- Idefics3 ---------------------------------------------------------------------------------


def idefics3_model_config(hf, path: Path | None = None) -> ModelConfig:
    """Our ModelConfig of a transformers Idefics3Config or SmolVLMConfig: its SigLIP over square tiles
    (`model.vision.tiling: idefics3`, at the processor's longest edge), the pixel shuffle of
    `scale_factor` × `scale_factor` patches into one bias-free linear (`model.adaptor:
    pixel_shuffle`), Llama."""
    vision = hf.vision_config
    cfg = decoder_vlm_config("causal", "pixel_shuffle", vision, "idefics3", feature_layer=0)
    cfg.vision.normalization = "siglip"  # its processor's default mean and std, 0.5
    cfg.vision.spatial_merge = hf.scale_factor
    cfg.vision.tiling = "idefics3"
    processor = path / "preprocessor_config.json" if path else None
    if processor is not None and processor.is_file():
        config = json.loads(processor.read_text())
        tile = (config.get("max_image_size") or {}).get("longest_edge", vision.image_size)
        if tile != vision.image_size or not config.get("do_image_splitting", True):
            raise ValueError(
                f"{processor}: only image splitting into tiles of the tower's image_size "
                f"({vision.image_size}), not max_image_size {tile} or do_image_splitting false"
            )
        cfg.vision.tile_longest_edge = (config.get("size") or {}).get("longest_edge", 0)
    return cfg


def _fixed_prefixes(tower: str, projector: str):
    """`_import_vlm`'s `prefixes` for a class that saves under one set of names."""
    return lambda files: (tower, projector)


_idefics3_prefixes = _fixed_prefixes("model.vision_model.", "model.connector.")


# Our bias-free linear is the connector's `modality_projection.proj`.
_IDEFICS3_PROJECTOR = {"": "modality_projection.proj"}


def _import_idefics3(model_type: str):
    def read(path: Path, seed: int) -> SplitVLM:
        return _import_vlm(
            path,
            seed,
            model_type,
            lambda hf: idefics3_model_config(hf, path),
            _IDEFICS3_PROJECTOR,
            _idefics3_prefixes,
        )

    return read


_IDEFICS3_SHAPE = {
    **_LLAVA_SHAPE,
    "image_markers": False,
    "image_row_break": False,
    "adaptor": "pixel_shuffle",
    "vision.tiling": "idefics3",
    "vision.resize": "square",
    "vision.feature_layer": 0,
}
# Idefics3's design under its two transformers classes: model_type → (the name transformers
# gives its classes, our tower class). SmolVLM is Idefics3 with its own names.
_IDEFICS3_CLASSES = {"idefics3": ("Idefics3", Idefics3Tower), "smolvlm": ("SmolVLM", SmolVLMTower)}


def _idefics3_mismatch(model_type: str):
    name, tower = _IDEFICS3_CLASSES[model_type]

    def mismatch(model: SplitVLM) -> str | None:
        reason = _shape_mismatch(model.cfg, name, _IDEFICS3_SHAPE)
        if reason is None and type(model.vision) is not tower:
            return f"{name}'s vision tower is its own SigLIP ({tower.__name__})"
        return reason

    return mismatch


def _idefics3_export(model_type: str):
    name, _ = _IDEFICS3_CLASSES[model_type]

    def write(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
        import transformers  # seconds; only when exporting

        cfg = model.cfg
        hf = getattr(transformers, f"{name}Config")(
            vision_config=model.vision.config.to_dict(),
            text_config=_llama_layout_text_config(model, base).to_dict(),
            scale_factor=cfg.vision.spatial_merge,
            image_token_id=_image_token(base, image_id, name, key="image_token_id"),
            tie_word_embeddings=cfg.tie_embeddings,
        )
        hf.architectures = [f"{name}ForConditionalGeneration"]
        prefixes = _idefics3_prefixes({})
        _save_vlm(model, out, model_type, _IDEFICS3_PROJECTOR, hf, prefixes=prefixes)
        size = cfg.vision.image_size
        _save_image_processor(
            out,
            cfg,
            f"{name}ImageProcessor",
            do_resize=True,
            size={"longest_edge": cfg.vision.tile_longest_edge or 4 * size},
            do_image_splitting=True,
            max_image_size={"longest_edge": size},
            do_pad=True,
        )
        rows, cols = cfg.square_grid
        (out / "processor_config.json").write_text(
            json.dumps({"processor_class": f"{name}Processor", "image_seq_len": rows * cols})
        )

    return write


# -- DeepSeek-VL ------------------------------------------------------------------------------


def deepseek_vl_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers DeepseekVLConfig (DeepSeek-VL 1.3B's design): a SigLIP
    read at its last_hidden_state, the aligner (Linear-GELU-Linear: our `mlp` adaptor), Llama.
    Its processor's default pixel normalization is OpenAI CLIP's."""
    vision = hf.vision_config
    if vision.model_type != "siglip_vision_model":
        raise ValueError(f"a {vision.model_type!r} vision tower; supported: siglip_vision_model")
    cfg = decoder_vlm_config("causal", "mlp", vision, "siglip", feature_layer=0)
    cfg.vision.normalization = "clip"
    return cfg


# Our MLP adaptor's layers → the aligner's.
_DEEPSEEK_VL_ALIGNER = {"0": "linear1", "2": "linear2"}


_deepseek_vl_prefixes = _fixed_prefixes("model.vision_model.", "model.aligner.")


def _import_deepseek_vl(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "deepseek_vl",
        deepseek_vl_model_config,
        _DEEPSEEK_VL_ALIGNER,
        _deepseek_vl_prefixes,
    )


_DEEPSEEK_VL_SHAPE = {
    **_LLAVA_SHAPE,
    "image_markers": False,
    "image_row_break": False,
    "adaptor": "mlp",
    "vision.resize": "square",
    "vision.feature_layer": 0,
}


def _shape_and_tower_mismatch(design: str, shape: dict, tower: type, tower_text: str):
    """A design's `mismatch`: the first field of `shape` the model differs in, else its tower
    if that is not a `tower`."""

    def mismatch(model: SplitVLM) -> str | None:
        reason = _shape_mismatch(model.cfg, design, shape)
        if reason is None and type(model.vision) is not tower:
            return f"{design}'s vision tower is {tower_text}"
        return reason

    return mismatch


_deepseek_vl_mismatch = _shape_and_tower_mismatch(
    "DeepSeek-VL", _DEEPSEEK_VL_SHAPE, PackedSiglipVisionModel, "a SigLIP one"
)


def _deepseek_vl_export(
    model: SplitVLM, out: Path, base: dict | None, image_id: int | None
) -> None:
    from transformers import DeepseekVLConfig  # seconds; only when exporting

    cfg = model.cfg
    hf = DeepseekVLConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=_llama_layout_text_config(model, base).to_dict(),
        image_token_id=_image_token(base, image_id, "DeepSeek-VL", key="image_token_id"),
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf.architectures = ["DeepseekVLForConditionalGeneration"]
    prefixes = _deepseek_vl_prefixes({})
    _save_vlm(model, out, "deepseek_vl", _DEEPSEEK_VL_ALIGNER, hf, prefixes=prefixes)
    _save_padded_square_processor(out, cfg, "DeepseekVLImageProcessor")


def _save_padded_square_processor(out: Path, cfg: ModelConfig, processor_type: str) -> None:
    """DeepSeek-VL's and Janus's image processor: padded to a square, resized to image_size."""
    size = cfg.vision.image_size
    _save_image_processor(
        out,
        cfg,
        processor_type,
        size={"height": size, "width": size},
        do_resize=True,
        do_pad=True,
    )


# -- Fuyu -------------------------------------------------------------------------------------

# Fuyu's image processor fits images into this box (height, width) unless its config says other.
_FUYU_BOX = (1080, 1920)


def fuyu_model_config(hf, path: Path | None = None) -> ModelConfig:
    """Our ModelConfig of a transformers FuyuConfig: no encoder (`model.vision.tower: none`), each
    patch's (p, p, 3) pixels embedded by one linear with a bias (Fuyu's vision_embed_tokens as
    `model.adaptor: linear`), images at their own aspect ratio in whole patches with its
    |NEWLINE| token after every row (`model.image_row_break: all`), causal attention and 1-D
    positions over everything, a Persimmon LLM. The longest side is the processor's box's longer
    side (`path`'s preprocessor_config.json, else 1920)."""
    if hf.num_channels != 3:
        raise ValueError(f"num_channels={hf.num_channels}; only RGB (3) is supported")
    if hf.hidden_size != hf.text_config.hidden_size:
        raise ValueError(
            f"hidden_size={hf.hidden_size} (the patch embedding's) differs from the language "
            f"model's {hf.text_config.hidden_size}"
        )
    box = _FUYU_BOX
    processor = (path / "preprocessor_config.json") if path else None
    if processor is not None and processor.is_file():
        size = json.loads(processor.read_text()).get("size") or {}
        box = (size.get("height", box[0]), size.get("width", box[1]))
    longest = max(box)
    longest -= longest % hf.patch_size  # whole patches (1920 is 64 of Fuyu's 30 pixels)
    vision = VisionConfig(
        tower="none", image_size=longest, patch_size=hf.patch_size, resize="longest_side"
    )
    cfg = decoder_config("causal", "linear", vision)
    cfg.image_row_break, cfg.image_row_break_token = "all", "|NEWLINE|"
    return cfg


def _fuyu_prefixes(files: dict) -> tuple[str, str]:
    """(no tower, patch embedding) prefixes: transformers' saved names or its nested ones."""
    nested = "model.vision_embed_tokens.weight" in files
    patches = "model.vision_embed_tokens." if nested else "vision_embed_tokens."
    return patches, patches


def _import_fuyu(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "fuyu",
        lambda hf: fuyu_model_config(hf, path),
        projector={},  # our linear adaptor is the patch embedding, weight and bias
        prefixes=_fuyu_prefixes,
    )


_FUYU_SHAPE = {
    **_DECODER_SHAPE,
    "image_attention": "causal",
    "image_positions": "sequential",
    "image_markers": False,
    "image_row_break": "all",
    "adaptor": "linear",
    "vision.tower": "none",
    "vision.resize": "longest_side",
    "vision.spatial_merge": 1,
    "norm_style": "layernorm",
    "post_norms": False,
    "scale_embeddings": False,
    "mlp_gated": False,
    "mlp_activation": "relu2",
    "mlp_bias": True,
    "attention_bias": True,
    "attention_output_bias": True,
    "attention_scale": 0.0,
    "rope_llama3_factor": 0.0,
    "layer_types": [],
}


def _fuyu_mismatch(model: SplitVLM) -> str | None:
    cfg = model.cfg
    reason = _shape_mismatch(cfg, "Fuyu", _FUYU_SHAPE)
    if reason is None and cfg.num_kv_heads != cfg.num_heads:
        reason = f"model.num_kv_heads={cfg.num_kv_heads}, Fuyu's Persimmon has no GQA"
    return reason


def _fuyu_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import FuyuConfig, PersimmonConfig  # seconds; only when exporting

    cfg = model.cfg
    text = PersimmonConfig(
        **{
            **((base or {}).get("text_config") or {}),
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": model.core[0].mlp.up.out_features if cfg.num_core_blocks else 0,
            "num_hidden_layers": cfg.num_core_blocks,
            "num_attention_heads": cfg.num_heads,
            "hidden_act": "relu2",
            "layer_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": _rope_scaling(cfg),
            "qk_layernorm": cfg.qk_norm,
            "partial_rotary_factor": cfg.rope_fraction,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "tie_word_embeddings": cfg.tie_embeddings,
        }
    )
    hf = FuyuConfig(
        text_config=text.to_dict(),
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        patch_size=cfg.vision.patch_size,
        num_channels=3,
        image_token_id=_image_token(base, image_id, "Fuyu", key="image_token_id"),
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf.architectures = ["FuyuForCausalLM"]
    _save_vlm(model, out, "fuyu", {}, hf, prefixes=("", "vision_embed_tokens."))
    size, patch = cfg.vision.image_size, cfg.vision.patch_size
    _save_image_processor(
        out,
        cfg,
        "FuyuImageProcessor",
        size={"height": size, "width": size},
        patch_size={"height": patch, "width": patch},
        do_resize=True,
        do_pad=True,
        padding_value=1.0,
        padding_mode="constant",
    )


# -- DeepSeek-VL 7B (hybrid) ------------------------------------------------------------------


def deepseek_vl_hybrid_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers DeepseekVLHybridConfig: its SAM and SigLIP towers as one
    (`model.vision.tower: deepseek_hybrid`, `DeepseekHybridTower`), images loaded at SAM's size
    (`high_res_size`) and normalized as SAM's path is (CLIP's), the aligner (`hybrid_aligner`),
    Llama."""
    vision = hf.vision_config
    if vision.model_type != "siglip_vision_model":
        raise ValueError(f"a {vision.model_type!r} vision tower; supported: siglip_vision_model")
    cfg = decoder_vlm_config("causal", "hybrid_aligner", vision, "deepseek_hybrid", 0)
    cfg.vision.high_res_size = hf.high_res_vision_config.image_size
    cfg.vision.normalization = "clip"
    return cfg


def _deepseek_hybrid_tower_config(hf, path: Path) -> dict:
    """The tower's config; its SigLIP path normalized as the processor's `image_mean` and
    `image_std` say (transformers' default: CLIP's)."""
    return DeepseekHybridTowerConfig(
        vision_config=hf.vision_config.to_dict(),
        high_res_vision_config=hf.high_res_vision_config.to_dict(),
        low_res_normalization=_image_normalization(path) or "clip",
    ).to_dict()


_deepseek_vl_hybrid_prefixes = _fixed_prefixes("model.", "model.aligner.")


def _import_deepseek_vl_hybrid(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "deepseek_vl_hybrid",
        deepseek_vl_hybrid_model_config,
        {},  # our HybridAligner has transformers' names
        _deepseek_vl_hybrid_prefixes,
        tower_config=lambda hf: _deepseek_hybrid_tower_config(hf, path),
        processor_keys=("high_res_image_mean", "high_res_image_std"),  # the SAM path's
    )


_DEEPSEEK_VL_HYBRID_SHAPE = {
    **_DEEPSEEK_VL_SHAPE,
    "adaptor": "hybrid_aligner",
    "vision.tower": "deepseek_hybrid",
    "vision.normalization": "clip",
}


_deepseek_vl_hybrid_mismatch = _shape_and_tower_mismatch(
    "DeepSeek-VL 7B",
    _DEEPSEEK_VL_HYBRID_SHAPE,
    DeepseekHybridTower,
    "its SAM and SigLIP pair (DeepseekHybridTower)",
)


def _deepseek_vl_hybrid_export(
    model: SplitVLM, out: Path, base: dict | None, image_id: int | None
) -> None:
    from transformers import DeepseekVLHybridConfig  # seconds; only when exporting

    cfg, tower = model.cfg, model.vision.config
    hf = DeepseekVLHybridConfig(
        vision_config=tower.vision_config.to_dict(),
        high_res_vision_config=tower.high_res_vision_config.to_dict(),
        text_config=_llama_layout_text_config(model, base).to_dict(),
        image_token_id=_image_token(base, image_id, "DeepSeek-VL", key="image_token_id"),
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf.architectures = ["DeepseekVLHybridForConditionalGeneration"]
    prefixes = _deepseek_vl_hybrid_prefixes({})
    _save_vlm(model, out, "deepseek_vl_hybrid", {}, hf, prefixes=prefixes)
    size, high = cfg.vision.image_size, cfg.vision.high_res_size
    low_mean, low_std = PIXEL_NORMALIZATIONS[tower.low_res_normalization]
    _save_image_processor(
        out,
        cfg,
        "DeepseekVLHybridImageProcessor",
        size={"height": size, "width": size},
        high_res_size={"height": high, "width": high},
        high_res_image_mean=list(PIXEL_NORMALIZATIONS["clip"][0]),
        high_res_image_std=list(PIXEL_NORMALIZATIONS["clip"][1]),
        image_mean=list(low_mean),  # the low-resolution path's own
        image_std=list(low_std),
        do_resize=True,
        do_pad=True,
    )


# -- BLIP-2 -----------------------------------------------------------------------------------


def blip2_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers Blip2Config: its ViT and Q-Former as one tower
    (`model.vision.tower: blip2`, `Blip2QueryTower`) whose `num_query_tokens` outputs are every
    image's tokens (`model.vision.num_queries`), the language projection as our `linear`
    adaptor, causal attention, a decoder-only language model: OPT (the released checkpoints) or
    one of the Llama layout."""
    if not hf.use_decoder_only_language_model:
        raise ValueError(
            f"a {hf.text_config.model_type!r} (encoder-decoder) language model; only "
            "decoder-only ones are supported"
        )
    vision = hf.vision_config
    return decoder_config(
        "causal",
        "linear",
        VisionConfig(
            tower="blip2",
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_size=vision.hidden_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            num_queries=hf.num_query_tokens,
            normalization="clip",
        ),
    )


def _blip2_tower_config(hf) -> dict:
    return Blip2TowerConfig(
        vision_config=hf.vision_config.to_dict(),
        qformer_config=hf.qformer_config.to_dict(),
        num_query_tokens=hf.num_query_tokens,
        initializer_range=hf.initializer_range,
    ).to_dict()


# The tower's modules are at the top level.
_blip2_prefixes = _fixed_prefixes("", "language_projection.")


def _import_blip2(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "blip-2",
        blip2_model_config,
        projector={},  # our linear adaptor is the language projection
        prefixes=_blip2_prefixes,
        tower_config=_blip2_tower_config,
    )


_BLIP2_INPUTS = {
    "image_markers": False,
    "image_row_break": False,
    "adaptor": "linear",
    "vision.resize": "square",
    "vision.tower": "blip2",
}
_BLIP2_SHAPE = {**_LLAVA_SHAPE, **_BLIP2_INPUTS}
# With an OPT language model (the released checkpoints): learned positions, no RoPE.
_BLIP2_OPT_SHAPE = {
    **{k: v for k, v in _DECODER_SHAPE.items() if k != "learned_positions"},  # any table
    **_BLIP2_INPUTS,
    "image_attention": "causal",
    "image_positions": "sequential",
    "position_offset": 2,
    "rope_fraction": 0.0,
    "norm_style": "layernorm",
    "post_norms": False,
    "scale_embeddings": False,
    "mlp_gated": False,
    "mlp_activation": "relu",
    "mlp_bias": True,
    "attention_bias": True,
    "attention_output_bias": True,
    "attention_scale": 0.0,
    "qk_norm": False,
    "layer_types": [],
}


def _blip2_text_model(cfg: ModelConfig) -> str:
    """The kind of language model our BLIP-2 has: OPT (learned positions) or a Llama."""
    return "opt" if cfg.learned_positions else "llama"


def _blip2_mismatch(model: SplitVLM) -> str | None:
    cfg = model.cfg
    if _blip2_text_model(cfg) == "opt":
        reason = _shape_mismatch(cfg, "BLIP-2 (OPT)", _BLIP2_OPT_SHAPE)
        if reason is None and cfg.num_kv_heads != cfg.num_heads:
            reason = f"model.num_kv_heads={cfg.num_kv_heads}: OPT has no grouped-query attention"
    else:
        reason = _shape_mismatch(cfg, "BLIP-2", _BLIP2_SHAPE)
    if reason is None and type(model.vision) is not Blip2QueryTower:
        return "BLIP-2's vision tower is its ViT and Q-Former (Blip2QueryTower)"
    return reason


def _blip2_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import Blip2Config  # seconds; only when exporting

    cfg, tower = model.cfg, model.vision.config
    text_model = _blip2_text_model(cfg)
    text = _opt_text_config if text_model == "opt" else _llama_layout_text_config
    hf = Blip2Config(
        vision_config=tower.vision_config.to_dict(),
        qformer_config=tower.qformer_config.to_dict(),
        text_config=text(model, base).to_dict(),
        num_query_tokens=tower.num_query_tokens,
        image_token_index=_image_token(base, image_id, "BLIP-2"),
    )
    hf.architectures = ["Blip2ForConditionalGeneration"]
    family = language_model_family("blip-2", text_model)
    _save_vlm(model, out, family, {}, hf, prefixes=_blip2_prefixes({}))
    size = cfg.vision.image_size
    _save_image_processor(
        out,
        cfg,
        "BlipImageProcessor",
        size={"height": size, "width": size},
        do_resize=True,
        resample=3,  # bicubic
    )


# -- Chameleon ---------------------------------------------------------------------------------

_CHAMELEON_IMAGE_PREFIX = "IMGIMG"  # its vocabulary's names of image tokens: IMGIMG<code>Z


def chameleon_image_token_name(code: int) -> str:
    """The vocabulary name of VQ code `code` in Chameleon's tokenizer: its decimal digits as the
    letters A-J between IMGIMG and Z (transformers' `ChameleonImageVocabularyMapping`)."""
    return _CHAMELEON_IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def chameleon_vocabulary(vocabulary_map: dict[str, int], codebook_size: int) -> tuple[int, list]:
    """(the id of our code 0, their code of each of our codes): Chameleon's image tokens must be
    `codebook_size` consecutive ids, in whatever order of codes; ours are in id order."""
    codes = {}
    for name, token_id in vocabulary_map.items():
        if name.startswith(_CHAMELEON_IMAGE_PREFIX):
            digits = "".join(
                str(ord(c) - ord("A")) for c in name[len(_CHAMELEON_IMAGE_PREFIX) : -1]
            )
            codes[token_id] = int(digits)
    start = min(codes, default=0)
    if sorted(codes) != list(range(start, start + codebook_size)) or sorted(codes.values()) != list(
        range(codebook_size)
    ):
        raise ValueError(
            f"vocabulary_map: its {len(codes)} image tokens ({_CHAMELEON_IMAGE_PREFIX}…) are not "
            f"the {codebook_size} codes of the VQ-VAE at consecutive ids"
        )
    return start, [codes[start + ours] for ours in range(codebook_size)]


def chameleon_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers ChameleonConfig: its VQ-VAE as the tower
    (`model.vision.tower: chameleon_vq`), each code a vocabulary id (`model.adaptor:
    vocabulary`, `model.image_target: tokens`, trained as text: `image_loss_tokens: all`),
    <racm3:break> and <eoss> around every image, causal attention everywhere; its language
    model's fields come from the checkpoint (`_chameleon`)."""
    vq = hf.vq_config
    if vq.double_latent or vq.in_channels != 3 or vq.attn_type not in ("vanilla", None):
        raise ValueError("only a VQ-VAE of RGB images, single latent (double_latent false)")
    if hf.vocabulary_map is None:
        raise ValueError("no vocabulary_map (the image tokens' ids)")
    start, _ = chameleon_vocabulary(hf.vocabulary_map, vq.num_embeddings)
    vision = VisionConfig(
        tower="chameleon_vq",
        image_size=vq.resolution,
        patch_size=2 ** (len(vq.channel_multiplier) - 1),
        hidden_size=vq.base_channels,
        num_layers=vq.num_res_blocks,
        codebook_size=vq.num_embeddings,
        normalization="chameleon",
    )
    cfg = decoder_config("causal", "vocabulary", vision)
    cfg.image_target, cfg.image_loss_tokens, cfg.image_vocab_start = "tokens", "all", start
    cfg.image_markers, cfg.image_start_token, cfg.image_end_token = True, "<racm3:break>", "<eoss>"
    return cfg


def _import_chameleon(path: Path, seed: int) -> SplitVLM:
    model = _import_vlm(
        path,
        seed,
        "chameleon",
        chameleon_model_config,
        {},
        prefixes=_fixed_prefixes("model.vqmodel.", "model.vqmodel."),
        tower_config=lambda hf: hf.vq_config.to_dict(),
    )
    # Our codes are in vocabulary order: the codebook's rows follow.
    vocabulary_map = _read_config(path)["vocabulary_map"]
    _, their_codes = chameleon_vocabulary(vocabulary_map, model.vision.codebook_size)
    codebook = model.vision.quantize.embedding.weight
    with torch.no_grad():
        codebook.copy_(codebook[torch.tensor(their_codes)].clone())
    return model


_CHAMELEON_SHAPE = {
    **_LLAVA_SHAPE,
    "qk_norm": "per_head_layernorm",
    "rope_llama3_factor": 0.0,
    "image_target": "tokens",
    "adaptor": "vocabulary",
    "image_markers": True,
    "image_row_break": False,
    "vision.resize": "square",
}

_chameleon_mismatch = _shape_and_tower_mismatch(
    "Chameleon", _CHAMELEON_SHAPE, ChameleonVQTower, "its VQ-VAE"
)


def _chameleon_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import ChameleonConfig  # seconds; only when exporting

    cfg = model.cfg
    # The imported names of every token, with the image tokens named after our codes (our
    # codebook is in vocabulary order) and <image> the id transformers finds images by.
    vocabulary_map = {
        name: token_id
        for name, token_id in ((base or {}).get("vocabulary_map") or {}).items()
        if not name.startswith(_CHAMELEON_IMAGE_PREFIX)
    }
    vocabulary_map["<image>"] = vocabulary_map.get("<image>", image_id)
    if vocabulary_map["<image>"] is None:
        raise ValueError(
            f"no image token id: the export has neither the original Chameleon config "
            f"({HF_CONFIG_FILE}) nor a tokenizer with an <image> or a pad token"
        )
    for code, token_id in enumerate(model.image_vocabulary):
        vocabulary_map[chameleon_image_token_name(code)] = token_id
    text = {**_text_config(model, base), "head_dim": None}
    text.pop("model_type", None)
    text.pop("text_config", None)
    ours = ("vq_config", "vocabulary_map", "rope_scaling", "swin_norm", "tie_word_embeddings")
    skipped = ("model_type", "architectures", "transformers_version", "image_token_id", *ours)
    base_fields = {k: v for k, v in (base or {}).items() if k not in skipped}
    hf = ChameleonConfig(
        **{**base_fields, **{k: v for k, v in text.items() if v is not None}},
        rope_scaling=(
            {"type": "linear", "factor": cfg.rope_linear_factor} if cfg.rope_linear_factor else None
        ),
        swin_norm=cfg.swin_norm,
        tie_word_embeddings=cfg.tie_embeddings,
        vq_config=model.vision.config.to_dict(),
        vocabulary_map=vocabulary_map,
    )
    hf.architectures = ["ChameleonForConditionalGeneration"]
    _save_vlm(model, out, "chameleon", {}, hf, prefixes=("model.vqmodel.", "model.vqmodel."))
    size = cfg.vision.image_size
    _save_image_processor(
        out,
        cfg,
        "ChameleonImageProcessor",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_resize=True,
        rescale_factor=PIXEL_RESCALE["chameleon"],
    )


# -- Janus ------------------------------------------------------------------------------------


def janus_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers JanusConfig: its ViT and VQ-VAE as one tower
    (`model.vision.tower: janus`, `JanusTower`), the understanding aligner as our `mlp` adaptor,
    the generation path's codes as image tokens (`model.image_target: tokens`, its embedding,
    aligner and head: `JanusGeneration`), <begin_of_image> and <end_of_image> around every image,
    Llama. Its processor's default normalization is OpenAI CLIP's."""
    vision, vq, width = hf.vision_config, hf.vq_config, hf.text_config.hidden_size
    if vision.depth != 2 or vision.hidden_act != "gelu":
        raise ValueError(
            f"an aligner of depth {vision.depth} with {vision.hidden_act!r}; supported: depth 2, "
            "gelu (Linear-GELU-Linear)"
        )
    if vq.double_latent or vq.in_channels != 3:
        raise ValueError("only a VQ-VAE of RGB images, single latent (double_latent false)")
    widths = (vision.projection_dim, vq.projection_dim, vq.image_token_embed_dim)
    if any(w != width for w in widths):
        raise ValueError(
            f"the aligners' projection_dim and the generation head's image_token_embed_dim "
            f"{widths} must be the language model's hidden_size ({width})"
        )
    cfg = decoder_vlm_config("causal", "mlp", vision, "janus", feature_layer=0)
    cfg.vision.codebook_size = vq.num_embeddings
    cfg.image_target = "tokens"
    cfg.image_markers = True
    cfg.image_start_token, cfg.image_end_token = "<begin_of_image>", "<end_of_image>"
    return cfg


# Our MLP adaptor's layers → the understanding aligner's.
_JANUS_ALIGNER = {"0": "fc1", "2": "hidden_layers.0"}


def _janus_tower_config(hf) -> dict:
    return JanusTowerConfig(
        vision_config=hf.vision_config.to_dict(), vq_config=hf.vq_config.to_dict()
    ).to_dict()


def _import_janus(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "janus",
        janus_model_config,
        _JANUS_ALIGNER,
        _fixed_prefixes("model.", "model.aligner."),
        tower_config=_janus_tower_config,
        modules={"generation": "model."},
    )


_JANUS_SHAPE = {
    **_DEEPSEEK_VL_SHAPE,
    "image_markers": True,
    "image_target": "tokens",
    "vision.tower": "janus",
}

_janus_mismatch = _shape_and_tower_mismatch(
    "Janus", _JANUS_SHAPE, JanusTower, "its ViT and VQ-VAE (JanusTower)"
)


def _janus_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import JanusConfig  # seconds; only when exporting

    cfg, tower = model.cfg, model.vision.config
    aligner_layers = 1 + len(model.generation.generation_aligner.hidden_layers)
    hf = JanusConfig(
        text_config=_llama_layout_text_config(model, base).to_dict(),
        vision_config={**tower.vision_config.to_dict(), "projection_dim": cfg.d_model, "depth": 2},
        vq_config={
            **tower.vq_config.to_dict(),
            "projection_dim": cfg.d_model,
            "image_token_embed_dim": cfg.d_model,
            "num_hidden_layers": aligner_layers,
        },
        image_token_id=_image_token(base, image_id, "Janus", key="image_token_id"),
        tie_word_embeddings=cfg.tie_embeddings,
    )
    hf.architectures = ["JanusForConditionalGeneration"]
    generation = {f"generation.{name}": f"model.{name}" for name in model.generation.state_dict()}
    _save_vlm(
        model, out, "janus", _JANUS_ALIGNER, hf, ("model.", "model.aligner."), extra=generation
    )
    _save_padded_square_processor(out, cfg, "JanusImageProcessor")


# -- LLaMA-3.2-Vision ---------------------------------------------------------------------------


def mllama_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers MllamaConfig: its tiled ViT as our tower
    (`model.vision.tower: mllama`, `MllamaTower`: each image tiled as its processor tiles it,
    `tiling: mllama`, in its max_num_tiles slots), its projector as our `linear` adaptor, the images cross-attended by its
    cross-attention layers (set from the text config with the language model: `_mllama_text`),
    each standing in the sequence as its <|image|> token. Its processor normalizes as OpenAI
    CLIP does."""
    vision = hf.vision_config
    if [1, 1] not in [list(ratio) for ratio in vision.supported_aspect_ratios]:
        raise ValueError("supported_aspect_ratios lacks [1, 1] (an image of one tile)")
    cfg = decoder_config(
        "causal",
        "linear",
        VisionConfig(
            tower="mllama",
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_size=vision.hidden_size,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.attention_heads,
            max_num_tiles=vision.max_num_tiles,
            tiling="mllama",
            normalization="clip",
        ),
    )
    cfg.image_markers, cfg.image_start_token = "start", "<|image|>"
    cfg.image_target = "none"
    return cfg


def _mllama_prefixes(files: dict) -> tuple[str, str]:
    """(vision tower, projector) tensor prefixes: transformers' saved names, or its nested ones."""
    if any(name.startswith("model.vision_model.") for name in files):
        return "model.vision_model.", "model.multi_modal_projector."
    return "vision_model.", "multi_modal_projector."


def _import_mllama(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path, seed, "mllama", mllama_model_config, projector={}, prefixes=_mllama_prefixes
    )


_MLLAMA_SHAPE = {
    **_LLAVA_SHAPE,
    "image_markers": "start",
    "image_row_break": False,
    "image_target": "none",
    "adaptor": "linear",
    "vision.resize": "square",
    "vision.tower": "mllama",
    "vision.tiling": "mllama",
}


def _mllama_mismatch(model: SplitVLM) -> str | None:
    reason = _shape_and_tower_mismatch(
        "LLaMA-3.2-Vision", _MLLAMA_SHAPE, MllamaTower, "its tiled ViT (MllamaTower)"
    )(model)
    cfg = model.cfg
    if reason is None and cfg.vocab_size - cfg.lm_head_size not in (0, 8):
        return (
            f"model.vocab_size={cfg.vocab_size} with an LM head of {cfg.lm_head_size} rows; "
            "LLaMA-3.2-Vision's embedding has 8 rows more than its LM head"
        )
    return reason


def _mllama_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import MllamaConfig  # seconds; only when exporting

    cfg = model.cfg
    base_text = (base or {}).get("text_config") or {}
    text = {
        **_text_config(model, base),
        "model_type": "mllama_text_model",
        # A padding row only shapes an embedding's gradient; none unless the import had one.
        "pad_token_id": base_text.get("pad_token_id"),
        "vocab_size": cfg.lm_head_size,
        "cross_attention_layers": list(cfg.cross_attention_layers),
        "rope_scaling": _rope_scaling(cfg) or {"rope_type": "default"},
        "tie_word_embeddings": False,
    }
    hf = MllamaConfig(
        vision_config=model.vision.config.to_dict(),
        text_config=text,
        image_token_index=_image_token(base, image_id, "LLaMA-3.2-Vision"),
    )
    hf.architectures = ["MllamaForConditionalGeneration"]

    def pad_embedding(tensors: dict) -> None:
        # Its embedding has 8 rows past the LM head's: zeros where ours ends there (<|image|>
        # and the rest of our vocabulary are then within the LM head's rows).
        embed = SUPPORTED_LLMS["mllama"].embed
        missing = cfg.lm_head_size + 8 - tensors[embed].shape[0]
        if missing:
            tensors[embed] = torch.cat(
                [tensors[embed], tensors[embed].new_zeros(missing, cfg.d_model)]
            )

    _save_vlm(model, out, "mllama", {}, hf, _mllama_prefixes({}), adjust=pad_embedding)
    size = cfg.vision.image_size
    _save_image_processor(
        out,
        cfg,
        "MllamaImageProcessor",
        size={"height": size, "width": size},
        max_image_tiles=cfg.vision.max_num_tiles,
        do_resize=True,
        do_pad=True,
        do_convert_rgb=True,
        resample=2,  # bilinear
    )


# -- Flamingo (transformers' Idefics) -------------------------------------------------------------


def idefics_model_config(hf) -> ModelConfig:
    """Our ModelConfig of a transformers IdeficsConfig: its ViT and perceiver resampler as our
    tower (`model.vision.tower: idefics`, `IdeficsTower`, the resampler's latents each image's
    keys), read at the tower's width (`identity` adaptor) by its gated cross-attention layers
    (set with the language model: `_idefics`), each image standing in the sequence as its
    <image> token. Its processor normalizes as OpenAI CLIP does."""
    vision = hf.vision_config
    cfg = decoder_config(
        "causal",
        "identity",
        VisionConfig(
            tower="idefics",
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_size=vision.embed_dim,
            num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            num_queries=hf.perceiver_config.resampler_n_latents if hf.use_resampler else 0,
            normalization="clip",
        ),
    )
    cfg.image_markers, cfg.image_start_token = "start", "<image>"
    cfg.image_target = "none"
    return cfg


def _idefics_tower_config(hf) -> dict:
    return {
        "model_type": "idefics_tower",
        "vision_config": hf.vision_config.to_dict(),
        "perceiver_config": hf.perceiver_config.to_dict(),
        "use_resampler": hf.use_resampler,
        "initializer_range": hf.initializer_range,
    }


def _import_idefics(path: Path, seed: int) -> SplitVLM:
    return _import_vlm(
        path,
        seed,
        "idefics",
        idefics_model_config,
        projector={},
        prefixes=lambda files: ("model.", ""),
        tower_config=_idefics_tower_config,
    )


_IDEFICS_SHAPE = {
    **_MLLAMA_SHAPE,
    "vision.tiling": "none",
    "adaptor": "identity",
    "vision.tower": "idefics",
    "cross_attention_style": "flamingo",
    "lm_head_rows": 0,
    "tie_embeddings": False,
    "rope_theta": 10000.0,
    "rope_linear_factor": 0.0,
    "rope_llama3_factor": 0.0,
}


def _idefics_interval(cfg: ModelConfig) -> int | None:
    """Idefics' cross_layer_interval of our core (its cross-attention block j at index
    j · (interval + 1), one before every interval-th of a multiple of interval layers), None if
    there is none."""
    crosses, num_core = cfg.cross_attention_layers, cfg.num_core_blocks
    num_layers = num_core - len(crosses)
    for interval in range(1, num_layers + 1):
        every = [j * (interval + 1) for j in range(num_layers // interval)]
        if num_layers % interval == 0 and every == crosses:
            return interval
    return None


def _idefics_mismatch(model: SplitVLM) -> str | None:
    reason = _shape_and_tower_mismatch(
        "Idefics", _IDEFICS_SHAPE, IdeficsTower, "its ViT and perceiver (IdeficsTower)"
    )(model)
    cfg = model.cfg
    if reason is None and (
        cfg.num_kv_heads != cfg.num_heads or cfg.head_dim * cfg.num_heads != cfg.d_model
    ):
        return "Idefics' attention has as many key/value heads as query heads, d_model wide"
    if reason is None and _idefics_interval(cfg) is None:
        return (
            f"model.cross_attention_layers={cfg.cross_attention_layers}: Idefics has one before "
            "every cross_layer_interval-th layer (indices j · (interval + 1))"
        )
    return reason


def _idefics_export(model: SplitVLM, out: Path, base: dict | None, image_id: int | None) -> None:
    from transformers import IdeficsConfig  # seconds; only when exporting

    cfg, base = model.cfg, dict(base or {})
    vocab = min(base.get("vocab_size", cfg.vocab_size), cfg.vocab_size)
    tower = model.vision.config
    hf = IdeficsConfig(
        **{
            **base,
            "vocab_size": vocab,
            "additional_vocab_size": cfg.vocab_size - vocab,
            "hidden_size": cfg.d_model,
            "intermediate_size": model.core[-1].mlp.up.out_features,
            "num_hidden_layers": cfg.num_core_blocks - len(cfg.cross_attention_layers),
            "num_attention_heads": cfg.num_heads,
            "rms_norm_eps": cfg.norm_eps,
            "cross_layer_interval": _idefics_interval(cfg),
            "qk_layer_norms": cfg.cross_attention_qk_norm,
            "alpha_type": "vector" if cfg.cross_attention_gate == "vector" else "float",
            "tie_word_embeddings": False,
            "use_resampler": tower.use_resampler,
            "vision_config": tower.vision_config.to_dict(),
            "perceiver_config": {
                **tower.perceiver_config.to_dict(),
                "use_resampler": tower.use_resampler,
            },
        }
    )
    hf.architectures = ["IdeficsForVisionText2Text"]
    family = SUPPORTED_LLMS["idefics"]

    def decouple(tensors: dict) -> None:
        # Its embedding and LM head: the first vocab_size rows, then the additional ones.
        for name, continued in (
            (family.embed, family.embed_continued),
            (family.lm_head, family.lm_head_continued),
        ):
            if cfg.vocab_size > vocab:
                tensors[continued] = tensors[name][vocab:]
            tensors[name] = tensors[name][:vocab]

    _save_vlm(model, out, family, {}, hf, ("model.", ""), adjust=decouple)
    _save_image_processor(
        out, cfg, "IdeficsImageProcessor", image_size=cfg.vision.image_size, image_num_channels=3
    )


HF_DESIGNS = {
    "llava": HFDesign(
        transformers_class="LlavaForConditionalGeneration",
        import_checkpoint=_import_llava,
        export_checkpoint=_llava_export,
        mismatch=_llava_mismatch,
    ),
    "llava_next": HFDesign(
        transformers_class="LlavaNextForConditionalGeneration",
        import_checkpoint=_import_llava_next,
        export_checkpoint=_llava_next_export,
        mismatch=_llava_next_mismatch,
    ),
    "paligemma": HFDesign(
        transformers_class="PaliGemmaForConditionalGeneration",
        import_checkpoint=_import_paligemma,
        export_checkpoint=_paligemma_export,
        mismatch=_paligemma_mismatch,
    ),
    "mistral3": HFDesign(
        transformers_class="Mistral3ForConditionalGeneration",
        import_checkpoint=_import_mistral3,
        export_checkpoint=_mistral3_export,
        mismatch=_mistral3_mismatch,
    ),
    "qwen2_vl": HFDesign(
        transformers_class="Qwen2VLForConditionalGeneration",
        import_checkpoint=_import_qwen2_vl,
        export_checkpoint=_qwen2_vl_export,
        mismatch=_qwen2_vl_mismatch,
    ),
    "deepseek_vl": HFDesign(
        transformers_class="DeepseekVLForConditionalGeneration",
        import_checkpoint=_import_deepseek_vl,
        export_checkpoint=_deepseek_vl_export,
        mismatch=_deepseek_vl_mismatch,
    ),
    "deepseek_vl_hybrid": HFDesign(
        transformers_class="DeepseekVLHybridForConditionalGeneration",
        import_checkpoint=_import_deepseek_vl_hybrid,
        export_checkpoint=_deepseek_vl_hybrid_export,
        mismatch=_deepseek_vl_hybrid_mismatch,
    ),
    "blip-2": HFDesign(
        transformers_class="Blip2ForConditionalGeneration",
        import_checkpoint=_import_blip2,
        export_checkpoint=_blip2_export,
        mismatch=_blip2_mismatch,
    ),
    "janus": HFDesign(
        transformers_class="JanusForConditionalGeneration",
        import_checkpoint=_import_janus,
        export_checkpoint=_janus_export,
        mismatch=_janus_mismatch,
    ),
    "chameleon": HFDesign(
        transformers_class="ChameleonForConditionalGeneration",
        import_checkpoint=_import_chameleon,
        export_checkpoint=_chameleon_export,
        mismatch=_chameleon_mismatch,
    ),
    "mllama": HFDesign(
        transformers_class="MllamaForConditionalGeneration",
        import_checkpoint=_import_mllama,
        export_checkpoint=_mllama_export,
        mismatch=_mllama_mismatch,
    ),
    "idefics": HFDesign(
        transformers_class="IdeficsForVisionText2Text",
        import_checkpoint=_import_idefics,
        export_checkpoint=_idefics_export,
        mismatch=_idefics_mismatch,
    ),
    "fuyu": HFDesign(
        transformers_class="FuyuForCausalLM",
        import_checkpoint=_import_fuyu,
        export_checkpoint=_fuyu_export,
        mismatch=_fuyu_mismatch,
    ),
    **{
        model_type: HFDesign(
            transformers_class=f"{name}ForConditionalGeneration",
            import_checkpoint=_import_idefics3(model_type),
            export_checkpoint=_idefics3_export(model_type),
            mismatch=_idefics3_mismatch(model_type),
        )
        for model_type, (name, _) in _IDEFICS3_CLASSES.items()
    },
}
