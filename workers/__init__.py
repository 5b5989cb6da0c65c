"""The processes of `pygemma4 serve`, one module each (installed as `pygemma4.workers`).

- `server`: sets up what one `pygemma4 serve` holds (the shared KV pool, the workers'
  configuration and endpoints) and removes it again.
- `frontend`: the router of the process `pygemma4 serve` runs: it binds the clients' endpoint,
  tracks every request in flight and reacts to the workers the `supervisor` watches.
- `tokenizer`: renders chat, tokenizes prompts, detokenizes the tokens that come back and cuts
  stop strings.
- `decode`: owns the KV pool; schedules requests and decodes every running sequence together
  each step (continuous batching).
- `prefill`: computes prompts straight into the KV blocks the decode worker hands it.

They talk over ZeroMQ with the messages of `pygemma4.protocol`, each process's inbox taking
only its own; `runtime` holds what they share (configuration, sockets, the shared KV pool,
process life).
"""
