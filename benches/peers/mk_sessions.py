"""Turns a Vidur-style request CSV (arrived_at, num_prefill_tokens, num_decode_tokens) into an
inference-lab session file: one single-step session per request, in order."""
import csv, json, sys

src, dst = sys.argv[1], sys.argv[2]
with open(src) as f, open(dst, "w") as out:
    for i, row in enumerate(csv.DictReader(f)):
        p, d = int(row["num_prefill_tokens"]), int(row["num_decode_tokens"])
        out.write(json.dumps({"id": f"r{i}", "steps": [{"input": p, "new": p, "output": d}]}) + "\n")
