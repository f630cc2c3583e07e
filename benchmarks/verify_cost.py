"""The self-check's cost against one scoring batch of the embedded model (both sides in one run).

    python benchmarks/verify_cost.py
"""
import time, torch, json
from gradsift.models import load_model, load_tokenizer
from gradsift.norms import GhostNormEngine
torch.manual_seed(0)
m = load_model("embedded"); tok = load_tokenizer("embedded")
rows = [json.loads(l) for l, _ in zip(open("/work/shared/data/gsm8k/train.jsonl"), range(8))]
texts = [(r["question"], r["answer"]) for r in rows]
ids, labels = [], []
for q, a in texts:
    p = tok(q)["input_ids"]; r = tok(" " + a)["input_ids"]
    ids.append(p + r); labels.append([-100] * len(p) + r)
T = max(map(len, ids))
batch = {"input_ids": torch.tensor([x + [0] * (T - len(x)) for x in ids]),
         "attention_mask": torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids]),
         "labels": torch.tensor([x + [-100] * (T - len(x)) for x in labels])}
print("B=8 T=", T)
res = {True: [], False: []}
for rnd in range(3):
    for v in ((True, False) if rnd % 2 == 0 else (False, True)):
        e = GhostNormEngine(m, params="all", verify=v)
        t = time.perf_counter(); e.forward(batch); e.backward(); res[v].append(time.perf_counter() - t); e.close()
        print(rnd, v, res[v][-1], flush=True)
import statistics as st
on, off = st.median(res[True]), st.median(res[False])
print(f"batch without check {off:.2f}s, with {on:.2f}s, check {on-off:.2f}s, share of 1000 samples (125 batches): {100*(on-off)/(125*off):.2f}%")
