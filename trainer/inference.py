"""Inference on one device: load a checkpoint, generate text (greedy) or images (coarse to fine),
and evaluate on a held-out split."""

from __future__ import annotations

import dataclasses
import io
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import yaml
from models.batch import IGNORE_INDEX
from models.pretrained import build_split_vlm
from models.split_vlm import SplitVLM, image_loss, pool_grid
from trainer.checkpoint import resolve_checkpoint
from trainer.config import Config, config_from_dict
from trainer.data.decode import Document, SampleDecoder, load_tokenizer, tokenizer_dir
from trainer.data.grounding import GROUNDING_TOKENS, grounding_hits
from trainer.data.packing import collate, layout_options
from trainer.data.shards import IMAGE_PLACEHOLDER, pack_blobs


def find_weights(path: Path) -> Path:
    """The weights file of an exported model directory, or of a run's or step directory's
    complete checkpoint (`resolve_checkpoint`: the one resume would take)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path / "model.safetensors"
    step_dir = resolve_checkpoint(path)
    weights = step_dir / "engine" / "model.safetensors"
    if not weights.is_file():
        raise ValueError(
            f"{step_dir} is a sharded checkpoint; export it first "
            f"(splitvlm export {step_dir} --out DIR) and use DIR"
        )
    return weights


def load_for_inference(path: Path, device: str = "cpu") -> tuple[SplitVLM, Config, SampleDecoder]:
    """The model, a config (the run's, or defaults around an export's model config) and a
    decoder. An export has no data path: set `cfg.data.path` before evaluating."""
    weights = find_weights(path)
    if (weights.parent / "vision_config.json").is_file():  # written by `splitvlm export`
        model = SplitVLM.from_pretrained(weights.parent, device).eval()
        cfg = Config(model=model.cfg)
        cfg.data.path = ""
        tokenizer = load_tokenizer(weights.parent / "tokenizer", model.cfg)
        return model, cfg, SampleDecoder(tokenizer, cfg.model, max_tokens=UNLIMITED_TOKENS)
    config_file = next(
        (
            p / "config.yaml"
            for p in (weights.parent, weights.parent.parent)
            if (p / "config.yaml").is_file()
        ),
        None,
    )
    if config_file is None:
        raise ValueError(f"no config.yaml next to {weights}")
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()))
    tokenizer = load_tokenizer(tokenizer_dir(cfg.data), cfg.model)
    # The weights replace every parameter, so skip loading the pretrained LLM a second time.
    cfg.model.pretrained_llm = ""
    model = build_split_vlm(cfg.model)
    model.load_state_dict(load_file(str(weights), device=device))
    model.to(device).eval()
    return (
        model,
        cfg,
        SampleDecoder(tokenizer, cfg.model, max_tokens=UNLIMITED_TOKENS, seed=cfg.run.seed),
    )


# Inference decodes one sample at a time, without the training run's per-micro-batch budget.
UNLIMITED_TOKENS = 1 << 30


def model_device(model: SplitVLM) -> torch.device:
    return next(model.parameters()).device


def extend(doc: Document, token_ids: list[int]) -> Document:
    """`doc` with `token_ids` appended as text, as loss targets: generated tokens are the
    answer, which prefix-LM attention (`model.image_attention: prefix`) keeps causal."""
    new = torch.tensor(token_ids, dtype=torch.long)
    segments = list(doc.segments)
    kind, length = segments[-1]
    if kind == "text":
        segments[-1] = ("text", length + len(token_ids))
    else:
        segments.append(("text", len(token_ids)))
    return Document(
        sample_id=doc.sample_id,
        input_ids=torch.cat([doc.input_ids, new]),
        target_mask=torch.cat([doc.target_mask, torch.ones(len(token_ids), dtype=torch.bool)]),
        segments=segments,
        pixel_values=doc.pixel_values,
        image_mask=doc.image_mask,
        image_span_full=doc.image_span_full,
    )


@torch.no_grad()
def generate_text(
    model: SplitVLM, decoder: SampleDecoder, prompts: list[Document], max_new_tokens: int = 16
) -> list[list[int]]:
    """Greedy completions of many prompts at once, packed into one sequence per step (no KV
    cache: the prompts here are short, and packing keeps every step a single forward)."""
    eos = decoder.tokenizer.eos_token_id
    docs, outputs = list(prompts), [[] for _ in prompts]
    active = list(range(len(prompts)))
    cfg = model.cfg
    for _ in range(max_new_tokens):
        if not active:
            break
        batch = collate([docs[i] for i in active], **layout_options(cfg, model_device(model)))
        trunk = model.trunk(batch)
        last = batch.layout.cu_seqlens[1:].long() - 1
        next_ids = model.text_logits(batch, trunk, last).argmax(dim=-1).tolist()
        still = []
        for i, token in zip(active, next_ids, strict=True):
            if token == eos:
                continue
            outputs[i].append(token)
            docs[i] = extend(docs[i], [token])
            still.append(i)
        active = still
    return outputs


def answer_text(tokenizer, token_ids: list[int], cfg) -> str:
    """A generated answer as text: special tokens dropped, but the grounding tags kept with
    `model.grounding` (`trainer.data.grounding.parse_boxes` reads them back as boxes)."""
    keep = set(tokenizer.convert_tokens_to_ids(list(GROUNDING_TOKENS))) if cfg.grounding else set()
    special = set(tokenizer.all_special_ids) - keep
    kept = [token for token in token_ids if token not in special]
    return tokenizer.decode(kept, skip_special_tokens=False).strip()


@torch.no_grad()
def evaluate(
    model: SplitVLM, cfg: Config, decoder: SampleDecoder, split: str = "heldout", limit: int = 0
):
    """Exact-match accuracy of greedy answers per prompt, and teacher-forced text loss."""
    from streaming import StreamingDataset

    from trainer.data.shards import check_split_dir

    if not cfg.data.path:
        raise ValueError("an exported model has no data path: pass --data DIR")
    local = Path(cfg.data.path) / split
    check_split_dir(local)
    dataset = StreamingDataset(local=str(local), shuffle=False, batch_size=1)
    count = len(dataset) if limit <= 0 else min(limit, len(dataset))
    samples = [dataset[i] for i in range(count)]
    tokenizer = decoder.tokenizer
    correct, total = defaultdict(int), defaultdict(int)
    box_hits = box_count = 0  # reference boxes, and those answered at IoU >= 0.5
    loss_sum, loss_count = 0.0, 0
    conversations = [
        (i, s)
        for i, s in enumerate(samples)
        if s["messages"] and IMAGE_PLACEHOLDER not in s["messages"][-1]["content"]
    ]
    for start in range(0, len(conversations), 64):
        chunk = conversations[start : start + 64]
        prompts = [decoder(sample, i, prompt_only=True) for i, sample in chunk]
        answers = generate_text(model, decoder, prompts)
        for (_, sample), answer in zip(chunk, answers, strict=True):
            prompt = sample["messages"][0]["content"].replace(IMAGE_PLACEHOLDER, "").strip()
            if model.cfg.grounding:  # the reference's boxes as the model writes them
                sample = decoder.with_box_bins(sample)
            reference = sample["messages"][-1]["content"].strip()
            generated = answer_text(tokenizer, answer, model.cfg)
            total[prompt] += 1
            correct[prompt] += int(generated == reference)
            if model.cfg.grounding:
                hits, count = grounding_hits(generated, reference)
                box_hits, box_count = box_hits + hits, box_count + count
    # Teacher-forced losses, with the training masks (seeded per sample, so the same every eval).
    image_loss_sum, predictions_and_targets, image_token_count = 0.0, [], 0
    for start in range(0, count, 64):
        docs = [decoder(samples[i], i) for i in range(start, min(start + 64, count))]
        batch = collate(docs, **layout_options(model.cfg, model_device(model)))
        trunk = model.trunk(batch)
        positions = (batch.labels != IGNORE_INDEX).nonzero().squeeze(1)
        logits = model.text_logits(batch, trunk, positions).float()
        loss_sum += float(F.cross_entropy(logits, batch.labels[positions], reduction="sum"))
        loss_count += batch.num_text_targets
        if model.cfg.image_target == "tokens" and trunk.image_targets is not None:
            hidden = model.text_hidden(batch, trunk)  # codes: a cross-entropy
            image_loss_sum += float(model.image_token_loss(batch, trunk, hidden))
            image_token_count += batch.num_image_targets(model.cfg.image_loss_tokens)
        elif trunk.image_targets is not None and bool(batch.image_mask.any()):
            _, _, prediction, target = model.masked_image_predictions(batch, trunk)
            image_loss_sum += float(image_loss(prediction, target, model.cfg.image_loss))
            predictions_and_targets.append(target)
    image = {}
    if image_token_count:
        image = {"image_loss": image_loss_sum / image_token_count}
    if predictions_and_targets:
        targets = torch.cat(predictions_and_targets)
        # The baseline a model must beat: always predicting the mean masked target.
        mean_target = targets.mean(dim=0, keepdim=True).expand_as(targets)
        image = {
            "image_loss": image_loss_sum / len(targets),
            "image_loss_mean_baseline": float(
                image_loss(mean_target, targets, model.cfg.image_loss)
            )
            / len(targets),
        }
    accuracy = {prompt: correct[prompt] / total[prompt] for prompt in sorted(total)}
    answered = sum(total.values())
    return {
        "samples": count,
        "questions": answered,
        "exact_match": sum(correct.values()) / answered if answered else None,
        "exact_match_by_prompt": accuracy,
        "text_loss": loss_sum / max(loss_count, 1),
        **image,
        **({"box_accuracy_iou50": box_hits / box_count} if box_count else {}),
    }


@torch.no_grad()
def generate_image(
    model: SplitVLM,
    decoder: SampleDecoder,
    prompt: str,
    seed: int = 0,
    size: tuple[int, int] | None = None,
    guidance_scale: float = 5.0,
) -> tuple[Image.Image, list[Image.Image]]:
    """Fill 100%-masked image spans coarse to fine; returns the final image and each scale's.
    A Janus model samples its codes instead (`generate_code_image`, with `guidance_scale`).

    Each span is predicted (diffusion sampler if the model has one, else the regression head),
    turned back into pixels, re-encoded by the vision tower at its scale and fed in unmasked —
    so every finer span is conditioned on the coarser ones. `size` (width, height): the image
    to generate, for native-resolution models (rounded to their grid of patches).
    """
    cfg = model.cfg
    if size is not None and not cfg.vision.native:
        raise ValueError(
            "--size needs a native-resolution model (model.vision.resize=native); this one "
            f"makes {cfg.vision.image_size}x{cfg.vision.image_size} images"
        )
    if model.generation is not None:
        return generate_code_image(model, decoder, prompt, seed, guidance_scale)
    if cfg.image_target != "pixels":
        raise ValueError(
            "image generation needs model.image_target=pixels, or Janus's generation path "
            "(model.vision.tower: janus)"
        )
    if cfg.vision.tiling != "none":
        raise ValueError("image generation fills one image, not tiles (model.vision.tiling)")
    patch = cfg.vision.token_size
    doc = image_prompt(decoder, prompt, size or (cfg.vision.image_size, cfg.vision.image_size))
    (grid,) = doc.image_grids
    spans = cfg.image_spans(grid)
    doc.image_mask = torch.ones_like(doc.image_mask)
    batch = collate([doc], **layout_options(cfg, model_device(model)))
    tokens = torch.zeros(cfg.num_image_tokens(grid), cfg.d_model)
    generator = torch.Generator().manual_seed(seed)
    scales, offset = [], 0
    for index, (span_grid, is_copy) in enumerate(spans):
        num_span_tokens = span_grid[0] * span_grid[1]
        span = torch.arange(offset, offset + num_span_tokens)
        offset += num_span_tokens
        if is_copy:
            continue
        trunk = model.trunk(batch, image_tokens=tokens)
        condition = model.image_condition(batch, trunk, span)
        if model.diffusion is not None:
            patches = model.diffusion.sample(condition, model.target_dim, generator)
        else:
            patches = model.image_head(condition)
        small = unpatchify(patches.clamp(-1, 1), span_grid, patch)
        scales.append(to_pil(small))
        full = F.interpolate(
            small[None],
            size=(grid[0] * patch, grid[1] * patch),
            mode="bilinear",
            align_corners=False,
        )
        features = model.encode_images(full)
        adapted = model.adaptor(pool_grid(features, grid, span_grid))[0]
        filled = [span]
        if index + 1 < len(spans) and spans[index + 1][1]:  # its dual copy comes next
            filled.append(span + num_span_tokens)
        for target in filled:
            tokens[target] = adapted
            batch.image_mask[target] = False
    return scales[-1], scales


def image_prompt(decoder: SampleDecoder, prompt: str, size: tuple[int, int]) -> Document:
    """`prompt` as a user turn and a blank image of `size` (width, height) as the assistant's:
    the document an image is generated into."""
    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="PNG")
    sample = {
        "text": "",
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": IMAGE_PLACEHOLDER},
        ],
        "images": pack_blobs([buffer.getvalue()]),
    }
    return decoder(sample, 0)


def generate_code_image(
    model: SplitVLM,
    decoder: SampleDecoder,
    prompt: str,
    seed: int = 0,
    guidance_scale: float = 5.0,
    greedy: bool = False,
) -> tuple[Image.Image, list[Image.Image]]:
    """Janus's image generation from a text prompt: `generate_codes` on the prompt as a user
    turn with the image as the assistant's, then its VQ-VAE's decoder → (the image, [it])."""
    cfg = model.cfg
    doc = image_prompt(decoder, prompt, (cfg.vision.image_size, cfg.vision.image_size))
    keep = [
        decoder.tokenizer.bos_token_id,
        decoder.tokenizer.convert_tokens_to_ids(cfg.image_start_token),
    ]
    codes = generate_codes(model, doc, keep, decoder.pad_id, seed, guidance_scale, greedy)
    with torch.no_grad():
        pixels = model.vision.vqmodel.decode(codes[None].to(model_device(model)))[0]
    image = to_pil(pixels.float().cpu())
    return image, [image]


@torch.no_grad()
def generate_codes(
    model: SplitVLM,
    doc: Document,
    keep: list[int],
    pad_id: int,
    seed: int = 0,
    guidance_scale: float = 5.0,
    greedy: bool = False,
) -> torch.Tensor:
    """The codes of `doc`'s first image, generated one at a time (Janus's `generate` in image
    mode): each from the generation head at the position before it, the codes so far fed back
    through the generation aligner. With `guidance_scale` > 1, classifier-free guidance: the
    same document with every token before the image but those in `keep` (BOS, the image's start
    marker) replaced by `pad_id` gives the unconditional logits u, and the codes are drawn from
    u + scale · (c − u). Greedy or sampled (`seed`). No KV cache: each step one packed forward
    of both documents, exact under causal attention. → (image tokens,) int64."""
    cfg, device = model.cfg, model_device(model)
    per_image = cfg.num_image_tokens()
    first_image = [kind for kind, _ in doc.segments].index("image")
    prompt_length = sum(length for _, length in doc.segments[:first_image])
    unconditional = doc.input_ids.clone()
    prompt = unconditional[:prompt_length]
    prompt[~torch.isin(prompt, torch.tensor(keep))] = pad_id
    generated = torch.zeros_like(doc.image_mask)
    generated[:per_image] = True  # the first image: generated, its own inputs, no target
    docs = [dataclasses.replace(doc, image_mask=generated)]
    guided = guidance_scale > 1
    if guided:
        docs.append(dataclasses.replace(docs[0], input_ids=unconditional))
    batch = collate(docs, **layout_options(cfg, device))
    first = torch.tensor([0, doc.image_mask.numel()][: len(docs)], device=device)
    codes = torch.zeros(per_image, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    width = model.embed.weight.shape[1]
    for k in range(per_image):
        tokens = torch.zeros(batch.image_index.numel(), width, device=device)
        if k:
            made = model.generation.embed(codes[:k]).to(tokens.dtype)
            for offset in first.tolist():
                tokens[offset : offset + k] = made
        trunk = model.trunk(batch, image_tokens=tokens)
        hidden = model.text_hidden(batch, trunk)
        read_at = batch.image_index[first + k] - 1
        logits = model.generation.generation_head(model.text_norm(hidden[read_at])).float()
        if guided:
            logits = logits[1] + guidance_scale * (logits[0] - logits[1])
        else:
            logits = logits[0]
        if greedy:
            codes[k] = logits.argmax()
        else:
            codes[k] = torch.multinomial(logits.softmax(-1), 1, generator=generator)[0]
    return codes


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """(rows · cols, 3·p²) row-major patches → (3, rows · p, cols · p)."""
    rows, cols = grid
    image = patches.reshape(rows, cols, 3, patch, patch)
    return image.permute(2, 0, 3, 1, 4).reshape(3, rows * patch, cols * patch)


def to_pil(image_CHW: torch.Tensor) -> Image.Image:
    pixels = ((image_CHW.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(pixels)
