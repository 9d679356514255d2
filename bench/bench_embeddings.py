"""Embedding throughput under concurrency: a running glm-api server against in-process encode.

    python bench/bench_embeddings.py                 # starts `python api.py --disable-chat`
    python bench/bench_embeddings.py --url http://host:8100

Two loads, each kept up until ``--sentences`` sentences are embedded: 32 clients sending
one-sentence requests back to back, and 4 clients sending 32-sentence requests. In the same
run, the same model in this process runs sentence-transformers ``encode`` with batch size 32
over the same sentences, two ways:

- in groups of 32, in the order the clients send them (``encode(texts[i:i + 32])``): what a
  server that batches the 32 requests in flight perfectly would reach;
- all at once (``encode(texts, batch_size=32)``): encode first sorts every sentence by
  length, so its batches hold sentences of one length and waste no padding. No server can
  do that with requests it has not received yet; it is the stricter bound.

The ratios are server / limit. Each figure is the best of ``--repeats`` runs, interleaved
with the limits'.

Rerank: one query against ``--documents`` documents in one ``/v1/rerank`` request, against
in-process ``CrossEncoder.predict`` of the same pairs (batch size 32), as pairs/s. No reranker
ships in a package, so the cross-encoder is all-MiniLM-L6-v2's own encoder with a one-label
head (the architecture and size of cross-encoder/ms-marco-MiniLM-L6-v2, random head): the
cost per pair is a real MiniLM cross-encoder's. The server loads it with ``--rerank-model``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.common import (  # noqa: E402
    RawHTTPConnection,
    glm_api_command,
    machine_line,
    print_table,
    running_server,
)

SUBJECTS = ["The old bridge over the river", "A small bakery near the station", "Our new colleague from the Lyon office",
            "The city council", "This laptop", "The morning train to the airport", "A quiet library", "The football team"]
VERBS = ["was praised for", "was criticised for", "became known for", "surprised everyone with"]
OBJECTS = [
    "its careful design",
    "the long delays last winter",
    "a remarkably friendly atmosphere that visitors kept mentioning in their reviews",
    "how quickly the repairs were finished after the storm had damaged the roof and the windows",
    "the price",
    "an unexpected decision",
]
CLAUSES = ["", ", according to several people who live nearby", "", " during the busy summer months of last year"]


def sentences(n: int) -> list[str]:
    """n different English sentences of everyday length: 7 to 32 words, 18 on average."""
    out = []
    for i in range(n):
        s, v, o, c = SUBJECTS[i % 8], VERBS[(i // 8) % 4], OBJECTS[(i // 32) % 6], CLAUSES[i % 4]
        out.append(f"{s} {v} {o}{c}.")
    return out


async def server_load(url: str, api: str, texts: list[str], clients: int, per_request: int) -> float:
    """Sentences/s with ``clients`` concurrent clients, each sending ``per_request`` sentences at a time."""
    chunks = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def client_loop(connection: RawHTTPConnection) -> None:
        try:
            while not queue.empty():
                chunk = queue.get_nowait()
                if api == "seed":
                    path, body = "/embedding", {"prompt": chunk}
                else:
                    path, body = "/v1/embeddings", {"input": chunk, "encoding_format": "base64"}
                status, payload = await connection.post_json(path, json.dumps(body).encode())
                if status != 200:
                    raise RuntimeError(f"{path} answered {status}: {payload[:300]!r}")
                if len(json.loads(payload)["data"]) != len(chunk):
                    raise RuntimeError(f"{path} returned the wrong number of vectors")
        finally:
            await connection.close()

    started = time.perf_counter()
    await asyncio.gather(*[client_loop(RawHTTPConnection(url)) for _ in range(clients)])
    return len(texts) / (time.perf_counter() - started)


def build_minilm_cross_encoder(embedding_folder: Path, out_dir: Path) -> Path:
    """all-MiniLM-L6-v2's encoder under a one-label sequence-classification head, saved with its
    tokenizer: a cross-encoder folder of ms-marco-MiniLM-L6-v2's shape."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(str(embedding_folder), num_labels=1, local_files_only=True)
    model.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(embedding_folder), local_files_only=True).save_pretrained(str(out_dir))
    return out_dir


async def server_rerank(url: str, query: str, documents: list[str]) -> float:
    """Pairs/s of one /v1/rerank request of one query against ``documents``."""
    connection = RawHTTPConnection(url)
    try:
        body = json.dumps({"model": "minilm-cross-encoder", "query": query, "documents": documents, "truncate": True})
        started = time.perf_counter()
        status, payload = await connection.post_json("/v1/rerank", body.encode())
        elapsed = time.perf_counter() - started
    finally:
        await connection.close()
    if status != 200 or len(json.loads(payload)["results"]) != len(documents):
        raise RuntimeError(f"/v1/rerank answered {status}: {payload[:300]!r}")
    return len(documents) / elapsed


def predict_limit(cross_encoder, query: str, documents: list[str]) -> float:
    started = time.perf_counter()
    cross_encoder.predict([(query, d) for d in documents], batch_size=32, show_progress_bar=False)
    return len(documents) / (time.perf_counter() - started)


def encode_limit(model, texts: list[str], group: int | None = None) -> float:
    """Sentences/s of in-process encode, batch size 32: over ``group`` sentences at a time in
    order, or (None) over all of them at once, which lets encode sort them all by length."""
    groups = [texts[i : i + group] for i in range(0, len(texts), group)] if group else [texts]
    started = time.perf_counter()
    for part in groups:
        model.encode(part, batch_size=32, convert_to_numpy=True)
    return len(texts) / (time.perf_counter() - started)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (default: start `python api.py --disable-chat` on a free port)")
    p.add_argument("--api", choices=["seed", "openai"], default="seed", help="/embedding or /v1/embeddings")
    p.add_argument("--sentences", type=int, default=512, help="sentences per measurement")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is kept")
    p.add_argument("--rerank-repeats", type=int, default=5,
                   help="paired server/predict runs for the rerank figure; its median is the ratio")
    p.add_argument("--documents", type=int, default=100, help="documents per rerank request")
    p.add_argument("--no-rerank", action="store_true", help="skip the rerank figure")
    p.add_argument("--rerank-only", action="store_true", help="only the rerank figure")
    args = p.parse_args()

    import torch

    from glm_api.families.embedding import load_embedding_model, packaged_embedding_path

    path = packaged_embedding_path()
    loaded = load_embedding_model(path, torch.device("cpu"), torch.float32)
    texts = sentences(args.sentences)
    tokens = [len(ids) for ids in loaded.model.tokenizer(texts)["input_ids"]]
    print(f"model all-MiniLM-L6-v2 ({path}), float32; {machine_line()}", flush=True)
    print(f"{len(texts)} sentences of {min(tokens)} to {max(tokens)} tokens, {sum(tokens) / len(tokens):.1f} on average")
    encode_limit(loaded.model, texts[:64])  # warm up
    loads = [] if args.rerank_only else [("32 clients x 1 sentence", 32, 1), ("4 clients x 32 sentences", 4, 32)]
    rerank_dir = None if args.no_rerank or args.url else Path(tempfile.mkdtemp(prefix="glm-api-bench-ce-"))
    if rerank_dir is not None:
        from sentence_transformers import CrossEncoder

        build_minilm_cross_encoder(path, rerank_dir)
        cross_encoder = CrossEncoder(str(rerank_dir), device="cpu", local_files_only=True)
        query, documents = "Which bakery near the station was praised?", sentences(args.documents)
        predict_limit(cross_encoder, query, documents[:32])  # warm up

    def run(url: str) -> list[list[object]]:
        asyncio.run(server_load(url, args.api, texts[:64], 8, 8))  # warm up
        rows = []
        for label, clients, per_request in loads:
            best, grouped, sorted_all = 0.0, 0.0, 0.0
            for _ in range(args.repeats):
                grouped = max(grouped, encode_limit(loaded.model, texts, group=32))
                sorted_all = max(sorted_all, encode_limit(loaded.model, texts))
                best = max(best, asyncio.run(server_load(url, args.api, texts, clients, per_request)))
            print(f"  {label}: {best:.1f} sentences/s, limits {grouped:.1f} (groups of 32) "
                  f"{sorted_all:.1f} (all sorted)", flush=True)
            rows.append([label, best, grouped, best / grouped, sorted_all, best / sorted_all])
        if rerank_dir is not None:
            asyncio.run(server_rerank(url, query, documents[:32]))  # warm up
            # Each server run sits between two predict runs and is compared with their mean; the
            # median of those paired ratios moves less with a shared machine's swings than best/best.
            best, limit, ratios = 0.0, 0.0, []
            before = predict_limit(cross_encoder, query, documents)
            for _ in range(args.rerank_repeats):
                served = asyncio.run(server_rerank(url, query, documents))
                after = predict_limit(cross_encoder, query, documents)
                ratios.append(served / ((before + after) / 2))
                best, limit, before = max(best, served), max(limit, before, after), after
            ratios.sort()
            median = ratios[len(ratios) // 2]
            label = f"rerank 1 query x {len(documents)} documents"
            print(f"  {label}: {best:.1f} pairs/s, CrossEncoder.predict {limit:.1f}; paired ratios "
                  + " ".join(f"{r:.2f}" for r in ratios), flush=True)
            rows.append([label + " (ratio: median of paired runs)", best, limit, median, "", ""])
        return rows

    if args.url:
        rows = run(args.url)
    else:
        extra = ["--rerank-model", f"minilm-cross-encoder={rerank_dir}"] if rerank_dir is not None else []
        command = glm_api_command(["--disable-chat", "--log-level", "warning", *extra])
        with running_server(command, ready_path="/ready", log_name="glm-api-bench-emb") as server:
            rows = run(server.url)
    print()
    print(f"{args.sentences} sentences per figure, best of {args.repeats}; limits: in-process encode, batch 32"
          + ("; rerank: pairs/s against in-process CrossEncoder.predict, batch 32" if rerank_dir is not None else ""))
    headers = ["load", "glm-api per s", "limit: encode groups of 32 (rerank: predict)", "ratio"]
    headers += ["encode, all sorted", "ratio"]
    print_table(headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
