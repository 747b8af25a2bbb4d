"""raypress.engine: generation on a loaded model (continuous batching, the KV cache, runners, sampling, output).
Knows nothing of Ray or HTTP; serve/ and jobs/ use it through ``engine.interface.EngineClient``."""
