"""Model FLOPs of a training step: what the model needs for one training step (the PaLM appendix-B convention:
no activation recomputation, no padding, since the packer has none), summed over micro-batches:

- Dense: a weight matrix of N entries costs 2N FLOPs per token that passes it forward, plus 2N
  for the input gradient and 2N for the weight gradient backward. So 6N for a trainable weight,
  4N for a frozen one that gradients pass through, 2N for the frozen vision tower (it runs without
  autograd). Tokens per module follow the model (DESIGN.md §4): text-in blocks see the text
  tokens, the tower sees image patches, the adaptor and image-in blocks the image tokens, the core
  and the text-head blocks every token, the LM head only positions with a text target, the
  image-head blocks every token (when the micro-batch has a masked image token) and the image head
  only the masked image tokens. Weights are matrices and convolution kernels (2-D and up); norms,
  biases and embedding lookups are left out, as in FLOP counters. The first layer on the image
  path (the patch embedding, or the adaptor's first layer behind a frozen tower) gets no input
  gradient. A tower or adaptor whose layers see different token counts prices an image itself
  (`dense_flops_per_image`, and its attention `attention_flops_per_image`: BLIP-2's ViT and
  Q-Former, Qwen-VL's resampler). This matches
  torch.utils.flop_counter's matmul count exactly (tested).
- Cross-attention blocks (LLaMA-3.2-Vision's, Flamingo's): their query projection, output
  projection and MLP see every token, their key and value projections every key of the images'
  stream, and their attention the (query, key) pairs of the micro-batch's `cross_layout`;
  without images none of it (LLaMA-3.2-Vision's blocks are skipped) but Flamingo's MLP. The key
  and value projections' input gradient is computed when the adaptor or the tower trains.
- Attention: a (query, key) pair costs 4·d_attn FLOPs forward per layer (2·d_attn for QKᵀ, 2·d_attn
  for AV; d_attn = heads × head dim) and twice that backward. Pairs are the packed layout's actual
  ones: query t sees keys doc_start[t]..vis_end[t], so a layout has Σ_t (vis_end[t] − doc_start[t]
  + 1) pairs: causal text counts n(n+1)/2 per run, an image span of n tokens ending e tokens into
  its document counts n·e, and nothing crosses a document. A sliding-window layer counts the
  pairs its window leaves (`layout.first_visible(window)` for doc_start).

Which tokens pass each top-level module and which layout each block stack attends over are
declared by the model next to its modules (`SplitVLM.TOKENS_THROUGH`, `ATTENTION_LAYOUT`): a
module added without an entry there is refused here instead of being counted wrong.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from torch import nn

from models.blocks import CrossAttentionBlock


def layer_flops(module: nn.Module, tokens: int, input_needs_grad: bool) -> int:
    """Forward + backward FLOPs of one linear layer over `tokens` tokens: 2 per weight and token
    forward, 2 more for the weight's gradient when it is trained, 2 more for the input's when
    the input depends on a trained parameter."""
    weight = module.weight
    return (2 + 2 * weight.requires_grad + 2 * input_needs_grad) * weight.numel() * tokens


def trains(module: nn.Module) -> bool:
    """Whether one of `module`'s own parameters (not its children's) is trained."""
    return any(p.requires_grad for p in module.parameters(recurse=False))


def attention_pairs(layout, window: int | None = None) -> int:
    """Visible (query, key) pairs of a `PackedLayout`, under a sliding `window` if given."""
    if layout is None:
        return 0
    return int((layout.vis_end.long() - layout.first_visible(window).long() + 1).sum())


_MATMUL_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weights(module: nn.Module) -> list[nn.Parameter]:
    """The matrices and kernels of `module`'s linear and convolution layers, in order: lookup
    tables, norms and other tensors (position tables, learned queries) excluded."""
    weights = {id(m.weight): m.weight for m in module.modules() if isinstance(m, _MATMUL_MODULES)}
    return list(weights.values())


def dense_weights(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) entries of the matrices and kernels in `module`."""
    weights = _weights(module)
    trainable = sum(p.numel() for p in weights if p.requires_grad)
    return trainable, sum(p.numel() for p in weights) - trainable


class ModelFlops:
    """Model FLOPs of a training step of the split VLM over packed micro-batches.

    Built from the unsharded model (before the engine wraps it), so parameter counts are global.
    """

    def __init__(self, model: nn.Module):
        cfg = model.cfg
        self.cfg = cfg
        self.tokens_through = dict(model.TOKENS_THROUGH)
        self.attention_layout = dict(model.ATTENTION_LAYOUT)
        undeclared = {name for name, _ in model.named_children()} - set(self.tokens_through)
        assert not undeclared, f"{type(model).__name__}.TOKENS_THROUGH lacks {sorted(undeclared)}"
        vision = model.vision
        self.vision_trainable = any(p.requires_grad for p in vision.parameters())
        self.vocabulary_images = cfg.adaptor == "vocabulary"
        # Per token: FLOPs of the dense weights of each module, forward + backward. A block
        # stack's visual experts are counted apart: their weights see the image tokens only, the
        # stack's text weights the rest.
        self.dense_per_token: dict[str, int] = {}
        self.expert_per_token: dict[str, int] = {}
        # A tower or adaptor whose layers see different token counts (BLIP-2's ViT its patches
        # and its Q-Former the queries, Qwen-VL's resampler the patches and the queries) prices
        # each image itself; the rest are priced per token below.
        self.per_image: dict[str, int] = {}
        # Their attention, per image too (BLIP-2's Q-Former, Qwen-VL's resampler).
        self.attention_per_image: dict[str, int] = {}
        # A tower whose images cost what their role is (Janus's: read by its ViT, or encoded
        # into codes) prices the micro-batch's images itself.
        self.batch_priced: dict[str, nn.Module] = {}
        # Cross-attention blocks, priced apart from their stack: per token (query side), per key
        # (key and value projections) and per visible pair.
        cross_blocks = [b for b in model.modules() if isinstance(b, CrossAttentionBlock)]
        adaptor_trains = any(p.requires_grad for p in model.adaptor.parameters())
        keys_need_grad = adaptor_trains or self.vision_trainable
        self.cross_per_query = self.cross_per_key = 0
        # Flamingo's blocks run their MLP on a micro-batch without images too.
        self.cross_mlp_without_images = 0
        for block in cross_blocks:
            for module in block.modules():
                if not isinstance(module, nn.Linear):
                    continue
                if module in (block.attn.wk, block.attn.wv):
                    self.cross_per_key += layer_flops(module, 1, keys_need_grad)
                else:
                    self.cross_per_query += layer_flops(module, 1, True)
                if not block.mask_blind_mlp and any(module is m for m in block.mlp.modules()):
                    self.cross_mlp_without_images += layer_flops(module, 1, True)
        cross_trainable, cross_frozen = [
            sum(dense_weights(b)[k] for b in cross_blocks) for k in (0, 1)
        ]
        self.cross_pair_flops = 3 * 4 * cfg.num_heads * cfg.head_dim * len(cross_blocks)
        for name, module in model.named_children():
            if getattr(module, "batch_flops", None) is not None:
                self.batch_priced[name] = module
                continue
            per_image = getattr(module, "dense_flops_per_image", None)
            if per_image is not None:
                input_needs_grad = name != "vision" and self.vision_trainable
                self.per_image[name] = per_image(input_needs_grad)
                attention = module.attention_flops_per_image(input_needs_grad)
                self.attention_per_image[name] = attention
                continue
            trainable, frozen = dense_weights(module)
            experts = [m.expert for m in module.modules() if getattr(m, "expert", None) is not None]
            if experts:
                counts = [dense_weights(expert) for expert in experts]
                expert_trainable = sum(count[0] for count in counts)
                expert_frozen = sum(count[1] for count in counts)
                trainable, frozen = trainable - expert_trainable, frozen - expert_frozen
                self.expert_per_token[name] = 6 * expert_trainable + 4 * expert_frozen
            if name == "core" and cross_blocks:
                trainable, frozen = trainable - cross_trainable, frozen - cross_frozen
            if name == "vision" and not self.vision_trainable:
                self.dense_per_token[name] = 2 * frozen  # no autograd: forward only
            else:
                self.dense_per_token[name] = 6 * trainable + 4 * frozen
        # A tower pass whose output no gradient reaches (the clean pass, when it only feeds the
        # detached targets) costs its forward only.
        self.vision_forward_per_token = 0 if self.batch_priced else 2 * sum(dense_weights(vision))
        # The first layer on the image path gets an input that needs no gradient (pixels, or the
        # frozen tower's output), so autograd skips its input-gradient matmul.
        first_on_image_path = "vision" if self.vision_trainable else "adaptor"
        if first_on_image_path in self.dense_per_token:
            first = getattr(model, first_on_image_path)
            # An adaptor may read the tower's output with several layers (DeepSeek-VL 7B's
            # aligner: one per tower).
            inputs = getattr(first, "input_layers", None)
            weights = [layer.weight for layer in inputs] if inputs else _weights(first)[:1]
            self.dense_per_token[first_on_image_path] -= 2 * sum(w.numel() for w in weights)
        attention_width = cfg.num_heads * cfg.head_dim
        # Per visible pair, forward + backward, by window (None: full) over the stack's layers.
        self.pair_flops: dict[str, Counter] = {}
        for name in self.attention_layout:
            stack = [b for b in getattr(model, name) if not isinstance(b, CrossAttentionBlock)]
            windows = Counter(block.attn.window for block in stack)
            self.pair_flops[name] = Counter(
                {window: 3 * 4 * attention_width * count for window, count in windows.items()}
            )
        # Attention width of the tower's layers: its feature width, but a query tower's ViT's.
        self.tower_width = getattr(vision, "attention_width", vision.feature_dim)
        self.tower_layers = 0 if self.batch_priced else vision.num_layers
        # With queries the tower sees its own patch grid, whatever the image tokens: BLIP-2's
        # tower (its CLS token included) or Qwen-VL's resampler says how many.
        self.patches_per_image = getattr(vision, "num_patches", 0) or getattr(
            model.adaptor, "num_patches", 0
        )
        # Concatenated towers: the sum over them of width × layers.
        self.tower_width_layers = getattr(
            vision, "attention_width_layers", self.tower_width * self.tower_layers
        )
        self.vision_pair_flops = (3 if self.vision_trainable else 1) * 4 * self.tower_width_layers

    def micro_batch(self, batch) -> int:
        return self.dense(batch) + self.attention(batch)

    def vision_work(self, batch) -> tuple[tuple[int, int], tuple[int, int]]:
        """The tower's work on the micro-batch's images: (patches, attention pairs), each split
        into (in passes gradients reach, in forward-only passes).

        Images of one grid are encoded together: clean once (targets, and the inputs of unmasked
        spans) and once more per span that has a masked token in any of them, with that span's
        masked regions blanked. All of it is one tower call, so a trainable tower's backward runs
        through every pass, a clean pass that only gives targets included (zero gradients).
        """
        cfg = self.cfg
        starts = np.cumsum([0] + [cfg.num_image_tokens(grid) for grid in batch.image_grids])
        by_grid: dict[tuple, list[int]] = {}
        for index, key in enumerate(zip(batch.image_grids, batch.image_tiles, strict=True)):
            by_grid.setdefault(key, []).append(index)
        patches, pairs = [0, 0], [0, 0]
        for (grid, tiles), indices in by_grid.items():
            blanked, offset = 0, 0
            for (rows, cols), is_copy in cfg.image_spans(grid):
                span_has_mask = any(
                    bool(
                        batch.image_mask[
                            starts[i] + offset : starts[i] + offset + rows * cols
                        ].any()
                    )
                    for i in indices
                )
                offset += rows * cols
                blanked += not is_copy and span_has_mask
            passes = (blanked + 1, 0) if self.vision_trainable else (0, blanked + 1)
            # A LLaVA-NeXT tiled image: its pinpoint's tiles, each attended alone.
            num_tiles, per_tile = (
                (1, grid) if tiles == (0, 0) else (tiles[0] * tiles[1], cfg.square_grid)
            )
            num_patches = self.patches_per_image or (
                per_tile[0] * per_tile[1] * cfg.vision.spatial_merge**2
            )
            for k in (0, 1):
                patches[k] += len(indices) * num_tiles * num_patches * passes[k]
                pairs[k] += len(indices) * num_tiles * num_patches**2 * passes[k]
        return (patches[0], patches[1]), (pairs[0], pairs[1])

    def dense(self, batch) -> int:
        cfg = self.cfg
        num_masked = batch.num_masked_image_tokens
        (patches_with_grad, patches_forward_only), _ = self.vision_work(batch)
        tokens = {
            "all": batch.num_tokens,
            "text": int(batch.text_index.numel()),
            "image": int(batch.image_index.numel()),
            # Janus's: a generated image's tokens are its codes', the others' the adaptor's.
            "read_image": int(batch.image_index.numel()) - num_masked,
            # A cross-attention design's: every key of the images' stream.
            "cross_keys": 0 if batch.cross_layout is None else batch.cross_layout.num_keys,
            "patches": patches_with_grad if self.vision_trainable else patches_forward_only,
            "diffusion_targets": batch.num_diffusion_targets,
            # Image tokens that are vocabulary ids are predicted by the LM head too.
            "text_targets": batch.num_text_targets
            + (batch.num_image_targets(cfg.image_loss_tokens) if self.vocabulary_images else 0),
            "masked": num_masked,
            "all_if_image_loss": batch.num_tokens if _image_loss_runs(batch) else 0,
        }
        # One pass per image: designs of queries mask nothing.
        flops = sum(self.per_image.values()) * len(batch.image_grids)
        flops += sum(m.batch_flops(batch, self.cfg)[0] for m in self.batch_priced.values())
        for name, per_token in self.dense_per_token.items():
            kind = self.tokens_through[name]
            if kind is None:
                continue
            count = tokens[kind]
            if name in self.expert_per_token:  # a stack over the merged sequence: all or none
                image = tokens["image"] if count else 0
                flops += per_token * (count - image) + self.expert_per_token[name] * image
            else:
                flops += per_token * count
        if self.vision_trainable:
            flops += self.vision_forward_per_token * patches_forward_only
        if batch.cross_layout is not None:
            layout = batch.cross_layout
            flops += (
                self.cross_per_query * layout.num_queries + self.cross_per_key * layout.num_keys
            )
        else:
            flops += self.cross_mlp_without_images * batch.num_tokens
        return flops

    def attention(self, batch) -> int:
        flops = sum(self.attention_per_image.values()) * len(batch.image_grids)
        flops += sum(m.batch_flops(batch, self.cfg)[1] for m in self.batch_priced.values())
        for name, layout_field in self.attention_layout.items():
            if name == "image_head_blocks" and not _image_loss_runs(batch):
                continue
            layout = getattr(batch, layout_field)
            for window, pair_flops in self.pair_flops[name].items():
                flops += pair_flops * attention_pairs(layout, window)
        if batch.cross_layout is not None:
            layout = batch.cross_layout
            pairs = int((layout.key_end.long() - layout.key_start.long()).sum())
            flops += self.cross_pair_flops * pairs
        # The tower attends bidirectionally within each image, once per pass.
        _, (pairs_with_grad, pairs_forward_only) = self.vision_work(batch)
        forward_pair_flops = 4 * self.tower_width_layers
        if not self.vision_trainable:
            return flops + self.vision_pair_flops * pairs_forward_only
        return (
            flops
            + self.vision_pair_flops * pairs_with_grad
            + forward_pair_flops * pairs_forward_only
        )

    def step(self, micro_batches: list) -> int:
        return sum(self.micro_batch(mb) for mb in micro_batches)


def _image_loss_runs(batch) -> bool:
    # The image-head blocks run only when the micro-batch has a masked image token.
    return batch.image_layout is not None and batch.num_masked_image_tokens > 0
