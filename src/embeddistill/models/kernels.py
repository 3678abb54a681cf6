"""Faster kernels for encoding with an unchanged model: MPNet's attention through ``scaled_dot_product_attention``,
and the whole transformer through ``torch.compile``. Each is a context that patches ``forward`` methods on the
model's instances and restores the classes' own when it ends.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def compiled_transformer(model: torch.nn.Module):
    """Run the Hugging Face model inside ``model`` through ``torch.compile`` while the context lasts.

    Between its matmuls an encoder layer runs a dozen pointwise kernels (bias, GELU, residual adds, LayerNorm,
    head transposes) that eager PyTorch launches one by one, each a round trip through device memory; the compiler
    fuses them. Shapes are dynamic (batches vary in rows and padded length), so one graph serves every batch; the
    first batches pay the compilation, which only a large corpus repays.
    """
    transformers = [module.auto_model for module in model.modules() if hasattr(module, "auto_model")][:1]
    for module in transformers:
        module.forward = torch.compile(module.forward, dynamic=True)
    try:
        yield
    finally:
        for module in transformers:
            del module.forward  # back to the class's own forward


# -- MPNet attention through scaled_dot_product_attention --------------------------------------------------------


@contextlib.contextmanager
def sdpa_attention(model: torch.nn.Module):
    """Run every MPNet encoder inside ``model`` with fused attention while the context lasts.

    MPNet ships eager attention only: per layer it materialises the ``(B, H, L, L)`` scores and adds its relative
    position bias, which was itself expanded to ``(B, H, L, L)``. Here the bias plus the padding mask is formed once
    per forward and passed to ``scaled_dot_product_attention`` as its additive mask: the same softmax of the same
    sums, without the per-layer score tensors. Other architectures are left as they are (BERT already uses SDPA).
    """
    patched = []
    for module in model.modules():
        if type(module).__name__ == "MPNetEncoder" and hasattr(module, "compute_position_bias"):
            module.forward = _mpnet_encoder_forward.__get__(module)
            patched.append(module)
            for layer in module.layer:
                layer.attention.attn.forward = _mpnet_self_attention_forward.__get__(layer.attention.attn)
                patched.append(layer.attention.attn)
    try:
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's own forward


def _additive_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    return torch.zeros((), dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask, torch.finfo(dtype).min
    )


_BUCKETS: dict[tuple, torch.Tensor] = {}  # (encoder class, length, device) -> (L, L) relative position buckets


@torch.compiler.disable
def _position_bias(encoder, hidden_states: torch.Tensor) -> torch.Tensor:
    """MPNet's relative position bias, ``(1, H, L, L)``: the same for every row, as ``compute_position_bias`` gives it.

    Its buckets depend on the length alone: bucketed on the CPU once per length and device, not at every forward
    (where the transformers versions that bucket on the CPU make the host wait for the device at every batch).
    Outside ``torch.compile``, which would fuse the bucketing (a logarithm per cell) into the kernel that adds the
    padding mask, computing it again for every row (a sixth of a compiled forward's device time on an H200).
    """
    length, device = hidden_states.shape[1], hidden_states.device
    key = (type(encoder), length, str(device))
    buckets = _BUCKETS.get(key)
    if buckets is None:
        # a normal tensor even when first made while encoding: it may be used later where autograd records
        with torch.inference_mode(False):
            positions = torch.arange(length, dtype=torch.long)
            relative = positions[None, :] - positions[:, None]
            buckets = encoder.relative_position_bucket(relative, num_buckets=32).to(device)  # as compute_position_bias
        if len(_BUCKETS) >= 64:  # lengths vary batch to batch where nothing pads them (the CPU): keep a few
            _BUCKETS.pop(next(iter(_BUCKETS)))
        _BUCKETS[key] = buckets
    # contiguous: a permuted view handed to the compiled graph made its kernels read misaligned addresses (H200)
    return encoder.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0).contiguous()


def _mpnet_encoder_forward(self, hidden_states, attention_mask=None, output_attentions=False, **kwargs):
    from transformers.modeling_outputs import BaseModelOutput

    if output_attentions or kwargs.get("output_hidden_states"):
        raise ValueError("the SDPA MPNet path returns the last hidden state only")
    bias = _position_bias(self, hidden_states)
    mask = _additive_mask(attention_mask, bias.dtype)
    bias = bias if mask is None else (bias + mask).contiguous()  # (B, H, L, L), once for all layers
    for layer in self.layer:
        hidden_states = layer(hidden_states, None, bias)[0]
    return BaseModelOutput(last_hidden_state=hidden_states)


def _mpnet_self_attention_forward(
    self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False, **kwargs
):
    batch, length, _ = hidden_states.shape
    shape = (batch, length, self.num_attention_heads, self.attention_head_size)
    q, k, v = (projection(hidden_states).view(shape).transpose(1, 2) for projection in (self.q, self.k, self.v))
    mask = position_bias if attention_mask is None else position_bias + _additive_mask(attention_mask, q.dtype)
    dropout = self.dropout.p if self.training else 0.0
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), dropout_p=dropout)
    return (self.o(context.transpose(1, 2).reshape(batch, length, self.all_head_size)),)
