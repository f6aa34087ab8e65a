"""A plain check of run.py's step times: no harness code, one wall-clock reading per block.

The tiny BERT of run.py (same sizes, written out again here), with SSF, LoRA (q, v; r=8) or
every weight trainable; a step is ``zero_grad + forward + cross-entropy + backward + AdamW``.
Per round and method one ``time.perf_counter()`` pair (wall) and one ``time.process_time()``
pair (CPU) around a block of steps; methods alternate block by block; the median block time per
step is printed as one JSON line. run.py compares the ssf/full and lora/full ratios with its own.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers as T
    from peft import LoraConfig, get_peft_model
    import ssf_deploy.peft
    if args.quick:
        size, batch, length, rounds, block = (200, 32, 2, 2, 64), 16, 16, 2, 2
    else:
        size, batch, length, rounds, block = (1000, 64, 2, 4, 128), 32, 32, 7, 10
    vocab, hidden, layers, heads, ffn = size
    cfg = T.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=ffn,
                       max_position_embeddings=length, num_labels=8, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    y = torch.randint(0, 8, (batch,), generator=g)
    models = {}
    for method in ("full", "ssf", "lora"):
        torch.manual_seed(0)
        model = T.BertForSequenceClassification(cfg)
        if method == "ssf":
            model = get_peft_model(model, ssf_deploy.peft.SSFConfig(task_type="SEQ_CLS"))
        elif method == "lora":
            model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                     target_modules=["query", "value"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        models[method] = (model.train(), opt)

    def steps(method, n):
        model, opt = models[method]
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(input_ids=ids).logits, y).backward()
            opt.step()

    wall = {m: [] for m in models}
    cpu = {m: [] for m in models}
    for _ in range(rounds):
        for m in models:
            steps(m, 2)                     # warm-up, untimed
            t0, c0 = time.perf_counter(), time.process_time()
            steps(m, block)
            wall[m].append((time.perf_counter() - t0) / block)
            cpu[m].append((time.process_time() - c0) / block)
    print(json.dumps({"ms": {m: 1e3 * statistics.median(v) for m, v in wall.items()},
                      "cpu_ms": {m: 1e3 * statistics.median(v) for m, v in cpu.items()},
                      "rounds": rounds, "block": block, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
