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
  gradient. This matches torch.utils.flop_counter's matmul count exactly (tested).
- Attention: a (query, key) pair costs 4·d_attn FLOPs forward per layer (2·d_attn for QKᵀ, 2·d_attn
  for AV; d_attn = heads × head dim) and twice that backward. Pairs are the packed layout's actual
  ones: query t sees keys doc_start[t]..vis_end[t], so a layout has Σ_t (vis_end[t] − doc_start[t]
  + 1) pairs: causal text counts n(n+1)/2 per run, an image span of n tokens ending e tokens into
  its document counts n·e, and nothing crosses a document.

Which tokens pass each top-level module and which layout each block stack attends over are
declared by the model next to its modules (`SplitVLM.TOKENS_THROUGH`, `ATTENTION_LAYOUT`): a
module added without an entry there is refused here instead of being counted wrong.
"""

from __future__ import annotations

from torch import nn


def attention_pairs(layout) -> int:
    """Visible (query, key) pairs of a `PackedLayout`."""
    if layout is None:
        return 0
    return int((layout.vis_end.long() - layout.doc_start.long() + 1).sum())


def _weights(module: nn.Module) -> list[nn.Parameter]:
    """The matrices and kernels of `module` in order; lookup tables excluded."""
    lookups = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    return [p for p in module.parameters() if p.ndim >= 2 and id(p) not in lookups]


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
        self.num_patches = cfg.image_tokens_per_side**2
        vision = model.vision
        self.vision_trainable = any(p.requires_grad for p in vision.parameters())
        # Per token: FLOPs of the dense weights of each module, forward + backward.
        self.dense_per_token: dict[str, int] = {}
        for name, module in model.named_children():
            trainable, frozen = dense_weights(module)
            if name == "vision" and not self.vision_trainable:
                self.dense_per_token[name] = 2 * frozen  # no autograd: forward only
            else:
                self.dense_per_token[name] = 6 * trainable + 4 * frozen
        # A tower pass whose output no gradient reaches (the clean pass, when it only feeds the
        # detached targets) costs its forward only.
        self.vision_forward_per_token = 2 * sum(dense_weights(vision))
        # The first layer on the image path gets an input that needs no gradient (pixels, or the
        # frozen tower's output), so autograd skips its input-gradient matmul.
        first_on_image_path = "vision" if self.vision_trainable else "adaptor"
        first_weight = _weights(getattr(model, first_on_image_path))[0]
        self.dense_per_token[first_on_image_path] -= 2 * first_weight.numel()
        attention_width = cfg.num_heads * cfg.head_dim
        self.pair_flops = {  # per visible pair, all layers of the stack, forward + backward
            name: 3 * 4 * attention_width * len(getattr(model, name))
            for name in self.attention_layout
        }
        tower = vision.config
        self.tower_width, self.tower_layers = tower.hidden_size, tower.num_hidden_layers
        self.vision_pair_flops = (
            (3 if self.vision_trainable else 1) * 4 * tower.hidden_size * tower.num_hidden_layers
        )

    def micro_batch(self, batch) -> int:
        return self.dense(batch) + self.attention(batch)

    def vision_passes(self, batch) -> tuple[int, int]:
        """Tower passes over the micro-batch's images: (passes gradients reach, forward-only).

        The model encodes the clean images once (targets, and the inputs of unmasked spans) and
        once more per span that has a masked token, with that span's masked regions blanked.
        """
        num_images = int(batch.pixel_values.shape[0])
        if num_images == 0:
            return 0, 0
        per_image = batch.image_mask.view(num_images, -1)
        blanked, clean_is_input, offset = 0, False, 0
        for side, is_copy in self.cfg.image_spans():
            span = per_image[:, offset : offset + side * side]
            offset += side * side
            if is_copy or not bool(span.any()):
                clean_is_input = True
            else:
                blanked += 1
        if not self.vision_trainable:
            return 0, blanked + 1
        return blanked + int(clean_is_input), int(not clean_is_input)

    def dense(self, batch) -> int:
        num_masked = batch.num_masked_image_tokens
        num_images = int(batch.pixel_values.shape[0])
        with_grad, forward_only = self.vision_passes(batch)
        tokens = {
            "all": batch.num_tokens,
            "text": int(batch.text_index.numel()),
            "image": int(batch.image_index.numel()),
            "patches": num_images
            * self.num_patches
            * (with_grad if self.vision_trainable else forward_only),
            "diffusion_targets": batch.num_diffusion_targets,
            "text_targets": batch.num_text_targets,
            "masked": num_masked,
            "all_if_image_loss": batch.num_tokens if _image_loss_runs(batch) else 0,
        }
        flops = 0
        for name, per_token in self.dense_per_token.items():
            kind = self.tokens_through[name]
            if kind is not None:
                flops += per_token * tokens[kind]
        if self.vision_trainable:
            flops += self.vision_forward_per_token * num_images * self.num_patches * forward_only
        return flops

    def attention(self, batch) -> int:
        flops = 0
        for name, layout_field in self.attention_layout.items():
            if name == "image_head_blocks" and not _image_loss_runs(batch):
                continue
            flops += self.pair_flops[name] * attention_pairs(getattr(batch, layout_field))
        # The tower attends bidirectionally within each image, once per pass.
        with_grad, forward_only = self.vision_passes(batch)
        pairs = int(batch.pixel_values.shape[0]) * self.num_patches**2
        forward_pair_flops = 4 * self.tower_width * self.tower_layers
        return (
            flops
            + self.vision_pair_flops
            * pairs
            * (with_grad if self.vision_trainable else forward_only)
            + (forward_pair_flops * pairs * forward_only if self.vision_trainable else 0)
        )

    def step(self, micro_batches: list) -> int:
        return sum(self.micro_batch(mb) for mb in micro_batches)


def _image_loss_runs(batch) -> bool:
    # The image-head blocks run only when the micro-batch has a masked image token.
    return batch.image_layout is not None and batch.num_masked_image_tokens > 0
