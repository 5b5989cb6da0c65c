"""Speed measurement: the figures `pygemma4 bench` prints.

- `stats`: summaries of repeated measurements (mean ± standard deviation, percentiles);
- `tokens`: the token ids benchmarks feed (BOS, then seeded random ids);
- `runners`: one engine (pygemma4, or llama.cpp through llama-cpp-python) loading a GGUF and
  timing prefill and decode on given tokens;
- `isolation`: a runner in a process of its own, so each engine's load time and peak memory
  are its own while the runs of two engines interleave;
- `schedule`: whether two engines' runs interleave, or (where both engines' memory does not
  fit in the machine together) run one engine after the other;
- `model_bench`: the llama-bench-style measurement of one or two engines on a model file;
- `load`: a load of concurrent requests against a running server (time to first token,
  inter-token latency, throughput);
- `server_process`: a `pygemma4 serve` of the benchmark's own, started and stopped with it;
- `report`: the tables on the terminal and the JSON files.
"""
