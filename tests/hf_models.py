"""Tiny random transformers models (offline: configs only, no hub), shared by the hf/peft tests.

The six architectures issue 21 names: ViT, DINOv2, Swin, ConvNeXt (image classifiers), the CLIP
vision model, BERT (sequence classifier). A few thousand parameters each, 32 px / 16 tokens.
"""
from __future__ import annotations

import functools

import torch

transformers = __import__("pytest").importorskip("transformers")

CLASSES = 5


def configs() -> dict:
    T = transformers
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               image_size=32, patch_size=8)
    return {
        "vit": (T.ViTForImageClassification, T.ViTConfig(**vit, num_labels=CLASSES)),
        "dinov2": (T.Dinov2ForImageClassification,
                   T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  mlp_ratio=2, image_size=32, patch_size=8, num_labels=CLASSES)),
        "swin": (T.SwinForImageClassification,
                 T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                              num_heads=[1, 2], window_size=4, num_labels=CLASSES)),
        "convnext": (T.ConvNextForImageClassification,
                     T.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                                      image_size=32, num_labels=CLASSES)),
        "clip": (T.CLIPVisionModel, T.CLIPVisionConfig(**vit)),
        "bert": (T.BertForSequenceClassification,
                 T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=64, num_labels=CLASSES)),
    }


ARCHS = tuple(configs())


def make(arch: str, seed: int = 0, trained: bool = True) -> torch.nn.Module:
    """A tiny random model; ``trained`` moves every weight off its init (no all-zero biases or
    all-one norms, which the ONNX exporter would fold away in the base graph only)."""
    cls, config = configs()[arch]
    torch.manual_seed(seed)
    model = cls(config).eval()
    if trained:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def move_trainables(model: torch.nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Move every trainable tensor off its init, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)


def save_folder(arch: str, path: str, weights: bool = False, seed: int = 0) -> str:
    """A local model folder as ``save_pretrained`` writes it: config.json (+ weights)."""
    if weights:
        make(arch, seed).save_pretrained(path)
    else:
        configs()[arch][1].save_pretrained(path)
    return path


def topic_batch(n: int, seed: int, classes: int = CLASSES, length: int = 16, vocab: int = 100,
                signal: float = 0.5, shift: int = 0):
    """A small learnable text task ("topic classification"): each class owns a slice of the
    vocabulary (rotated by ``shift`` tokens: another task over the same words); a sequence of
    class c draws each token from c's slice with probability ``signal``, else from the whole
    vocabulary. Position 0 is a [CLS]-like token 0."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    width = (vocab - 1) // classes
    own = labels[:, None] * width + torch.randint(0, width, (n, length), generator=g)
    own = 1 + (own + shift) % (vocab - 1)
    noise = torch.randint(1, vocab, (n, length), generator=g)
    ids = torch.where(torch.rand(n, length, generator=g) < signal, own, noise)
    ids[:, 0] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def fit(model, x, y, steps: int, lr: float, batch: int = 32) -> list[float]:
    """Plain AdamW + cross-entropy on whatever ``model`` leaves trainable; the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        i = (step * batch) % len(y)
        xb = {k: v[i:i + batch] for k, v in x.items()} if isinstance(x, dict) else x[i:i + batch]
        out = model(**xb) if isinstance(xb, dict) else model(xb)
        loss = torch.nn.functional.cross_entropy(getattr(out, "logits", out), y[i:i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@functools.lru_cache(None)
def _upstream_bert() -> dict:
    model = make("bert", seed=0, trained=False)
    fit(model, *topic_batch(256, seed=10), steps=60, lr=3e-3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def pretrained_bert(seed: int = 1) -> torch.nn.Module:
    """The tiny BERT pre-trained upstream (full training on ``topic_batch`` shift 0): the
    stand-in for pretrained weights, offline. Its classifier is re-drawn from ``seed``."""
    model = make("bert", trained=False)
    model.load_state_dict(_upstream_bert())
    torch.manual_seed(seed)
    model.classifier.reset_parameters()
    return model.eval()
